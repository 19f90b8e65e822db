"""A folder of the user's own unlabeled images feeds REFINE; labeled test images give BA, triggered images ASR, and
``predict`` classifies a folder. The files are of every kind a user has: sizes, grayscale, RGBA, 16 bits, nesting.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules import ImageFolder, RefineDataModule, UnlabeledFolder
from datamodules.datasets import UNLABELED
from refine_pl.attacks import BadNets
from refine_pl.batches import IndexedImages
from refine_pl.errors import ConfigError
from refine_pl.metrics import attack_success_counts
from refine_pl.predict import prediction_rows, write_predictions_csv

MODES = {"RGB": 3, "L": 1, "RGBA": 4, "I;16": 1}


def write_images(folder: Path, count: int, seed: int = 0, nested: bool = True) -> list[Path]:
    """``count`` images of assorted sizes and modes (RGB, grayscale, RGBA, 16-bit) as PNG and JPEG, some nested."""
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        mode = list(MODES)[index % len(MODES)]
        height, width = int(rng.integers(12, 70)), int(rng.integers(12, 70))
        if mode == "I;16":
            image = Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
        else:
            pixels = rng.integers(0, 256, (height, width, MODES[mode]), dtype=np.uint8)
            image = Image.fromarray(pixels.squeeze(-1) if MODES[mode] == 1 else pixels, mode)
        suffix = ".jpg" if mode in ("RGB", "L") and index % 2 == 0 else ".png"
        path = folder / (f"sub{index % 3}" if nested else "") / f"image_{index}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        paths.append(path)
    return paths


def write_test_folder(folder: Path, classes: list[str], per_class: int = 2) -> None:
    for label, name in enumerate(classes):
        write_images(folder / name, per_class, seed=10 + label, nested=False)


@pytest.fixture
def images(tmp_path: Path) -> Path:
    write_images(tmp_path / "images", 10)
    return tmp_path / "images"


def test_every_image_of_any_kind_and_depth_trains_without_a_label(images: Path) -> None:
    data = RefineDataModule(
        UnlabeledFolder(str(images), num_classes=4, image_size=20), batch_size=4, augment=False, val_fraction=0
    )
    data.setup("fit")
    assert len(data.train_set) == 10 and bool((data.train_set.labels == UNLABELED).all())
    batch = next(iter(data.train_dataloader()))
    # Images and their positions in the folder: no label reaches REFINE.
    assert isinstance(batch, IndexedImages) and batch.images.shape == (4, 3, 20, 20)
    assert len(set(batch.indices.tolist())) == 4 and all(0 <= index < 10 for index in batch.indices.tolist())
    assert float(batch.images.min()) >= 0 and float(batch.images.max()) <= 1
    assert data.val_dataloader() == []  # nothing held out: no label-free agreement


def test_a_share_of_the_unlabeled_images_is_held_out_for_the_label_free_agreement(images: Path) -> None:
    data = RefineDataModule(UnlabeledFolder(str(images), num_classes=4, image_size=20), batch_size=4, val_fraction=0.2)
    data.setup("fit")
    trained, held_out = set(data.train_set.paths.tolist()), set(data.val_set.paths.tolist())
    assert len(held_out) == 2 and len(trained) == 8 and not trained & held_out
    (loader,) = data.val_dataloader()
    _, labels = next(iter(loader))
    assert bool((labels == UNLABELED).all())  # the agreement reads no label
    again = RefineDataModule(UnlabeledFolder(str(images), num_classes=4, image_size=20), batch_size=4, val_fraction=0.2)
    again.setup("fit")
    assert set(again.val_set.paths.tolist()) == held_out  # the same share on every run of the seed


def test_labeled_test_images_give_the_clean_loader_and_their_class_names(images: Path, tmp_path: Path) -> None:
    write_test_folder(tmp_path / "test", ["cat", "dog", "fox", "owl"])
    source = UnlabeledFolder(str(images), num_classes=4, image_size=16, test_root=str(tmp_path / "test"))
    data = RefineDataModule(source, batch_size=8)
    data.setup("test")
    (clean,) = data.test_dataloader()
    assert clean.dataset.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert data.class_names == ("cat", "dog", "fox", "owl")
    named = UnlabeledFolder(
        str(images), 4, image_size=16, test_root=str(tmp_path / "test"), class_names=["owl", "fox", "dog", "cat"]
    )
    data = RefineDataModule(named)
    data.setup("test")
    assert data.test_set.labels.tolist() == [3, 3, 2, 2, 1, 1, 0, 0]  # folders matched to the given names


def test_triggered_images_count_for_asr_whatever_their_unknown_class(images: Path, tmp_path: Path) -> None:
    write_images(tmp_path / "triggered", 3, seed=5)
    source = UnlabeledFolder(str(images), 4, image_size=16, triggered_root=str(tmp_path / "triggered"), target_label=2)
    data = RefineDataModule(source, batch_size=8)
    data.setup("test")
    clean, triggered = data.test_dataloader()
    assert len(clean.dataset) == 0  # no labeled test images: BA is not measured
    triggered_images, labels, targets = next(iter(triggered))
    assert triggered_images.shape == (3, 3, 16, 16) and targets.tolist() == [2, 2, 2]
    hits, total = attack_success_counts(torch.tensor([2, 0, 2]), labels, targets)
    assert (int(hits), int(total)) == (2, 3)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"test_root": "{root}/images/sub0"}, "overlaps the training images"),
        ({"test_root": "{root}"}, "overlaps the training images"),
        ({"triggered_root": "{root}/trig"}, "go together"),
        ({"triggered_root": "{root}/trig", "target_label": 4}, r"target_label 4 is not a class \(0\.\.3\)"),
        ({"class_names": ["a", "b"]}, "has 2 names but num_classes is 4"),
        ({"num_classes": 1}, "num_classes >= 2"),
    ],
)
def test_folders_that_would_mix_training_and_test_images_or_do_not_fit_are_refused(
    arguments: dict, message: str, images: Path, tmp_path: Path
) -> None:
    arguments = {k: v.format(root=tmp_path) if isinstance(v, str) else v for k, v in arguments.items()}
    with pytest.raises(ConfigError, match=message):
        source = UnlabeledFolder(str(images), **{"num_classes": 4, **arguments})
        RefineDataModule(source).setup("test")


def test_a_test_folder_with_another_number_of_classes_needs_class_names(images: Path, tmp_path: Path) -> None:
    write_test_folder(tmp_path / "test", ["cat", "dog"])
    data = RefineDataModule(UnlabeledFolder(str(images), 4, test_root=str(tmp_path / "test")))
    with pytest.raises(ConfigError, match="has 2 class folders for 4 classes: .*class_names"):
        data.setup("test")


def test_nothing_to_test_and_two_sources_of_asr_are_refused(images: Path, tmp_path: Path) -> None:
    data = RefineDataModule(UnlabeledFolder(str(images), 4, image_size=16))
    data.setup("test")
    with pytest.raises(ConfigError, match="Nothing to test: .*test_root.*triggered_root"):
        data.test_dataloader()
    write_images(tmp_path / "triggered", 2)
    source = UnlabeledFolder(str(images), 4, image_size=16, triggered_root=str(tmp_path / "triggered"), target_label=0)
    data = RefineDataModule(source, attack=BadNets())
    data.setup("test")
    with pytest.raises(ConfigError, match="Both an attack .* and a folder of triggered images measure ASR"):
        data.test_dataloader()
    with pytest.raises(ConfigError, match=r"No image files under .*empty \(jpg, .*: check .*source\.init_args\.root"):
        (tmp_path / "empty").mkdir()
        RefineDataModule(UnlabeledFolder(str(tmp_path / "empty"), 4)).setup("fit")


def test_predict_reads_a_folder_in_path_order_with_each_images_index(images: Path) -> None:
    data = RefineDataModule(UnlabeledFolder(str(images), 4, image_size=16), batch_size=4, predict_root=str(images))
    data.setup("predict")
    loader = data.predict_dataloader()
    assert data.predict_paths == sorted(str(p) for p in images.rglob("*.*"))
    batches = list(loader)
    assert torch.cat([index for _, index in batches]).tolist() == list(range(10))
    assert batches[0][0].shape == (4, 3, 16, 16)
    with pytest.raises(ConfigError, match=r"pass --data\.init_args\.predict_root FOLDER"):
        RefineDataModule(UnlabeledFolder(str(images), 4)).predict_dataloader()


def test_prediction_rows_say_where_the_defended_model_and_the_victim_disagree(tmp_path: Path) -> None:
    predictions = {
        "defended_class": torch.tensor([1, 2]),
        "defended_probability": torch.tensor([0.75, 0.5]),
        "victim_class": torch.tensor([1, 0]),
        "score": torch.tensor([0.01, 2.5]),
    }
    rows = prediction_rows(["a.png", "b.jpg"], predictions, ("cat", "dog", "fox"), threshold=1.0)
    path = write_predictions_csv(tmp_path / "p.csv", rows)
    assert path.read_text().splitlines() == [
        "path,defended_class,defended_probability,victim_class,disagree,score,flagged,defended_name,victim_name",
        "a.png,1,0.750000,1,false,0.010000,false,dog,dog",
        "b.jpg,2,0.500000,0,true,2.500000,true,fox,cat",
    ]
    without_threshold = prediction_rows(["a.png"], {k: v[:1] for k, v in predictions.items()}, None)[0]
    assert list(without_threshold) == [
        "path", "defended_class", "defended_probability", "victim_class", "disagree", "score", "flagged",
    ]  # fmt: skip
    assert without_threshold["flagged"] == ""  # no threshold known: nothing is said about the image


def test_images_in_a_linked_sub_folder_are_read_and_a_link_loop_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "images"
    write_images(root, 2, nested=False)
    write_images(tmp_path / "elsewhere", 5, seed=1)
    (root / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    data = RefineDataModule(UnlabeledFolder(str(root), num_classes=4, image_size=16), augment=False, val_fraction=0)
    data.setup("fit")
    assert len(data.train_set) == 7
    (tmp_path / "elsewhere" / "sub0" / "back").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(ConfigError, match=r"back is .*elsewhere again, already read as .*linked \(a link loop"):
        RefineDataModule(UnlabeledFolder(str(root), num_classes=4, image_size=16)).setup("fit")


def test_a_link_that_brings_training_images_into_the_test_folder_is_refused(images: Path, tmp_path: Path) -> None:
    write_test_folder(tmp_path / "test", ["a", "b", "c", "d"])
    (tmp_path / "test" / "a" / "more").symlink_to(images / "sub1", target_is_directory=True)
    data = RefineDataModule(UnlabeledFolder(str(images), 4, test_root=str(tmp_path / "test")))
    with pytest.raises(ConfigError, match=r"a/more/.* under --data.init_args.source.init_args.test_root links to "):
        data.setup("test")


def test_duplicate_class_names_are_refused_by_name(images: Path) -> None:
    with pytest.raises(ConfigError, match=r"^--data.init_args.source.init_args.class_names names 'cat', 'dog' more th"):
        UnlabeledFolder(str(images), num_classes=5, class_names=["dog", "cat", "dog", "cat", "emu"])


def test_a_grayscale_source_reads_every_folder_and_image_kind_in_one_channel(images: Path, tmp_path: Path) -> None:
    write_test_folder(tmp_path / "test", ["cat", "dog", "fox", "owl"])
    write_images(tmp_path / "triggered", 3, seed=5)
    gray = {"in_channels": 1, "mean": (0.5,), "std": (0.25,), "image_size": 12}
    source = UnlabeledFolder(
        str(images), 4, test_root=str(tmp_path / "test"), triggered_root=str(tmp_path / "triggered"), target_label=0,
        **gray,
    )  # fmt: skip
    data = RefineDataModule(source, batch_size=4, predict_root=str(images))
    data.setup("fit")
    assert data.in_channels == 1 and data.mean == (0.5,)
    training = next(iter(data.train_dataloader()))  # augmented: no random grayscale step for one channel
    clean, triggered = data.test_dataloader()
    predicted = torch.cat([batch.images for batch in data.predict_dataloader()])
    for batch in (training, next(iter(clean))[0], next(iter(triggered))[0], predicted):
        assert batch.shape[1:] == (1, 12, 12)
    # The same files read in RGB: grayscale is their luma (ITU-R 601), so an RGB file's channels differ from it.
    rgb = RefineDataModule(UnlabeledFolder(str(images), 4, image_size=12), batch_size=4, predict_root=str(images))
    colour = torch.cat([batch.images for batch in rgb.predict_dataloader()])
    luma = (colour * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    assert torch.allclose(predicted, luma, atol=2 / 255)  # 8-bit rounding of each
    labeled = ImageFolder(str(tmp_path), 4, train_dir="test", test_dir="test", **gray)
    assert labeled.load()[0][0][0].shape == (1, 12, 12)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"in_channels": 4}, r"in_channels is 4: image files are read as 3 channels \(RGB\) or 1"),
        ({"in_channels": 1}, r"has 1 channel\(s\) but got mean=\(0.485, 0.456, 0.406\).*set --data.*mean and"),
        ({"mean": (0.5,), "std": (0.5,)}, r"has 3 channel\(s\) but got mean=\(0.5,\)"),
    ],
)
def test_channels_other_than_1_or_3_and_a_normalisation_of_another_width_are_refused(
    arguments: dict, message: str, images: Path
) -> None:
    with pytest.raises(ConfigError, match=message):
        UnlabeledFolder(str(images), 4, **arguments)
