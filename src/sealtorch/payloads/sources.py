"""What can be sealed, and how each input becomes a payload byte stream.

* a state_dict (mapping of names to tensors), or an ``nn.Module`` (its state_dict)
* a ``.safetensors`` file
* a ``.pt``/``.pth`` state_dict, read with ``torch.load(weights_only=True)`` only - a pickle that
  needs anything more is refused (:class:`~sealtorch.errors.UnsafePickleError`)
* a TorchScript archive (a ``ScriptModule`` or its file; recognised by content, even if named
  ``.pt``)
* a Hugging Face ``save_pretrained`` directory (``config.json`` and safetensors weights, one
  file or shards with ``model.safetensors.index.json``), streamed from its files with its
  config and tokenizer files carried along (:mod:`sealtorch.payloads.hf`)
* a ``torch.export`` program (an ``ExportedProgram`` or its ``.pt2`` file) of PyTorch
  operators and tensors: a ``.pt2`` file is inspected before ``torch.export.load`` reads it,
  and archives with pickles, custom or opaque objects or code are refused
  (:mod:`sealtorch.payloads.pt2`)

File types are recognised by their content, not their name.
"""

from __future__ import annotations

import io
import logging
import os
import pickle  # noqa: TID251 - only to catch the weights-only unpickler's refusal
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sealtorch.errors import ConfigError, PayloadError, UnsafePickleError
from sealtorch.payloads.manifest import PayloadKind

if TYPE_CHECKING:
    import torch

    from sealtorch.payloads.tensors import SafetensorsPlan

__all__ = ["Payload", "detect_file_kind", "prepare_payload", "training_mode_ops"]

_log = logging.getLogger(__name__)
_COPY_PIECE = 4 * 1024 * 1024


@dataclass
class Payload:
    """A payload ready to be sealed: its kind, exact size and a one-shot byte stream."""

    kind: PayloadKind
    size: int
    stream: Callable[[], Iterator[memoryview]]
    description: str
    state_dict: Mapping[str, torch.Tensor] | None = None
    tensor_count: int | None = None
    #: ``payload.align`` of the manifest: 64 for state dicts, None for programs.
    align: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    #: Files carried after the payload (a Hugging Face directory's config, tokenizer...).
    files: list[tuple[str, bytes]] = field(default_factory=list)
    #: Payload offsets where the input's shards end: where a sealed set's files are cut.
    boundaries: list[int] = field(default_factory=list)
    #: A Hugging Face directory's parsed config.json.
    hf_config: dict[str, Any] | None = None
    #: Tensor name -> (shape, dtype code), for checks that need no tensor data.
    tensor_shapes: dict[str, tuple[tuple[int, ...], str]] | None = None


def detect_file_kind(path: Path) -> str:
    """``safetensors``, ``torchscript``, ``torch_export``, ``torch_zip`` or ``torch_legacy``."""
    try:
        with path.open("rb") as handle:
            head = handle.read(9)
    except FileNotFoundError as exc:
        raise ConfigError(f"{path} does not exist") from exc
    except IsADirectoryError as exc:
        raise ConfigError(f"{path} is a directory; pass a model file") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except zipfile.BadZipFile as exc:
            raise PayloadError(f"{path} looks like a zip archive but is damaged") from exc
        if any(name.endswith("/archive_format") for name in names):
            return "torch_export"
        if any(name.endswith("/constants.pkl") for name in names) and any(
            "/code/" in name for name in names
        ):
            return "torchscript"
        if any(name.endswith("/data.pkl") or name == "data.pkl" for name in names):
            return "torch_zip"
        raise PayloadError(f"{path} is a zip archive but not a PyTorch file")
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:1] == b"\x80":  # pickle protocol marker: torch.save's legacy (pre-1.6) format
        return "torch_legacy"
    raise PayloadError(
        f"cannot tell what {path} is: sealtorch reads .safetensors, .pt/.pth state_dicts, "
        "TorchScript archives and torch.export .pt2 programs"
    )


def _file_stream(path: Path, size: int) -> Callable[[], Iterator[memoryview]]:
    def stream() -> Iterator[memoryview]:
        buffer = memoryview(bytearray(_COPY_PIECE))
        remaining = size
        with path.open("rb", buffering=0) as handle:
            while remaining:
                got = handle.readinto(buffer[: min(_COPY_PIECE, remaining)])
                if not got:
                    raise PayloadError(f"{path} shrank while it was being sealed")
                remaining -= got
                yield buffer[:got]
            if handle.read(1):
                raise PayloadError(f"{path} grew while it was being sealed")

    return stream


def _bytes_stream(data: bytes) -> Callable[[], Iterator[memoryview]]:
    def stream() -> Iterator[memoryview]:
        yield memoryview(data)

    return stream


def _state_dict_payload(
    state_dict: Mapping[str, torch.Tensor], description: str, metadata: Mapping[str, str] | None
) -> Payload:
    from sealtorch.payloads.tensors import SafetensorsPlan

    plan: SafetensorsPlan = SafetensorsPlan(state_dict, metadata=metadata)
    return Payload(
        kind="safetensors",
        size=plan.size,
        stream=plan.stream,
        description=description,
        state_dict=state_dict,
        tensor_count=plan.tensor_count,
        align=plan.align,
    )


def _as_state_dict(obj: object, source: str, state_dict_key: str | None) -> Mapping[str, Any]:
    import torch

    if state_dict_key is not None:
        if not isinstance(obj, Mapping) or state_dict_key not in obj:
            keys = sorted(str(k) for k in obj) if isinstance(obj, Mapping) else []
            raise PayloadError(
                f"{source} has no entry {state_dict_key!r} (top-level keys: {keys[:10]})"
            )
        obj = obj[state_dict_key]
    if not isinstance(obj, Mapping):
        raise PayloadError(
            f"{source} holds a {type(obj).__name__}, not a state_dict (a mapping of tensors)"
        )
    non_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if non_tensors:
        nested = [k for k in non_tensors if isinstance(obj[k], Mapping)]
        hint = (
            f"; it looks like a training checkpoint: pass --state-dict-key {nested[0]} "
            f"(state_dict_key={nested[0]!r})"
            if nested
            else ""
        )
        raise PayloadError(
            f"{source} is not a plain state_dict: {len(non_tensors)} entries are not tensors "
            f"(e.g. {str(non_tensors[0])!r}){hint}"
        )
    return obj


def _torch_load(path: Path, *, mmap: bool) -> object:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise UnsafePickleError(
            f"{path} cannot be read safely: its pickle needs more than tensors and plain "
            "containers, and unpickling it could run arbitrary code. On a trusted machine, "
            "re-save just the weights: torch.save(model.state_dict(), 'weights.pt') or "
            "safetensors.torch.save_file(model.state_dict(), 'model.safetensors')"
        ) from exc
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        raise PayloadError(f"cannot read {path} as a PyTorch file: {exc}") from exc


def training_mode_ops(program: Any) -> list[str]:
    """Operators of an exported program that run in training mode (dropout, batch norm...)."""
    found = []
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        schema = getattr(node.target, "_schema", None)
        if schema is None:
            continue
        for index, argument in enumerate(schema.arguments):
            if argument.name not in ("train", "training"):
                continue
            value = (
                node.args[index]
                if index < len(node.args)
                else node.kwargs.get(argument.name, argument.default_value)
            )
            if value is True:
                found.append(str(node.target))
    return found


def _check_exported(program: Any, source: str) -> None:
    ops = training_mode_ops(program)
    if ops:
        raise PayloadError(
            f"{source} was exported in training mode ({', '.join(sorted(set(ops))[:3])}); "
            "exported programs keep the mode they were exported in, so call model.eval() "
            "before torch.export.export()"
        )


def _exported_bytes(program: Any) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def _script_bytes(module: Any) -> bytes:
    import torch

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # PyTorch deprecates TorchScript; sealing existing TorchScript models stays supported.
        warnings.filterwarnings(
            "ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning
        )
        torch.jit.save(module, buffer)
    return buffer.getvalue()


def _from_hf_directory(path: Path, *, state_dict_key: str | None) -> Payload:
    from sealtorch.payloads.hf import read_hf_directory

    if state_dict_key is not None:
        raise ConfigError("--state-dict-key applies to .pt/.pth checkpoints only")
    directory = read_hf_directory(path)
    header, entries, data_size = directory.plan()
    return Payload(
        kind="safetensors",
        size=len(header) + data_size,
        stream=directory.stream_factory(header, entries),
        description=f"Hugging Face model {path.name}",
        tensor_count=len(entries),
        align=64,
        files=directory.files,
        boundaries=directory.shard_ends(entries, len(header)),
        hf_config=directory.config,
        tensor_shapes={t.name: (t.shape, t.dtype) for t in directory.tensors},
    )


def _from_file(path: Path, *, state_dict_key: str | None) -> Payload:
    if path.is_dir():
        return _from_hf_directory(path, state_dict_key=state_dict_key)
    kind = detect_file_kind(path)
    size = path.stat().st_size
    if kind == "safetensors":
        if state_dict_key is not None:
            raise ConfigError("--state-dict-key applies to .pt/.pth checkpoints only")
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
            tensors = load_file(path)
        except (SafetensorError, OSError, ValueError) as exc:
            raise PayloadError(f"{path} is not a valid safetensors file: {exc}") from exc
        return _state_dict_payload(tensors, f"safetensors file {path.name}", metadata)
    if kind == "torchscript":
        if state_dict_key is not None:
            raise ConfigError("--state-dict-key applies to .pt/.pth checkpoints only")
        return Payload(
            kind="torchscript",
            size=size,
            stream=_file_stream(path, size),
            description=f"TorchScript archive {path.name}",
        )
    if kind == "torch_export":
        if state_dict_key is not None:
            raise ConfigError("--state-dict-key applies to .pt/.pth checkpoints only")
        from sealtorch.payloads.programs import load_exported_program

        # Inspected before torch.export.load: an archive from elsewhere must not run code here.
        program = load_exported_program(path, source=str(path))
        _check_exported(program, str(path))
        return Payload(
            kind="torch_export",
            size=size,
            stream=_file_stream(path, size),
            description=f"torch.export program {path.name}",
        )
    loaded = _torch_load(path, mmap=kind == "torch_zip")
    state_dict = _as_state_dict(loaded, str(path), state_dict_key)
    return _state_dict_payload(state_dict, f"state_dict file {path.name}", None)


def prepare_payload(source: object, *, state_dict_key: str | None = None) -> Payload:
    """Turn anything sealtorch can seal into a :class:`Payload`."""
    import torch
    from torch import nn

    if isinstance(source, str | os.PathLike):
        return _from_file(Path(source), state_dict_key=state_dict_key)
    if state_dict_key is not None and not isinstance(source, Mapping):
        raise ConfigError("state_dict_key applies to checkpoint files and dicts only")
    if isinstance(source, torch.jit.ScriptModule):
        data = _script_bytes(source)
        return Payload(
            kind="torchscript",
            size=len(data),
            stream=_bytes_stream(data),
            description="TorchScript module",
        )
    if isinstance(source, torch.export.ExportedProgram):
        from sealtorch.payloads.pt2 import check_program_graph, inspect_export_archive

        check_program_graph(source)
        _check_exported(source, "the program")
        data = _exported_bytes(source)
        inspect_export_archive(io.BytesIO(data))  # what loading will accept, refused now
        return Payload(
            kind="torch_export",
            size=len(data),
            stream=_bytes_stream(data),
            description="torch.export program",
        )
    if isinstance(source, nn.Module):
        return _state_dict_payload(source.state_dict(), type(source).__name__, None)
    if isinstance(source, Mapping):
        state_dict = _as_state_dict(source, "the state_dict", state_dict_key)
        return _state_dict_payload(state_dict, "state_dict", None)
    if isinstance(source, io.IOBase):
        raise ConfigError("pass a file path, not an open file")
    raise ConfigError(
        f"cannot seal a {type(source).__name__}: pass a state_dict, an nn.Module, a "
        "ScriptModule, an ExportedProgram, or a path to a .safetensors/.pt/.pth/.pt2 file"
    )
