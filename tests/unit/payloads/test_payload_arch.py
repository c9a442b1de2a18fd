from __future__ import annotations

import pytest
import torch
from arch_factories import WithDerivedBuffer, tiny_mlp

from sealtorch.errors import ConfigError, PayloadError
from sealtorch.payloads.arch import build_module, check_state_dict_matches, load_into_module


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
        build_module(ref, {}, device="meta")


def test_kwargs_may_not_override_fixed_arguments() -> None:
    with pytest.raises(ConfigError, match="weights"):
        build_module("torchvision:resnet18", {"weights": "IMAGENET1K_V1"})
    with pytest.raises(ConfigError, match="pretrained"):
        build_module("timm:efficientnet_lite0", {"pretrained": True})


def test_bad_kwargs_are_payload_errors() -> None:
    with pytest.raises(PayloadError, match="TypeError"):
        build_module("arch_factories:tiny_mlp", {"no_such_argument": 1})


def test_mismatch_lists_missing_unexpected_and_wrong_shapes() -> None:
    sd = tiny_mlp().state_dict()
    sd["extra"] = torch.ones(1)
    del sd["0.bias"]
    sd["2.weight"] = torch.ones(5, 5)
    with pytest.raises(PayloadError) as info:
        check_state_dict_matches("arch_factories:tiny_mlp", {}, sd)
    text = str(info.value)
    assert "missing: 0.bias" in text
    assert "unexpected: extra" in text
    assert "wrong shape/dtype: 2.weight" in text


def test_load_into_module_uses_the_given_tensors_and_freezes() -> None:
    reference = tiny_mlp(width=6, classes=2)
    sd = {k: v.clone() for k, v in reference.state_dict().items()}
    module = load_into_module("arch_factories:tiny_mlp", {"width": 6, "classes": 2}, sd)
    assert not module.training
    assert all(not p.requires_grad for p in module.parameters())
    assert module.state_dict()["0.weight"].data_ptr() == sd["0.weight"].data_ptr()
    x = torch.randn(3, 6)
    assert torch.equal(module(x), reference.eval()(x))


def test_module_keeping_meta_tensors_is_rebuilt_on_cpu() -> None:
    reference = WithDerivedBuffer(4)
    sd = {k: v.clone() for k, v in reference.state_dict().items()}
    module = load_into_module("arch_factories:derived", {"width": 4}, sd)
    assert not any(t.is_meta for t in (*module.parameters(), *module.buffers()))
    x = torch.randn(2, 4)
    assert torch.equal(module(x), reference(x))
