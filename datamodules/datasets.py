"""Map-style datasets: labeled images (in memory or read lazily from files), and the views built on them."""

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from refine_pl.attacks import Attack
from refine_pl.batches import AugmentedViews, IndexedImages
from refine_pl.classifier import check_images
from refine_pl.images import load_image_file

ImageAugmentation = Callable[[Tensor], Tensor]


class LabeledImageDataset(Dataset, ABC):
    """What every labeled dataset of refine-pl offers, wherever its images live.

    Items are ``(float image [C, H, W] in [0, 1], int label)``, all of one size; ``labels`` holds every
    label as a ``[N]`` long tensor without reading an image, so splits and poison choices never touch the
    images; ``subset`` selects samples. The wrappers below (poisoned, unlabeled, augmented) take any of them.
    """

    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)

    @abstractmethod
    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        """The image (float ``[C, H, W]`` in [0, 1]) and label of sample ``index``."""

    @abstractmethod
    def subset(self, indices: Tensor) -> "LabeledImageDataset":
        """The samples at ``indices`` (a long tensor), as a new dataset sharing nothing mutable with this one."""


class ImageTensorDataset(LabeledImageDataset):
    """Images held in memory as one uint8 tensor.

    Args:
        images: ``[N, C, H, W]`` uint8.
        labels: ``[N]`` long.
    """

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        if images.ndim != 4 or images.dtype != torch.uint8 or len(images) != len(labels):
            raise ValueError(
                f"expected uint8 images [N, C, H, W] and N labels, got {images.dtype} {tuple(images.shape)} "
                f"and {tuple(labels.shape)}"
            )
        self.images = images
        self.labels = labels.long()

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index].float().div_(255.0), int(self.labels[index])

    def subset(self, indices: Tensor) -> "ImageTensorDataset":
        return ImageTensorDataset(self.images[indices], self.labels[indices])


UNLABELED = -1
"""The label of an image whose class nobody gave (a folder of unlabeled images): never a class index."""


class ImageFileDataset(LabeledImageDataset):
    """Images read from their files when an item is asked for, so a large dataset never sits in memory.

    Every image is read by :func:`load_image_file`. An unreadable file, or one whose pixels cannot be mapped to
    [0, 1], raises a :class:`~refine_pl.errors.ConfigError` that names it.

    Args:
        paths: Image file of each sample.
        labels: ``[N]`` long (:data:`UNLABELED` for images without a class).
        image_size: Side of the square images the items have.
        crop: Keep the aspect ratio and centre-crop instead of stretching.
        channels: 3 (RGB) or 1 (grayscale).
    """

    def __init__(self, paths: Sequence[str], labels: Tensor, image_size: int, crop: bool, channels: int = 3) -> None:
        if len(paths) != len(labels):
            raise ValueError(f"got {len(paths)} paths and {len(labels)} labels")
        # One numpy string array instead of a list of Python strings: DataLoader workers then share it
        # without copy-on-access of every string's reference count.
        self.paths = np.asarray(paths, dtype=np.str_)
        self.labels = labels.long()
        self.image_size = image_size
        self.crop = crop
        self.channels = channels

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = load_image_file(str(self.paths[index]), self.image_size, self.crop, self.channels)
        return image, int(self.labels[index])

    def subset(self, indices: Tensor) -> "ImageFileDataset":
        return ImageFileDataset(
            self.paths[indices.numpy()], self.labels[indices], self.image_size, self.crop, self.channels
        )


def stratified_split(labels: Tensor, second_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Splits indices so that each class puts ``round(second_fraction * n_class)`` samples in the second part.

    Args:
        labels: ``[N]`` class labels.
        second_fraction: Share of every class that goes to the second part.
        seed: Seed of the shuffle inside each class.

    Returns:
        ``(first, second)`` sorted long index tensors that partition ``range(N)``.
    """
    generator = torch.Generator().manual_seed(seed)
    first, second = [], []
    for label in labels.unique(sorted=True):
        members = torch.nonzero(labels == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        cut = round(second_fraction * len(members))
        second.append(members[:cut])
        first.append(members[cut:])
    return torch.cat(first).sort().values, torch.cat(second).sort().values


def _checked_poison(attack: Attack, image: Tensor, index: int) -> Tensor:
    """``image`` after :func:`~refine_pl.classifier.check_images`.

    An attack whose state came from a file (a victim checkpoint) could otherwise put NaN pixels into the data,
    and a NaN image is classified as class 0.
    """
    check_images(
        image,
        f"Sample {index} poisoned by attack {attack.name!r}",
        fix="the attack's parameters or state (from its config or the victim checkpoint) are broken; fix or drop them",
    )
    return image


class PoisonedTrainingSet(Dataset):
    """A training set in which the samples at ``poison_indices`` carry the trigger and the attack's label.

    Samples at ``cover_indices`` (disjoint from the poisoned ones) get the attack's cover modification and
    keep their true label. Items are ``(image, label)``; the optional augmentation runs after poisoning,
    as a data pipeline would.
    """

    def __init__(
        self,
        base: LabeledImageDataset,
        attack: Attack,
        poison_indices: Tensor,
        augmentation: ImageAugmentation | None = None,
        cover_indices: Tensor | None = None,
    ) -> None:
        self.base = base
        self.attack = attack
        self.poisoned = set(poison_indices.tolist())
        self.covered = set() if cover_indices is None else set(cover_indices.tolist())
        if self.poisoned & self.covered:
            raise ValueError(f"{attack.name}: poisoned and cover samples must be disjoint")
        self.augmentation = augmentation

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image, label = self.base[index]
        if index in self.poisoned:
            image = _checked_poison(
                self.attack, self.attack.apply_training(image[None], torch.tensor([index]))[0], index
            )
            label = self.attack.poisoned_label(label)
        elif index in self.covered:
            image = _checked_poison(self.attack, self.attack.apply_cover(image[None], torch.tensor([index]))[0], index)
        if self.augmentation is not None:
            image = self.augmentation(image)
        return image, label


class PoisonedTestSet(Dataset):
    """Every test image whose true label is not the target, with the trigger applied.

    Items are ``(poisoned image, true label, target label)``; ASR counts how often the target comes out.
    """

    def __init__(self, base: LabeledImageDataset, attack: Attack) -> None:
        self.base = base
        self.attack = attack
        self.indices = torch.nonzero(base.labels != attack.target_label).flatten()

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[Tensor, int, int]:
        index = int(self.indices[position])
        image, label = self.base[index]
        poisoned = _checked_poison(self.attack, self.attack.apply(image[None], torch.tensor([index]))[0], index)
        return poisoned, label, self.attack.target_label


class DatasetView(Dataset):
    """One item per item of a labeled dataset, made from it (labels dropped, augmented, ...) by ``__getitem__``.

    Args:
        base: The labeled dataset.
        augmentation: Applied to the images where the view augments (None: not augmented).
    """

    def __init__(self, base: LabeledImageDataset, augmentation: ImageAugmentation | None = None) -> None:
        self.base = base
        self.augmentation = augmentation

    def __len__(self) -> int:
        return len(self.base)


class TriggeredImages(DatasetView):
    """Images that already carry a trigger (e.g. a folder the user prepared), all counted for ASR.

    Items are ``(image, UNLABELED, target label)``: the true classes are unknown and taken to differ from the target,
    so every image whose defended class is the target counts as a success of the attack.
    """

    def __init__(self, base: LabeledImageDataset, target_label: int) -> None:
        super().__init__(base)
        self.target_label = target_label

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        image, _ = self.base[index]
        return image, UNLABELED, self.target_label


class UnlabeledImages(DatasetView):
    """Images of a labeled dataset with the labels dropped (and augmented, if given): items are image tensors only."""

    def __getitem__(self, index: int) -> Tensor:
        image, _ = self.base[index]
        return self.augmentation(image) if self.augmentation is not None else image


class IndexedUnlabeledImages(DatasetView):
    """Images of a labeled dataset with the labels dropped, each with its index in the dataset.

    Items are :class:`~refine_pl.batches.IndexedImages` ``(image, index)``: the index (a position, not a
    label) lets REFINE compute the pseudo-label of an un-augmented image once. There is no augmentation here by
    design, so an image and its index always stand for the same pixels.
    """

    def __init__(self, base: LabeledImageDataset) -> None:
        super().__init__(base)

    def __getitem__(self, index: int) -> IndexedImages:
        image, _ = self.base[index]
        return IndexedImages(image, index)


class IndexedAugmentedViews(DatasetView):
    """Augmented images of a labeled dataset with the labels dropped, each with its original and its index.

    Items are :class:`~refine_pl.batches.AugmentedViews` ``(augmented image, image, index)``: REFINE trains
    the transform on the augmented view and takes its pseudo-label from the victim's prediction on the original.
    """

    def __getitem__(self, index: int) -> AugmentedViews:
        image, _ = self.base[index]
        return AugmentedViews(self.augmentation(image), image, index)


class AugmentedImages(DatasetView):
    """A labeled dataset whose images pass through an augmentation: items are ``(augmented image, label)``."""

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image, label = self.base[index]
        return self.augmentation(image), label
