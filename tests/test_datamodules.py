import torch

from datamodules import EmbeddedMNIST, RefineDataModule, VictimDataModule
from datamodules.datasets import stratified_split
from refine_pl.attacks import BadNets
from refine_pl.metrics import CLEAN_LOADER, POISONED_LOADER


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
