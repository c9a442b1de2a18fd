"""``sealtorch.load_model(sealed_file, key=KeyReleaseClient("unix:///..."))`` through a key cache:
the inference side cannot tell a cache from a key server."""

from __future__ import annotations

from pathlib import Path

import pytest
from keycache_helpers import Attesters, KeyServerControl, cache_settings, running_cache

from _fixtures.clock import FakeClock
from sealtorch.errors import KeyReleaseError
from sealtorch.keys import generate_key

torch = pytest.importorskip("torch")


def test_load_model_through_the_cache(
    tmp_path: Path, keyserver: KeyServerControl, attesters: Attesters, clock: FakeClock
) -> None:
    import sealtorch

    dek = generate_key()
    with keyserver.server.admin() as admin:
        admin.create_model("tiny", key=dek)
        admin.set_policy("tiny", attesters.policy())
    torch.manual_seed(0)
    reference = torch.nn.Linear(8, 3)
    sealed = tmp_path / "tiny.sealed"
    sealtorch.encrypt_model(
        reference.state_dict(),
        sealed,
        model_id="tiny",
        key=dek,
        arch="torch.nn:Linear",
        arch_kwargs={"in_features": 8, "out_features": 3},
    )
    with running_cache(
        cache_settings(tmp_path, attesters, keyserver), clock=clock, attester=attesters.cache
    ) as cache:
        keyserver.stop()  # the cache alone releases the key now
        with cache.client(attesters.app) as client:
            model = sealtorch.load_model(sealed, key=client, allowed_archs=["torch.nn:Linear"])
        x = torch.randn(4, 8)
        assert torch.equal(model(x), reference(x))
        with (
            cache.client(attesters.serve) as outsider,
            pytest.raises(KeyReleaseError) as caught,
        ):
            sealtorch.load_model(sealed, key=outsider)
        assert "measurement_mismatch" in caught.value.reasons
