"""Self-describing model files: archives that carry a network's program as well as its weights, read safely.

refine-pl reads one such format, the ``torch.export`` archive (``.pt2``, written by ``torch.export.save``), and
refuses TorchScript (``torch.jit.save``). What each can execute when loaded was read from torch 2.14.1's source;
``tests/test_archives.py`` shows the TorchScript way and ways 1, 2, 4, 5 and 6 below with files whose payload creates
a marker file in torch's loader (and not in refine-pl's):

**TorchScript.** ``torch.jit.load`` compiles the TorchScript source stored under ``code/`` and, while it unpickles
``data.pkl``, calls the ``__setstate__`` method of every object whose class defines one: code from the file runs
during loading. TorchScript's builtins include ``torch.save`` (``aten::save``) and ``torch.from_file``
(``aten::from_file``), which write and create files, and the model's ``forward`` may call them too. No check of
the archive before loading can rule this out short of re-implementing the TorchScript compiler, so refine-pl
refuses these files and says how to convert them.

**torch.export (.pt2).** ``torch.export.load`` runs Python from the file in at least seven ways:

1. a weight or constant that the archive's JSON config marks ``use_pickle`` is read with
   ``torch.load(weights_only=False)``;
2. a constant stored as ``opaque_obj_*`` is read with ``pickle.loads``;
3. a constant stored as ``custom_obj_*`` goes through TorchScript's unpickler (TorchBind objects);
4. the sample inputs (``data/sample_inputs/*.pt``) are read with ``torch.load(weights_only=True)``, and when that
   fails, again with ``weights_only=False``;
5. every symbolic shape expression (``expr_str``) is parsed by ``sympy.sympify``, which evaluates it as Python;
6. ``guards_code`` is compiled with ``exec`` when the program becomes a module, and run on every call;
7. folders under ``data/aotinductor/`` are compiled shared libraries, loaded as native code;

and the graph's call targets are looked up by name from ``torch``, ``math`` and ``_operator`` (so
``torch.os.system`` is a valid target) and called when the module runs. :func:`load_exported_program` therefore
checks the bytes it will hand to torch first: only the records a plain exported classifier has (weights as raw
tensor data, no pickled or opaque objects, no compiled code), sample inputs that load with ``weights_only=True``,
no guard code, shape expressions made only of sympy constructors with literal arguments, and a graph of ATen
operators (except the few that touch files or print) and integer arithmetic, with one image tensor in and one
logits tensor out and no state it mutates. Only then does it call ``torch.export.load`` on those same bytes, and
it checks the loaded graph once more before building the module.
"""

import io
import json
import operator
import re
import tokenize
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from refine_pl.errors import ConfigError, cli_flag, first_sentence
from refine_pl.internals import archive_record, aten_operator

PT2_ARCH = "pt2"
"""What :class:`~refine_pl.victims.VictimRecord` and the exported file record as the architecture of a victim read
from a torch.export archive (no registered name or torchvision model is called so)."""

_CONVERT = (
    "convert it where running its code is acceptable (a sandbox): torch.save(model.state_dict(), path) and pass "
    f"{cli_flag('model', 'victim_arch')}, or torch.export.save(torch.export.export(model, (images,), "
    "dynamic_shapes=({0: torch.export.Dim('batch')},)), 'model.pt2')"
)

_PT2_RECORDS = re.compile(
    r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id|models/model\.json"
    r"|data/weights/model_weights_config\.json|data/weights/weight_\d+"
    r"|data/constants/model_constants_config\.json|data/constants/tensor_\d+"
    r"|data/sample_inputs/model\.pt|extra/[^/]+"
)
"""Every record a .pt2 archive of one plain exported program may hold; extra files are read as text only."""

_MODEL_KEYS = frozenset(
    {
        "graph_module", "opset_version", "range_constraints", "schema_version", "verifiers", "torch_version",
        "guards_code",
    }
)  # fmt: skip
"""Top-level keys of ``models/model.json`` in torch 2.14.1; a new key is refused until it has been reviewed."""

DENIED_ATEN_OPS = frozenset({"from_file", "save", "_print", "warn"})
"""ATen operators that reach outside tensors: found by searching the 4,400 operator schemas of torch 2.14.1
(``torch._C._jit_get_all_schemas()``) for arguments that name a file, and for printing and warning."""

_ARITHMETIC = ("add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "eq", "ne", "lt", "le", "gt", "ge")
ALLOWED_OPERATORS = {f"_operator.{name}": getattr(operator, name) for name in ("getitem", *_ARITHMETIC)}
"""Python operators an exported graph may call: tuple indexing and integer arithmetic on symbolic sizes."""

_ATEN_TARGET = re.compile(r"torch\.ops\.aten\.(\w+)\.(\w+)")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SYMBOL = re.compile(r"[a-z]+\d+")

_EXPRESSION_NAMES = frozenset(
    {
        "Symbol", "Integer", "Add", "Mul", "Min", "Max", "Mod", "FloorDiv", "CeilDiv", "CleanDiv", "PythonMod",
        "ModularIndexing", "FloorToInt", "CeilToInt", "TruncToInt", "IntTrueDiv", "Identity",
        "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not", "True", "False",
        "positive", "negative", "nonnegative", "integer", "real", "finite",
    }
)  # fmt: skip
"""Names a symbolic shape expression may use: sympy's and torch's constructors of integer expressions as torch
writes them (``Mul(Integer(16), Symbol('s77', positive=True, integer=True))``) and the assumption keywords. No power
(``Pow(Integer(10), Integer(10**18))`` would be evaluated eagerly), no attribute access, no subscript."""

_EXPRESSION_OPS = frozenset({"(", ")", ",", "=", "-"})
_MAX_EXPRESSION = 2_000
_SYMBOL_STRING = re.compile(r"'[a-z]+\d+'")


def archive_kind(records: dict[str, int]) -> str:
    """What a torch zip archive holds: ``"pt2"``, ``"pt2-legacy"``, ``"torchscript"``, ``"torch.save"`` or ``"zip"``."""
    if "archive_format" in records:
        return "pt2"
    if "serialized_exported_program.json" in records:
        return "pt2-legacy"
    if "constants.pkl" in records or any(name.startswith("code/") for name in records):
        return "torchscript"
    if "data.pkl" in records:
        return "torch.save"
    return "zip"


def refuse_archive(path: Path, kind: str) -> ConfigError:
    """The error for an archive refine-pl does not load: what it would run, and how to convert it."""
    if kind == "torchscript":
        return ConfigError(
            f"Refusing to load {path}: it is a TorchScript archive (torch.jit.save), and loading one runs TorchScript "
            f"code from the file (its __setstate__ methods), which can read and write files; {_CONVERT}."
        )
    return ConfigError(
        f"Refusing to load {path}: it is a torch.export archive in the format of torch < 2.8, whose loader falls back "
        f"to unpickling Python objects; re-save it with torch.export.save under a current torch, or {_CONVERT}."
    )


def _walk(value: Any) -> Iterator[tuple[str, Any]]:
    """Every ``(key, value)`` pair of the dicts nested anywhere in a JSON value."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield key, item
            yield from _walk(item)
    elif isinstance(value, list):
        for item in value:
            yield from _walk(item)


def safe_expression(text: Any) -> bool:
    """Whether a shape expression of an archive uses only :data:`_EXPRESSION_NAMES`, integers and symbol names.

    Such a string evaluated by ``sympy.sympify`` can only call those constructors with literal arguments.
    """
    if not isinstance(text, str) or len(text) > _MAX_EXPRESSION:
        return False
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (tokenize.TokenError, SyntaxError):
        return False
    for token in tokens:
        if token.type in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER):
            continue
        if token.type == tokenize.NAME and token.string in _EXPRESSION_NAMES:
            continue
        if token.type == tokenize.NUMBER and token.string.isdigit() and len(token.string) <= 20:
            continue
        if token.type == tokenize.STRING and _SYMBOL_STRING.fullmatch(token.string):
            continue
        if token.type == tokenize.OP and token.string in _EXPRESSION_OPS:
            continue
        return False
    return True


def _allowed_target(target: str) -> bool:
    found = _ATEN_TARGET.fullmatch(target)
    return (found is not None and found.group(1) not in DENIED_ATEN_OPS) or target in ALLOWED_OPERATORS


_SIMPLE_IN_SPEC = {
    "type": "builtins.tuple",
    "context": "null",
    "children_spec": [
        {
            "type": "builtins.tuple",
            "context": "null",
            "children_spec": [{"type": None, "context": None, "children_spec": []}],
        },
        {"type": "builtins.dict", "context": "[]", "children_spec": []},
    ],
}
"""The input tree of a program called with one positional tensor and no keyword arguments."""


def _check_program_json(path: Path, model: Any) -> None:
    """Refuses a ``models/model.json`` whose loading or module building would evaluate or call anything unsafe."""

    def refuse(what: str) -> ConfigError:
        return ConfigError(
            f"Refusing to load {path}: its exported program {what}, which torch.export.load would evaluate or run as "
            f"Python; an exported image classifier needs none of it. Re-export the plain model, or {_CONVERT}."
        )

    if not isinstance(model, dict) or not set(model) <= _MODEL_KEYS:
        unknown = sorted(set(model) - _MODEL_KEYS) if isinstance(model, dict) else type(model).__name__
        raise refuse(f"has entries refine-pl has not reviewed ({unknown})")
    if model.get("guards_code"):
        raise refuse("holds guard code")
    for key, value in _walk(model):
        if key == "expr_str" and not safe_expression(value):
            raise refuse(f"holds the shape expression {str(value)[:80]!r}")
        if key in ("as_graph", "as_custom_obj", "as_operator") or (key == "custom_obj_values" and value):
            raise refuse(f"passes a {key.removeprefix('as_').replace('_', ' ')} to an operator")
        if (
            key in ("name", "parameter_name", "buffer_name")
            and isinstance(value, str)
            and not all(_IDENTIFIER.fullmatch(part) or part.isdigit() for part in value.split("."))
        ):
            raise refuse(f"names a value {value[:80]!r}")
    constraints = model.get("range_constraints")
    for symbol in constraints if isinstance(constraints, dict) else ():
        if not _SYMBOL.fullmatch(symbol):
            raise refuse(f"constrains the shape symbol {symbol[:80]!r}")
    # A value of the wrong type below makes torch's deserializer fail (a ConfigError then), so only lists and dicts
    # of the expected kinds need a look.
    graph_module = _member(model, "graph_module")
    nodes = _member(_member(graph_module, "graph"), "nodes")
    for node in nodes if isinstance(nodes, list) else ():
        target = _member(node, "target")
        if not isinstance(target, str) or not _allowed_target(target):
            raise refuse(f"calls {str(target)[:80]!r} (only ATen operators and integer arithmetic are accepted)")
    entries = _member(graph_module, "module_call_graph")
    for entry in entries if isinstance(entries, list) else ():
        signature = _member(entry, "signature")
        if signature is None:
            continue
        try:
            in_spec = json.loads(signature["in_spec"])
        except (KeyError, TypeError, ValueError):
            in_spec = None
        names = _member(signature, "forward_arg_names")
        if (
            not (isinstance(in_spec, list) and in_spec[1:] == [_SIMPLE_IN_SPEC])
            or not isinstance(names, list)
            or not all(isinstance(name, str) and _IDENTIFIER.fullmatch(name) for name in names)
        ):
            raise refuse("takes other inputs than one image tensor")


def _member(value: Any, key: str) -> Any:
    """``value[key]`` of a JSON object, None when ``value`` is not one or lacks the key."""
    return value.get(key) if isinstance(value, dict) else None


def _check_payload_config(path: Path, data: bytes, prefix: str) -> None:
    """Refuses a weights or constants config that marks a payload as pickled or stores anything but raw tensors."""
    try:
        config = dict(json.loads(data)["config"])
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigError(
            f"{path} is a damaged torch.export archive ({first_sentence(error)}): export it again."
        ) from error
    for name, entry in config.items():
        meta = entry.get("tensor_meta") if isinstance(entry, dict) else None
        if (
            not isinstance(entry, dict)
            or entry.get("use_pickle") is not False
            or not re.fullmatch(rf"{prefix}\d+", str(entry.get("path_name")))
            or not isinstance(meta, dict)
            or (meta.get("device") or {}).get("type") != "cpu"
        ):
            raise ConfigError(
                f"Refusing to load {path}: its archive stores {str(name)[:80]!r} as something other than raw tensor "
                "data on the CPU (a pickled payload, which torch.export.load would unpickle, running code from the "
                f"file); {_CONVERT}."
            )


def check_pt2_archive(path: Path, data: bytes, records: dict[str, int]) -> None:
    """Checks a torch.export archive before torch reads it: see the module docstring for what is refused and why.

    Raises:
        ConfigError: The archive holds a record, payload, expression or operator that loading or running it would
            evaluate as code, or is damaged.
    """
    unexpected = sorted(name for name in records if not _PT2_RECORDS.fullmatch(name))
    if unexpected:
        what = "compiled native code (AOTInductor)" if any("aotinductor" in n for n in unexpected) else "records"
        raise ConfigError(
            f"Refusing to load {path}: its torch.export archive holds {what} beyond one exported program's graph and "
            f"tensors ({', '.join(unexpected[:3])}), which torch.export.load would load or unpickle; {_CONVERT}."
        )
    for name in ("archive_format", "models/model.json", "data/weights/model_weights_config.json"):
        if name not in records:
            raise ConfigError(f"{path} is a torch.export archive without {name}: it is damaged; export it again.")
    if archive_record(data, "archive_format") != b"pt2":
        raise ConfigError(f"{path} is not a torch.export archive of format 'pt2': export it again.")
    _check_payload_config(path, archive_record(data, "data/weights/model_weights_config.json"), "weight_")
    if "data/constants/model_constants_config.json" in records:
        _check_payload_config(path, archive_record(data, "data/constants/model_constants_config.json"), "tensor_")
    if "data/sample_inputs/model.pt" in records:
        try:
            torch.load(io.BytesIO(archive_record(data, "data/sample_inputs/model.pt")), weights_only=True)
        except Exception as error:  # whatever weights_only refuses, torch.export.load would unpickle without it
            raise ConfigError(
                f"Refusing to load {path}: its sample inputs do not load with weights_only=True "
                f"({first_sentence(error)}), and torch.export.load would then unpickle them; {_CONVERT}."
            ) from error
    try:
        model = json.loads(archive_record(data, "models/model.json"))
    except ValueError as error:
        raise ConfigError(f"{path} holds a damaged exported program (not JSON): export it again.") from error
    _check_program_json(path, model)


class ExportedNet(nn.Module):
    """A network loaded from a torch.export archive, as a module refine-pl can freeze, move and call.

    The exported graph fixes its train / eval behaviour when it is exported (an exported module refuses ``train()``
    and ``eval()``), so :meth:`train` only records the mode. The archive's bytes are kept, so that an export of the
    defended classifier can carry the victim exactly as it was read.

    Args:
        program: ``ExportedProgram.module()`` of the checked program.
        archive: The archive's bytes.
    """

    def __init__(self, program: nn.Module, archive: bytes) -> None:
        super().__init__()
        self.program = program
        self.archive = archive

    def train(self, mode: bool = True) -> "ExportedNet":
        self.training = mode
        return self

    def forward(self, images: Tensor) -> Tensor:
        """Logits ``[B, num_classes]`` for normalised images ``[B, C, H, W]``."""
        return self.program(images)


def _check_loaded_program(path: Path, program: torch.export.ExportedProgram) -> None:
    """The graph torch built: ATen operators and arithmetic only, one input, one output, no state mutated."""
    for node in program.graph.nodes:
        target = node.target
        operator_name = aten_operator(target)
        allowed = node.op in ("placeholder", "output") or (
            node.op == "call_function"
            and (
                (operator_name is not None and operator_name not in DENIED_ATEN_OPS)
                or any(target is function for function in ALLOWED_OPERATORS.values())
            )
        )
        if not allowed:
            raise ConfigError(f"Refusing to use {path}: its graph has a {node.op} node {target!s:.80}; {_CONVERT}.")
    signature = program.graph_signature
    if len(signature.user_inputs) != 1 or len(signature.user_outputs) != 1:
        raise ConfigError(
            f"{path} is a program of {len(signature.user_inputs)} input(s) and {len(signature.user_outputs)} "
            "output(s); a victim takes one image batch and returns one logits tensor: export the classifier alone."
        )
    if signature.buffers_to_mutate or signature.user_inputs_to_mutate:
        raise ConfigError(
            f"{path} is a program that changes its buffers or its input when it runs (exported in training mode?): "
            "export the classifier after model.eval()."
        )


def load_exported_program(path: Path, data: bytes, records: dict[str, int]) -> ExportedNet:
    """The classifier of a torch.export archive, read from ``data`` (the file's bytes) without running its code.

    Args:
        path: The file, for messages.
        data: Its bytes: checked by :func:`check_pt2_archive`, then given to ``torch.export.load`` as they are.
        records: Its records (:func:`~refine_pl.internals.archive_records`).

    Raises:
        ConfigError: The archive is refused (see :func:`check_pt2_archive`), cannot be loaded, or its graph is not
            one image batch in, one logits tensor out, with ATen operators only.
    """
    check_pt2_archive(path, data, records)
    try:
        program = torch.export.load(io.BytesIO(data))
    except Exception as error:  # torch's deserializer raises many types on inconsistent archives
        raise ConfigError(
            f"{path} is a torch.export archive that cannot be loaded ({first_sentence(error)}): export it again with "
            "this torch version."
        ) from error
    _check_loaded_program(path, program)
    return ExportedNet(program.module(), data)
