"""The gRPC messages sealtorch builds match the published ones that clients use, field for field.

The references are the generated modules shipped by kserve (``grpc_predict_v2.proto``, the
KServe v2 protocol) and tritonclient (Triton's ``grpc_service.proto`` and ``model_config.proto``).
Both claim ``inference.*`` in protobuf's default pool, so each is read in a subprocess.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from sealtorch.serving.grpc_proto import FILE_NAME, POOL, SERVICE

_DUMP = """
import json, sys, importlib
from google.protobuf import descriptor_pb2
fields, methods = {}, {}
def walk(message):
    fields[message.full_name] = {
        f.name: [f.number, f.type, f.label, (f.message_type or f.enum_type).full_name
                 if (f.message_type or f.enum_type) else ""]
        for f in message.fields
    }
    for nested in message.nested_types:
        walk(nested)
for name in sys.argv[1:]:
    module = importlib.import_module(name)
    for message in module.DESCRIPTOR.message_types_by_name.values():
        walk(message)
    for service in module.DESCRIPTOR.services_by_name.values():
        for method in service.methods:
            methods[method.full_name] = [method.input_type.full_name, method.output_type.full_name]
json.dump({"fields": fields, "methods": methods}, sys.stdout)
"""


def _reference(*modules: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", _DUMP, *modules], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def _ours() -> dict[str, Any]:
    fields: dict[str, Any] = {}

    def walk(message: Any) -> None:
        fields[message.full_name] = {
            f.name: [
                f.number,
                f.type,
                f.label,
                (f.message_type or f.enum_type).full_name
                if (f.message_type or f.enum_type)
                else "",
            ]
            for f in message.fields
        }
        for nested in message.nested_types:
            walk(nested)

    file = POOL.FindFileByName(FILE_NAME)
    for message in file.message_types_by_name.values():
        walk(message)
    service = POOL.FindServiceByName(SERVICE)
    methods = {
        m.full_name: [m.input_type.full_name, m.output_type.full_name] for m in service.methods
    }
    return {"fields": fields, "methods": methods}


@pytest.mark.parametrize(
    ("modules", "superset"),
    [
        (("kserve.protocol.grpc.grpc_predict_v2_pb2",), False),
        (("tritonclient.grpc.service_pb2", "tritonclient.grpc.model_config_pb2"), True),
    ],
    ids=["kserve", "tritonclient"],
)
def test_every_field_matches_the_published_protocol(
    modules: tuple[str, ...], superset: bool
) -> None:
    reference = _reference(*modules)
    ours = _ours()
    for message, fields in ours["fields"].items():
        theirs = reference["fields"].get(message)
        if theirs is None:
            assert not superset, f"{message} is not in the published protocol"
            continue  # a Triton addition (ModelConfig) that KServe's proto does not have
        for name, spec in fields.items():
            if name in theirs:
                assert spec == theirs[name], f"{message}.{name}: {spec} != {theirs[name]}"
            else:
                assert not superset, f"{message}.{name} is not in the published protocol"
        if not superset:  # everything KServe's protocol has, sealtorch has too
            assert set(theirs) <= set(fields), f"{message} lacks {set(theirs) - set(fields)}"
    for method, types in ours["methods"].items():
        if method in reference["methods"]:
            assert types == reference["methods"][method]
        else:
            assert not superset
            assert method.endswith("ModelConfig")
    served = set(ours["methods"])
    assert {
        f"{SERVICE}.{name}"
        for name in (
            "ServerLive",
            "ServerReady",
            "ModelReady",
            "ServerMetadata",
            "ModelMetadata",
            "ModelInfer",
        )
    } <= served
