"""The Open Inference Protocol over gRPC (``inference.GRPCInferenceService``), with grpcio.

The same models, readiness, request limits, inference pool and codec as the REST app: a
``ModelInfer`` message becomes an :class:`~sealtorch.serving.protocol.InferenceRequest`, runs
``decode → forward → select outputs`` in the inference pool (against the same ``--max-pending``
count as REST requests) and is written back as a ``ModelInferResponse``.

* Inputs: typed ``contents`` (the field of the input's datatype; FP16 and BF16 have none and
  need ``raw_input_contents``) or ``raw_input_contents`` (all inputs, in order, little-endian;
  BYTES as 4-byte length + bytes per element, each element a raw encoded image for image
  models).
* Outputs go out as ``raw_output_contents`` (what Triton does and tritonclient reads); typed
  ``contents`` when the request parameter ``binary_data_output`` is false or every requested
  output says ``binary_data: false`` (not for FP16/BF16, which have no typed field).
* Status codes: INVALID_ARGUMENT (malformed request, input that does not fit), NOT_FOUND
  (unknown model or version), UNAVAILABLE (model still loading, server stopping),
  RESOURCE_EXHAUSTED (queue full, message or tensor over the limits), INTERNAL (the model
  failed). Messages are the REST error messages.
* Also served: the standard ``grpc.health.v1.Health`` service (SERVING once every model is,
  NOT_SERVING while loading and when stopping) and server reflection.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

import grpc  # type: ignore[import-untyped]
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc  # type: ignore[import-untyped]
from grpc_reflection.v1alpha import reflection  # type: ignore[import-untyped]

from sealtorch._listen import host_port
from sealtorch.errors import ConfigError
from sealtorch.serving import codec
from sealtorch.serving.errors import RequestError, ServerBusyError, show
from sealtorch.serving.grpc_proto import POOL, SERVICE, message
from sealtorch.serving.model import ServedModel
from sealtorch.serving.protocol import (
    DATATYPES,
    MAX_PARAMETERS,
    MAX_TENSORS,
    InferenceRequest,
    RequestedOutput,
    RequestInput,
    check_target,
    shape_text,
)
from sealtorch.serving.state import ServerState
from sealtorch.serving.tensors import MAX_ELEMENTS, encode_bytes_binary, encode_json

__all__ = ["GrpcServer"]

_log = logging.getLogger(__name__)

_M = {
    name: message(name)
    for name in (
        "ServerLiveResponse",
        "ServerReadyResponse",
        "ModelReadyResponse",
        "ServerMetadataResponse",
        "ModelMetadataResponse",
        "ModelInferResponse",
        "ModelConfigResponse",
    )
}
_REQUESTS: Final = {
    method: message(f"{method}Request")
    for method in (
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
        "ModelConfig",
    )
}

#: datatype → (typed contents field, NumPy type); FP16/BF16 have no field (raw only).
_CONTENTS: Final[dict[str, tuple[str, Any]]] = {
    "BOOL": ("bool_contents", np.bool_),
    "UINT8": ("uint_contents", np.uint8),
    "UINT16": ("uint_contents", np.uint16),
    "UINT32": ("uint_contents", np.uint32),
    "UINT64": ("uint64_contents", np.uint64),
    "INT8": ("int_contents", np.int8),
    "INT16": ("int_contents", np.int16),
    "INT32": ("int_contents", np.int32),
    "INT64": ("int64_contents", np.int64),
    "FP32": ("fp32_contents", np.float32),
    "FP64": ("fp64_contents", np.float64),
    "BYTES": ("bytes_contents", None),
}
_HTTP_STATUS: Final = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 413,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.INTERNAL: 500,
}


def _code(exc: RequestError) -> Any:
    if isinstance(exc, ServerBusyError) or exc.status_code == 413:
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    return {404: grpc.StatusCode.NOT_FOUND, 503: grpc.StatusCode.UNAVAILABLE}.get(
        exc.status_code, grpc.StatusCode.INVALID_ARGUMENT
    )


# -- message → request -----------------------------------------------------------------------


def _parameters(entries: Any, where: str) -> MappingProxyType[str, str | int | float | bool]:
    if len(entries) > MAX_PARAMETERS:
        raise RequestError(f"{where} holds more than {MAX_PARAMETERS} parameters")
    result: dict[str, str | int | float | bool] = {}
    for key, value in entries.items():
        kind = value.WhichOneof("parameter_choice")
        if kind is None:
            raise RequestError(f"{where}.{show(key)} holds no value")
        item = getattr(value, kind)
        if isinstance(item, float) and not math.isfinite(item):
            raise RequestError(f"{where}.{show(key)} must be finite")
        result[key] = item
    return MappingProxyType(result)


def _typed_raw(tensor: Any, datatype: str, count: int, where: str) -> bytes:
    """The raw bytes of typed ``contents`` (checked: the right field, the count, the range)."""
    used = [field.name for field, _ in tensor.contents.ListFields()]
    expected = _CONTENTS.get(datatype)
    if expected is None:
        raise RequestError(
            f"{where} is {datatype}, which has no typed contents; send raw_input_contents"
        )
    field, kind = expected
    if used != [field]:
        found = ", ".join(used) or "nothing"
        raise RequestError(f"{where} is {datatype}: its data goes in contents.{field}, not {found}")
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise RequestError(
            f"{where} holds {len(values):,} values in contents.{field}, but the shape "
            f"{shape_text(tensor.shape)} has {count:,}"
        )
    if kind is None:  # BYTES
        return encode_bytes_binary(list(values))
    if datatype in ("UINT8", "UINT16", "INT8", "INT16") and count:
        wide = np.array(values, dtype=np.int64)
        info = np.iinfo(kind)
        if int(wide.min()) < info.min or int(wide.max()) > info.max:
            raise RequestError(
                f"{where} holds values outside the {datatype} range {info.min}..{info.max}"
            )
        return bytes(wide.astype(kind).tobytes())
    return bytes(np.array(values, dtype=kind).tobytes())


def request_from_message(msg: Any) -> InferenceRequest:
    """An :class:`InferenceRequest` from a ``ModelInferRequest`` (400 if malformed)."""
    if not 1 <= len(msg.inputs) <= MAX_TENSORS:
        raise RequestError(f"inputs must hold 1 to {MAX_TENSORS} input tensors")
    raw = list(msg.raw_input_contents)
    if raw and len(raw) != len(msg.inputs):
        raise RequestError(
            f"raw_input_contents holds {len(raw)} tensors for {len(msg.inputs)} inputs; "
            "with raw contents, every input sends its data there, in order"
        )
    inputs = []
    for index, tensor in enumerate(msg.inputs):
        where = f"inputs[{index}]"
        if not tensor.name:
            raise RequestError(f"{where} has no name")
        if tensor.datatype not in DATATYPES:
            raise RequestError(
                f"{where}.datatype must be one of {', '.join(DATATYPES)}, "
                f"not {show(tensor.datatype)}"
            )
        if any(dim < 0 for dim in tensor.shape):
            raise RequestError(f"{where}.shape must hold non-negative integers")
        shape = tuple(tensor.shape)
        count = math.prod(shape)
        if count > MAX_ELEMENTS:
            raise RequestError(
                f"{where} has {count:,} elements in shape {shape_text(shape)}; the limit is "
                f"{MAX_ELEMENTS:,}"
            )
        if raw:
            if tensor.HasField("contents"):
                raise RequestError(f"{where} has both contents and raw_input_contents; send one")
            data = raw[index]
        elif tensor.HasField("contents"):
            data = _typed_raw(tensor, tensor.datatype, count, where)
        else:
            raise RequestError(f"{where} has no data (contents or raw_input_contents)")
        inputs.append(
            RequestInput(
                name=tensor.name,
                datatype=tensor.datatype,
                shape=shape,
                parameters=_parameters(tensor.parameters, f"{where}.parameters"),
                raw=data,
            )
        )
    if len({item.name for item in inputs}) != len(inputs):
        raise RequestError("inputs repeat a name; each input tensor appears once")
    outputs = None
    if msg.outputs:
        outputs = tuple(
            RequestedOutput(
                name=out.name, parameters=_parameters(out.parameters, f"outputs[{i}].parameters")
            )
            for i, out in enumerate(msg.outputs)
        )
        if len({o.name for o in outputs}) != len(outputs):
            raise RequestError("outputs repeat a name; ask for each output once")
    return InferenceRequest(
        inputs=tuple(inputs),
        outputs=outputs,
        id=msg.id or None,
        parameters=_parameters(msg.parameters, "parameters"),
    )


# -- outputs → message -----------------------------------------------------------------------


def _wants_raw(outputs: Sequence[codec.OutputTensor]) -> bool:
    """Raw contents for all outputs (the protocol allows no mix) unless every one asked for
    typed contents; FP16 and BF16 have no typed field."""
    return any(o.binary or o.datatype in ("FP16", "BF16") for o in outputs)


def response_message(
    model: ServedModel, request: InferenceRequest, outputs: Sequence[codec.OutputTensor]
) -> Any:
    response = _M["ModelInferResponse"](
        model_name=model.name, model_version=model.version, id=request.id or ""
    )
    raw = _wants_raw(outputs)
    for output in outputs:
        entry = response.outputs.add(
            name=output.name, datatype=output.datatype, shape=list(output.shape)
        )
        if raw:
            continue
        field = _CONTENTS[output.datatype][0]
        if output.elements is not None:
            getattr(entry.contents, field).extend(output.elements)
        else:
            assert output.tensor is not None  # noqa: S101 - one of the two is set
            getattr(entry.contents, field).extend(encode_json(output.tensor))
    if raw:
        response.raw_output_contents.extend(output.raw() for output in outputs)
    return response


def _infer(model: ServedModel, msg: Any) -> tuple[Any, float]:
    """Worker thread: message → request → decode → forward → select → message."""
    request = request_from_message(msg)
    check_target(request, model.name, msg.model_version or model.version)
    binary = request.parameters.get("binary_data_output", True)
    if not isinstance(binary, bool):
        raise RequestError("parameters.binary_data_output must be true or false")
    outputs, compute = codec.run(model, request, binary_default=binary)
    return response_message(model, request, outputs), compute


# -- the service -----------------------------------------------------------------------------


class _Service:
    """The handlers of ``inference.GRPCInferenceService`` (run in the gRPC server's threads)."""

    def __init__(self, state: ServerState, max_pending: int) -> None:
        self._state = state
        self._max_pending = max_pending

    @contextmanager
    def _refusals(self, context: Any) -> Iterator[None]:
        try:
            yield
        except RequestError as exc:
            context.abort(_code(exc), str(exc))

    def ServerLive(self, request: Any, context: Any) -> Any:  # noqa: N802 - the RPC's name
        del request, context
        return _M["ServerLiveResponse"](live=True)

    def ServerReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        del request, context
        return _M["ServerReadyResponse"](ready=self._state.ready)

    def ModelReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        with self._refusals(context):
            ready = self._state.model_ready(request.name, request.version or None)
        return _M["ModelReadyResponse"](ready=ready)

    def ServerMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        del request, context
        return _M["ServerMetadataResponse"](**codec.server_metadata())

    def ModelMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        with self._refusals(context):
            model = self._state.lookup(request.name, request.version or None)
        return _M["ModelMetadataResponse"](**codec.model_metadata(model))

    def ModelConfig(self, request: Any, context: Any) -> Any:  # noqa: N802
        with self._refusals(context):
            model = self._state.lookup(request.name, request.version or None)
        config = codec.model_config(model)
        policy = {}
        if model.version.isdigit():
            policy = {"version_policy": {"specific": {"versions": [int(model.version)]}}}
        del config["version_policy"]  # versions are integers in Triton's message
        return _M["ModelConfigResponse"](config={**config, **policy})

    def ModelInfer(self, request: Any, context: Any) -> Any:  # noqa: N802
        state = self._state
        metrics = state.metrics
        label = request.model_name if state.known(request.model_name) else ""
        start = time.perf_counter()
        code = grpc.StatusCode.INTERNAL
        metrics.in_flight.inc()
        try:
            model = state.lookup(request.model_name, request.model_version or None)
            with state.admitted(self._max_pending):
                response, compute = state.executor.submit(_infer, model, request).result()
            metrics.compute.labels(label).observe(compute)
            code = grpc.StatusCode.OK
            return response
        except RequestError as exc:
            code = _code(exc)
            _log.info("inference refused: %s", exc, extra={"model": label})
            context.abort(code, str(exc))
        except (RuntimeError, MemoryError) as exc:
            _log.error("inference failed: %s", type(exc).__name__, extra={"model": label})
            context.abort(grpc.StatusCode.INTERNAL, "internal server error while running the model")
        finally:
            metrics.finished(label, _HTTP_STATUS.get(code, 500), time.perf_counter() - start)
            metrics.grpc.labels("ModelInfer", code.name).inc()
        return None  # pragma: no cover - abort raises


def _handler(service: _Service) -> Any:
    methods = {}
    for name, request_type in _REQUESTS.items():
        methods[name] = grpc.unary_unary_rpc_method_handler(
            getattr(service, name),
            request_deserializer=request_type.FromString,
            response_serializer=lambda response: response.SerializeToString(),
        )
    return grpc.method_handlers_generic_handler(SERVICE, methods)


POOL.AddSerializedFile(health_pb2.DESCRIPTOR.serialized_pb)


class GrpcServer:
    """The gRPC server beside the HTTP one: bound at construction, started by :meth:`start`."""

    def __init__(
        self,
        state: ServerState,
        *,
        host: str,
        port: int,
        max_message_bytes: int,
        max_pending: int,
        workers: int,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
    ) -> None:
        self._threads = ThreadPoolExecutor(
            max_workers=max_pending + workers + 4, thread_name_prefix="sealtorch-grpc"
        )
        self._server = grpc.server(
            self._threads,
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", -1),
                ("grpc.so_reuseport", 0),
            ],
            maximum_concurrent_rpcs=max_pending + workers + 4,
        )
        self._server.add_generic_rpc_handlers((_handler(_Service(state, max_pending)),))
        self.health = health.HealthServicer()
        for name in ("", SERVICE):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server, pool=POOL
        )
        try:
            if tls_cert is not None and tls_key is not None:
                credentials = grpc.ssl_server_credentials(
                    [(tls_key.read_bytes(), tls_cert.read_bytes())]
                )
                self.port = self._server.add_secure_port(host_port(host, port), credentials)
            else:
                self.port = self._server.add_insecure_port(host_port(host, port))
        except RuntimeError as exc:
            raise ConfigError(
                f"cannot listen on {host_port(host, port)} for gRPC: the address is taken or not "
                "available (--grpc-port 0 picks a free port and prints it)"
            ) from exc
        self.address = f"{'grpcs' if tls_cert else 'grpc'}://{host_port(host, self.port)}"

    def start(self) -> None:
        self._server.start()

    def serving(self, ok: bool) -> None:
        """Report SERVING (every model loaded) or NOT_SERVING to the health service."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if ok
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE):
            self.health.set(name, status)

    def stop(self, grace: float) -> None:
        """Refuse new calls, let running ones finish (at most ``grace`` seconds)."""
        self.health.enter_graceful_shutdown()
        self._server.stop(grace).wait()
        self._threads.shutdown(wait=False, cancel_futures=True)
