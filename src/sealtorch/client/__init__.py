"""Clients of key sources: attested key release inside an enclave, and the key server's admin API.

* :mod:`sealtorch.client.release` - :class:`KeyReleaseClient`, the enclave side of the key
  release protocol (against a key server or a key cache), a :class:`~sealtorch.keys.KeyProvider`.
* :mod:`sealtorch.client.admin` - :class:`AdminClient` (``sealtorch admin ...``) and
  :class:`KeyServerWrapper` (``sealtorch encrypt --keyserver``: the server wraps the content key).
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
