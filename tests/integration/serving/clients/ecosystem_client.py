"""Drive ``sealtorch serve`` with an unmodified ecosystem client, in a process of its own.

tritonclient.grpc and kserve both register the ``inference.*`` protobuf messages in protobuf's
default pool, so they cannot share a process (nor the test process): each call runs here.

Usage: ``python ecosystem_client.py CLIENT URL`` with a JSON job on stdin::

    {"call": "infer", "model": "m", "version": "", "inputs": [{"name", "datatype", "shape",
     "b64": raw little-endian bytes, or "values": [...] for JSON/typed data}],
     "outputs": [{"name", "classification": N}], "binary": true, "compression": null}
    {"call": "metadata" | "config" | "live" | "ready" | "model_ready", "model": "m"}

CLIENT: triton-http, triton-grpc, kserve-rest, kserve-grpc. Prints one JSON document:
``{"outputs": {name: {"datatype", "shape", "b64" | "values"}}}``, the call's result, or
``{"error": {"type", "status", "message"}}``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from typing import Any

import numpy as np

_NUMPY = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": np.object_,
}


def _array(spec: dict[str, Any]) -> np.ndarray:
    if spec["datatype"] == "BYTES":
        return np.array([base64.b64decode(v) for v in spec["b64_elements"]], dtype=np.object_)
    raw = base64.b64decode(spec["b64"])
    return np.frombuffer(raw, dtype=_NUMPY[spec["datatype"]]).reshape(spec["shape"])


def _result(name: str, array: np.ndarray) -> dict[str, Any]:
    if array.dtype == np.object_:
        return {
            "datatype": "BYTES",
            "shape": list(array.shape),
            "values": [v.decode() if isinstance(v, bytes) else str(v) for v in array.reshape(-1)],
        }
    return {
        "datatype": str(array.dtype),
        "shape": list(array.shape),
        "b64": base64.b64encode(np.ascontiguousarray(array).tobytes()).decode(),
    }


def triton(kind: str, url: str, job: dict[str, Any]) -> Any:
    if kind == "http":
        import tritonclient.http as client
        from tritonclient.utils import InferenceServerException
    else:
        import tritonclient.grpc as client  # type: ignore[no-redef]
        from tritonclient.utils import InferenceServerException
    server = client.InferenceServerClient(url)
    model = job.get("model", "")
    try:
        call = job["call"]
        if call == "live":
            return {"live": server.is_server_live()}
        if call == "ready":
            return {"ready": server.is_server_ready()}
        if call == "model_ready":
            return {"ready": server.is_model_ready(model, job.get("version", ""))}
        if call == "metadata":
            if kind == "http":
                return {
                    "server": server.get_server_metadata(),
                    "model": server.get_model_metadata(model),
                }
            meta = server.get_model_metadata(model, as_json=True)
            for tensor in (*meta.get("inputs", ()), *meta.get("outputs", ())):
                tensor["shape"] = [int(d) for d in tensor["shape"]]  # int64 in proto JSON
            return {"server": server.get_server_metadata(as_json=True), "model": meta}
        if call == "config":
            if kind == "http":
                return server.get_model_config(model)
            return server.get_model_config(model, as_json=True)
        inputs = []
        for spec in job["inputs"]:
            item = client.InferInput(spec["name"], spec["shape"], spec["datatype"])
            if kind == "http":
                item.set_data_from_numpy(_array(spec), binary_data=job.get("binary", True))
            else:
                item.set_data_from_numpy(_array(spec))
            inputs.append(item)
        outputs = None
        if job.get("outputs"):
            outputs = []
            for spec in job["outputs"]:
                if kind == "http":
                    outputs.append(
                        client.InferRequestedOutput(
                            spec["name"],
                            binary_data=job.get("binary", True),
                            class_count=spec.get("classification", 0),
                        )
                    )
                else:
                    outputs.append(
                        client.InferRequestedOutput(
                            spec["name"], class_count=spec.get("classification", 0)
                        )
                    )
        extra: dict[str, Any] = {}
        if kind == "http" and job.get("compression"):
            extra["request_compression_algorithm"] = job["compression"]
        result = server.infer(
            model, inputs, model_version=job.get("version", ""), outputs=outputs, **extra
        )
        names = [
            o["name"]
            for o in result.get_response(**({} if kind == "http" else {"as_json": True}))["outputs"]
        ]
        return {"outputs": {name: _result(name, result.as_numpy(name)) for name in names}}
    except InferenceServerException as exc:
        return {
            "error": {
                "type": "InferenceServerException",
                "status": str(exc.status()),
                "message": exc.message(),
            }
        }


async def kserve(kind: str, url: str, job: dict[str, Any]) -> Any:
    import kserve as ks
    from kserve.protocol.infer_type import RequestedOutput

    model = job.get("model", "")
    if kind == "rest":
        client: Any = ks.InferenceRESTClient(ks.RESTConfig(protocol="v2", retries=0))
    else:
        client = ks.InferenceGRPCClient(url, retries=0)
    try:
        call = job["call"]
        if call == "live":
            return {
                "live": await client.is_server_live(url)
                if kind == "rest"
                else await client.is_server_live()
            }
        if call == "ready":
            return {
                "ready": await client.is_server_ready(url)
                if kind == "rest"
                else await client.is_server_ready()
            }
        if call == "model_ready":
            if kind == "rest":
                return {"ready": await client.is_model_ready(url, model)}
            return {"ready": await client.is_model_ready(model)}
        inputs = []
        for spec in job["inputs"]:
            item = ks.InferInput(spec["name"], spec["shape"], spec["datatype"])
            if "values" in spec:
                item.set_data_from_numpy(
                    np.array(spec["values"], dtype=_NUMPY[spec["datatype"]]).reshape(spec["shape"]),
                    binary_data=False,
                )
            else:
                item.set_data_from_numpy(_array(spec), binary_data=job.get("binary", True))
            inputs.append(item)
        outputs = None
        if job.get("outputs"):
            outputs = []
            for spec in job["outputs"]:
                parameters: dict[str, Any] = {}
                if "classification" in spec:
                    parameters["classification"] = spec["classification"]
                if kind == "rest":
                    parameters["binary_data"] = job.get("binary", True)
                outputs.append(RequestedOutput(spec["name"], parameters=parameters))
        request = ks.InferRequest(
            model_name=model,
            infer_inputs=inputs,
            request_outputs=outputs,
            model_version=job.get("version") or None,
        )
        if kind == "rest":
            response = await client.infer(url, request, model_name=model)
        else:
            response = await client.infer(request)
        return {
            "outputs": {out.name: _result(out.name, out.as_numpy()) for out in response.outputs}
        }
    except Exception as exc:  # noqa: BLE001 - reported to the test, which checks it
        status = getattr(getattr(exc, "response", None), "status_code", None)
        code = getattr(exc, "code", None)
        if callable(code):
            status = code().name
        text = getattr(getattr(exc, "response", None), "text", None) or (
            exc.details() if hasattr(exc, "details") else str(exc)
        )
        return {"error": {"type": type(exc).__name__, "status": str(status), "message": text}}
    finally:
        close = getattr(client, "close", None)
        if close is not None:
            await close()


def main() -> None:
    name, url = sys.argv[1], sys.argv[2]
    job = json.load(sys.stdin)
    family, kind = name.split("-")
    result = triton(kind, url, job) if family == "triton" else asyncio.run(kserve(kind, url, job))
    json.dump(result, sys.stdout, default=str)


if __name__ == "__main__":
    main()
