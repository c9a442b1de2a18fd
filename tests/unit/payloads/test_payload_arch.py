from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from arch_factories import WithDerivedBuffer, tiny_mlp

from sealtorch.errors import ConfigError, PayloadError
from sealtorch.payloads.arch import (
    build_module,
    check_allowed_archs,
    check_arch_kwargs,
    check_state_dict_matches,
    load_into_module,
)

MLP = "arch_factories:tiny_mlp"


def test_torchvision_and_timm_build_on_meta_without_memory() -> None:
    resnet = build_module("torchvision:resnet18", {"num_classes": 7}, device="meta")
    assert next(resnet.parameters()).is_meta
    assert resnet.fc.out_features == 7
    effnet = build_module("timm:efficientnet_lite0", {}, device="meta")
    assert next(effnet.parameters()).is_meta


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("torchvision:no_such_net", "torchvision has no model"),
        ("timm:no_such_net", "timm has no model"),
        ("no_such_package.models:build", "cannot import"),
        ("arch_factories:missing", "has no callable"),
        ("arch_factories:not_a_module", "not a torch.nn.Module"),
        ("arch_factories:broken", "building arch_factories:broken failed"),
    ],
)
def test_bad_references(ref: str, message: str) -> None:
    with pytest.raises(PayloadError, match=message):
        build_module(ref, {}, device="meta", allowed_archs=[ref])


def test_kwargs_may_not_override_fixed_arguments() -> None:
    with pytest.raises(ConfigError, match="weights"):
        build_module("torchvision:resnet18", {"weights": "IMAGENET1K_V1"})
    with pytest.raises(ConfigError, match="pretrained"):
        build_module("timm:efficientnet_lite0", {"pretrained": True})


def test_bad_kwargs_are_payload_errors() -> None:
    with pytest.raises(PayloadError, match="TypeError"):
        build_module("arch_factories:tiny_mlp", {"no_such_argument": 1}, allowed_archs=[MLP])


def test_mismatch_lists_missing_unexpected_and_wrong_shapes() -> None:
    sd = tiny_mlp().state_dict()
    sd["extra"] = torch.ones(1)
    del sd["0.bias"]
    sd["2.weight"] = torch.ones(5, 5)
    with pytest.raises(PayloadError) as info:
        check_state_dict_matches(MLP, {}, sd, allowed_archs=[MLP])
    text = str(info.value)
    assert "missing: 0.bias" in text
    assert "unexpected: extra" in text
    assert "wrong shape/dtype: 2.weight" in text


def test_load_into_module_uses_the_given_tensors_and_freezes() -> None:
    reference = tiny_mlp(width=6, classes=2)
    sd = {k: v.clone() for k, v in reference.state_dict().items()}
    module = load_into_module(MLP, {"width": 6, "classes": 2}, sd, allowed_archs=[MLP])
    assert not module.training
    assert all(not p.requires_grad for p in module.parameters())
    assert module.state_dict()["0.weight"].data_ptr() == sd["0.weight"].data_ptr()
    x = torch.randn(3, 6)
    assert torch.equal(module(x), reference.eval()(x))


def test_module_keeping_meta_tensors_is_rebuilt_on_cpu() -> None:
    reference = WithDerivedBuffer(4)
    sd = {k: v.clone() for k, v in reference.state_dict().items()}
    ref = "arch_factories:derived"
    module = load_into_module(ref, {"width": 4}, sd, allowed_archs=[ref])
    assert not any(t.is_meta for t in (*module.parameters(), *module.buffers()))
    x = torch.randn(2, 4)
    assert torch.equal(module(x), reference(x))


# -- the attacker's side: a reference read from a sealed file is data ------------------------------

MARKER_MODULE = "marker_module"
MARKER_FACTORY = "marker_module:build"


@pytest.fixture
def marker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Created if hostile code runs; marker_module (importable here) writes it on import."""
    path = tmp_path / "marker"
    monkeypatch.setenv("SEALTORCH_TEST_MARKER", str(path))
    sys.modules.pop(MARKER_MODULE, None)
    yield path
    assert not path.exists(), f"code named by the sealed file ran: {path.read_text()}"
    assert MARKER_MODULE not in sys.modules


@pytest.mark.parametrize(
    ("ref", "kwargs"),
    [
        ("os:system", {"command": "touch {marker}"}),
        ("subprocess:run", {"args": ["touch", "{marker}"]}),
        ("builtins:exec", {"source": "open('{marker}', 'w')"}),
        ("marker_module:build", {}),
        ("importlib:import_module", {"name": "marker_module"}),
    ],
)
def test_references_not_allowed_are_refused_before_any_import(
    ref: str, kwargs: dict[str, object], marker: Path
) -> None:
    given = json.loads(json.dumps(kwargs).replace("{marker}", str(marker)))
    for allowed in ([], [MLP]):
        with pytest.raises(PayloadError, match=f"is not allowed.*--allow-arch {ref}"):
            build_module(ref, given, device="meta", allowed_archs=allowed)
        with pytest.raises(PayloadError, match="is not allowed"):
            load_into_module(ref, given, {}, allowed_archs=allowed)


def test_an_allowed_factory_is_built(marker: Path) -> None:
    """The positive control: listing marker_module:build does run it."""
    try:
        build_module(MARKER_FACTORY, {}, device="meta", allowed_archs=[MARKER_FACTORY])
        assert marker.read_text() == "called"
    finally:
        marker.unlink(missing_ok=True)
        sys.modules.pop(MARKER_MODULE, None)


def test_allow_lists_take_factories_only() -> None:
    assert check_allowed_archs(["pkg.models:build", MLP]) == {"pkg.models:build", MLP}
    with pytest.raises(ConfigError, match="always allowed"):
        check_allowed_archs(["torchvision:resnet18"])
    with pytest.raises(ConfigError, match="invalid architecture reference"):
        check_allowed_archs(["os.system"])


@pytest.mark.parametrize(
    ("ref", "kwargs"),
    [
        ("torchvision:fasterrcnn_resnet50_fpn", {"weights_backbone": "IMAGENET1K_V1"}),
        ("torchvision:fasterrcnn_resnet50_fpn", {"pretrained_backbone": True}),
        ("torchvision:resnet18", {"progress": False}),
        ("timm:resnet18", {"checkpoint_path": "/etc/passwd"}),
        ("timm:resnet18", {"pretrained_cfg": {"hf_hub_id": "someone/else"}}),
        ("timm:resnet18", {"pretrained_cfg_overlay": {"file": "/tmp/evil.pth"}}),
        ("timm:resnet18", {"cache_dir": "/tmp"}),
        ("timm:resnet18", {"pretrained_strict": False}),
    ],
)
def test_hub_kwargs_that_load_weights_or_configuration_are_refused(
    ref: str, kwargs: dict[str, object]
) -> None:
    with pytest.raises(ConfigError, match="read or download weights"):
        build_module(ref, kwargs, device="meta")
    with pytest.raises(ConfigError, match="read or download weights"):
        check_arch_kwargs(ref, kwargs)


def test_timm_layer_names_are_looked_up_not_imported(marker: Path) -> None:
    """timm resolves act_layer/norm_layer strings through its own tables: a module path is an
    unknown name (KeyError), not an import; a builder's AssertionError is a PayloadError."""
    with pytest.raises(PayloadError, match=r"KeyError: 'marker_module\.build'"):
        build_module("timm:resnet18", {"act_layer": "marker_module.build"}, device="meta")
    with pytest.raises(PayloadError, match="AssertionError"):
        build_module("timm:convnext_atto", {"norm_layer": 5}, device="meta")
    gelu = build_module("timm:resnet18", {"act_layer": "gelu"}, device="meta")
    assert "GELU" in {type(m).__name__ for m in gelu.modules()}  # timm's own GELU layer
