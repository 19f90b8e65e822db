"""Shared fixtures: a small backdoored victim trained once per test session through the real CLI, an untrained
victim, a tiny REFINE module, and small sets of real digits.
"""

import functools
import os
import socket
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from pytorch_lightning import Trainer

from callbacks import DefenseReport
from datamodules import DatasetSource, EmbeddedMNIST, RefineDataModule
from datamodules.datasets import ImageTensorDataset
from refine_pl import RefineLitModule, VictimLitModule
from refine_pl.cli import cli_main
from refine_pl.pipeline import DEFAULT_REFINE_CONFIGS, config_flags
from refine_pl.transform import UNet
from refine_pl.weights import ATTACK_KEY

REPO = Path(__file__).resolve().parents[1]
VICTIM_CONFIG = "configs/victim/mnist.yaml"
BADNETS_CONFIG = "configs/attacks/badnets.yaml"
BACKDOORED_VICTIM = ["--config", VICTIM_CONFIG, "--config", BADNETS_CONFIG]
REFINE_CONFIGS = DEFAULT_REFINE_CONFIGS
"""The main job's REFINE configs by name (``configs/...``, as users type them; see refine_pl.configs)."""
WITHOUT_DEPLOYMENT_FORMATS = ["--trainer.callbacks.init_args.formats", "[]"]
"""Turns off the ONNX and TorchScript files of the reference recipe's last callback (DeploymentFiles; the model card
is still written): about 6 s per fit or test on this machine, for tests that check other things. The tests of
tests/test_own_model.py write and check those files."""
REFINE_JOB = [*config_flags(REFINE_CONFIGS), *WITHOUT_DEPLOYMENT_FORMATS]
"""The main job's REFINE configs as ``--config`` flags (the reference recipe, then the MNIST overlay), without the
ONNX and TorchScript files."""
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
MNIST_FACTS = {"num_classes": 10, "in_channels": 1, "image_size": 28, "mean": (0.1307,), "std": (0.3081,)}


class CodeOnUnpickle:
    """Pickles to a call of ``os.mkdir(marker)``: unpickling it unsafely creates the marker directory."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _restored_environment() -> Iterator[None]:
    """Undoes what a test's Lightning run exported (a SLURM run sets MASTER_ADDR to the SLURM main node, which
    a later multi-process test would try to reach).
    """
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def victim_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BadNets victim (small CNN, embedded MNIST) trained for 3 epochs with the main job's config."""
    root = tmp_path_factory.mktemp("victim")
    cli_main(["fit", *BACKDOORED_VICTIM, "--trainer.max_epochs", "3", "--trainer.default_root_dir", str(root), *QUIET])
    path = root / "checkpoints" / "last.ckpt"
    assert path.is_file()
    return path


def free_port() -> int:
    """A free TCP port on localhost, for the rendezvous of a multi-process test."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_victim_checkpoint(path: Path, attack: dict[str, Any] | None = None, **facts: Any) -> Path:
    """Writes a victim checkpoint with random weights as VictimLitModule's checkpoints record one, and returns it.

    Args:
        path: The file to write.
        attack: An attack record (:func:`refine_pl.attacks.attack_record`) to store with it.
        **facts: VictimLitModule arguments replacing the MNIST facts (``num_classes``, ``arch``, ...).
    """
    module = VictimLitModule(**{**MNIST_FACTS, **facts})
    content = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    if attack is not None:
        content[ATTACK_KEY] = attack
    torch.save(content, path)
    return path


@pytest.fixture
def untrained_victim(tmp_path: Path) -> Path:
    """A victim checkpoint with random weights: enough to check what REFINE changes and what it reads."""
    return write_victim_checkpoint(tmp_path / "victim.ckpt")


def quiet_trainer(root: Path, **kwargs) -> Trainer:
    """A Trainer (CPU unless ``kwargs`` say otherwise) writing under ``root``, with no logger, progress bar or model
    summary; ``kwargs`` add to it.
    """
    settings = {"accelerator": "cpu", **kwargs}
    return Trainer(
        logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=root, **settings
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` need CUDA: without a GPU they are reported as skipped, with the reason."""
    if torch.cuda.is_available():
        return
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (the gpu tier)"))


def tiny_refine_module(victim: Path, **kwargs) -> RefineLitModule:
    """REFINE with a U-Net of first width 4 in front of ``victim``, on MNIST's data facts; ``kwargs`` replace them."""
    return RefineLitModule(
        victim_checkpoint=str(victim), **{**MNIST_FACTS, "transform": partial(UNet, base_width=4), **kwargs}
    )


def fit_and_test_with_report(
    module: RefineLitModule, data: RefineDataModule, root: Path, **trainer_kwargs: Any
) -> tuple[Trainer, DefenseReport]:
    """Fits ``module`` for one step (no validation) with the attack its victim records, then tests it; the
    trainer and the :class:`~callbacks.DefenseReport` it wrote.
    """
    data.use_recorded_attack(module.victim_record)
    report = DefenseReport()
    trainer = quiet_trainer(root, max_steps=1, limit_val_batches=0, callbacks=[report], **trainer_kwargs)
    trainer.fit(module, datamodule=data)
    trainer.test(module, datamodule=data)
    return trainer, report


def benign_data(shuffled_labels: bool) -> RefineDataModule:
    """The embedded MNIST's REFINE data (batch 32, no flip), set up for fitting.

    With ``shuffled_labels`` the training split's labels are permuted (seeded): a defense that learns from unlabeled
    images only trains bit-identically on both.
    """
    datamodule = RefineDataModule(EmbeddedMNIST(), batch_size=32, horizontal_flip=False)
    datamodule.setup("fit")
    if shuffled_labels:
        labels = datamodule.train_set.labels
        datamodule.train_set.labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))]
        assert not torch.equal(datamodule.train_set.labels, labels)
    return datamodule


@functools.cache
def _embedded_mnist() -> tuple[ImageTensorDataset, ImageTensorDataset]:
    return EmbeddedMNIST().load()


class SmallDigits(DatasetSource):
    """Real digits in the numbers a test chooses: the first images of each class of the embedded MNIST-5k
    training and test splits (read once per process).

    Args:
        train_per_class: Number of training images of each class.
        test_per_class: Number of test images of each class.
    """

    name = "mnist5k-small"
    num_classes = EmbeddedMNIST.num_classes
    in_channels = EmbeddedMNIST.in_channels
    image_size = EmbeddedMNIST.image_size
    mean = EmbeddedMNIST.mean
    std = EmbeddedMNIST.std

    def __init__(self, train_per_class: tuple[int, ...] = (10,) * 10, test_per_class: tuple[int, ...] = (5,) * 10):
        self.train_per_class = train_per_class
        self.test_per_class = test_per_class

    def load(self) -> tuple[ImageTensorDataset, ImageTensorDataset]:
        def first(dataset: ImageTensorDataset, per_class: tuple[int, ...]) -> ImageTensorDataset:
            picks = [torch.nonzero(dataset.labels == c).flatten()[:n] for c, n in enumerate(per_class)]
            return dataset.subset(torch.cat(picks).sort().values)

        train, test = _embedded_mnist()
        return first(train, self.train_per_class), first(test, self.test_per_class)
