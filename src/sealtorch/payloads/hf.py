"""Hugging Face ``save_pretrained`` directories as payloads, streamed from their files.

A directory with a ``config.json`` and its weights in safetensors - one ``model.safetensors``
or shards listed by ``model.safetensors.index.json`` - becomes one state_dict payload (every
tensor of every shard, in shard order) plus the directory's other files (config, generation
config, tokenizer...) carried after it, all inside the ciphertext. Tensors are read from the
input files piece by piece while sealing, so memory stays at a few megabytes whatever the
model's size. Tied weights that ``save_pretrained`` leaves out (GPT-2's ``lm_head.weight``)
stay out: loading ties them again (:mod:`sealtorch.payloads.hf_arch`).

Refused: code in the directory (``*.py``: a sealed model never carries code to run), weights
in pickle formats (``pytorch_model.bin``...), and files of unknown kinds, each with the reason.

Reading a directory needs no PyTorch and no transformers.
"""

from __future__ import annotations

import json
import math
import mmap
import shutil
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from sealtorch.errors import ConfigError, PayloadError
from sealtorch.payloads.manifest import MAX_FILE_SIZE, MAX_FILES, Manifest
from sealtorch.payloads.tensors import ITEM_SIZES, TENSOR_ALIGNMENT, TensorEntry, plan_layout
from sealtorch.sealed._atomic import AtomicFile

__all__ = ["HfDirectory", "is_hf_directory", "read_hf_directory", "write_directory"]

CONFIG_NAME: Final = "config.json"
SINGLE_WEIGHTS: Final = "model.safetensors"
WEIGHTS_INDEX: Final = "model.safetensors.index.json"
#: Carried files: configuration, tokenizer and processor files by their suffix.
_CARRIED_SUFFIXES: Final = (".json", ".txt", ".model", ".jinja", ".tiktoken")
#: Weights in formats that are unpickled or not safetensors: refused, not silently dropped.
_OTHER_WEIGHTS: Final = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
_MAX_HEADER: Final = 100 * 1024 * 1024
_PIECE: Final = 4 * 1024 * 1024
_U64 = struct.Struct("<Q")


def is_hf_directory(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_NAME).is_file()


@dataclass(frozen=True)
class _Tensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    path: Path
    start: int  # absolute offset in the input file
    size: int


@dataclass
class HfDirectory:
    """A checked ``save_pretrained`` directory, ready to stream."""

    path: Path
    config: dict[str, Any]
    tensors: list[_Tensor]
    files: list[tuple[str, bytes]]
    #: Shard files, in order, with how many tensors each holds.
    shards: list[tuple[str, int]]
    metadata: dict[str, str]

    def plan(self) -> tuple[bytes, list[TensorEntry], int]:
        """The aligned safetensors layout of all tensors (header, entries, data size)."""
        return plan_layout(
            [(t.name, t.dtype, t.shape) for t in self.tensors],
            metadata=self.metadata,
            align=TENSOR_ALIGNMENT,
        )

    def shard_ends(self, entries: list[TensorEntry], header_size: int) -> list[int]:
        """Payload offsets where each input shard's tensors end (preferred cuts of a set)."""
        ends = []
        seen = 0
        for _, count in self.shards[:-1]:
            seen += count
            ends.append(header_size + entries[seen - 1].end)
        return ends

    def stream_factory(
        self, header: bytes, entries: list[TensorEntry]
    ) -> Callable[[], Iterator[memoryview]]:
        tensors = {t.name: t for t in self.tensors}

        def stream() -> Iterator[memoryview]:
            yield memoryview(header)
            zeros = memoryview(bytes(TENSOR_ALIGNMENT))
            buffer = memoryview(bytearray(_PIECE))
            position = 0
            handles: dict[Path, Any] = {}
            try:
                for entry in entries:
                    if entry.start > position:
                        yield zeros[: entry.start - position]
                    position = entry.end
                    tensor = tensors[entry.name]
                    handle = handles.get(tensor.path)
                    if handle is None:
                        for old in handles.values():
                            old.close()
                        handles = {tensor.path: tensor.path.open("rb", buffering=0)}
                        handle = handles[tensor.path]
                    handle.seek(tensor.start)
                    remaining = tensor.size
                    while remaining:
                        got = handle.readinto(buffer[: min(_PIECE, remaining)])
                        if not got:
                            raise PayloadError(f"{tensor.path} shrank while it was being sealed")
                        remaining -= got
                        yield buffer[:got]
            finally:
                for old in handles.values():
                    old.close()

        return stream


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PayloadError(f"{path} is not a readable JSON {what}: {exc}") from exc


def _shard_tensors(path: Path) -> tuple[list[_Tensor], dict[str, str]]:
    """The tensors of one safetensors file, from its header (no tensor data is read)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) != 8:
                raise PayloadError(f"{path} is too short to be a safetensors file")
            (length,) = _U64.unpack(prefix)
            if length > _MAX_HEADER or 8 + length > size:
                raise PayloadError(f"{path} has an invalid safetensors header length")
            header = json.loads(handle.read(length))
    except OSError as exc:
        raise PayloadError(f"cannot read {path}: {exc.strerror}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PayloadError(f"{path} has an invalid safetensors header: {exc}") from exc
    if not isinstance(header, dict):
        raise PayloadError(f"{path} has an invalid safetensors header")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise PayloadError(f"{path}: __metadata__ must map strings to strings")
    data_start = 8 + length
    tensors = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise PayloadError(f"{path}: tensor {name!r} has an invalid header entry")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in ITEM_SIZES:
            raise PayloadError(
                f"{path}: tensor {name!r} has dtype {dtype}, which sealtorch does not seal "
                f"(supported: {', '.join(ITEM_SIZES)})"
            )
        if not (
            isinstance(shape, list)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
            and isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise PayloadError(f"{path}: tensor {name!r} has an invalid shape or offsets")
        begin, end = offsets
        nbytes = math.prod(shape) * ITEM_SIZES[dtype]
        if not 0 <= begin <= end or end - begin != nbytes or data_start + end > size:
            raise PayloadError(f"{path}: tensor {name!r} lies outside the file or has a bad size")
        tensors.append(_Tensor(name, dtype, tuple(shape), path, data_start + begin, nbytes))
    tensors.sort(key=lambda t: t.start)
    return tensors, metadata


def _weight_files(directory: Path) -> list[Path]:
    index = directory / WEIGHTS_INDEX
    single = directory / SINGLE_WEIGHTS
    if index.is_file():
        document = _read_json(index, "safetensors index")
        weight_map = document.get("weight_map") if isinstance(document, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise PayloadError(f"{index} has no weight_map")
        names = []
        for file in weight_map.values():
            if not isinstance(file, str) or "/" in file or not file.endswith(".safetensors"):
                raise PayloadError(f"{index} names an invalid shard {file!r}")
            if file not in names:
                names.append(file)
        return [directory / name for name in sorted(names)]
    if single.is_file():
        return [single]
    others = sorted(p.name for p in directory.iterdir() if p.suffix in _OTHER_WEIGHTS)
    if others:
        raise PayloadError(
            f"{directory} holds weights as {', '.join(others)}, not safetensors: sealtorch "
            "never unpickles a checkpoint; save it with save_pretrained(..., "
            "safe_serialization=True)"
        )
    raise PayloadError(f"{directory} has a config.json but no {SINGLE_WEIGHTS} or {WEIGHTS_INDEX}")


def read_hf_directory(directory: Path) -> HfDirectory:
    """Check a ``save_pretrained`` directory and list what will be sealed (no tensor data)."""
    if not is_hf_directory(directory):
        raise ConfigError(f"{directory} is a directory without a config.json; pass a model file")
    config = _read_json(directory / CONFIG_NAME, "model configuration")
    if not isinstance(config, dict):
        raise PayloadError(f"{directory / CONFIG_NAME} is not a JSON object")
    weights = _weight_files(directory)
    index_map: dict[str, str] | None = None
    if weights[0].name != SINGLE_WEIGHTS or len(weights) > 1:
        index_map = _read_json(directory / WEIGHTS_INDEX, "safetensors index")["weight_map"]
    tensors: list[_Tensor] = []
    shards: list[tuple[str, int]] = []
    metadata: dict[str, str] = {}
    seen: set[str] = set()
    for path in weights:
        if not path.is_file():
            raise PayloadError(f"{path.name}, listed by {WEIGHTS_INDEX}, is missing")
        found, shard_metadata = _shard_tensors(path)
        metadata.update(shard_metadata)
        for tensor in found:
            if tensor.name in seen:
                raise PayloadError(f"tensor {tensor.name!r} appears in two shards")
            if index_map is not None and index_map.get(tensor.name) != path.name:
                raise PayloadError(
                    f"{WEIGHTS_INDEX} does not list tensor {tensor.name!r} of {path.name}"
                )
            seen.add(tensor.name)
        tensors.extend(found)
        shards.append((path.name, len(found)))
    if index_map is not None and set(index_map) != seen:
        missing = sorted(set(index_map) - seen)[:5]
        raise PayloadError(f"{WEIGHTS_INDEX} lists tensors no shard holds: {missing}")
    weight_names = {p.name for p in weights} | {WEIGHTS_INDEX}
    files: list[tuple[str, bytes]] = []
    for path in sorted(directory.iterdir(), key=lambda p: p.name):
        name = path.name
        if name in weight_names or name.startswith("."):
            continue
        if path.is_dir():
            raise PayloadError(
                f"{directory} holds a folder {name}/: sealtorch seals the files of a "
                "save_pretrained directory, not nested folders"
            )
        if path.suffix == ".py":
            raise PayloadError(
                f"{directory} holds Python code ({name}): a sealed model never carries code "
                "to run (no trust_remote_code); use a model class that transformers ships"
            )
        if path.suffix in _OTHER_WEIGHTS or path.suffix == ".safetensors":
            raise PayloadError(
                f"{directory} holds {name}, which {WEIGHTS_INDEX} does not list: remove it "
                "(sealtorch seals the safetensors weights the directory's index names)"
            )
        if path.suffix not in _CARRIED_SUFFIXES:
            raise PayloadError(
                f"{directory} holds {name}, which sealtorch does not know how to carry "
                f"(it carries {', '.join(_CARRIED_SUFFIXES)} files besides the weights)"
            )
        size = path.stat().st_size
        if size > MAX_FILE_SIZE:
            raise PayloadError(f"{name} is larger than {MAX_FILE_SIZE >> 20} MiB")
        files.append((name, path.read_bytes()))
    if len(files) > MAX_FILES:
        raise PayloadError(f"{directory} holds more than {MAX_FILES} files besides its weights")
    return HfDirectory(
        path=directory,
        config=config,
        tensors=tensors,
        files=files,
        shards=shards,
        metadata=metadata,
    )


def write_directory(
    directory: Path, manifest: Manifest, buffer: mmap.mmap, *, overwrite: bool
) -> None:
    """A sealed Hugging Face model back as a ``save_pretrained`` directory (``sealtorch
    decrypt``): its carried files byte for byte and one standard ``model.safetensors``.

    ``buffer`` is the authenticated body plaintext; it is released (freed with the last tensor).
    Each file is written atomically (mode 0600); a directory created here is removed again if
    anything fails.
    """
    from sealtorch.payloads.tensors import SafetensorsPlan, read_safetensors

    if directory.exists() and (not overwrite or not directory.is_dir()):
        buffer.close()
        raise ConfigError(
            f"{directory} already exists; pass --force (overwrite=True) to write into it"
        )
    created = not directory.exists()
    if created:
        try:
            directory.mkdir(mode=0o700)
        except OSError as exc:
            buffer.close()
            raise ConfigError(f"cannot create {directory}: {exc.strerror}") from exc
    try:
        with memoryview(buffer) as view:
            for name, (start, end) in manifest.file_ranges().items():
                with AtomicFile(directory / name, overwrite=overwrite, mode=0o600) as out:
                    for position in range(start, end, _PIECE):
                        with view[position : min(end, position + _PIECE)] as piece:
                            out.write(piece)
        metadata, tensors = read_safetensors(
            buffer,
            offset=manifest.payload_offset,
            size=manifest.payload_size,
            align=manifest.payload_align,
        )
        del buffer  # the tensors keep it alive
        with AtomicFile(directory / SINGLE_WEIGHTS, overwrite=overwrite, mode=0o600) as out:
            for piece in SafetensorsPlan(tensors, metadata=metadata, align=None).stream():
                out.write(piece)
    except BaseException:
        if created:
            shutil.rmtree(directory, ignore_errors=True)
        raise
