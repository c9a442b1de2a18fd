"""ResNet-50 (random weights) sealed without a declared interface, served over real HTTP:
inferred metadata and outputs bit-identical to plain PyTorch at several input sizes."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch
import torchvision
from serving_helpers import by_name, output_tensor, running_server, tensor_input

import sealtorch
from sealtorch.keys import generate_key
from sealtorch.serving.server import SealedModelSource, ServerSettings

pytestmark = pytest.mark.slow


def test_resnet50_outputs_are_bit_identical_over_http(tmp_path: Path) -> None:
    torch.manual_seed(50)
    plain = torchvision.models.resnet50(weights=None).eval()
    key = generate_key()
    path = tmp_path / "resnet50.sealed"
    sealtorch.encrypt_model(
        plain.state_dict(), path, model_id="resnet50", key=key, arch="torchvision:resnet50"
    )
    source = SealedModelSource(path, key=key)
    with (
        running_server([source], ServerSettings(port=0)) as server,
        httpx.Client(base_url=str(server.url), timeout=300) as client,
    ):
        metadata = client.get("/v2/models/resnet50").json()
        assert metadata["inputs"] == [
            {"name": "input", "datatype": "FP32", "shape": [-1, 3, -1, -1]}
        ]
        assert metadata["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 1000]}]
        for shape in ((2, 3, 224, 224), (1, 3, 160, 192)):
            x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
            response = client.post(
                "/v2/models/resnet50/infer", json={"inputs": [tensor_input("input", x)]}
            )
            assert response.status_code == 200, response.text
            served = output_tensor(by_name(response.json())["output"])
            with torch.inference_mode():
                expected = plain(x)
            assert torch.equal(served, expected), shape
