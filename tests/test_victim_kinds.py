"""Victims of any architecture: torchvision's classifiers by name, the user's own builder by import path, torch.export
archives. Each loads, is defended through the CLI, and exports to safetensors, ONNX and TorchScript.
"""

import io
import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torchvision.models import get_model

from refine_pl.architectures import architecture, build_architecture, import_builder, torchvision_classifiers
from refine_pl.classifier import DefendedClassifier
from refine_pl.cli import cli_main
from refine_pl.errors import ConfigError
from refine_pl.export import ARCHIVE_KEY, export_defended, export_onnx, export_torchscript, load_defended
from refine_pl.remap import OutputRemap
from refine_pl.transform import UNet
from refine_pl.victims import load_victim
from tests.conftest import MNIST_FACTS, QUIET, REFINE_JOB, write_victim_checkpoint

RGB = {"num_classes": 4, "in_channels": 3, "image_size": 32, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}

OWN_NETS = '''
from torch import nn


def build(num_classes):
    """Takes only num_classes: the in_channels of the data is not passed to it."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, num_classes)
    )


class AnyChannels(nn.Module):
    def __init__(self, **options):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(options["in_channels"], 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(4, options["num_classes"]),
        )

    def forward(self, images):
        return self.net(images)


NOT_CALLABLE = 3


def not_a_network(num_classes):
    return "a string"
'''


@pytest.fixture
def own_nets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The name of a module of the user's own builders, importable for the test (``PYTHONPATH=.`` of the user)."""
    name = f"own_nets_{tmp_path.name}"  # a new module per test: import caches modules by name
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(OWN_NETS))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def _same_outputs(a: nn.Module, b: nn.Module, shape: tuple[int, ...]) -> None:
    images = torch.rand(*shape)
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(images), b.eval()(images), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "squeezenet1_1", "shufflenet_v2_x0_5"])
def test_a_torchvision_classifier_by_name_loads_a_bare_state_dict(name: str, tmp_path: Path) -> None:
    net = get_model(name, num_classes=4).eval()
    path = tmp_path / "suspect.pt"
    torch.save(net.state_dict(), path)
    classifier, record = load_victim(path, **RGB, arch=name)
    assert record.arch == name and name in torchvision_classifiers()
    _same_outputs(classifier.net, net, (2, 3, 32, 32))
    assert architecture(name).native_size == 224


def test_torchvision_names_are_refused_for_other_channel_counts_and_unknown_names_say_where_to_look() -> None:
    with pytest.raises(ConfigError, match="mobilenet_v3_small takes 3-channel .* the data has 1 channel"):
        build_architecture("mobilenet_v3_small", 10, 1)
    with pytest.raises(ConfigError, match=r"Unknown architecture 'mobilenet_v9'.*torchvision's classification models"):
        build_architecture("mobilenet_v9", 10, 3)


def test_the_users_own_builder_by_import_path(own_nets: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = import_builder(f"{own_nets}:build")(10, 1)
    path = tmp_path / "suspect.pt"
    torch.save(net.state_dict(), path)
    classifier, record = load_victim(path, **MNIST_FACTS, arch=f"{own_nets}:build")
    assert record.arch == f"{own_nets}:build"
    _same_outputs(classifier.net, net, (2, 1, 28, 28))
    assert import_builder(f"{own_nets}:AnyChannels")(7, 3)(torch.rand(1, 3, 8, 8)).shape == (1, 7)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("no_such_package_xyz.nets:build", "cannot import 'no_such_package_xyz.nets'"),
        ("{module}:missing", "has no attribute 'missing'"),
        ("{module}:NOT_CALLABLE", "is a int, not a function or class building a network"),
        (":build", "is not an import path"),
    ],
)
def test_import_paths_that_do_not_give_a_builder_say_why(path: str, message: str, own_nets: str) -> None:
    with pytest.raises(ConfigError, match=message):
        import_builder(path.format(module=own_nets))


def test_a_builder_that_returns_no_network_is_refused(own_nets: str, tmp_path: Path) -> None:
    path = tmp_path / "suspect.pt"
    torch.save({}, path)
    with pytest.raises(ConfigError, match="returned a str, not a torch.nn.Module"):
        load_victim(path, **MNIST_FACTS, arch=f"{own_nets}:not_a_network")


def test_an_import_path_read_from_a_file_is_never_imported(own_nets: str, tmp_path: Path) -> None:
    path = write_victim_checkpoint(tmp_path / "victim.ckpt")
    content = torch.load(path, weights_only=True)
    content["hyper_parameters"]["arch"] = f"{own_nets}:build"  # a file naming code for refine-pl to run
    torch.save(content, path)
    with pytest.raises(ConfigError, match=f"records the import path '{own_nets}:build'.*never imports code named by"):
        load_victim(path, **MNIST_FACTS)
    assert own_nets not in sys.modules  # nothing was imported, so nothing of the module ran


def _victim(kind: str, own_nets: str, tmp_path: Path):
    """The loaded victim of each kind (10 classes, 1-channel 28 px images) and its victim_arch (None for .pt2)."""
    torch.manual_seed(0)
    if kind == "registry":
        net, arch = build_architecture("small_cnn", 10, 1), "small_cnn"
    elif kind == "import path":
        arch = f"{own_nets}:build"
        net = import_builder(arch)(10, 1)
    else:
        net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 10))
        buffer = io.BytesIO()
        shapes = ({0: torch.export.Dim("batch")},)
        torch.export.save(torch.export.export(net.eval(), (torch.rand(2, 1, 28, 28),), dynamic_shapes=shapes), buffer)
        (tmp_path / "suspect.pt2").write_bytes(buffer.getvalue())
        return load_victim(tmp_path / "suspect.pt2", **MNIST_FACTS).classifier, None
    torch.save(net.state_dict(), tmp_path / "suspect.pt")
    return load_victim(tmp_path / "suspect.pt", **MNIST_FACTS, arch=arch).classifier, arch


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["registry", "import path", "pt2"])
def test_every_kind_of_victim_exports_to_safetensors_onnx_and_torchscript(
    kind: str, own_nets: str, tmp_path: Path
) -> None:
    import onnxruntime

    victim, arch = _victim(kind, own_nets, tmp_path)
    confirm = arch if kind == "import path" else None
    defended = DefendedClassifier(UNet(1, base_width=2, depth=2), victim, OutputRemap(10, seed=3)).eval()
    with torch.no_grad():
        for parameter in defended.transform.parameters():  # a transform that is not its initialisation
            parameter.add_(0.05 * torch.randn_like(parameter))
    # In the layout RefineLitModule keeps it in and load_defended returns, so that the logits can be equal bit for bit.
    defended.to(memory_format=torch.channels_last)
    path = export_defended(defended, 28, tmp_path / "defended.safetensors")
    if confirm is not None:
        with pytest.raises(ConfigError, match=f"victim_arch='{confirm}'"):
            load_defended(path)
    loaded = load_defended(path, victim_arch=confirm)
    session = onnxruntime.InferenceSession(
        str(export_onnx(defended, 28, tmp_path / "defended.onnx")), providers=["CPUExecutionProvider"]
    )
    scripted = torch.jit.load(str(export_torchscript(defended, 28, tmp_path / "defended.torchscript.pt")))
    for batch in (1, 5):
        images = torch.rand(batch, 1, 28, 28)
        with torch.no_grad():
            expected = defended(images)
            torch.testing.assert_close(loaded(images), expected, rtol=0, atol=0)
            torch.testing.assert_close(scripted(images), expected, rtol=1e-5, atol=1e-5)
        onnx_logits = session.run(["logits"], {"images": images.numpy()})[0]
        np.testing.assert_allclose(onnx_logits, expected.numpy(), rtol=1e-4, atol=1e-4)
    if kind == "pt2":  # the archive travels inside the defended file, byte for byte
        assert load_file(str(path))[ARCHIVE_KEY].numpy().tobytes() == (tmp_path / "suspect.pt2").read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["import path", "pt2"])
def test_a_victim_of_each_kind_is_defended_through_the_cli(kind: str, own_nets: str, tmp_path: Path) -> None:
    _, arch = _victim(kind, own_nets, tmp_path)
    weights = ["--model.init_args.victim_checkpoint", str(tmp_path / ("suspect.pt2" if arch is None else "suspect.pt"))]
    if arch is not None:
        weights += ["--model.init_args.victim_arch", arch]
    common = [
        *REFINE_JOB, *weights, *QUIET,
        "--model.init_args.transform.init_args.base_width", "4",
        "--trainer.default_root_dir", str(tmp_path / "run"),
        "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--trainer.limit_test_batches", "2",
    ]  # fmt: skip
    cli_main(["fit", *common])
    tested = cli_main(["test", *common, "--ckpt_path", "last"])
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["dataset"] == "mnist5k" and report["defended"]["ba"] is not None
    assert f"Architecture: `{arch or 'pt2'}`" in (tmp_path / "run" / "MODEL_CARD.md").read_text()
    loaded = load_defended(tmp_path / "run" / "defended.safetensors", victim_arch=arch)  # the import path confirmed
    _same_outputs(loaded, tested.model.defended, (3, 1, 28, 28))


def test_an_own_network_that_holds_its_layers_as_self_net_loads(own_nets: str, tmp_path: Path) -> None:
    net = import_builder(f"{own_nets}:AnyChannels")(4, 3)
    assert all(key.startswith("net.") for key in net.state_dict())
    path = tmp_path / "suspect.pt"
    torch.save(net.state_dict(), path)
    classifier, _ = load_victim(path, **RGB, arch=f"{own_nets}:AnyChannels")
    _same_outputs(classifier.net, net, (2, 3, 32, 32))
    torch.save({f"module.{key}": value for key, value in net.state_dict().items()}, path)  # as DDP saves it
    _same_outputs(load_victim(path, **RGB, arch=f"{own_nets}:AnyChannels").classifier.net, net, (2, 3, 32, 32))
