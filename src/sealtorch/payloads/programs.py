"""Loading program payloads (``torch.export`` and TorchScript archives) without running code
that the archive names.

* ``torch.export``: the archive is inspected first (:func:`sealtorch.payloads.pt2.
  inspect_export_archive`: no pickles, no custom or opaque objects, no native code, a program
  of PyTorch operators whose guards, symbolic sizes and names are data), then loaded with
  ``torch.export.load``, its graph checked again, and ``ExportedProgram.module()`` built.
* TorchScript: loaded with ``torch.jit.load``. A TorchScript archive cannot name Python code:
  its pickles (``data.pkl``, ``constants.pkl``) are read by PyTorch's C++ unpickler, which
  resolves a class name only to a TorchScript type compiled from the archive's ``code/`` or to
  a fixed set of PyTorch functions (``os.system`` is "Unknown type name 'posix.system'"), and
  ``code/`` is TorchScript, compiled by the TorchScript compiler, which has no ``import``,
  ``eval``, ``__import__`` or Python module in scope: it calls operators registered in the
  process only. ``tests/unit/payloads/test_payload_programs.py`` checks both.

Every error PyTorch's loaders raise on a malformed archive becomes a
:class:`~sealtorch.errors.PayloadError` (they raise ``AssertionError``, ``KeyError``,
verifier errors... not only ``RuntimeError``).
"""

from __future__ import annotations

import io
import pickle  # noqa: TID251 - only to catch the unpicklers' errors
import warnings
import zipfile
from typing import TYPE_CHECKING, Any

from sealtorch.errors import PayloadError
from sealtorch.payloads.pt2 import ProgramArchive, check_program_graph, inspect_export_archive

if TYPE_CHECKING:
    from torch import nn

__all__ = ["load_exported_program", "load_program"]

_JIT_DEPRECATED = r"`torch\.jit\.\w+` is deprecated"


def _loader_errors() -> tuple[type[BaseException], ...]:
    """What PyTorch's program loaders raise for a malformed archive."""
    from torch._export.verifier import SpecViolationError  # raised by torch.export.load

    return (
        ArithmeticError,
        AssertionError,
        AttributeError,
        EOFError,
        LookupError,
        OSError,
        RuntimeError,
        TypeError,
        ValueError,
        SpecViolationError,
        pickle.UnpicklingError,
        zipfile.BadZipFile,
    )


def _rewind(archive: ProgramArchive) -> ProgramArchive:
    if isinstance(archive, io.IOBase):
        archive.seek(0)
    return archive


def load_exported_program(archive: ProgramArchive, *, source: str) -> Any:
    """Inspect, load and check a ``torch.export`` archive; returns the ``ExportedProgram``.

    ``source`` names the archive in error messages (a path, "the sealed torch_export program").
    """
    import torch

    inspect_export_archive(archive)
    try:
        program = torch.export.load(_rewind(archive))
    except _loader_errors() as exc:
        raise PayloadError(
            f"{source} is not a loadable torch.export program: {type(exc).__name__}: {exc}"
        ) from exc
    check_program_graph(program)
    return program


def load_program(kind: str, archive: ProgramArchive) -> nn.Module:
    """The module of a sealed ``torchscript`` or ``torch_export`` payload, for inference."""
    import torch

    try:
        if kind == "torch_export":
            program = load_exported_program(archive, source=f"the sealed {kind} program")
            module: nn.Module = program.module()
            # Exported graphs keep the mode they were exported in (sealing refuses programs
            # exported in training mode) and refuse .eval(); set the flags for consistency.
            for sub in module.modules():
                sub.training = False
        else:
            with warnings.catch_warnings():
                # PyTorch deprecates TorchScript; sealed TorchScript models still load.
                warnings.filterwarnings("ignore", message=_JIT_DEPRECATED, category=FutureWarning)
                module = torch.jit.load(_rewind(archive), map_location="cpu")  # type: ignore[no-untyped-call]
            module.eval()
    except _loader_errors() as exc:
        raise PayloadError(
            f"the sealed {kind} program cannot be loaded: {type(exc).__name__}: {exc}"
        ) from exc
    for parameter in module.parameters():  # ScriptModules refuse module.requires_grad_()
        parameter.requires_grad_(False)
    return module
