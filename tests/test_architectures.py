"""Every registered victim architecture at its native size, and loading users' own weights for each.

Tests are parametrised over the registry, so a newly registered architecture is tested without editing them.
"""

from pathlib import Path

import pytest
import torch

from refine_pl.architectures import ARCHITECTURES, build_architecture
from refine_pl.errors import ConfigError
from refine_pl.victims import load_victim

NORMALISATION = {"mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3)}
PAPER_ARCHITECTURES = {"resnet18_cifar": 32, "resnet50_cifar": 32, "vgg16_bn_cifar": 32, "resnet18": 224}
# Each architecture is saved once, with the key prefix of a common wrapper (none, DDP, a Lightning ``model``)
# spread over the registry: stripping a prefix does not depend on the architecture.
PREFIXES = ("", "module.", "model.")
SAVED_WITH_PREFIX = {name: PREFIXES[i % len(PREFIXES)] for i, name in enumerate(sorted(ARCHITECTURES))}


def test_the_paper_architectures_are_registered_at_their_native_sizes() -> None:
    assert {name: ARCHITECTURES[name].native_size for name in PAPER_ARCHITECTURES} == PAPER_ARCHITECTURES


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_architecture_takes_one_and_three_channels_at_its_native_size(arch: str) -> None:
    size = ARCHITECTURES[arch].native_size
    for channels in (1, 3):
        net = build_architecture(arch, 7, channels).eval()
        with torch.no_grad():
            assert net(torch.rand(2, channels, size, size)).shape == (2, 7)


def test_cifar_resnet18_has_the_usual_parameter_names_and_count() -> None:
    state = build_architecture("resnet18_cifar", 10, 3).state_dict()
    for key in ("conv1.weight", "layer2.0.shortcut.0.weight", "layer4.1.bn2.running_mean", "linear.bias"):
        assert key in state
    assert sum(p.numel() for p in build_architecture("resnet18_cifar", 10, 3).parameters()) == 11_173_962


@pytest.mark.parametrize(("arch", "prefix"), SAVED_WITH_PREFIX.items())
def test_users_own_state_dict_loads_exactly_and_classifies_at_the_native_size(
    tmp_path: Path, arch: str, prefix: str
) -> None:
    size = ARCHITECTURES[arch].native_size
    net = build_architecture(arch, 10, 3)
    with torch.no_grad():  # non-trivial BN statistics, so that a load that skipped them would show
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    net.eval()
    path = tmp_path / "weights.pt"
    torch.save({prefix + key: value for key, value in net.state_dict().items()}, path)
    loaded, record = load_victim(path, num_classes=10, in_channels=3, image_size=size, arch=arch, **NORMALISATION)
    assert record.arch == arch and record.attack is None
    images = torch.rand(2, 3, size, size)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALISATION.values())
    with torch.no_grad():
        logits = loaded(images)
        assert logits.shape == (2, 10)
        torch.testing.assert_close(logits, net((images - mean) / std))


def test_weights_of_another_architecture_are_refused_with_the_differences(tmp_path: Path) -> None:
    path = tmp_path / "torchvision_resnet18.pt"
    torch.save(build_architecture("resnet18", 10, 3).state_dict(), path)
    with pytest.raises(ConfigError) as error:
        load_victim(path, num_classes=10, in_channels=3, image_size=32, arch="resnet18_cifar", **NORMALISATION)
    message = str(error.value)
    assert "do not fit architecture 'resnet18_cifar' built for 10 classes and 3 input channels" in message
    assert "20 keys missing from the file (layer2.0.shortcut.0.weight, " in message
    assert "20 unexpected keys in the file (layer2.0.downsample.0.weight, " in message
    assert "size mismatch for conv1.weight: file [64, 3, 7, 7], model [64, 3, 3, 3]" in message
    assert "--model.init_args.victim_arch" in message


def test_weights_for_another_class_count_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save(build_architecture("vgg16_bn_cifar", 43, 3).state_dict(), path)
    with pytest.raises(
        ConfigError, match="size mismatch for classifier.weight: file \\[43, 512\\], model \\[10, 512\\]"
    ):
        load_victim(path, num_classes=10, in_channels=3, image_size=32, arch="vgg16_bn_cifar", **NORMALISATION)


def test_an_unknown_wrapper_prefix_is_named(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    state = build_architecture("resnet18_cifar", 10, 3).state_dict()
    torch.save({f"backbone.{key}": value for key, value in state.items()}, path)
    with pytest.raises(ConfigError, match="every key in the file starts with 'backbone.'"):
        load_victim(path, num_classes=10, in_channels=3, image_size=32, arch="resnet18_cifar", **NORMALISATION)
