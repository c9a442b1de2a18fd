"""Program payloads from the attacker's side: archives that would run code when PyTorch loads
them are refused at sealing and at loading, and the marker file they would write never appears.

``hostile_programs.py`` builds each archive (``python hostile_programs.py`` shows that PyTorch
alone runs nine of them); ``marker_module.py`` writes the marker when it is imported.
"""

from __future__ import annotations

import io
import json
import pickle  # noqa: TID251 - writes hostile pickles, never loads one
import re
import sys
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path

import hostile_programs
import pytest
import torch

import sealtorch
from sealtorch.errors import PayloadError
from sealtorch.keys import DataKey
from sealtorch.payloads.programs import load_program
from sealtorch.payloads.pt2 import check_program_graph, inspect_export_archive
from sealtorch.payloads.sources import prepare_payload

KEY = DataKey(bytes(range(32)))
REFUSED = re.escape("refusing this torch.export program")
MARKER_MODULE = "marker_module"


@pytest.fixture
def marker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The file that hostile code would create (also where marker_module writes on import)."""
    path = tmp_path / "marker"
    monkeypatch.setenv(hostile_programs.MARKER_ENV, str(path))
    sys.modules.pop(MARKER_MODULE, None)
    yield path
    assert not path.exists(), f"hostile code ran: {path.read_text() or 'touched'}"
    assert MARKER_MODULE not in sys.modules


@pytest.mark.parametrize("case", sorted(hostile_programs.HOSTILE))
def test_hostile_archives_are_refused_when_sealing(case: str, marker: Path, tmp_path: Path) -> None:
    archive = tmp_path / "program.pt2"
    archive.write_bytes(hostile_programs.HOSTILE[case](marker, MARKER_MODULE))
    with pytest.raises(PayloadError, match=REFUSED):
        prepare_payload(archive)
    with pytest.raises(PayloadError, match=REFUSED):
        inspect_export_archive(io.BytesIO(archive.read_bytes()))


@pytest.mark.parametrize("case", sorted(hostile_programs.HOSTILE))
def test_hostile_archives_are_refused_when_loading(case: str, marker: Path, tmp_path: Path) -> None:
    """Written straight into a sealed file (any key holder can), refused before torch reads it."""
    payload = hostile_programs.HOSTILE[case](marker, MARKER_MODULE)
    sealed = hostile_programs.seal_raw(
        tmp_path / "hostile.sealed", payload, kind="torch_export", key=KEY
    )
    with pytest.raises(PayloadError, match=REFUSED):
        sealtorch.load_model(sealed, key=KEY)


@pytest.mark.parametrize("kind", ["constant", "dynamic", "branches", "keywords"])
def test_plain_programs_still_seal_and_load(kind: str, tmp_path: Path) -> None:
    program = hostile_programs.exported(kind)
    path = tmp_path / "p.sealed"
    sealtorch.encrypt_model(program, path, model_id="p", key=KEY)
    model = sealtorch.load_model(path, key=KEY)
    args, kwargs = program.example_inputs
    with torch.inference_mode():
        assert torch.equal(model(*args, **kwargs), program.module()(*args, **kwargs))
    file = tmp_path / "p.pt2"
    torch.export.save(program, file)
    assert prepare_payload(file).kind == "torch_export"


def test_programs_calling_python_functions_are_refused_when_sealing(tmp_path: Path) -> None:
    program = hostile_programs.exported()
    node = next(n for n in program.graph.nodes if n.op == "call_function")
    node.target = print
    with pytest.raises(PayloadError, match=r"its graph calls 'builtins\.print'"):
        prepare_payload(program)
    with pytest.raises(PayloadError, match="not a PyTorch operator"):
        check_program_graph(program)


def test_loader_errors_become_payload_errors(tmp_path: Path) -> None:
    """An archive that passes inspection but that PyTorch cannot load: a PayloadError, never
    the AssertionError / KeyError / verifier error PyTorch raises."""

    def drop_tensor_description(entries: dict[str, bytes]) -> None:
        program = json.loads(entries["models/model.json"])
        del program["graph_module"]["graph"]["tensor_values"]["linear"]
        entries["models/model.json"] = json.dumps(program).encode()

    broken = hostile_programs.rewrite(hostile_programs.archive_bytes(), drop_tensor_description)
    for payload in (broken, b"PK\x03\x04 not a zip", b""):
        sealed = hostile_programs.seal_raw(
            tmp_path / "broken.sealed", payload, kind="torch_export", key=KEY
        )
        with pytest.raises(PayloadError):
            sealtorch.load_model(sealed, key=KEY)
        sealed.unlink()


# -- TorchScript: the archive cannot name Python code ---------------------------------------------


def _scripted() -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated
        torch.jit.save(torch.jit.script(torch.nn.Linear(3, 2)), buffer)
    return buffer.getvalue()


def _replace(data: bytes, suffix: str, content: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as source, zipfile.ZipFile(out, "w") as target:
        for name in source.namelist():
            target.writestr(name, content if name.endswith(suffix) else source.read(name))
    return out.getvalue()


@pytest.mark.parametrize("entry", ["/data.pkl", "/constants.pkl"])
def test_torchscript_pickles_cannot_call_python(entry: str, marker: Path) -> None:
    """TorchScript's own unpickler resolves names to TorchScript types only."""
    touch = pickle.dumps(hostile_programs.Touch(marker), protocol=2)  # TorchScript's protocol
    hostile = _replace(_scripted(), entry, touch)
    with pytest.raises(PayloadError, match="Unknown type name"):
        load_program("torchscript", io.BytesIO(hostile))


@pytest.mark.parametrize(
    "statement",
    [
        "__import__('os').system('touch {marker}')",
        "os.system('touch {marker}')",
        "eval(\"__import__('os').system('touch {marker}')\")",
    ],
)
def test_torchscript_code_cannot_reach_python(statement: str, marker: Path) -> None:
    """``code/`` is compiled by the TorchScript compiler: no import, eval or Python module."""
    data = _scripted()
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        (name,) = (n for n in archive.namelist() if n.endswith("linear.py"))
        source = archive.read(name).decode()
    injected = f"    _x = {statement.format(marker=marker)}\n    return torch.linear"
    hostile = _replace(data, name, source.replace("    return torch.linear", injected).encode())
    with pytest.raises(PayloadError, match="undefined value"):
        load_program("torchscript", io.BytesIO(hostile))
