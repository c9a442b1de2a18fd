"""ServedModel: interface declaration and inference, warm-up, classification, refusals."""

from __future__ import annotations

import base64
import io
import json
from typing import Any, NamedTuple

import pytest
import torch
from PIL import Image
from torch import nn

from sealtorch.errors import ConfigError, PayloadError
from sealtorch.payloads.manifest import ImagePreprocessSpec, TensorSpec
from sealtorch.serving.codec import infer, model_metadata
from sealtorch.serving.errors import RequestError
from sealtorch.serving.model import ServedModel, check_model_name
from sealtorch.serving.protocol import parse_inference_request

SMALL_IMAGES = ImagePreprocessSpec(resize=20, crop=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def _request(document: dict[str, Any]) -> Any:
    return parse_inference_request(json.dumps(document).encode())


def _tensor(name: str, tensor: torch.Tensor, datatype: str = "FP32") -> dict[str, Any]:
    return {
        "name": name,
        "datatype": datatype,
        "shape": list(tensor.shape),
        "data": tensor.reshape(-1).tolist(),
    }


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


class SmallConvNet(nn.Module):
    def __init__(self, channels: int = 3, classes: int = 5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 4, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.conv(x)).flatten(1))


# -- interface inference -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "inputs", "outputs"),
    [
        (nn.Linear(6, 2), [("input", "FP32", [-1, 6])], [("output", "FP32", [-1, 2])]),
        (SmallConvNet(), [("input", "FP32", [-1, 3, -1, -1])], [("output", "FP32", [-1, 5])]),
        (nn.Conv1d(2, 3, 5), [("input", "FP32", [-1, 2, -1])], [("output", "FP32", [-1, 3, 220])]),
        (nn.Embedding(300, 4), [("input", "INT64", [-1, -1])], [("output", "FP32", [-1, 224, 4])]),
    ],
)
def test_inputs_are_inferred_from_the_first_layer(
    module: nn.Module, inputs: list[Any], outputs: list[Any]
) -> None:
    model = ServedModel.build(module, name="m", sealed=False)
    metadata = model_metadata(model)
    assert [(i["name"], i["datatype"], i["shape"]) for i in metadata["inputs"]] == inputs
    assert [(o["name"], o["datatype"], o["shape"]) for o in metadata["outputs"]] == outputs
    assert metadata["platform"] == "pytorch"


def test_a_timm_style_input_size_wins_over_the_first_layer() -> None:
    module = SmallConvNet()
    module.pretrained_cfg = {"input_size": (3, 32, 40)}  # type: ignore[assignment]
    model = ServedModel.build(module, name="m", sealed=False)
    assert model_metadata(model)["inputs"] == [
        {"name": "input", "datatype": "FP32", "shape": [-1, 3, 32, 40]}
    ]


def test_a_model_without_recognisable_input_must_declare_it() -> None:
    with pytest.raises(PayloadError, match="declare its inputs when sealing"):
        ServedModel.build(nn.ReLU(), name="m", sealed=False)


class Pair(NamedTuple):
    scores: torch.Tensor
    count: torch.Tensor


class ManyOutputs(nn.Module):
    def forward(self, x: torch.Tensor) -> Any:
        return Pair(scores=x * 2, count=torch.tensor([x.shape[0]]))


def test_output_names_shapes_and_batch_dimension() -> None:
    model = ServedModel.build(
        ManyOutputs(),
        name="m",
        inputs=[TensorSpec(name="x", datatype="FP16", shape=(-1, 2))],
        sealed=False,
    )
    assert model_metadata(model)["outputs"] == [
        {"name": "scores", "datatype": "FP16", "shape": [-1, 2]},
        {"name": "count", "datatype": "INT64", "shape": [1]},  # not batch-dependent
    ]


class Bad(nn.Module):
    def forward(self, x: torch.Tensor) -> Any:
        return "not a tensor"


def test_unservable_outputs_fail_at_load() -> None:
    with pytest.raises(PayloadError, match="returns a str"):
        ServedModel.build(Bad(), name="m", inputs=[TensorSpec("x", "FP32", (1,))], sealed=False)


def test_a_model_that_fails_its_warm_up_does_not_load_and_says_why_without_internals() -> None:
    with pytest.raises(PayloadError, match="failed its warm-up inference") as info:
        ServedModel.build(
            nn.Linear(6, 2),
            name="m",
            inputs=[TensorSpec(name="x", datatype="FP32", shape=(-1, 5))],
            sealed=False,
        )
    message = str(info.value)
    assert "FP32 [1, 5]" in message
    assert "mat1" not in message
    assert "6" not in message  # the layer's private width


@pytest.mark.parametrize(
    ("outputs", "message"),
    [
        (
            [TensorSpec("a", "FP32", (-1, 2)), TensorSpec("b", "FP32", (-1, 2))],
            "declares 2 outputs",
        ),
        ([TensorSpec("a", "FP16", (-1, 2))], "as FP16"),
        ([TensorSpec("a", "FP32", (-1,))], "as FP32 [-1]"),
    ],
)
def test_declared_outputs_are_checked_against_the_warm_up(
    outputs: list[TensorSpec], message: str
) -> None:
    with pytest.raises(PayloadError, match=message.replace("[", r"\[")):
        ServedModel.build(nn.Linear(6, 2), name="m", outputs=outputs, sealed=False)


def test_labels_must_fit_an_output() -> None:
    with pytest.raises(PayloadError, match="3 labels but no output"):
        ServedModel.build(nn.Linear(6, 2), name="m", labels=["a", "b", "c"], sealed=False)


# -- inference ---------------------------------------------------------------------------------


class Private(nn.Module):
    """Works at the warm-up width (224) only; its error messages would reveal its weights."""

    def __init__(self) -> None:
        super().__init__()
        self.secret = nn.Linear(224, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.secret(x)


def test_model_errors_become_400_without_the_model_s_message() -> None:
    model = ServedModel.build(
        Private(),
        name="m",
        inputs=[TensorSpec(name="x", datatype="FP32", shape=(-1, -1))],
        outputs=[TensorSpec(name="y", datatype="FP32", shape=(-1, 7))],
        sealed=False,
    )
    with pytest.raises(RequestError, match="could not run on this input") as info:
        infer(model, _request({"inputs": [_tensor("x", torch.zeros(1, 5))]}))
    assert info.value.status_code == 400
    assert "mat1" not in str(info.value)
    assert "224" not in str(info.value)
    assert isinstance(info.value.__cause__, RuntimeError)  # kept for debugging, never sent


def test_classification_is_stable_clamped_and_labelled() -> None:
    class Fixed(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tensor([[1.0, 3.0, 3.0, 0.5]]).expand(x.shape[0], 4) + x.sum() * 0

    model = ServedModel.build(
        Fixed(),
        name="m",
        inputs=[TensorSpec("x", "FP32", (-1, 1))],
        labels=["a", "b:c", "d", "e"],
        sealed=False,
    )
    result = infer(
        model,
        _request(
            {
                "inputs": [_tensor("x", torch.zeros(2, 1))],
                "outputs": [{"name": "output", "parameters": {"classification": 9}}],
            }
        ),
    )
    (output,) = result.document["outputs"]
    assert output["shape"] == [2, 4]  # clamped to the number of classes
    assert output["data"][:4] == ["3.0:1:b:c", "3.0:2:d", "1.0:0:a", "0.5:3:e"]  # ties: index order


def test_integer_outputs_classify_as_integers_and_rank_3_is_refused() -> None:
    class Ints(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x.to(torch.int32) * 3, x.reshape(1, 1, -1)

    model = ServedModel.build(
        Ints(), name="m", inputs=[TensorSpec("x", "FP32", (3,))], sealed=False
    )
    request = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [3], "data": [1, 5, 2]}]}
    result = infer(
        model,
        _request(
            {**request, "outputs": [{"name": "output_0", "parameters": {"classification": 2}}]}
        ),
    )
    assert result.document["outputs"][0]["data"] == ["15:1", "6:2"]
    assert result.document["outputs"][0]["shape"] == [2]
    with pytest.raises(RequestError, match="classification needs"):
        infer(
            model,
            _request(
                {**request, "outputs": [{"name": "output_1", "parameters": {"classification": 1}}]}
            ),
        )


def test_a_model_s_own_probabilities_output_is_kept() -> None:
    class Own(nn.Module):
        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"logits": x, "probabilities": x.sigmoid()}

    model = ServedModel.build(
        Own(), name="m", inputs=[TensorSpec("x", "FP32", (-1, 2))], labels=["a", "b"], sealed=False
    )
    assert [o.name for o in model.outputs] == ["logits", "probabilities"]
    assert not model.derived_probabilities


# -- image models ------------------------------------------------------------------------------


def test_image_models_take_tensors_or_encoded_images() -> None:
    model = ServedModel.build(SmallConvNet(), name="img", preprocess=SMALL_IMAGES, sealed=False)
    assert model_metadata(model)["inputs"] == [
        {"name": "input", "datatype": "FP32", "shape": [-1, 3, 16, 16]},
        {"name": "image", "datatype": "BYTES", "shape": [-1]},
    ]
    image = {
        "name": "image",
        "datatype": "BYTES",
        "shape": [1],
        "data": [base64.b64encode(_png(30, 20)).decode()],
    }
    result = infer(model, _request({"inputs": [image]}))
    assert result.document["outputs"][0]["shape"] == [1, 5]


def test_an_image_only_model_declares_one_bytes_input() -> None:
    model = ServedModel.build(
        SmallConvNet(),
        name="img",
        inputs=[TensorSpec("jpeg", "BYTES", (-1,))],
        preprocess=SMALL_IMAGES,
        sealed=False,
    )
    assert model_metadata(model)["inputs"] == [{"name": "jpeg", "datatype": "BYTES", "shape": [-1]}]
    with pytest.raises(RequestError, match="has no input 'input'"):
        infer(model, _request({"inputs": [_tensor("input", torch.zeros(1, 3, 16, 16))]}))


def test_image_input_name_does_not_clash() -> None:
    model = ServedModel.build(
        SmallConvNet(),
        name="img",
        inputs=[TensorSpec("image", "FP32", (-1, 3, 16, 16))],
        preprocess=SMALL_IMAGES,
        sealed=False,
    )
    assert model.image_input is not None
    assert model.image_input.name == "image_bytes"


@pytest.mark.parametrize(
    ("inputs", "preprocess", "message"),
    [
        ([TensorSpec("b", "BYTES", (-1,))], None, "only as encoded images"),
        (
            [TensorSpec("b", "BYTES", (-1,)), TensorSpec("x", "FP32", (1,))],
            SMALL_IMAGES,
            "only input",
        ),
        (
            [TensorSpec("x", "FP32", (1,)), TensorSpec("y", "FP32", (1,))],
            SMALL_IMAGES,
            "exactly one input",
        ),
        (
            [TensorSpec("x", "FP32", (-1, 3, 32, 32))],
            SMALL_IMAGES,
            r"produces \[batch, 3, 16, 16\]",
        ),
        ([TensorSpec("x", "FP32", (-1, 768))], SMALL_IMAGES, "preprocessing produces"),
    ],
)
def test_image_declarations_that_cannot_be_served(
    inputs: list[TensorSpec], preprocess: ImagePreprocessSpec | None, message: str
) -> None:
    with pytest.raises(PayloadError, match=message):
        ServedModel.build(
            SmallConvNet(), name="m", inputs=inputs, preprocess=preprocess, sealed=False
        )


# -- names -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "-x", "a/b", "a b", "x" * 129, "..", "é"])
def test_bad_model_names_are_refused(name: str) -> None:
    with pytest.raises(ConfigError):
        check_model_name(name)


def test_good_model_names() -> None:
    for name in ("resnet50", "efficientnet-lite0", "a.b_c-1", "9"):
        assert check_model_name(name) == name
    model = ServedModel.build(nn.Linear(2, 2), name="m", version="2024.1", sealed=False)
    assert repr(model) == "ServedModel(name='m', version='2024.1', sealed=False)"


def test_a_model_in_host_memory_has_no_device() -> None:
    model = ServedModel.build(
        torch.nn.Linear(3, 2), name="m", inputs=[TensorSpec("x", "FP32", (-1, 3))], sealed=False
    )
    assert model.device is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_model_on_the_gpu_takes_host_tensors_and_answers_on_the_host() -> None:
    """`serve --device cuda`: requests are decoded on the host, so inputs go to the model's
    device and outputs come back, for every kind of model (not only transformers)."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3)
    with torch.inference_mode():
        expected = layer.cuda()(x.cuda()).cpu()
    model = ServedModel.build(
        layer, name="m", inputs=[TensorSpec("x", "FP32", (-1, 3))], sealed=False
    )
    assert model.device is not None
    assert model.device.type == "cuda"
    (produced,) = model.forward([x])
    assert produced.device.type == "cpu"
    assert torch.equal(produced, expected)
