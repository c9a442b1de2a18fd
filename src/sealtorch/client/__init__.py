"""Clients of the key server: attested key release (inside an enclave) and administration.

:class:`KeyReleaseClient` runs the key release protocol (``docs/protocol.md``) from inside a
TEE — challenge → evidence → release → HPKE open — against a key server over HTTPS or a key
cache over a Unix socket (``unix:///run/sealtorch/keycache.sock``); both speak the same
protocol. It is a :class:`~sealtorch.keys.KeyProvider`, so it plugs into loading::

    from sealtorch.attestation import attester_for
    from sealtorch.client import KeyReleaseClient

    with KeyReleaseClient(
        "https://keys.example.com:8443", attester=attester_for("gramine"), ca="ca.crt"
    ) as client:
        model = sealtorch.load_model("resnet50.sealed", key=client)

Every granted key is checked before it is returned: its HPKE ``info`` (model, version, request
id, nonce, policy digest, lease) must open, and the policy that came with it must hash to the
digest bound into it; anything else is a :class:`~sealtorch.errors.ProtocolError`. Denials raise
:class:`~sealtorch.errors.KeyReleaseError` with the server's reason codes. Connection errors are
retried with jittered exponential backoff (a fresh challenge each time); denials never are.

:class:`AdminClient` is the admin API (``sealtorch admin ...``), and :class:`KeyServerWrapper`
seals files with a content key wrapped *by the key server* (``sealtorch encrypt --keyserver``):
the data key never leaves the server.
"""

from sealtorch.client.admin import AdminClient, AdminError, KeyServerWrapper, read_token
from sealtorch.client.release import (
    Challenge,
    Denial,
    KeyReleaseClient,
    ReleasedKey,
    ReleaseResult,
    Session,
)

__all__ = [
    "AdminClient",
    "AdminError",
    "Challenge",
    "Denial",
    "KeyReleaseClient",
    "KeyServerWrapper",
    "ReleaseResult",
    "ReleasedKey",
    "Session",
    "read_token",
]
