"""What a ``torch.export`` archive (``.pt2``) may hold, checked before PyTorch reads it.

PyTorch warns that ``torch.export.load`` must never see data from an untrusted source, and a
sealed file is data: whoever holds a model's key can seal any archive, and the owner may be
handed a ``.pt2`` by someone else. Loading an archive as PyTorch 2.14 writes it can run code in
several ways, each of which this module refuses before ``torch.export.load`` is called:

* pickles: weights or constants marked ``use_pickle`` (``torch.load(weights_only=False)``),
  opaque objects (``pickle.loads``), custom TorchScript objects (the TorchScript unpickler),
  the legacy ``<model>.pt`` weight and constant files, and the sample inputs, which PyTorch
  unpickles without restriction when the restricted unpickler refuses them;
* native code: AOTInductor packages (``data/aotinductor/``) and other unknown entries;
* Python source in the program's JSON (``models/model.json``): input guards
  (``guards_code``, compiled with ``exec`` by ``ExportedProgram.module()`` and run on every
  call), symbolic size expressions (``expr_str``, parsed by ``sympy.sympify``, i.e. ``eval``),
  graph node targets resolved by attribute path (e.g. ``torch.export.custom_ops.
  _call_custom_autograd_function_in_pre_dispatch``, which imports a module named by a string
  argument), and names that ``torch.fx`` pastes into code it generates and executes.

So an archive is accepted only if it looks exactly like what ``torch.export.save`` writes for
an ordinary program (:func:`inspect_export_archive`): one root folder holding

======================================================  ==========================================
``archive_format`` ``archive_version`` ``byteorder``    format markers
``.data/version`` ``.data/serialization_id``
``models/model.json``                                   the program: checked field by field
``data/weights/model_weights_config.json``,             weights as raw little-endian tensor bytes
``data/weights/weight_N``                               (never ``use_pickle``)
``data/constants/model_constants_config.json``,         tensor constants, likewise
``data/constants/tensor_N``
``data/sample_inputs/model.pt``                         must load with
                                                        ``torch.load(weights_only=True)``
======================================================  ==========================================

and nothing else, in a plain zip file (no duplicate names, not even differing in case only, as
PyTorch's reader looks names up; no bytes before the first entry or after the end record).
After loading, the graph is checked again (:func:`check_program_graph`): PyTorch operators,
an allowlist of higher-order operators and of the arithmetic used on symbolic sizes, names
that are plain identifiers.
"""

from __future__ import annotations

import ast
import io
import json
import os
import pickle  # noqa: TID251 - only to catch the weights-only unpickler's refusal
import re
import zipfile
from collections.abc import Iterator, Mapping
from typing import IO, Any, Final

from sealtorch.errors import PayloadError

__all__ = ["ProgramArchive", "check_program_graph", "inspect_export_archive"]

#: A program archive as PyTorch's loaders take it: a path or an in-memory file.
ProgramArchive = str | os.PathLike[str] | IO[bytes]

# fmt: off
_FIXED_ENTRIES: Final = frozenset({
    "archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id",
    "models/model.json",
    "data/weights/model_weights_config.json",
    "data/constants/model_constants_config.json",
    "data/sample_inputs/model.pt",
})
# fmt: on
_WEIGHT_FILE = re.compile(r"data/weights/(weight_[0-9]{1,9})")
_CONSTANT_FILE = re.compile(r"data/constants/(tensor_[0-9]{1,9})")
_ROOT = re.compile(r"[^/\\\x00-\x1f\x7f]{1,255}")
_MAX_JSON: Final = 256 * 1024 * 1024
_MAX_SAMPLE_INPUTS: Final = 64 * 1024 * 1024

#: Names and qualified names (node names, parameter FQNs...): torch.fx writes them into code.
_QUALIFIED_NAME = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*")
#: Every other string in the program JSON (dialects, devices, versions, names).
_PLAIN = re.compile(r"[A-Za-z0-9_.:+\-]*")
#: Keys of range_constraints: sizes printed as text (e.g. ``2*s74``), looked up, not parsed.
_SIZE_TEXT = re.compile(r"[A-Za-z0-9_ *+\-/(),]*")
#: PyTorch operators: torch.ops.NAMESPACE.OP.OVERLOAD (no dunder parts).
_OPERATOR = re.compile(
    r"torch\.ops\.(?!higher_order\.)(?:(?!__)[A-Za-z0-9_]+\.){2}(?!__)[A-Za-z0-9_]+"
)
# fmt: off
#: Higher-order operators whose arguments are graphs, tensors and operators - never a Python
#: callable, module name or compiled code (unlike flat_apply, invoke_leaf_function,
#: inductor_compiled_code, aoti_call_delegate, call_torchbind, autograd_function_apply...).
_HIGHER_ORDER_OPS: Final = frozenset({
    "associative_scan", "auto_functionalized", "auto_functionalized_v2", "cond",
    "flex_attention", "hints_wrapper", "invoke_subgraph", "map_impl", "out_dtype", "scan",
    "while_loop", "while_loop_stack_output", "with_effects", "wrap_with_autocast",
    "wrap_with_set_grad_enabled",
})
#: Python functions a graph may call on symbolic sizes (and grad-mode switches).
_SYMBOLIC_FUNCTIONS: Final = frozenset({
    *(f"_operator.{name}" for name in (
        "abs", "add", "and_", "eq", "floordiv", "ge", "getitem", "gt", "le", "lshift", "lt",
        "mod", "mul", "ne", "neg", "not_", "or_", "pos", "pow", "rshift", "sub", "truediv",
    )),
    "math.ceil", "math.floor", "math.sqrt", "math.trunc",
    *(f"torch.sym_{name}" for name in ("float", "int", "ite", "max", "min", "not", "sum")),
    "torch._sym_sqrt", "torch._C._set_grad_enabled",
    "torch.amp.autocast_mode._enter_autocast", "torch.amp.autocast_mode._exit_autocast",
})

# -- symbolic size expressions (sympy srepr, parsed by sympy.sympify = eval) ----------------------

_SYMPY_NAMES: Final = frozenset({
    # sympy classes that srepr prints for integer and boolean size expressions
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Mod", "Max", "Min", "Abs",
    "floor", "ceiling", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "Equality", "Unequality",
    "StrictLessThan", "StrictGreaterThan", "LessThan", "GreaterThan", "And", "Or", "Not",
    "BooleanTrue", "BooleanFalse", "true", "false", "Infinity", "NegativeInfinity", "Zero",
    "One", "NegativeOne", "Half", "oo", "Piecewise", "ExprCondPair",
    # torch.utils._sympy.functions, as torch's deserializer names them
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt",
    "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv",
    "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt",
    "RoundDecimal", "ToFloat", "Identity",
    # assumptions and literals
    "integer", "positive", "nonnegative", "negative", "nonpositive", "real", "finite",
    "infinite", "commutative", "zero", "nonzero", "even", "odd", "rational", "precision",
    "True", "False",
})
# fmt: on
_SYM_TOKEN = re.compile(
    r"\s*(?:(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<number>[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)"
    r"|(?P<string>'[A-Za-z0-9_.+\-]*')"
    r"|(?P<op>[(),=+\-*/]))"
)

# -- input guards (Python expressions compiled with exec by ExportedProgram.module()) -------------

# fmt: off
_GUARD_NODES: Final = (
    ast.Expression, ast.Compare, ast.BoolOp, ast.UnaryOp, ast.BinOp, ast.Constant,
    ast.Subscript, ast.Call, ast.Attribute, ast.Name, ast.Load,
    ast.And, ast.Or, ast.Not, ast.USub, ast.UAdd,
    ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow,
    ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE,
)
# fmt: on
_GUARD_METHODS: Final = frozenset({"size", "stride", "storage_offset", "dim", "numel"})
_GUARD_FUNCTIONS: Final = frozenset({"IsNonOverlappingAndDenseIndicator", "abs", "max", "min"})
_GUARD_MODULE_FUNCTIONS: Final = frozenset(
    {
        "math.ceil",
        "math.floor",
        "math.sqrt",
        "math.trunc",
        *(f"torch.sym_{name}" for name in ["float", "int", "ite", "max", "min", "not"]),
    }
)
_MAX_GUARD: Final = 16384


def _refuse(problem: str) -> PayloadError:
    return PayloadError(
        f"refusing this torch.export program: {problem}. Loading it could run code that the "
        "archive names; export a plain program (tensors and PyTorch operators only) with "
        "torch.export.export() after model.eval() and torch.export.save()"
    )


# -- the zip file ----------------------------------------------------------------------------


def _check_frame(handle: IO[bytes]) -> None:
    """The zip file starts with its first entry and ends with its end record (no comment), so
    that Python's zipfile and PyTorch's reader see the same entries."""
    handle.seek(0)
    head = handle.read(4)
    size = handle.seek(0, os.SEEK_END)
    if size < 22:
        raise _refuse("it is not a zip archive")
    handle.seek(size - 22)
    tail = handle.read(22)
    if head != b"PK\x03\x04" or tail[:4] != b"PK\x05\x06" or tail[20:] != b"\x00\x00":
        raise _refuse("its zip file has bytes before its first entry or after its end record")


def _members(archive: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    """The entries by their name inside the archive's one root folder."""
    roots = set()
    members: dict[str, zipfile.ZipInfo] = {}
    folded: set[str] = set()
    for info in archive.infolist():
        name = info.filename
        root, slash, inner = name.partition("/")
        if not slash or _ROOT.fullmatch(root) is None:
            raise _refuse(f"its entry {name!r} is not inside the archive's folder")
        if name.casefold() in folded:
            raise _refuse(f"two of its entries are named {name!r} (compared without case)")
        if info.flag_bits & 0x1:
            raise _refuse(f"its entry {name!r} is encrypted")
        folded.add(name.casefold())
        roots.add(root)
        members[inner] = info
    if len(roots) != 1:
        raise _refuse("its entries are not all in one folder")
    return members


def _unexpected(name: str) -> str:
    if name.startswith("data/aotinductor/"):
        return "it holds an AOTInductor package (compiled native code)"
    if name.startswith("data/constants/custom_obj_"):
        return f"it holds a custom TorchScript object ({name})"
    if name.startswith("data/constants/opaque_obj_"):
        return f"it holds a pickled opaque object ({name})"
    if name.endswith((".pt", ".pkl")):
        return f"it holds a pickle ({name})"
    if name.startswith("extra/"):
        return f"it holds an extra file ({name}), which sealtorch does not carry"
    return f"it holds an entry that torch.export.save does not write for a program ({name})"


def _read(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    if info.file_size > limit:
        raise _refuse(f"its entry {info.filename} is larger than {limit} bytes")
    try:
        return archive.read(info)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise _refuse(f"its entry {info.filename} cannot be read ({exc})") from exc


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _refuse(f"its JSON repeats the key {key!r}")
        result[key] = value
    return result


def _read_json(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> Any:
    data = _read(archive, info, _MAX_JSON)
    try:
        return json.loads(data, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as exc:
        raise _refuse(f"its entry {info.filename} is not valid JSON") from exc


def inspect_export_archive(archive: ProgramArchive) -> None:
    """Refuse a ``torch.export`` archive that could run code when PyTorch loads it.

    Reads only the archive's directory, its JSON files and its (small) sample inputs; the
    weights are not read. Raises :class:`~sealtorch.errors.PayloadError`.
    """
    if isinstance(archive, str | os.PathLike):
        with open(archive, "rb") as handle:
            _check_frame(handle)
            _inspect_zip(handle)
    else:
        _check_frame(archive)
        _inspect_zip(archive)
        archive.seek(0)


def _inspect_zip(handle: IO[bytes]) -> None:
    handle.seek(0)
    try:
        archive = zipfile.ZipFile(handle)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise _refuse(f"it is not a readable zip archive ({exc})") from exc
    with archive:
        members = _members(archive)
        weights = {m.group(1) for n in members if (m := _WEIGHT_FILE.fullmatch(n))}
        constants = {m.group(1) for n in members if (m := _CONSTANT_FILE.fullmatch(n))}
        for name in members:
            if name not in _FIXED_ENTRIES and not (
                _WEIGHT_FILE.fullmatch(name) or _CONSTANT_FILE.fullmatch(name)
            ):
                raise _refuse(_unexpected(name))
        missing = sorted(_FIXED_ENTRIES - {".data/serialization_id", "byteorder"} - set(members))
        if missing:
            raise _refuse(f"it lacks {', '.join(missing)} (not a torch.export.save archive)")
        if _read(archive, members["archive_format"], 16) != b"pt2":
            raise _refuse("its archive_format is not pt2")
        _check_payload_config(
            _read_json(archive, members["data/weights/model_weights_config.json"]),
            what="weight",
            prefix="weight_",
            files=weights,
        )
        _check_payload_config(
            _read_json(archive, members["data/constants/model_constants_config.json"]),
            what="constant",
            prefix="tensor_",
            files=constants,
        )
        _check_program(_read_json(archive, members["models/model.json"]))
        _check_sample_inputs(
            _read(archive, members["data/sample_inputs/model.pt"], _MAX_SAMPLE_INPUTS)
        )


def _check_payload_config(doc: object, *, what: str, prefix: str, files: set[str]) -> None:
    """Weights and constants: raw tensor files only, never pickles or objects."""
    config = doc.get("config") if isinstance(doc, dict) and set(doc) == {"config"} else None
    if not isinstance(config, dict):
        raise _refuse(f"its {what} configuration is not what torch.export.save writes")
    for fqn, entry in config.items():
        if _QUALIFIED_NAME.fullmatch(fqn) is None:
            raise _refuse(f"its {what} name {fqn[:80]!r} is not a plain qualified name")
        path_name = entry.get("path_name") if isinstance(entry, dict) else None
        if isinstance(path_name, str) and path_name.startswith("custom_obj_"):
            raise _refuse(f"its {what} {fqn} is a custom TorchScript object")
        if isinstance(path_name, str) and path_name.startswith("opaque_obj_"):
            raise _refuse(f"its {what} {fqn} is a pickled opaque object")
        if not isinstance(entry, dict) or entry.get("use_pickle") is not False:
            raise _refuse(
                f"its {what} {fqn} is pickled (PyTorch would load it with "
                "torch.load(weights_only=False))"
            )
        if path_name not in files or not str(path_name).startswith(prefix):
            raise _refuse(f"its {what} {fqn} does not name a tensor file of the archive")
        if not isinstance(entry.get("tensor_meta"), dict):
            raise _refuse(f"its {what} {fqn} has no tensor description")
        _walk(entry, "")


def _check_sample_inputs(data: bytes) -> None:
    """PyTorch unpickles the sample inputs with ``torch.load(weights_only=True)`` and, should
    that raise *anything*, again without restriction. So they must load exactly that way."""
    import torch

    if not data:
        return
    try:
        loaded = torch.load(io.BytesIO(data), weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _refuse(
            "its sample inputs need more than PyTorch's weights-only unpickler (PyTorch would "
            "then unpickle them without restriction)"
        ) from exc
    except Exception as exc:  # PyTorch falls back to full unpickling on any Exception
        raise _refuse(f"its sample inputs cannot be read safely ({type(exc).__name__})") from exc
    if not isinstance(loaded, tuple | dict):
        raise _refuse("its sample inputs are not a tuple or dict")


# -- the program (models/model.json) ----------------------------------------------------------


def _check_program(doc: object) -> None:
    if not isinstance(doc, dict) or "graph_module" not in doc:
        raise _refuse("models/model.json is not an exported program")
    guards = doc.get("guards_code", [])
    if not isinstance(guards, list):
        raise _refuse("its input guards are not a list")
    for guard in guards:
        _check_guard(guard)
    _walk(doc, "")


#: Fields whose strings PyTorch keeps as data or prints with repr() (never as code).
_FREE_TEXT: Final = frozenset({"as_string", "as_strings"})
#: Fields holding a pytree spec as JSON text (its names reach generated code: checked inside).
_TREESPECS: Final = frozenset({"in_spec", "out_spec"})
#: Fields that describe custom (TorchScript / torchbind) objects.
_CUSTOM_OBJECTS: Final = frozenset({"as_custom_obj", "custom_obj", "custom_obj_values"})


def _walk(value: object, key: str, depth: int = 0) -> None:
    """Check every string of the program JSON by the field it is in."""
    if depth > 256:
        raise _refuse("its program JSON is nested too deeply")
    if isinstance(value, dict):
        for name, item in value.items():
            if name == "metadata":
                # Node and graph metadata (stack traces, module paths): torch.fx writes them
                # only into comments, one line each, or with repr().
                continue
            if name == "guards_code":
                continue  # checked by _check_guard
            if name in _CUSTOM_OBJECTS and item:
                raise _refuse("it holds a custom TorchScript object")
            pattern = _SIZE_TEXT if key == "range_constraints" else _PLAIN
            if pattern.fullmatch(name) is None:
                raise _refuse(f"it has a field or name {name[:80]!r} that is not plain")
            _walk(item, name, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _walk(item, key, depth + 1)
    elif isinstance(value, str):
        if key == "expr_str":
            _check_sym_expr(value)
        elif key in ("target", "as_operator"):
            _check_target(value)
        elif key in _TREESPECS:
            _check_treespec(value)
        elif key not in _FREE_TEXT and _PLAIN.fullmatch(value) is None:
            raise _refuse(f"its field {key!r} holds {value[:80]!r}, which is not a plain name")


def _check_treespec(text: str) -> None:
    """A pytree spec (JSON text whose ``context`` fields are JSON text again): its dict keys
    become keyword names in the code that torch.fx generates, so every string must be plain."""
    try:
        spec = json.loads(text, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as exc:
        raise _refuse("its input or output structure is not valid JSON") from exc

    def visit(value: object, key: str) -> None:
        if isinstance(value, dict):
            for name, item in value.items():
                visit(name, "")
                visit(item, name)
        elif isinstance(value, list):
            for item in value:
                visit(item, key)
        elif isinstance(value, str) and key == "context":
            _check_treespec(value)
        elif isinstance(value, str) and _PLAIN.fullmatch(value) is None:
            raise _refuse(f"its input or output structure names {value[:80]!r}")

    visit(spec, "")


def _check_target(target: str) -> None:
    """What a graph node may call: resolved by PyTorch through ``getattr`` from ``torch``,
    ``_operator`` or ``math``, so anything else reachable that way must be refused."""
    if _OPERATOR.fullmatch(target) or target in _SYMBOLIC_FUNCTIONS:
        return
    prefix, _, name = target.rpartition(".")
    if prefix == "torch.ops.higher_order" and name in _HIGHER_ORDER_OPS:
        return
    raise _refuse(f"a graph node calls {target[:120]!r}, which is not a PyTorch operator")


def _check_sym_expr(text: str) -> None:
    """A symbolic size as ``sympy.srepr`` writes it: sympy and torch size functions, symbols,
    numbers - ``sympy.sympify`` evaluates it as Python."""
    position = 0
    while position < len(text):
        match = _SYM_TOKEN.match(text, position)
        if match is None or match.end() == position:
            raise _refuse(f"it has a symbolic size {text[:120]!r} that is not a sympy expression")
        name = match.group("name")
        if name is not None and name not in _SYMPY_NAMES:
            raise _refuse(f"its symbolic size {text[:120]!r} uses {name!r}")
        position = match.end()
    if "**" in text or len(text) > 65536:
        raise _refuse(f"its symbolic size {text[:120]!r} is not a plain sympy expression")


def _check_guard(guard: object) -> None:
    """An input guard: a comparison of input sizes (compiled with exec by PyTorch)."""
    if not isinstance(guard, str) or len(guard) > _MAX_GUARD:
        raise _refuse("it has an input guard that is not a short expression")
    try:
        tree = ast.parse(guard, mode="eval")
    except (SyntaxError, ValueError, RecursionError) as exc:
        raise _refuse(f"its input guard {guard[:120]!r} is not an expression") from exc
    for node in ast.walk(tree):
        if not isinstance(node, _GUARD_NODES) or not _guard_node_ok(node):
            raise _refuse(f"its input guard {guard[:120]!r} is not a comparison of input sizes")


def _guard_node_ok(node: ast.AST) -> bool:
    if isinstance(node, ast.Name):
        return node.id in ("L", "math", "torch") or node.id in _GUARD_FUNCTIONS
    if isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, str):
            return _QUALIFIED_NAME.fullmatch(value) is not None
        return isinstance(value, int | float | bool)
    if isinstance(node, ast.Attribute):
        if isinstance(node.value, ast.Name) and node.value.id in ("math", "torch"):
            return f"{node.value.id}.{node.attr}" in _GUARD_MODULE_FUNCTIONS
        return node.attr in _GUARD_METHODS
    if isinstance(node, ast.Call):
        if node.keywords:
            return False
        func = node.func
        if isinstance(func, ast.Name):
            return func.id in _GUARD_FUNCTIONS
        return isinstance(func, ast.Attribute)
    if isinstance(node, ast.Subscript):
        return not isinstance(node.slice, ast.Slice)
    return True


# -- after loading ---------------------------------------------------------------------------


def check_program_graph(program: Any) -> None:
    """Refuse a loaded ``ExportedProgram`` whose graphs call anything but PyTorch operators."""
    import torch

    for module in program.graph_module.modules():
        graph = getattr(module, "graph", None)
        if not isinstance(graph, torch.fx.Graph):
            continue
        for node in graph.nodes:
            if node.op not in ("placeholder", "get_attr", "call_function", "output"):
                raise _refuse(f"its graph has a {node.op} node")
            if node.op == "get_attr" and _QUALIFIED_NAME.fullmatch(str(node.target)) is None:
                raise _refuse(f"its graph reads an attribute named {str(node.target)[:80]!r}")
            if node.op == "call_function":
                _check_callable(node.target)
            for leaf in _leaves((node.args, node.kwargs)):
                if callable(leaf) and not isinstance(leaf, torch.fx.Node | torch.Tensor):
                    _check_callable(leaf)


def _leaves(value: object) -> Iterator[object]:
    if isinstance(value, list | tuple):
        for item in value:
            yield from _leaves(item)
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _leaves(item)
    elif isinstance(value, slice):
        yield from _leaves((value.start, value.stop, value.step))
    else:
        yield value


def _check_callable(target: object) -> None:
    import torch

    if isinstance(target, torch._ops.OpOverload):
        return
    if isinstance(target, torch._ops.HigherOrderOperator):
        name = str(target.name())  # type: ignore[no-untyped-call]
        if name in _HIGHER_ORDER_OPS:
            return
        raise _refuse(f"its graph calls the higher-order operator {name}")
    if _qualified_name(target) in _SYMBOLIC_FUNCTIONS:
        return
    raise _refuse(f"its graph calls {_qualified_name(target)[:120]!r}, not a PyTorch operator")


def _qualified_name(target: object) -> str:
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None)
    return f"{module}.{name}" if name else repr(target)
