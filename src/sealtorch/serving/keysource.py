"""Where ``sealtorch serve`` gets model keys: ``--keys URL`` (attested) or ``--key-file``.

``--keys`` names a key cache or key server speaking the key release protocol:

* ``unix:///run/sealtorch/keycache.sock`` — a key cache on this host (a TDX guest, or
  processes outside an enclave; Gramine cannot share a Unix socket between two enclaves, so
  Gramine deployments use a loopback URL);
* ``https://HOST:PORT`` — a key server, or a key cache listening on TCP.

Either way a key is accepted only with the key server's release statement, signed by a key
pinned with ``--keyserver-pubkey`` (:class:`~sealtorch.protocol.TrustedReleaseKeys`): the host
can answer on any socket or port, so the URL alone proves nothing.

Several ``--keys`` (repeated, or one comma list) name replicas: a connection failure or a 503
moves to the next at once (:class:`~sealtorch.client.KeyReleaseClient`). At start ``serve``
waits for its key source — a key cache or key server that is not up yet — retrying with
jittered backoff for up to ``--keys-wait`` seconds (default :data:`DEFAULT_KEYS_WAIT`), each
retry logged at WARNING; then it gives up with one line.

:func:`resolve_key_source` is the one place that turns the URL and the TEE name into a
:class:`~sealtorch.keys.KeyProvider`; :func:`dev_key_file` is the unattested development
path, which logs a loud warning.
"""

from __future__ import annotations

import logging
import os
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from sealtorch.errors import ConfigError
from sealtorch.keys import KeyFile, KeyProvider

if TYPE_CHECKING:
    from sealtorch.client import KeyReleaseClient

__all__ = [
    "DEFAULT_KEYS_WAIT",
    "TEE_NAMES",
    "KeyEndpoint",
    "dev_key_file",
    "parse_keys_url",
    "resolve_key_source",
]

_log = logging.getLogger(__name__)

TEE_NAMES: Final = ("sim", "gramine", "tdx", "snp")
#: Seconds ``serve`` waits for its key source at start (``--keys-wait``).
DEFAULT_KEYS_WAIT: Final = 60.0

DEV_KEY_WARNING: Final = (
    "--key-file: the model key is read from a file and NO ATTESTATION takes place. Anyone who "
    "can read that file can decrypt the model, and nothing proves what code runs here. Use this "
    "for development only; in production use --keys with a key cache or key server."
)


@dataclass(frozen=True)
class KeyEndpoint:
    """A parsed ``--keys`` URL."""

    scheme: str  # "unix" or "https"
    path: Path | None = None  # unix
    host: str | None = None  # https
    port: int | None = None  # https

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix://{self.path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"https://{host}:{self.port}"


def parse_keys_url(url: str) -> KeyEndpoint:
    """Validate a ``--keys`` URL (``unix:///ABSOLUTE/PATH`` or ``https://HOST[:PORT]``)."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.query or parsed.fragment:
        raise ConfigError(f"--keys {url!r}: a key source URL has no query or fragment")
    if parsed.scheme == "unix":
        if parsed.netloc or not parsed.path.startswith("/"):
            raise ConfigError(
                f"--keys {url!r}: write a Unix socket as unix:///ABSOLUTE/PATH "
                "(three slashes), e.g. unix:///run/sealtorch/keycache.sock"
            )
        return KeyEndpoint(scheme="unix", path=Path(parsed.path))
    if parsed.scheme == "https":
        if not parsed.hostname:
            raise ConfigError(f"--keys {url!r}: the URL names no host")
        if parsed.username or parsed.password:
            raise ConfigError(f"--keys {url!r}: credentials do not belong in the URL")
        if parsed.path not in ("", "/"):
            raise ConfigError(f"--keys {url!r}: give only https://HOST:PORT, no path")
        try:
            port = parsed.port or 443
        except ValueError as exc:
            raise ConfigError(f"--keys {url!r}: the port is not a number in 1..65535") from exc
        return KeyEndpoint(scheme="https", host=parsed.hostname, port=port)
    if parsed.scheme == "http":
        raise ConfigError(
            f"--keys {url!r}: plain http is refused; the key server and key cache speak https "
            "(or use a unix:// socket on this host)"
        )
    raise ConfigError(
        f"--keys {url!r}: use unix:///PATH (a local key cache) or https://HOST:PORT "
        "(a key server or key cache)"
    )


def resolve_key_source(
    url: str | Sequence[str],
    *,
    tee: str | None,
    ca: str | os.PathLike[str] | None = None,
    tee_root: str | os.PathLike[str] | None = None,
    sim_key: str | os.PathLike[str] | None = None,
    hpke_suite: str | None = None,
    keyserver_pubkeys: Sequence[str] = (),
    wait: float | None = DEFAULT_KEYS_WAIT,
) -> KeyReleaseClient:
    """The attested key provider for ``--keys URL`` running in TEE ``tee``.

    ``ca`` is the CA certificate to trust for ``https://`` (default: the system store);
    ``tee_root`` overrides the gramine/tdx/snp device directory (tests); ``sim_key`` is the
    simulated TEE's attestation key file. The inference server attests as role ``serve``.
    ``keyserver_pubkeys`` are the key server release-signing keys it pins (at least one).
    ``url`` may name several key sources (a sequence or commas: failover in order); ``wait``
    is how long to keep retrying when none answers (seconds; ``None``: the client's rounds).
    """
    from sealtorch.attestation import attester_for
    from sealtorch.client import KeyReleaseClient
    from sealtorch.client._http import split_urls
    from sealtorch.protocol import DEFAULT_HPKE_SUITE, TrustedReleaseKeys

    endpoints = [parse_keys_url(one) for one in split_urls(url)]
    if tee is None:
        raise ConfigError(
            "--keys needs --tee (sim, gramine, tdx or snp): the TEE whose evidence proves this "
            "server to the key cache or key server"
        )
    if tee not in TEE_NAMES:
        raise ConfigError(f"unknown TEE {tee!r}; choose one of {', '.join(TEE_NAMES)}")
    if ca is not None and all(endpoint.scheme != "https" for endpoint in endpoints):
        raise ConfigError("--keys-ca applies to an https:// key source, not a Unix socket")
    if sim_key is not None and tee != "sim":
        raise ConfigError("--sim-key applies to --tee sim only")
    if tee_root is not None and tee == "sim":
        raise ConfigError("--tee-root applies to --tee gramine, tdx or snp")
    if not keyserver_pubkeys:
        raise ConfigError(
            "--keys needs --keyserver-pubkey KEY: the key server's release-signing public key, "
            "which proves that a released key comes from your key server (through a key cache "
            "or not); `sealtorch keyserver signing-key show DATA_DIR` prints it"
        )
    trusted = TrustedReleaseKeys(keyserver_pubkeys)
    if tee == "sim":
        attester = attester_for("sim", role="serve", key_path=sim_key)
    else:
        attester = attester_for(tee, root=tee_root)
    if wait is not None and wait < 0:
        raise ConfigError(f"--keys-wait must be 0 or more seconds, not {wait}")
    return KeyReleaseClient(
        [str(endpoint) for endpoint in endpoints],
        attester=attester,
        ca=ca,
        suite=hpke_suite or DEFAULT_HPKE_SUITE,
        trusted_release_keys=trusted,
        wait=wait,
    )


def dev_key_file(path: str | os.PathLike[str]) -> KeyProvider:
    """The unattested development key source, announced by a loud warning in the log."""
    provider = KeyFile(path)
    _log.warning(DEV_KEY_WARNING)
    return provider
