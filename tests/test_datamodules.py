from pathlib import Path

import pytest
import torch

from datamodules import EmbeddedMNIST, RefineDataModule, VictimDataModule
from datamodules.backdoor import uniform_fraction
from datamodules.datasets import PoisonedTestSet, stratified_split
from refine_pl.attacks import Attack, BadNets
from refine_pl.cli import cli_main
from refine_pl.errors import ConfigError
from refine_pl.metrics import CLEAN_LOADER, POISONED_LOADER
from tests.conftest import QUIET, VICTIM_CONFIG


def test_embedded_mnist_is_real_mnist_with_a_fixed_stratified_split() -> None:
    train, test = EmbeddedMNIST().load()
    assert len(train) == 4000 and len(test) == 1000
    assert torch.equal(torch.bincount(test.labels), torch.full((10,), 100))
    assert torch.equal(torch.bincount(train.labels), torch.full((10,), 400))
    image, label = train[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert image.min() >= 0.0 and image.max() <= 1.0 and isinstance(label, int)
    # MNIST digits: mostly black background, bright strokes.
    assert 0.08 < train.images.float().mean().item() / 255 < 0.18
    again_train, again_test = EmbeddedMNIST().load()
    assert torch.equal(again_test.images, test.images) and torch.equal(again_train.labels, train.labels)
    train_rows = {bytes(row.numpy()) for row in train.images.flatten(1)}
    assert not any(bytes(row.numpy()) in train_rows for row in test.images.flatten(1))


def test_stratified_split_partitions_every_class() -> None:
    labels = torch.arange(95) % 5
    first, second = stratified_split(labels, 0.2, seed=3)
    assert sorted(torch.cat([first, second]).tolist()) == list(range(95))
    assert torch.equal(torch.bincount(labels[second]), torch.full((5,), 4))


def test_victim_datamodule_poisons_training_set_and_gives_clean_and_poisoned_evaluation() -> None:
    datamodule = VictimDataModule(EmbeddedMNIST(), BadNets(target_label=0, poison_rate=0.1), batch_size=64)
    datamodule.setup("fit")
    assert len(datamodule.train_set) == 3600 and len(datamodule.val_set) == 400
    train_set = datamodule.train_dataloader().dataset.base  # inside the per-sample seeding wrapper
    assert len(train_set.poisoned) == 360
    clean, poisoned = datamodule.val_dataloader()
    images, labels = next(iter(clean))
    assert images.shape == (64, 1, 28, 28) and labels.shape == (64,)
    poisoned_images, true_labels, targets = next(iter(poisoned))
    assert (true_labels != 0).all() and (targets == 0).all()
    assert torch.all(poisoned_images[:, :, -3:, -3:] == 1.0)
    assert len(datamodule.test_dataloader()[POISONED_LOADER].dataset) == 900


def test_refine_training_batches_are_images_only() -> None:
    datamodule = RefineDataModule(EmbeddedMNIST(), BadNets(), batch_size=32, horizontal_flip=False)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert isinstance(batch, torch.Tensor) and batch.shape == (32, 1, 28, 28)
    assert batch.min() >= 0.0 and batch.max() <= 1.0
    assert len(datamodule.test_dataloader()) == 2


def test_without_attack_only_the_clean_loader_is_given() -> None:
    datamodule = RefineDataModule(EmbeddedMNIST())
    datamodule.setup("test")
    loaders = datamodule.test_dataloader()
    assert len(loaders) == 1 and len(loaders[CLEAN_LOADER].dataset) == 1000


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("batch_size", "0", "batch_size must be an integer >= 1, got 0"),
        ("batch_size", "-3", "batch_size must be an integer >= 1, got -3"),
        ("num_workers", "-1", "num_workers must be an integer >= 0"),
        ("val_fraction", "1.0", r"val_fraction .* must be in \[0, 1\), got 1\.0"),
        ("val_fraction", "-0.1", r"val_fraction .* must be in \[0, 1\), got -0\.1"),
    ],
)
def test_loader_settings_are_checked_before_training(tmp_path: Path, flag: str, value: str, message: str) -> None:
    args = ["--config", VICTIM_CONFIG, f"--data.init_args.{flag}", value, "--trainer.default_root_dir", str(tmp_path)]
    # max_steps / limit_val_batches only bound the run should the settings reach training
    args += ["--trainer.max_steps", "1", "--trainer.limit_val_batches", "1", *QUIET]
    with pytest.raises(ConfigError, match=f"--data.init_args.{message}"):
        cli_main(["fit", *args])
    assert not (tmp_path / "checkpoints").exists()


class _NaNAttack(Attack):
    """An attack whose trigger turns one pixel into NaN, as broken state from a checkpoint could."""

    name = "nan_pixel"

    def apply(self, images: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        images = images.clone()
        images[..., 0, 0] = float("nan")
        return images


def test_a_poisoned_image_with_a_nan_pixel_stops_at_the_data_boundary() -> None:
    data, _ = EmbeddedMNIST().load()
    with pytest.raises(ConfigError, match=r"Sample \d+ poisoned by attack 'nan_pixel' has 1 NaN"):
        PoisonedTestSet(data, _NaNAttack())[0]


def test_uniform_fraction_draws_nested_subsets_from_one_seed() -> None:
    draws = {fraction: uniform_fraction(3600, fraction, seed=0) for fraction in (0.01, 0.05, 0.5, 1.0)}
    for fraction, indices in draws.items():
        assert len(indices) == round(fraction * 3600) and len(set(indices.tolist())) == len(indices)
        assert torch.equal(indices, indices.sort().values)
    assert set(draws[0.01].tolist()) <= set(draws[0.05].tolist()) <= set(draws[0.5].tolist())
    assert torch.equal(draws[1.0], torch.arange(3600))
    assert not torch.equal(uniform_fraction(3600, 0.05, seed=1), draws[0.05])
    assert len(uniform_fraction(10, 0.01, seed=0)) == 1  # never an empty training set


def test_refine_datamodule_trains_on_the_fraction_and_evaluates_on_everything() -> None:
    full = RefineDataModule(EmbeddedMNIST(), batch_size=32)
    full.setup("fit")
    part = RefineDataModule(EmbeddedMNIST(), batch_size=32, fraction=0.05)
    part.setup("fit")
    part.setup("test")  # a second setup draws nothing more
    assert len(part.train_set) == round(0.05 * len(full.train_set)) == 180
    assert torch.equal(part.val_set.labels, full.val_set.labels) and len(part.test_set) == len(full.test_set)
    images = torch.stack([image for image, _ in part.train_set])
    chosen = uniform_fraction(len(full.train_set), 0.05, seed=0)
    assert torch.equal(images, torch.stack([full.train_set[int(i)][0] for i in chosen]))
    assert len(part.train_dataloader()) == 180 // 32
    for fraction in (0.0, 1.5, -0.1):
        with pytest.raises(ConfigError, match=r"--data.init_args.fraction .* must be in \(0, 1\]"):
            RefineDataModule(EmbeddedMNIST(), fraction=fraction)
