"""The real loading code of CIFAR-10, GTSRB and image folders, on tiny files in each real on-disk format."""

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules import CIFAR10, GTSRB, EmbeddedMNIST, ImageFolder, RefineDataModule, VictimDataModule
from datamodules.backdoor import victim_augmentation
from datamodules.datasets import ImageFileDataset, LabeledImageDataset, PoisonedTestSet
from refine_pl.attacks import BadNets
from refine_pl.errors import ConfigError
from tests.conftest import CodeOnUnpickle
from tests.dataset_files import (
    FOLDER_CLASSES,
    GTSRB_CLASSES,
    sign_colour,
    write_cifar10,
    write_gtsrb,
    write_image_folder,
)


def test_cifar10_reads_the_python_batches_exactly(tmp_path: Path) -> None:
    written = write_cifar10(tmp_path)
    train, test = CIFAR10(root=str(tmp_path)).load()
    assert len(train) == 100 and len(test) == 20
    assert torch.equal(torch.bincount(train.labels), torch.full((10,), 10))
    # The first image of data_batch_2 is sample 20: channel planes in R, G, B order, row-major 32x32.
    data, labels = written["data_batch_2"]
    image, label = train[20]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label == labels[0]
    assert torch.equal((image * 255).round().to(torch.uint8), torch.from_numpy(data[0].reshape(3, 32, 32)))
    assert torch.equal(
        (test[19][0] * 255).round().to(torch.uint8).flatten(), torch.from_numpy(written["test_batch"][0][19])
    )


def test_cifar10_normalisation_reaches_the_victim_and_can_be_replaced(tmp_path: Path) -> None:
    assert CIFAR10.mean == (0.4914, 0.4822, 0.4465) and CIFAR10.std == (0.2023, 0.1994, 0.2010)
    datamodule = VictimDataModule(CIFAR10(root=str(tmp_path)))
    assert datamodule.mean == CIFAR10.mean and datamodule.in_channels == 3 and datamodule.image_size == 32
    own = CIFAR10(root=str(tmp_path), mean=(0.5, 0.5, 0.5), std=(0.247, 0.243, 0.261))
    assert own.mean == (0.5, 0.5, 0.5) and own.std == (0.247, 0.243, 0.261)
    with pytest.raises(ConfigError, match=r"3 channel\(s\) but got mean=\(0\.5,\), which is not 3 number"):
        CIFAR10(root=str(tmp_path), mean=(0.5,))


def test_missing_cifar10_names_the_flag_and_the_path(tmp_path: Path) -> None:
    source = CIFAR10(root=str(tmp_path / "cifar10"))
    source.prepare_data()  # download is off: nothing happens
    with pytest.raises(ConfigError) as error:
        source.load()
    message = str(error.value)
    assert message.startswith(f"CIFAR-10 not found under {tmp_path / 'cifar10'}")
    assert "download is off: pass --data.init_args.source.init_args.download true" in message
    assert "--data.init_args.source.init_args.root at an extracted copy" in message


def test_a_cifar_batch_that_would_run_code_is_refused(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    marker = tmp_path / "code_ran"
    batch_path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    with batch_path.open("wb") as handle:
        pickle.dump({"data": np.zeros((1, 3072), np.uint8), "labels": [0], "x": CodeOnUnpickle(marker)}, handle)
    with pytest.raises(ConfigError, match=f"{batch_path} is not a CIFAR python batch .*refusing to load"):
        CIFAR10(root=str(tmp_path)).load()
    assert not marker.exists()
    with batch_path.open("wb") as handle:
        pickle.dump({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}, handle, protocol=2)
    with pytest.raises(ConfigError, match="does not hold a CIFAR batch"):
        CIFAR10(root=str(tmp_path)).load()


def test_gtsrb_reads_torchvisions_layout_and_stretches_to_32_px(tmp_path: Path) -> None:
    write_gtsrb(tmp_path)
    train, test = GTSRB(root=str(tmp_path)).load()
    assert isinstance(train, ImageFileDataset) and isinstance(test, ImageFileDataset)
    assert len(train) == 6 * len(GTSRB_CLASSES) and len(test) == 2 * len(GTSRB_CLASSES)
    assert sorted(train.labels.unique().tolist()) == list(GTSRB_CLASSES)  # class ids from the folder names
    assert test.labels.tolist() == [label for label in GTSRB_CLASSES for _ in range(2)]  # from the CSV
    for dataset in (train, test):
        for index in range(len(dataset)):
            image, label = dataset[index]
            assert image.shape == (3, 32, 32)
            expected = torch.tensor(sign_colour(label), dtype=torch.float32).view(3, 1, 1) / 255
            torch.testing.assert_close(image, expected.expand(3, 32, 32), atol=1 / 255, rtol=0)
    assert GTSRB.num_classes == 43 and GTSRB.mean == (0.0, 0.0, 0.0) and GTSRB.std == (1.0, 1.0, 1.0)


def test_missing_gtsrb_names_the_flag_and_the_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"GTSRB not found under {tmp_path} .*download is off: pass "):
        GTSRB(root=str(tmp_path)).load()


def test_image_folder_numbers_sorted_classes_and_centre_crops(tmp_path: Path) -> None:
    write_image_folder(tmp_path)
    source = ImageFolder(root=str(tmp_path), num_classes=3, image_size=224)
    train, test = source.load()
    assert len(train) == 18 and len(test) == 6
    assert torch.equal(torch.bincount(train.labels), torch.full((3,), 6))
    assert train.paths[0].split(os.sep)[-2] == FOLDER_CLASSES[0] and int(train.labels[0]) == 0
    for dataset in (train, test):
        for index in range(len(dataset)):
            image, _ = dataset[index]
            assert image.shape == (3, 224, 224) and image.min() >= 0.0 and image.max() <= 1.0
            # Only the green centre survives the crop (JPEG blurs the border pixels a little).
            red, green, blue = image[:, 3:-3, 3:-3]
            assert green.min() > 0.85 and red.max() < 0.2 and blue.max() < 0.2
    assert source.mean == (0.485, 0.456, 0.406) and source.std == (0.229, 0.224, 0.225)


def test_lazy_datasets_work_with_every_wrapper(tmp_path: Path) -> None:
    write_image_folder(tmp_path)
    train, _ = ImageFolder(root=str(tmp_path), num_classes=3, image_size=64).load()
    assert isinstance(train, LabeledImageDataset)
    part = train.subset(torch.tensor([0, 7, 13]))
    assert part.labels.tolist() == [0, 1, 2] and part.paths[1] == train.paths[7]
    poisoned = PoisonedTestSet(part, BadNets(target_label=0, patch_size=5))
    assert len(poisoned) == 2
    image, label, target = poisoned[0]
    assert label == 1 and target == 0 and torch.all(image[:, -5:, -5:] == 1.0)


def test_image_folder_checks_its_classes(tmp_path: Path) -> None:
    write_image_folder(tmp_path)
    with pytest.raises(ConfigError, match="has 3 class folders but num_classes is 50: set "):
        ImageFolder(root=str(tmp_path), num_classes=50).load()
    (tmp_path / "val" / "n09999999").mkdir()
    with pytest.raises(ConfigError, match="class folders that are not in .*train: n09999999"):
        ImageFolder(root=str(tmp_path), num_classes=3).load()
    with pytest.raises(ConfigError, match="not found under .*nowhere.*point --data.init_args.source.init_args.root"):
        ImageFolder(root=str(tmp_path / "nowhere"), num_classes=3).load()


def test_a_corrupted_image_is_reported_by_its_path(tmp_path: Path) -> None:
    write_image_folder(tmp_path)
    broken = tmp_path / "train" / FOLDER_CLASSES[1] / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    truncated = tmp_path / "train" / FOLDER_CLASSES[2] / "truncated.png"
    truncated.write_bytes((tmp_path / "val" / FOLDER_CLASSES[0] / f"{FOLDER_CLASSES[0]}_0.png").read_bytes()[:200])
    train, _ = ImageFolder(root=str(tmp_path), num_classes=3).load()
    for path in (broken, truncated):
        index = list(train.paths).index(str(path))
        with pytest.raises(ConfigError, match=f"Cannot read image {path} .*replace or delete the file"):
            train[index]


def test_datamodules_split_lazy_folders_and_give_images_only_to_refine(tmp_path: Path) -> None:
    write_gtsrb(tmp_path)
    datamodule = RefineDataModule(GTSRB(root=str(tmp_path)), BadNets(), batch_size=4, horizontal_flip=False)
    datamodule.setup("fit")
    assert len(datamodule.train_set) + len(datamodule.val_set) == 18
    batch = next(iter(datamodule.train_dataloader()))
    assert isinstance(batch, torch.Tensor) and batch.shape == (4, 3, 32, 32)
    victim_data = VictimDataModule(GTSRB(root=str(tmp_path)), BadNets(), batch_size=4, crop_padding=4)
    victim_data.setup("fit")
    images, labels = next(iter(victim_data.train_dataloader()))
    assert images.shape == (4, 3, 32, 32) and labels.shape == (4,)


def test_victim_augmentation_is_off_by_default_and_crops_the_padded_image_when_asked() -> None:
    assert victim_augmentation(32, 0, False) is None
    image = torch.rand(3, 32, 32)
    padded = torch.nn.functional.pad(image, (4, 4, 4, 4))
    crop = victim_augmentation(32, 4, False)
    offsets = set()
    for _ in range(20):
        out = crop(image)
        matches = [(i, j) for i in range(9) for j in range(9) if torch.equal(out, padded[:, i : i + 32, j : j + 32])]
        assert len(matches) == 1
        offsets.add(matches[0])
    assert len(offsets) > 1  # the crop moves
    flipped = {torch.equal(victim_augmentation(32, 0, True)(image), image.flip(-1)) for _ in range(20)}
    assert flipped == {True, False}


@pytest.mark.parametrize("source", [EmbeddedMNIST, CIFAR10, GTSRB])
def test_every_source_takes_the_normalisation_its_model_expects(source, tmp_path: Path) -> None:
    channels = source.in_channels
    kwargs = {} if source is EmbeddedMNIST else {"root": str(tmp_path)}
    raw = source(**kwargs, mean=(0.0,) * channels, std=(1.0,) * channels)
    assert raw.mean == (0.0,) * channels and raw.std == (1.0,) * channels
    assert source(**kwargs).mean == source.mean
    with pytest.raises(ConfigError, match=r"std=\(1e-300,.*--data\.init_args\.source\.init_args\.std"):
        source(**kwargs, std=(1e-300,) * channels)
