"""Self-describing model files run nothing of theirs in refine-pl.

Each way torch's own loaders execute code from a TorchScript or torch.export archive is shown with a file whose
payload creates a marker (torch's loader creates it), and the same file is refused by refine-pl with the marker left
uncreated. A plain exported classifier loads and classifies as the original network.
"""

import contextlib
import io
import json
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from refine_pl.archives import (
    DENIED_ATEN_OPS,
    PT2_ARCH,
    ExportedNet,
    check_pt2_archive,
    load_exported_program,
    safe_expression,
)
from refine_pl.errors import ConfigError
from refine_pl.internals import archive_records
from refine_pl.victims import load_victim
from tests.conftest import CodeOnUnpickle

FACTS = {"num_classes": 5, "in_channels": 3, "image_size": 16, "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}


def _classifier() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)
    )
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.5, 0.5)  # statistics that are not the defaults, so they must be loaded
    return net.eval()


def _exported(net: nn.Module, batch_dim: bool = True) -> bytes:
    shapes = ({0: torch.export.Dim("batch")},) if batch_dim else None
    buffer = io.BytesIO()
    torch.export.save(torch.export.export(net, (torch.rand(2, 3, 16, 16),), dynamic_shapes=shapes), buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def plain_archive() -> bytes:
    return _exported(_classifier())


def _rewritten(data: bytes, edit) -> bytes:
    """The archive with its records (name without the root folder: bytes) changed by ``edit``."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        root = archive.namelist()[0].split("/")[0]
        records = {name.split("/", 1)[1]: archive.read(name) for name in archive.namelist()}
    edit(records)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for name, content in records.items():
            archive.writestr(f"{root}/{name}", content)
    return out.getvalue()


def _json_edit(name: str, change):
    def edit(records: dict[str, bytes]) -> None:
        content = json.loads(records[name])
        change(content)
        records[name] = json.dumps(content).encode()

    return edit


def _pickled_weight(marker: Path):
    """A weight marked ``use_pickle`` whose payload is a pickle that calls ``os.mkdir(marker)``."""

    def edit(records: dict[str, bytes]) -> None:
        _json_edit("data/weights/model_weights_config.json", lambda c: c["config"]["0.bias"].update(use_pickle=True))(
            records
        )
        buffer = io.BytesIO()
        torch.save(CodeOnUnpickle(marker), buffer)
        records["data/weights/weight_1"] = buffer.getvalue()

    return edit


def _opaque_constant(marker: Path):
    def edit(records: dict[str, bytes]) -> None:
        entry = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True, "tensor_meta": None}
        records["data/constants/model_constants_config.json"] = json.dumps({"config": {"c": entry}}).encode()
        records["data/constants/opaque_obj_0"] = pickle.dumps(CodeOnUnpickle(marker))

    return edit


def _sample_inputs(marker: Path):
    def edit(records: dict[str, bytes]) -> None:
        buffer = io.BytesIO()
        torch.save(((CodeOnUnpickle(marker),), {}), buffer)
        records["data/sample_inputs/model.pt"] = buffer.getvalue()

    return edit


def _shape_expression(marker: Path):
    """A symbolic batch size whose expression (``sympy.sympify`` evaluates it) reaches ``__import__``."""
    escape = f"Symbol.__new__.__globals__['__builtins__']['__import__']('os').mkdir('{marker}') or "

    def edit(records: dict[str, bytes]) -> None:
        text = records["models/model.json"].decode()
        symbol = text[text.index("Symbol(") : text.index(")", text.index("Symbol(")) + 1]
        records["models/model.json"] = text.replace(f'"expr_str": "{symbol}"', f'"expr_str": "{escape}{symbol}"', 1)
        records["models/model.json"] = records["models/model.json"].encode()

    return edit


def _guard_code(marker: Path):
    return _json_edit("models/model.json", lambda m: m.update(guards_code=[f"__import__('os').mkdir('{marker}')"]))


PAYLOADS = {
    "pickled weight": (_pickled_weight, "as something other than raw tensor data"),
    "opaque constant": (_opaque_constant, r"holds records .*opaque_obj_0"),
    "sample inputs": (_sample_inputs, "sample inputs do not load with weights_only=True"),
    "shape expression": (_shape_expression, "holds the shape expression"),
    "guard code": (_guard_code, "holds guard code"),
}
"""Every way torch.export.load (torch 2.14.1) runs Python from an archive, with refine-pl's message for each."""


@pytest.mark.parametrize("kind", PAYLOADS)
def test_a_pt2_payload_runs_in_torch_export_load_and_nothing_runs_in_refine_pl(
    kind: str, plain_archive: bytes, tmp_path: Path
) -> None:
    make, message = PAYLOADS[kind]
    # torch's own loader runs the payload: the marker appears (when the module is built or called, for guards).
    marker = tmp_path / "ran_in_torch"
    evil = _rewritten(plain_archive, make(marker))
    with contextlib.suppress(Exception):  # the archive may fail to load after its payload ran: the marker counts
        torch.export.load(io.BytesIO(evil)).module()(torch.rand(2, 3, 16, 16))
    assert marker.exists(), f"the {kind} payload did not run in torch.export.load: the test proves nothing"

    marker = tmp_path / "ran_in_refine_pl"
    path = tmp_path / "suspect.pt2"
    path.write_bytes(_rewritten(plain_archive, make(marker)))
    with pytest.raises(ConfigError, match=f"Refusing to load {path}: .*{message}") as error:
        load_victim(path, **FACTS)
    assert "\n" not in str(error.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ("data/aotinductor/model/model.so", r"compiled native code \(AOTInductor\)"),
        ("data/constants/custom_obj_0", "custom_obj_0"),
        ("data/weights/model.pt", "data/weights/model.pt"),  # the legacy pickled weights file
    ],
)
def test_records_that_torch_would_load_as_code_or_pickles_are_refused(
    record: str, message: str, plain_archive: bytes, tmp_path: Path
) -> None:
    path = tmp_path / "suspect.pt2"
    path.write_bytes(_rewritten(plain_archive, lambda records: records.update({record: b"\x7fELF"})))
    with pytest.raises(ConfigError, match=f"Refusing to load .*{message}"):
        load_victim(path, **FACTS)


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("torch.os.mkdir", "calls 'torch.os.mkdir'"),  # any callable reachable from torch by name
        ("torch.ops.aten.from_file.default", "calls 'torch.ops.aten.from_file.default'"),
        ("torch.ops.aten.save.default", "calls 'torch.ops.aten.save.default'"),
        ("torch.ops.higher_order.cond", "calls 'torch.ops.higher_order.cond'"),
        ("torch.ops.my_namespace.my_op.default", "calls 'torch.ops.my_namespace"),
    ],
)
def test_a_graph_that_calls_anything_but_aten_and_arithmetic_is_refused_before_loading(
    target: str, message: str, plain_archive: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def retarget(model: dict) -> None:
        model["graph_module"]["graph"]["nodes"][2]["target"] = target

    path = tmp_path / "suspect.pt2"
    path.write_bytes(_rewritten(plain_archive, _json_edit("models/model.json", retarget)))
    monkeypatch.setattr(torch.export, "load", lambda *args, **kwargs: pytest.fail("torch.export.load was called"))
    with pytest.raises(ConfigError, match=message):
        load_victim(path, **FACTS)
    assert {"from_file", "save"} <= DENIED_ATEN_OPS


def test_torch_writes_aten_save_as_a_file_writing_operator() -> None:
    """The denied operators exist and take a file name: why a graph may not call them."""
    for name in ("from_file", "save"):
        schemas = [str(schema) for schema in torch._C._jit_get_all_schemas() if schema.name == f"aten::{name}"]
        assert schemas and all("str filename" in schema for schema in schemas), schemas


@pytest.mark.parametrize(
    "expression",
    [
        "Symbol('s77', positive=True, integer=True)",
        "Mul(Integer(16), Symbol('s77', positive=True, integer=True))",
        "Min(Integer(16), Mul(Integer(-2), Symbol('s1', positive=True, integer=True)))",
    ],
)
def test_shape_expressions_as_torch_writes_them_are_accepted(expression: str) -> None:
    assert safe_expression(expression)


@pytest.mark.parametrize(
    "expression",
    [
        "Symbol.__new__.__globals__",  # attribute access
        "Symbol('s0')['x']",  # subscript
        "__import__('os')",  # a name that is not a sympy constructor
        "Symbol('s0; import os')",  # a string that is not a symbol name
        "Pow(Integer(10), Integer(10000000000000000000))",  # evaluated eagerly: a hang
        "Integer(1" + "0" * 30 + ")",
        "lambda: 0",
        "Symbol('s0', positive=True) if True else 0",
        "Symbol(",  # does not tokenize
        "S" * 3000,
        17,
    ],
)
def test_anything_else_in_a_shape_expression_is_refused(expression: object) -> None:
    assert not safe_expression(expression)


def test_a_plain_exported_classifier_is_the_victim_and_classifies_as_the_original(
    plain_archive: bytes, tmp_path: Path
) -> None:
    path = tmp_path / "suspect.pt2"
    path.write_bytes(plain_archive)
    classifier, record = load_victim(path, **FACTS)
    assert record.arch == PT2_ARCH and isinstance(classifier.net, ExportedNet)
    assert not any(p.requires_grad for p in classifier.parameters())
    classifier.train()  # refine-pl switches modes; the exported program fixed its own at export time
    for batch in (1, 3):
        images = torch.rand(batch, 3, 16, 16)
        torch.testing.assert_close(classifier(images), _classifier()(images), rtol=0, atol=0)
    images = torch.rand(2, 3, 16, 16, requires_grad=True)
    classifier(images).sum().backward()  # REFINE trains the transform through the victim
    assert images.grad is not None and images.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="holds its own network: drop --model.init_args.victim_arch"):
        load_victim(path, **FACTS, arch="small_cnn")
    with pytest.raises(ConfigError, match="gives 5 class scores but the data has 10 classes"):
        load_victim(path, **{**FACTS, "num_classes": 10})


def test_a_program_exported_for_one_batch_size_or_in_training_mode_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "static.pt2"
    path.write_bytes(_exported(_classifier(), batch_dim=False))
    with pytest.raises(ConfigError, match=r"cannot take 3-channel 16x16 images .*dynamic_shapes"):
        load_victim(path, **FACTS)
    path = tmp_path / "training.pt2"
    path.write_bytes(_exported(_classifier().train()))  # batch norm then updates its statistics on every call
    with pytest.raises(
        ConfigError, match=r"changes program\.1\.running_mean, .* exported in training mode; .*model\.eval\(\)"
    ):
        load_victim(path, **FACTS)


def test_an_archive_of_the_torch_2_7_format_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "old.pt2"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("old/serialized_exported_program.json", "{}")
        archive.writestr("old/version", "8.0")
    with pytest.raises(ConfigError, match="format of torch < 2.8, whose loader falls back to unpickling"):
        load_victim(path, **FACTS)


class _SetstateWritesAFile(nn.Module):
    """A TorchScript module whose ``__setstate__`` writes a tensor to the path it was saved with."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.weight = torch.zeros(5)
        self.marker = marker

    def forward(self, images: Tensor) -> Tensor:
        return images.flatten(1)[:, :5] + self.weight

    @torch.jit.export
    def __getstate__(self) -> tuple[str, Tensor, bool]:
        return (self.marker, self.weight, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, Tensor, bool]) -> None:
        self.marker = state[0]
        self.weight = state[1]
        self.training = state[2]
        torch.save(self.weight, self.marker)


def test_torchscript_runs_its_code_in_torch_jit_load_and_is_refused_by_refine_pl(tmp_path: Path) -> None:
    marker = tmp_path / "written_by_setstate"
    path = tmp_path / "suspect.pt"
    torch.jit.script(_SetstateWritesAFile(str(marker))).save(str(path))
    assert not marker.exists()
    torch.jit.load(str(path))
    assert marker.is_file(), "torch.jit.load did not run __setstate__: the test proves nothing"
    marker.unlink()

    with pytest.raises(ConfigError, match=rf"Refusing to load {path}: it is a TorchScript archive .*__setstate__"):
        load_victim(path, **FACTS, arch="small_cnn")
    assert not marker.exists()


def test_an_exported_net_keeps_the_archive_it_was_read_from(plain_archive: bytes, tmp_path: Path) -> None:
    net = load_exported_program(tmp_path / "x.pt2", plain_archive, archive_records(plain_archive))
    assert net.archive == plain_archive
    check_pt2_archive(tmp_path / "x.pt2", plain_archive, archive_records(plain_archive))  # no error: a plain program
