"""The Python API for sealing and loading models (exported lazily by ``sealtorch``).

>>> import sealtorch
>>> key = sealtorch.generate_key()
>>> sealtorch.encrypt_model(
...     model.state_dict(),
...     "resnet50.sealed",
...     model_id="resnet50",
...     key=key,
...     arch="torchvision:resnet50",
... )  # doctest: +SKIP
>>> model = sealtorch.load_model("resnet50.sealed", key=key)  # doctest: +SKIP

``key`` is raw key bytes, a :class:`~sealtorch.keys.DataKey`, a key file path, or any
:class:`~sealtorch.keys.KeyProvider` (a key server or key cache client). For sealing it may
also be a :class:`~sealtorch.sealed.keywrap.ContentKeyWrapper`, which wraps the file's content
key without handing out the data key.

Loading authenticates every byte before anything is parsed; every way a sealed file can be
wrong raises the same :class:`~sealtorch.errors.IntegrityError`, and nothing is returned or
written.
"""

from __future__ import annotations

import contextlib
import io
import logging
import mmap
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from sealtorch.errors import ConfigError, PayloadError
from sealtorch.keys import DataKey, KeyProvider, as_key_provider
from sealtorch.payloads.manifest import (
    ImagePreprocessSpec,
    Manifest,
    TensorSpec,
    parse_prefix,
    validate_arch_ref,
)
from sealtorch.sealed._atomic import AtomicFile
from sealtorch.sealed.header import (
    DEFAULT_CHUNK_SIZE,
    Header,
    KeyBlock,
    check_chunk_size,
    check_key_version,
    check_model_id,
)
from sealtorch.sealed.keywrap import ContentKeyWrapper, LocalKeyWrapper
from sealtorch.sealed.reader import SealedReader
from sealtorch.sealed.sets import SealedSetWriter, plan_parts, set_paths
from sealtorch.sealed.writer import SealedWriter

if TYPE_CHECKING:
    import torch
    from torch import nn

    from sealtorch.payloads.device import DevicePlaintext

__all__ = [
    "KeyLike",
    "SealedInfo",
    "SealedModel",
    "decrypt_model",
    "encrypt_model",
    "inspect_sealed",
    "load_model",
    "load_sealed_model",
    "load_state_dict",
    "rewrap",
]

_log = logging.getLogger(__name__)

KeyLike = KeyProvider | DataKey | bytes | str | os.PathLike[str]
#: ``progress(done_bytes, total_bytes)``
ProgressCallback = Callable[[int, int], None]
SealedSource = str | os.PathLike[str] | BinaryIO
_WRITE_PIECE = 4 * 1024 * 1024


@dataclass(frozen=True)
class SealedInfo:
    """What a sealed file reveals without its key (``sealtorch inspect``)."""

    model_id: str
    key_version: int
    format_version: int
    suite: str
    chunk_size: int
    chunk_count: int
    plaintext_size: int
    file_size: int
    path: Path | None = None
    #: How many files hold the model: 1, or the size of its sealed set.
    file_count: int = 1

    @classmethod
    def from_header(cls, header: Header, *, path: Path | None) -> SealedInfo:
        """The info of a single file (for a sealed set, use :meth:`from_reader`)."""
        return cls(
            model_id=header.model_id,
            key_version=header.key_version,
            format_version=header.version,
            suite=header.body.suite,
            chunk_size=header.body.chunk_size,
            chunk_count=header.body.chunk_count,
            plaintext_size=header.body.plaintext_size,
            file_size=len(header.encode()) + header.body.sealed_size,
            path=path,
        )

    @classmethod
    def from_reader(cls, reader: SealedReader) -> SealedInfo:
        """The info of an open sealed file or set (sizes and chunks of all its files)."""
        header = reader.header
        return cls(
            model_id=header.model_id,
            key_version=header.key_version,
            format_version=header.version,
            suite=header.body.suite,
            chunk_size=header.body.chunk_size,
            chunk_count=header.body.chunk_count + sum(m.body.chunk_count for m in reader.members),
            plaintext_size=reader.plaintext_size,
            file_size=reader.file_size,
            path=reader.path,
            file_count=1 + len(reader.members),
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "key_version": self.key_version,
            "format_version": self.format_version,
            "suite": self.suite,
            "chunk_size": self.chunk_size,
            "chunk_count": self.chunk_count,
            "plaintext_size": self.plaintext_size,
            "file_size": self.file_size,
            # Only for sealed sets: a single file's public fields are unchanged.
            **({"file_count": self.file_count} if self.file_count > 1 else {}),
        }

    def __str__(self) -> str:
        return (
            f"model_id={self.model_id} key_version={self.key_version} "
            f"format=v{self.format_version} suite={self.suite} "
            f"chunk_size={self.chunk_size} plaintext_size={self.plaintext_size}"
        )


@dataclass(frozen=True)
class SealedModel:
    """A loaded model together with its (decrypted) manifest and public header."""

    module: nn.Module
    manifest: Manifest
    info: SealedInfo
    #: Seconds spent obtaining the key and authenticating + decrypting the file
    #: (``"decrypt"``), and building the module from the plaintext (``"build"``).
    timings: Mapping[str, float] = field(default_factory=dict)
    #: The files a sealed Hugging Face directory carries besides its weights (``config.json``,
    #: tokenizer files...), by name, as sealed; empty for other models.
    files: Mapping[str, bytes] = field(default_factory=dict)


# -- keys -----------------------------------------------------------------------------------


def _provider(key: KeyLike) -> KeyProvider | DataKey:
    if isinstance(key, DataKey):
        return key
    return as_key_provider(key)


def _wrapper(
    key: KeyLike | ContentKeyWrapper, *, model_id: str, key_version: int | None
) -> ContentKeyWrapper:
    """The content key wrapper for sealing: a remote-style wrapper, or the data key itself."""
    if isinstance(key, ContentKeyWrapper):
        configured = getattr(key, "key_version", None)
        if key_version is not None and configured is not None and configured != key_version:
            raise ConfigError(
                f"the key wrapper seals with key version {configured}, not {key_version}"
            )
        return key
    version = check_key_version(1 if key_version is None else key_version)
    provider = _provider(key)
    dek = provider if isinstance(provider, DataKey) else provider.data_key(model_id, version)
    if not isinstance(dek, DataKey):
        raise TypeError(f"{provider!r}.data_key() must return a DataKey")
    return LocalKeyWrapper(dek, key_version=version)


# -- sealing --------------------------------------------------------------------------------


def encrypt_model(
    source: object,
    destination: str | os.PathLike[str] | BinaryIO,
    *,
    model_id: str,
    key: KeyLike | ContentKeyWrapper,
    key_version: int | None = None,
    arch: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    metadata: Mapping[str, str] | None = None,
    inputs: Iterable[Mapping[str, Any] | TensorSpec] | None = None,
    outputs: Iterable[Mapping[str, Any] | TensorSpec] | None = None,
    preprocess: Mapping[str, Any] | ImagePreprocessSpec | None = None,
    labels: Iterable[str] | None = None,
    state_dict_key: str | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    overwrite: bool = False,
    check_arch: bool = True,
    progress: ProgressCallback | None = None,
    max_file_size: int | None = None,
    split_like_input: bool = True,
) -> SealedInfo:
    """Seal a model into ``destination`` (written atomically; refuses to overwrite by default).

    ``source`` may also be a Hugging Face ``save_pretrained`` directory: its config, tokenizer
    and other files are sealed with the weights, and ``arch`` defaults to
    ``transformers:CLASS`` from its config (see :mod:`sealtorch.payloads.hf_arch`). A model
    whose input is sharded (``split_like_input``), or larger than ``max_file_size`` bytes, is
    sealed into a *sealed set*: ``destination`` plus ``destination.00002-of-0000N``... (see
    ``docs/format.md`` § Sealed sets), opened by ``destination`` alone.

    ``source`` is a state_dict, an ``nn.Module`` (its state_dict is sealed), a
    ``ScriptModule``, an ``ExportedProgram``, or a path to a ``.safetensors``, ``.pt``/``.pth``
    (state_dict; ``state_dict_key`` picks it out of a checkpoint dict), TorchScript or ``.pt2``
    file. ``arch`` (``torchvision:NAME``, ``timm:NAME`` or ``package.module:factory``, with
    ``arch_kwargs``) lets :func:`load_model` rebuild the module (a factory only where the
    loading side allows it); with ``check_arch`` the state_dict is checked against it now.
    ``inputs``, ``outputs``, ``preprocess`` and ``labels`` describe the model for the inference
    server. All of it is encrypted; only the model id,
    key version and sizes are public.
    """
    from sealtorch.payloads.arch import check_arch_kwargs, check_state_dict_matches
    from sealtorch.payloads.sources import prepare_payload

    check_model_id(model_id)
    check_chunk_size(chunk_size)
    if key_version is not None:
        check_key_version(key_version)
    if max_file_size is not None and max_file_size < 1:
        raise ConfigError("the file size limit must be positive")
    if arch is not None:
        validate_arch_ref(arch)
        check_arch_kwargs(arch, arch_kwargs or {})
    payload = prepare_payload(source, state_dict_key=state_dict_key)
    if arch is not None and payload.kind != "safetensors":
        raise ConfigError(
            f"--arch applies to state_dicts only; a {payload.kind} payload carries its own code"
        )
    if payload.hf_config is not None:
        from sealtorch.payloads.hf_arch import choose_transformers_arch

        arch = choose_transformers_arch(
            payload.hf_config, payload.tensor_shapes or {}, arch, check=check_arch
        )
    elif arch is not None and arch.startswith("transformers:"):
        raise ConfigError(
            f"{arch} is built from a config.json: seal the model's save_pretrained directory"
        )
    if arch is not None and check_arch and payload.state_dict is not None:
        # The owner named this architecture on their own machine: building it here is theirs.
        check_state_dict_matches(arch, arch_kwargs or {}, payload.state_dict, allowed_archs=(arch,))
    manifest = Manifest.build(
        kind=payload.kind,
        payload_size=payload.size,
        payload_align=payload.align,
        arch=arch,
        arch_kwargs=arch_kwargs,
        metadata=metadata,
        inputs=inputs,
        outputs=outputs,
        preprocess=preprocess,
        labels=labels,
        files=[(name, len(data)) for name, data in payload.files] or None,
    )
    prefix = manifest.encode_prefix()
    wrapper = _wrapper(key, model_id=model_id, key_version=key_version)
    total = manifest.plaintext_size
    cuts = payload.boundaries if split_like_input else []
    sizes = plan_parts(
        total, boundaries=[manifest.payload_offset + b for b in cuts], max_size=max_file_size
    )
    if len(sizes) > 1 and not isinstance(destination, str | os.PathLike):
        raise ConfigError("a model sealed into several files needs a destination path")
    done = 0

    def advance(size: int) -> None:
        nonlocal done
        done += size
        if progress is not None:
            progress(done, total)

    writer: SealedWriter | SealedSetWriter
    if len(sizes) == 1:
        writer = SealedWriter(
            destination,
            model_id=model_id,
            plaintext_size=total,
            wrapper=wrapper,
            chunk_size=chunk_size,
            overwrite=overwrite,
            progress=advance,
        )
    else:
        writer = SealedSetWriter(
            destination,  # type: ignore[arg-type]
            model_id=model_id,
            sizes=sizes,
            wrapper=wrapper,
            chunk_size=chunk_size,
            overwrite=overwrite,
            progress=advance,
        )
    with writer:
        writer.write(prefix)
        for piece in payload.stream():
            writer.write(piece)
        for _, data in payload.files:
            writer.write(data)
    header = writer.header
    if not isinstance(header, Header):  # pragma: no cover - both writers write a Header first
        raise TypeError("internal error: the first file has no key block")
    _log.info(
        "sealed %s as model %s (key version %d, %d bytes, %d file%s)",
        payload.description,
        model_id,
        header.key_version,
        total,
        len(sizes),
        "s" if len(sizes) > 1 else "",
    )
    if isinstance(destination, str | os.PathLike):
        return inspect_sealed(destination)
    return SealedInfo.from_header(header, path=None)


# -- loading --------------------------------------------------------------------------------


def _unmap(buffer: mmap.mmap) -> None:
    """Free a plaintext buffer now. Only while no tensor views it: ``torch.frombuffer`` keeps a
    reference to the buffer but no buffer export, so ``close()`` would not notice live tensors.
    Once tensors exist, the buffer is freed with the last of them."""
    buffer.close()


def _decrypt(
    source: SealedSource, key: KeyLike, *, progress: ProgressCallback | None = None
) -> tuple[SealedInfo, Manifest, mmap.mmap]:
    provider = _provider(key)
    with SealedReader(source) as reader:
        buffer = reader.decrypt(reader.content_key(provider), progress=progress)
        info = SealedInfo.from_reader(reader)
    try:
        manifest = parse_prefix(buffer, plaintext_size=info.plaintext_size)
    except BaseException:
        _unmap(buffer)
        raise
    return info, manifest, buffer


def load_state_dict(source: SealedSource, *, key: KeyLike) -> dict[str, torch.Tensor]:
    """Authenticate, decrypt and return the sealed state_dict.

    Every tensor is 64-byte aligned, like PyTorch's own allocations, and a view of one
    decrypted buffer, freed when the last tensor is (files sealed with the earlier packed
    payload layout are copied once into aligned tensors).
    """
    from sealtorch.payloads.tensors import tensors_from_buffer

    _, manifest, buffer = _decrypt(source, key)
    if manifest.kind != "safetensors":
        _unmap(buffer)
        raise PayloadError(
            f"this sealed model holds a {manifest.kind} program, not a state_dict; "
            "use sealtorch.load_model()"
        )
    return tensors_from_buffer(
        buffer,
        offset=manifest.payload_offset,
        size=manifest.payload_size,
        align=manifest.payload_align,
    )


def load_sealed_model(
    source: SealedSource,
    *,
    key: KeyLike,
    arch: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    allowed_archs: Iterable[str] = (),
    progress: ProgressCallback | None = None,
    device: str | torch.device | None = None,
) -> SealedModel:
    """Like :func:`load_model`, but also return the manifest (inputs, outputs, labels...)."""
    from sealtorch.payloads.arch import check_allowed_archs, check_arch_allowed, load_into_module
    from sealtorch.payloads.device import resolve_device, tensors_on_device
    from sealtorch.payloads.programs import load_program
    from sealtorch.payloads.tensors import tensors_from_buffer

    allowed = check_allowed_archs(allowed_archs)
    if arch is not None:
        validate_arch_ref(arch)
        allowed |= {arch}  # the caller's own choice, not the file's
    target = resolve_device(device)
    start = time.perf_counter()
    placed = None if target is None else _decrypt_to_device(source, key, target, progress)
    if placed is None:
        info, manifest, buffer = _decrypt(source, key, progress=progress)
    else:
        info, manifest, buffer = placed[0], placed[1].manifest, placed[1].host
    decrypted = time.perf_counter()
    module: nn.Module
    files: dict[str, bytes] = {}
    if manifest.kind == "safetensors":
        ref = arch if arch is not None else manifest.arch
        if ref is None:
            _unmap(buffer)
            raise PayloadError(
                "this sealed state_dict has no architecture reference: seal it with "
                "--arch (arch=...), pass arch= here, or use sealtorch.load_state_dict()"
            )
        try:
            check_arch_allowed(ref, allowed_archs=allowed)  # before anything is imported
        except BaseException:
            _unmap(buffer)
            raise
        kwargs = arch_kwargs if arch is not None else manifest.arch_kwargs
        config_json = _carried_file(buffer, manifest, "config.json")
        generation_json = _carried_file(buffer, manifest, "generation_config.json")
        files = {name: buffer[s:e] for name, (s, e) in manifest.file_ranges().items()}
        state_dict = (
            tensors_on_device(placed[1])
            if placed is not None
            else tensors_from_buffer(
                buffer,
                offset=manifest.payload_offset,
                size=manifest.payload_size,
                align=manifest.payload_align,
            )
        )
        del buffer, placed  # the tensors keep it alive
        if ref.startswith("transformers:"):
            from sealtorch.payloads.hf_arch import load_transformers_model

            if config_json is None:
                raise PayloadError(f"{ref} needs a sealed config.json, and this model has none")
            module = load_transformers_model(
                ref, config_json, state_dict, generation_config_json=generation_json, device=target
            )
        else:
            module = load_into_module(ref, kwargs or {}, state_dict, allowed_archs=allowed)
    else:
        if arch is not None:
            _unmap(buffer)
            raise ConfigError(f"a {manifest.kind} payload carries its own architecture")
        start, end = manifest.payload_offset, manifest.payload_offset + manifest.payload_size
        with _program_archive(buffer, start, end) as archive:
            module = load_program(manifest.kind, archive)
    if target is not None:
        module.to(target)  # what is not there yet: non-persistent buffers, programs
    timings = {"decrypt": decrypted - start, "build": time.perf_counter() - decrypted}
    return SealedModel(module=module, manifest=manifest, info=info, timings=timings, files=files)


def _decrypt_to_device(
    source: SealedSource, key: KeyLike, device: torch.device, progress: ProgressCallback | None
) -> tuple[SealedInfo, DevicePlaintext] | None:
    """A state dict decrypted onto ``device`` (None for a program: load it on the host)."""
    from sealtorch.payloads.device import decrypt_to_device

    with SealedReader(source) as reader:
        placed = decrypt_to_device(
            reader, reader.content_key(_provider(key)), device, progress=progress
        )
        return None if placed is None else (SealedInfo.from_reader(reader), placed)


def _carried_file(buffer: mmap.mmap, manifest: Manifest, name: str) -> bytes | None:
    """A file the model carries (e.g. ``config.json``), copied out of the plaintext."""
    span = manifest.file_ranges().get(name)
    return None if span is None else bytes(buffer[span[0] : span[1]])


@contextlib.contextmanager
def _program_archive(buffer: mmap.mmap, start: int, end: int) -> Iterator[str | io.BytesIO]:
    """The program archive in ``buffer[start:end]`` as PyTorch's loaders take it; frees
    ``buffer``.

    Handed bytes in memory, PyTorch copies the whole archive twice before it builds a tensor
    (a TorchScript load then peaks at ~4x the model size); handed a path, it reads record by
    record. So the archive moves into an anonymous in-memory file (``memfd_create``: RAM like
    the rest of the process, no name in any file system, gone when closed) whose
    ``/proc/self/fd`` path the loader opens: ~2x for the moment of the move, then ~1x. Where
    that is unavailable (not Linux, a library OS without memfd) the bytes go in memory.
    """
    fd = _memfd_with(memoryview(buffer)[start:end])
    if fd is None:
        data = io.BytesIO(buffer[start:end])
        _unmap(buffer)
        yield data
        return
    _unmap(buffer)
    try:
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def _memfd_with(view: memoryview) -> int | None:
    """A memfd holding ``view`` (which is released), or None where memfds are unavailable."""
    try:
        create = getattr(os, "memfd_create", None)
        if create is None:
            return None
        try:
            fd: int = create("sealtorch-program", os.MFD_CLOEXEC)
        except OSError:
            return None
        try:
            written = 0
            while written < len(view):
                written += os.write(fd, view[written:])
            # The loader opens this path: it must give back what was written (a library OS
            # may have memfds but no /proc/self/fd).
            with Path(f"/proc/self/fd/{fd}").open("rb") as probe:
                if probe.read(64) != bytes(view[:64]):
                    raise OSError("the memfd does not read back through /proc/self/fd")
        except OSError:
            os.close(fd)
            return None
        return fd
    finally:
        view.release()


def load_model(
    source: SealedSource,
    *,
    key: KeyLike,
    arch: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    allowed_archs: Iterable[str] = (),
    progress: ProgressCallback | None = None,
    device: str | torch.device | None = None,
) -> nn.Module:
    """Authenticate and decrypt a sealed model and return it ready for inference.

    ``source`` is a sealed file, or the first file of a sealed set (the others are found next
    to it). A sealed Hugging Face directory comes back as its transformers model (e.g.
    ``GPT2LMHeadModel``), rebuilt from its sealed config with tied weights tied again.
    ``progress(done_bytes, total_bytes)`` is called while decrypting. ``device="cuda"`` (or
    ``"cuda:N"``) decrypts a state dict straight onto that GPU through a small pinned staging
    buffer, so host memory stays at a few chunks (``docs/huggingface.md`` § Big models).

    The module is in eval mode with ``requires_grad`` off. A state_dict payload is loaded into
    the architecture named at sealing time (or ``arch``/``arch_kwargs``), its parameters being
    views of the decrypted buffer; TorchScript and ``torch.export`` payloads load as such.

    The sealed file may name ``torchvision:`` and ``timm:`` models; a
    ``package.module:factory`` it names is imported and called only if it is one of
    ``allowed_archs`` (this machine's explicit choice: a sealed file is data and must not
    choose the code that runs). An ``arch`` passed here is allowed as the caller's own choice.
    Program payloads are inspected before PyTorch loads them (no pickled, custom or opaque
    objects, only PyTorch operators); see ``docs/format.md``.
    """
    return load_sealed_model(
        source,
        key=key,
        arch=arch,
        arch_kwargs=arch_kwargs,
        allowed_archs=allowed_archs,
        progress=progress,
        device=device,
    ).module


# -- owner tools ----------------------------------------------------------------------------


def inspect_sealed(source: SealedSource) -> SealedInfo:
    """The public header of a sealed file (no key needed; nothing is authenticated)."""
    with SealedReader(source) as reader:
        return SealedInfo.from_reader(reader)


def decrypt_model(
    source: SealedSource,
    destination: str | os.PathLike[str],
    *,
    key: KeyLike,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
) -> Manifest:
    """Write the plain model to a file: a standard ``.safetensors`` file for a state_dict, the
    TorchScript ``.pt`` or ``.pt2`` archive for a program.

    The whole body is authenticated and a state_dict is checked by the same strict reader that
    loading uses before anything is written; the output goes to a temporary file (mode 0600)
    renamed to ``destination`` once complete, so on any failure nothing is left. Memory: about
    the model's size. Returns the manifest (payload kind, architecture, metadata).
    """
    from sealtorch.payloads.tensors import SafetensorsPlan, read_safetensors

    _, manifest, buffer = _decrypt(source, key, progress=progress)
    if manifest.files:
        from sealtorch.payloads.hf import write_directory

        write_directory(Path(destination), manifest, buffer, overwrite=overwrite)
        return manifest
    with AtomicFile(destination, overwrite=overwrite, mode=0o600) as out:
        if manifest.kind == "safetensors":
            metadata, tensors = read_safetensors(
                buffer,
                offset=manifest.payload_offset,
                size=manifest.payload_size,
                align=manifest.payload_align,
            )
            del buffer  # the tensors keep it alive
            for piece in SafetensorsPlan(tensors, metadata=metadata, align=None).stream():
                out.write(piece)
        else:
            _write_range(out, buffer, manifest.payload_offset, manifest.plaintext_size)
            _unmap(buffer)
    return manifest


def _write_range(out: AtomicFile, buffer: mmap.mmap, start: int, end: int) -> None:
    with memoryview(buffer) as view:
        for position in range(start, end, _WRITE_PIECE):
            with view[position : min(end, position + _WRITE_PIECE)] as piece:
                out.write(piece)


def rewrap(
    source: str | os.PathLike[str],
    *,
    key: KeyLike | None,
    new_key: KeyLike | ContentKeyWrapper,
    new_key_version: int | None = None,
    destination: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> SealedInfo:
    """Rotate a sealed file to a new data key without re-encrypting its body.

    The content key is unwrapped with ``key`` and wrapped again under ``new_key`` (version
    ``new_key_version``, default: the old version + 1) with a fresh salt and nonce; the body is
    copied byte for byte. In place by default (atomically: a reader sees the old or the new
    file, never a mix), or to ``destination``.

    With ``key=None``, ``new_key`` rewraps remotely (``sealtorch.client.KeyServerWrapper``: the
    key server unwraps with the old version and wraps under its current one, so the content
    key never leaves it); ``new_key_version`` is then the server's choice.
    """
    source_path = Path(source)
    target = source_path if destination is None else Path(destination)
    in_place = target.resolve() == source_path.resolve()
    if in_place:
        # The real file: replacing a symlink would leave the old file (still openable with
        # the old key) where the link pointed.
        target = source_path.resolve()
    remote = getattr(new_key, "rewrap", None) if key is None else None
    if key is None and not callable(remote):
        raise ConfigError(
            "rewrap needs key= (the current data key), unless new_key rewraps remotely "
            "(sealtorch.client.KeyServerWrapper)"
        )
    with SealedReader(source_path) as reader:
        old = reader.header
        if key is None:
            key_block = remote(old)  # type: ignore[misc]
            if not isinstance(key_block, KeyBlock):
                raise TypeError(f"{new_key!r}.rewrap() must return a KeyBlock")
        else:
            cek = reader.content_key(_provider(key))
            version = old.key_version + 1 if new_key_version is None else new_key_version
            wrapper = _wrapper(new_key, model_id=old.model_id, key_version=version)
            key_block = wrapper.wrap(model_id=old.model_id, body_digest=old.body.digest, cek=cek)
            del cek
        header = Header(body=old.body, key=key_block)
        if not in_place:
            # The other files of a set hold no key: copied unchanged next to the new first file.
            for member, path in zip(
                reader.members, set_paths(target, len(reader.members) + 1)[1:], strict=True
            ):
                with AtomicFile(path, overwrite=overwrite) as copy:
                    member.file.seek(0)
                    while piece := member.file.read(_WRITE_PIECE):
                        copy.write(piece)
        with AtomicFile(target, overwrite=in_place or overwrite) as out:
            out.write(header.encode())
            reader.copy_body(out.file)
    _log.info(
        "rewrapped model %s from key version %d to %d",
        old.model_id,
        old.key_version,
        header.key_version,
    )
    return inspect_sealed(target)
