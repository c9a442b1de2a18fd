"""The key cache (dkeycache): attested, leased key distribution on a TEE host.

It attests to the key server, fetches every model key its host may hold, keeps them only in
memory (optionally sealed to the enclave across restarts), renews their leases before they
end, and serves the key release protocol to local enclaves over a Unix socket — enforcing on
them the policy that came with each key. See ``docs/keycache.md``.

Programmatic use (tests, embedding)::

    from sealtorch.keycache import build_cache, load_settings

    cache, service = build_cache(load_settings("keycache.toml"))
    cache.start()  # restore, attest, fetch
    app = KeyCacheApp(cache, service)  # an ASGI app serving the protocol
"""

from __future__ import annotations

from sealtorch.keycache.app import STATUS_PATH, KeyCacheApp
from sealtorch.keycache.cache import KeyCache
from sealtorch.keycache.holdings import HeldKey, Holdings
from sealtorch.keycache.persist import PlatformSealer, SealedState, StateRefused
from sealtorch.keycache.server import build_cache, run
from sealtorch.keycache.service import CACHE_REASON_CODES, LocalError, LocalReleaseService
from sealtorch.keycache.settings import KeyCacheSettings, load_settings
from sealtorch.keycache.status import CacheStatus
from sealtorch.keycache.upstream import Upstream

__all__ = [
    "CACHE_REASON_CODES",
    "STATUS_PATH",
    "CacheStatus",
    "HeldKey",
    "Holdings",
    "KeyCache",
    "KeyCacheApp",
    "KeyCacheSettings",
    "LocalError",
    "LocalReleaseService",
    "PlatformSealer",
    "SealedState",
    "StateRefused",
    "Upstream",
    "build_cache",
    "load_settings",
    "run",
]
