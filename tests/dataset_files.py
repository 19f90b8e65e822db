"""Writes tiny datasets in the real on-disk formats, so tests run the real loading code on them."""

import csv
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR_PER_CLASS_PER_BATCH = 2
GTSRB_CLASSES = (0, 1, 42)
FOLDER_CLASSES = ("n01440764", "n01443537", "n01484850")


def write_cifar10(root: Path, seed: int = 0) -> dict[str, tuple[np.ndarray, list[int]]]:
    """CIFAR-10's python version: ``root/cifar-10-batches-py/data_batch_1..5`` and ``test_batch``.

    Each batch is a pickled dict (protocol 2, like the originals) with ``data`` uint8 ``[N, 3072]`` (red,
    green, blue planes of 32x32 images) and ``labels``; every batch has 2 images of each class.

    Returns:
        ``{batch name: (data, labels)}`` as written.
    """
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    written = {}
    for name in (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"):
        labels = [label for label in range(10) for _ in range(CIFAR_PER_CLASS_PER_BATCH)]
        data = rng.integers(0, 256, size=(len(labels), 3 * 32 * 32), dtype=np.uint8)
        batch = {"batch_label": name, "labels": labels, "data": data, "filenames": [f"{i}.png" for i in labels]}
        with (folder / name).open("wb") as handle:
            pickle.dump(batch, handle, protocol=2)
        written[name] = (data, labels)
    return written


def sign_colour(label: int) -> tuple[int, int, int]:
    """The solid colour of every GTSRB test image of class ``label``."""
    return (40 + 4 * label, 200 - 3 * label, (17 * label) % 256)


def write_gtsrb(root: Path, per_class: int = 6) -> None:
    """GTSRB in torchvision's layout under ``root/gtsrb``: per-class ``Training`` folders of ``.ppm`` images
    (with the per-class ``GT-*.csv`` of the original), ``Final_Test/Images`` and ``GT-final_test.csv``.

    Images are solid-coloured (:func:`sign_colour`) and of assorted sizes, so resizing must keep the colour.
    """
    base = root / "gtsrb"
    test_folder = base / "GTSRB" / "Final_Test" / "Images"
    test_folder.mkdir(parents=True)
    test_rows = []
    for label in GTSRB_CLASSES:
        folder = base / "GTSRB" / "Training" / f"{label:05d}"
        folder.mkdir(parents=True)
        (folder / f"GT-{label:05d}.csv").write_text("Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n")
        for index in range(per_class):
            size = (29 + 3 * index, 35 + 2 * index)
            Image.new("RGB", size, sign_colour(label)).save(folder / f"00000_{index:05d}.ppm")
        for index in range(2):
            name = f"{len(test_rows):05d}.ppm"
            Image.new("RGB", (50 + index, 47), sign_colour(label)).save(test_folder / name)
            test_rows.append([name, 50 + index, 47, 5, 5, 40, 40, label])
    with (base / "GT-final_test.csv").open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter=";")
        writer.writerow(["Filename", "Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId"])
        writer.writerows(test_rows)


def write_image_folder(root: Path, train_per_class: int = 6, val_per_class: int = 2, seed: int = 0) -> None:
    """An ImageNet-style tree ``root/{train,val}/<wnid>/*`` of landscape and portrait JPEG and PNG images.

    Every image is green in its central square and red / blue in the margins that a centre crop removes.
    """
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for class_name in FOLDER_CLASSES:
            folder = root / split / class_name
            folder.mkdir(parents=True)
            for index in range(count):
                landscape = index % 2 == 0
                long, short = int(rng.integers(230, 320)), int(rng.integers(160, 220))
                pixels = np.zeros((short, long, 3), dtype=np.uint8)
                margin = (long - short) // 2
                pixels[:, :margin] = (255, 0, 0)
                pixels[:, margin : margin + short] = (0, 255, 0)
                pixels[:, margin + short :] = (0, 0, 255)
                if not landscape:
                    pixels = pixels.transpose(1, 0, 2).copy()
                suffix = ".JPEG" if split == "train" else ".png"
                Image.fromarray(pixels).save(folder / f"{class_name}_{index}{suffix}", quality=95)
