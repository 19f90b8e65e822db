import contextlib
import hashlib
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from refine_pl.architectures import build_architecture
from refine_pl.errors import ConfigError
from refine_pl.victims import check_victim_accepts, load_victim
from refine_pl.weights import read_weights_file
from tests.conftest import MNIST_FACTS, CodeOnUnpickle, write_victim_checkpoint

MNIST = {"num_classes": 10, "in_channels": 1, "image_size": 28, "mean": (0.5,), "std": (0.25,)}


def _unpickle_unsafely(path: Path) -> None:
    """Loads ``path`` the way refine-pl never does: ``torch.load(weights_only=False)``."""
    # A plain pickle fails torch's magic-number check, but only after unpickling it has already run it.
    with contextlib.suppress(RuntimeError):
        torch.load(path, weights_only=False)


@pytest.mark.parametrize(
    ("save", "message"),
    [
        (lambda content, path: torch.save(content, path), r"Refusing to load .*\(posix\.mkdir\).*could run code"),
        (
            lambda content, path: torch.save(content, path, _use_new_zipfile_serialization=False),
            r"Refusing to read .*legacy \(pre-1\.6\) format.*torch\.save\(torch\.load\(path, weights_only=True\)",
        ),
        (
            lambda content, path: path.write_bytes(pickle.dumps(content, protocol=4)),
            r"Refusing to read .*: it is a plain Python pickle, not written by torch\.save.*never unpickles",
        ),
    ],
    ids=["torch.save", "torch.save legacy", "pickle.dump"],
)
def test_loading_never_runs_code_from_the_file(tmp_path: Path, save, message: str) -> None:
    net = build_architecture("small_cnn", 10, 1)
    marker = tmp_path / "code_ran"
    path = tmp_path / "victim.pt"
    save({"state_dict": net.state_dict(), "extra": CodeOnUnpickle(marker)}, path)

    _unpickle_unsafely(path)  # proves the file really runs code
    assert marker.exists()
    marker.rmdir()

    with pytest.raises(ConfigError, match=message) as error:
        load_victim(path, arch="small_cnn", **MNIST)
    assert not marker.exists() and "\n" not in str(error.value) and "weights_only=False" not in str(error.value)


def _assert_same_outputs(loaded: torch.nn.Module, net: torch.nn.Module, mean: float, std: float) -> None:
    images = torch.rand(3, 1, 28, 28)
    net.eval()
    torch.testing.assert_close(loaded(images), net((images - mean) / std))


def test_plain_state_dict_needs_an_architecture_then_loads_exactly(tmp_path: Path) -> None:
    net = build_architecture("small_cnn", 10, 1)
    path = tmp_path / "weights.pth"
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, path)  # as saved from DDP
    with pytest.raises(ConfigError, match="--model.init_args.victim_arch"):
        load_victim(path, **MNIST)
    _assert_same_outputs(load_victim(path, arch="small_cnn", **MNIST).classifier, net, 0.5, 0.25)


def test_safetensors_file_loads(tmp_path: Path) -> None:
    net = build_architecture("small_cnn", 10, 1)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    _assert_same_outputs(load_victim(path, arch="small_cnn", **MNIST).classifier, net, 0.5, 0.25)


def test_victim_checkpoint_brings_its_own_architecture_and_normalisation(tmp_path: Path) -> None:
    path = write_victim_checkpoint(tmp_path / "victim.ckpt", mean=(0.1,), std=(0.3,))
    module = torch.load(path, weights_only=True)
    net = build_architecture("small_cnn", 10, 1)
    net.load_state_dict({key.removeprefix("model.net."): value for key, value in module["state_dict"].items()})
    loaded, record = load_victim(path, **MNIST)  # the data's mean/std (0.5, 0.25) must not be used
    assert record.arch == "small_cnn" and record.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    _assert_same_outputs(loaded, net, 0.1, 0.3)
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    with pytest.raises(ConfigError, match="victim_arch is 'other'"):
        load_victim(path, arch="other", **MNIST)


@pytest.mark.parametrize(("field", "value"), [("num_classes", 43), ("in_channels", 3), ("image_size", 32)])
def test_checkpoint_that_disagrees_with_the_data_is_refused(tmp_path: Path, field: str, value: int) -> None:
    facts = {field: value, **({"mean": (0.5,) * 3, "std": (0.25,) * 3} if field == "in_channels" else {})}
    path = write_victim_checkpoint(tmp_path / "victim.ckpt", **facts)
    with pytest.raises(ConfigError, match=f"{field}={value} but the data has {field}={MNIST[field]}"):
        load_victim(path, **MNIST)


def test_bare_weights_of_another_shape_are_refused_with_the_reason(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save(build_architecture("small_cnn", 43, 1).state_dict(), path)
    with pytest.raises(ConfigError, match="do not fit architecture 'small_cnn' built for 10 classes.*size mismatch"):
        load_victim(path, arch="small_cnn", **MNIST)


def test_missing_file_and_unknown_architecture(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found at .*--model.init_args.victim_checkpoint"):
        load_victim(tmp_path / "nope.ckpt", arch="small_cnn", **MNIST)
    path = tmp_path / "weights.pt"
    torch.save(build_architecture("small_cnn", 10, 1).state_dict(), path)
    with pytest.raises(ConfigError, match="Unknown architecture 'resnet9000'; known architectures: .*small_cnn"):
        load_victim(path, arch="resnet9000", **MNIST)


def _safetensors_bytes(tmp_path: Path) -> bytes:
    path = tmp_path / "good.safetensors"
    save_file({k: v.contiguous() for k, v in build_architecture("small_cnn", 10, 1).state_dict().items()}, str(path))
    return path.read_bytes()


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.safetensors", lambda data: b"", r"is an empty file \(0 bytes\)"),
        ("truncated.safetensors", lambda data: data[: len(data) // 2], r"is a safetensors file that cannot be read"),
        (
            "header.safetensors",
            lambda data: data[:8] + b"{garbage" + data[16:],
            r"safetensors file that cannot be read",
        ),
        ("random.safetensors", lambda data: bytes(range(7, 250)) * 3, r"of no weights format refine-pl knows"),
        ("random.ckpt", lambda data: bytes(range(7, 250)) * 3, r"of no weights format refine-pl knows"),
        ("gzip.ckpt", lambda data: b"\x1f\x8b\x08" + bytes(40), r"is a gzip-compressed file"),
        ("keras.h5", lambda data: b"\x89HDF\r\n\x1a\n" + bytes(40), r"is an HDF5 file"),
    ],
)
def test_unreadable_files_are_described_in_one_line(tmp_path: Path, name: str, content, message: str) -> None:
    path = tmp_path / name
    path.write_bytes(content(_safetensors_bytes(tmp_path)))
    with pytest.raises(ConfigError, match=message) as error:
        load_victim(path, arch="small_cnn", **MNIST)
    text = str(error.value)
    assert str(path) in text and "\n" not in text and "could run code" not in text and "weights_only=False" not in text


def test_a_truncated_torch_save_file_is_called_truncated(tmp_path: Path) -> None:
    path = tmp_path / "victim.ckpt"
    torch.save(build_architecture("small_cnn", 10, 1).state_dict(), path)
    for cut in (100, 10_000):
        path.write_bytes(path.read_bytes()[:-cut])
        with pytest.raises(ConfigError, match=r"torch\.save.*cannot be read .*truncated or damaged") as error:
            load_victim(path, arch="small_cnn", **MNIST)
        assert "\n" not in str(error.value) and "weights_only=False" not in str(error.value)


def test_a_safetensors_file_named_ckpt_is_read_as_safetensors(tmp_path: Path) -> None:
    net = build_architecture("small_cnn", 10, 1)
    path = tmp_path / "victim.ckpt"
    path.write_bytes(_safetensors_bytes(tmp_path))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    _assert_same_outputs(load_victim(path, arch="small_cnn", **MNIST).classifier, net, 0.5, 0.25)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated", "ignore:'torch.load' received a zip file")
def test_other_files_that_are_not_weights(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        read_weights_file(tmp_path)
    script = tmp_path / "scripted.pt"
    torch.jit.script(build_architecture("small_cnn", 10, 1)).save(str(script))
    with pytest.raises(ConfigError, match=r"is a TorchScript archive .*torch\.save\(model\.state_dict\(\)"):
        read_weights_file(script)
    training_checkpoint = tmp_path / "training.pt"
    torch.save({"model": build_architecture("small_cnn", 10, 1).state_dict(), "epoch": 3}, training_checkpoint)
    with pytest.raises(
        ConfigError,
        match=r"'model' of type OrderedDict, not a tensor.*under 'model': torch\.save\(checkpoint\['model'\], path\)",
    ):
        read_weights_file(training_checkpoint)
    a_list = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], a_list)
    with pytest.raises(ConfigError, match="holds a list, not a state_dict"):
        read_weights_file(a_list)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_weights_that_are_not_finite_are_refused(tmp_path: Path, value: float) -> None:
    state = build_architecture("small_cnn", 10, 1).state_dict()
    state["0.0.weight"][0, 0, 0, 0] = value
    path = tmp_path / "diverged.pt"
    torch.save(state, path)
    with pytest.raises(ConfigError, match=r"NaN or infinite values in 0\.0\.weight"):
        load_victim(path, arch="small_cnn", **MNIST)


@pytest.mark.parametrize(
    ("hparams", "message"),
    [
        ({"mean": (0.1, 0.2, 0.3), "std": (0.3,)}, r"mean=\(0\.1, 0\.2, 0\.3\), which is not 1 number\(s\) in \[-10"),
        ({"mean": (0.1,), "std": (0.3, 0.3)}, r"std=\(0\.3, 0\.3\), which is not 1 number"),
        ({"mean": (0.1,), "std": (0.0,)}, r"std=\(0\.0,\), which is not 1 number\(s\) in \[0\.001, 100\]"),
        ({"mean": (float("nan"),), "std": (0.3,)}, r"mean=\(nan,\)"),
        ({"std": "0.3"}, r"std='0\.3'"),
        ({"mean": (0.1,), "std": (1e-300,)}, r"std=\(1e-300,\), which is not 1 number"),
        ({"mean": (1e308,), "std": (0.3,)}, r"mean=\(1e\+308,\), which is not 1 number"),
        ({"arch": 5}, r"records architecture 5, not a name"),
        ({"num_classes": "10"}, r"trained with num_classes=10 but the data has num_classes=10"),
    ],
)
def test_a_checkpoint_whose_records_do_not_fit_the_data_is_refused(tmp_path: Path, hparams: dict, message: str) -> None:
    path = write_victim_checkpoint(tmp_path / "victim.ckpt")
    content = torch.load(path, weights_only=True)
    content["hyper_parameters"].update(hparams)
    torch.save(content, path)
    with pytest.raises(ConfigError, match=message) as error:
        load_victim(path, **MNIST)
    assert "\n" not in str(error.value)


def test_a_victim_that_cannot_take_the_image_size_is_refused_before_training(tmp_path: Path) -> None:
    net = build_architecture("vgg16_bn_cifar", 10, 1)  # five max-pools: 28 px shrink to nothing
    path = tmp_path / "vgg.pt"
    torch.save(net.state_dict(), path)
    expected = r"'vgg16_bn_cifar' cannot take 1-channel 28x28 images .*the image size this network was built for"
    with pytest.raises(ConfigError, match=expected) as error:
        load_victim(path, arch="vgg16_bn_cifar", **MNIST)
    assert "\n" not in str(error.value)
    net.train()
    check_victim_accepts(net, 1, 32, "vgg16_bn_cifar")  # 32 px fit, and the network's mode is restored
    assert net.training


def test_a_network_of_exactly_32_px_given_48_is_not_told_to_use_a_larger_size() -> None:
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    with pytest.raises(ConfigError, match=r"cannot take 3-channel 48x48 images") as error:
        check_victim_accepts(net, 3, 48, "own:net")
    message = str(error.value)
    assert "larger" not in message and "\n" not in message
    assert "the image size this network was built for (--data.init_args.source.init_args.image_size" in message


def test_a_victim_checkpoint_s_own_normalisation_is_used_and_a_different_one_of_the_data_is_said_loudly(
    victim_checkpoint: Path,
) -> None:
    facts = {**MNIST_FACTS, "mean": (0.0,), "std": (1.0,)}
    with pytest.warns(
        UserWarning,
        match=r"records the normalisation it was trained with \(mean \[0\.1307\].*the data's "
        r"\(mean \[0\.0\], std \[1\.0\]\) is not",
    ):
        classifier = load_victim(victim_checkpoint, **facts).classifier
    assert torch.allclose(classifier.mean.flatten(), torch.tensor([0.1307]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_victim(victim_checkpoint, **MNIST_FACTS)
