"""gRPC messages ↔ requests and responses: typed contents of every type, raw contents, refusals."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from sealtorch.payloads.manifest import TensorSpec
from sealtorch.serving import codec
from sealtorch.serving.errors import RequestError
from sealtorch.serving.grpc_proto import message
from sealtorch.serving.grpc_service import request_from_message, response_message
from sealtorch.serving.model import ServedModel
from sealtorch.serving.tensors import decode_tensor

Request = message("ModelInferRequest")

_TYPED = [
    ("BOOL", "bool_contents", [True, False, True], torch.bool),
    ("UINT8", "uint_contents", [0, 7, 255], torch.uint8),
    ("UINT16", "uint_contents", [0, 7, 65535], torch.uint16),
    ("UINT32", "uint_contents", [0, 7, 2**32 - 1], torch.uint32),
    ("UINT64", "uint64_contents", [0, 7, 2**64 - 1], torch.uint64),
    ("INT8", "int_contents", [-128, 0, 127], torch.int8),
    ("INT16", "int_contents", [-32768, 0, 32767], torch.int16),
    ("INT32", "int_contents", [-(2**31), 0, 2**31 - 1], torch.int32),
    ("INT64", "int64_contents", [-(2**63), 0, 2**63 - 1], torch.int64),
    ("FP32", "fp32_contents", [1.5, -0.1, 3e38], torch.float32),
    ("FP64", "fp64_contents", [1.5, -0.1, 1e300], torch.float64),
]


def _request(*inputs: dict[str, Any], raw: list[bytes] | None = None, **fields: Any) -> Any:
    msg = Request(model_name="m", inputs=list(inputs), **fields)
    if raw is not None:
        msg.raw_input_contents.extend(raw)
    return msg


def _tensor(item: Any) -> torch.Tensor:
    return decode_tensor(
        datatype=item.datatype, shape=item.shape, data=item.data, raw=item.raw, where="x"
    )


@pytest.mark.parametrize(("datatype", "field", "values", "dtype"), _TYPED)
def test_typed_contents_of_every_type_decode_exactly(
    datatype: str, field: str, values: list[Any], dtype: torch.dtype
) -> None:
    request = request_from_message(
        _request({"name": "x", "datatype": datatype, "shape": [3], "contents": {field: values}})
    )
    (item,) = request.inputs
    tensor = _tensor(item)
    assert tensor.dtype == dtype
    expected = np.array(values, dtype=np.float32).tolist() if datatype == "FP32" else values
    assert tensor.numpy().tolist() == expected


@pytest.mark.parametrize(
    ("datatype", "field", "values"),
    [
        ("INT8", "int_contents", [128]),
        ("UINT8", "uint_contents", [256]),
        ("INT16", "int_contents", [-32769]),
        ("UINT16", "uint_contents", [65536]),
    ],
)
def test_typed_values_out_of_range_are_refused(
    datatype: str, field: str, values: list[int]
) -> None:
    msg = _request({"name": "x", "datatype": datatype, "shape": [1], "contents": {field: values}})
    with pytest.raises(RequestError, match=f"outside the {datatype} range"):
        request_from_message(msg)


@pytest.mark.parametrize(
    ("inputs", "raw", "message_part"),
    [
        (
            [{"name": "x", "datatype": "FP32", "shape": [2], "contents": {"int_contents": [1, 2]}}],
            None,
            "its data goes in contents.fp32_contents, not int_contents",
        ),
        (
            [{"name": "x", "datatype": "FP32", "shape": [3], "contents": {"fp32_contents": [1]}}],
            None,
            "holds 1 values in contents.fp32_contents, but the shape [3] has 3",
        ),
        (
            [{"name": "x", "datatype": "FP16", "shape": [1], "contents": {"fp32_contents": [1]}}],
            None,
            "FP16, which has no typed contents; send raw_input_contents",
        ),
        ([{"name": "x", "datatype": "FP32", "shape": [1]}], None, "has no data"),
        (
            [{"name": "x", "datatype": "FP32", "shape": [1], "contents": {"fp32_contents": [1]}}],
            [b"\0\0\0\0"],
            "has both contents and raw_input_contents",
        ),
        (
            [
                {"name": "x", "datatype": "FP32", "shape": [1]},
                {"name": "y", "datatype": "FP32", "shape": [1]},
            ],
            [b"\0\0\0\0"],
            "raw_input_contents holds 1 tensors for 2 inputs",
        ),
        ([{"name": "x", "datatype": "FP8", "shape": [1]}], [b"\0"], "datatype must be one of"),
        (
            [{"name": "x", "datatype": "FP32", "shape": [1 << 20, 1 << 20]}],
            [b""],
            "elements in shape",
        ),
        (
            [
                {"name": "x", "datatype": "FP32", "shape": [1]},
                {"name": "x", "datatype": "FP32", "shape": [1]},
            ],
            [b"\0" * 4, b"\0" * 4],
            "inputs repeat a name",
        ),
        ([], None, "inputs must hold 1 to"),
    ],
)
def test_malformed_messages_are_refused(
    inputs: list[dict[str, Any]], raw: list[bytes] | None, message_part: str
) -> None:
    with pytest.raises(RequestError) as info:
        request_from_message(_request(*inputs, raw=raw))
    assert message_part in str(info.value)


def test_parameters_of_every_kind_are_read() -> None:
    msg = _request({"name": "x", "datatype": "FP32", "shape": [1]}, raw=[b"\0" * 4])
    msg.parameters["flag"].bool_param = True
    msg.parameters["count"].int64_param = -3
    msg.parameters["text"].string_param = "a"
    msg.parameters["ratio"].double_param = 0.5
    msg.parameters["big"].uint64_param = 2**64 - 1
    request = request_from_message(msg)
    assert dict(request.parameters) == {
        "flag": True,
        "count": -3,
        "text": "a",
        "ratio": 0.5,
        "big": 2**64 - 1,
    }
    msg.parameters["bad"].double_param = float("nan")
    with pytest.raises(RequestError, match="must be finite"):
        request_from_message(msg)


def _model() -> ServedModel:
    class Both(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x * 2, x.to(torch.float16)

    return ServedModel.build(
        Both(),
        name="m",
        inputs=[TensorSpec("x", "FP32", (-1, 3))],
        sealed=False,
    )


def test_responses_are_raw_by_default_and_typed_on_request() -> None:
    model = _model()
    x = torch.tensor([[1.0, -2.5, 3.25]])
    msg = _request({"name": "x", "datatype": "FP32", "shape": [1, 3]}, raw=[x.numpy().tobytes()])
    request = request_from_message(msg)
    outputs, _ = codec.run(model, request, binary_default=True)
    response = response_message(model, request, outputs)
    assert [o.name for o in response.outputs] == ["output_0", "output_1"]
    assert response.raw_output_contents[0] == (x * 2).numpy().tobytes()
    assert response.raw_output_contents[1] == x.to(torch.float16).numpy().tobytes()

    msg.outputs.add(name="output_0")
    request = request_from_message(msg)
    outputs, _ = codec.run(model, request, binary_default=False)
    typed = response_message(model, request, outputs)
    assert list(typed.outputs[0].contents.fp32_contents) == [2.0, -5.0, 6.5]
    assert not typed.raw_output_contents
    assert list(typed.outputs[0].shape) == [1, 3]


def test_fp16_outputs_always_go_raw() -> None:
    model = _model()
    msg = _request({"name": "x", "datatype": "FP32", "shape": [1, 3]}, raw=[b"\0" * 12])
    msg.outputs.add(name="output_1")
    request = request_from_message(msg)
    outputs, _ = codec.run(model, request, binary_default=False)
    response = response_message(model, request, outputs)
    assert response.raw_output_contents[0] == b"\0" * 6


def test_bytes_contents_become_length_prefixed_elements() -> None:
    msg = _request(
        {
            "name": "image",
            "datatype": "BYTES",
            "shape": [2],
            "contents": {"bytes_contents": [b"ab", b""]},
        }
    )
    (item,) = request_from_message(msg).inputs
    assert item.raw == struct.pack("<I", 2) + b"ab" + struct.pack("<I", 0)


def test_typed_outputs_of_unsigned_and_boolean_types() -> None:
    class Kinds(nn.Module):
        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"u16": x.to(torch.uint16), "flag": x > 1, "u64": x.to(torch.uint64)}

    model = ServedModel.build(
        Kinds(), name="m", inputs=[TensorSpec("x", "FP32", (-1, 2))], sealed=False
    )
    msg = _request(
        {"name": "x", "datatype": "FP32", "shape": [1, 2], "contents": {"fp32_contents": [1, 7]}}
    )
    request = request_from_message(msg)
    outputs, _ = codec.run(model, request, binary_default=False)
    response = response_message(model, request, outputs)
    contents = {o.name: o.contents for o in response.outputs}
    assert list(contents["u16"].uint_contents) == [1, 7]
    assert list(contents["flag"].bool_contents) == [False, True]
    assert list(contents["u64"].uint64_contents) == [1, 7]
