"""The two LightningDataModules: a victim's poisoned training data, and REFINE's unlabeled benign data.

Both split the source's training set into train / validation (stratified, seeded) in ``setup`` and give
two validation and two test loaders, clean and poisoned, in the order of
:data:`refine_pl.metrics.CLEAN_LOADER` and :data:`refine_pl.metrics.POISONED_LOADER`, so one evaluation
pass reports BA and ASR together. Without an attack only the clean loader is given. A source whose training
images are unlabeled (:class:`~datamodules.sources.UnlabeledFolder`) holds out a uniform share of them instead,
whose one validation loader measures only the label-free agreement, and gives a clean test loader that may be
empty (BA is then not measured).
"""

from pathlib import Path
from typing import Any

import torch
from pytorch_lightning import LightningDataModule
from pytorch_lightning.accelerators import CUDAAccelerator
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from datamodules.datasets import (
    UNLABELED,
    AugmentedImages,
    ImageAugmentation,
    ImageFileDataset,
    IndexedAugmentedViews,
    IndexedUnlabeledImages,
    LabeledImageDataset,
    PoisonedTestSet,
    PoisonedTrainingSet,
    UnlabeledImages,
    stratified_split,
)
from datamodules.sampling import ResumableDataLoader, ResumableSampler
from datamodules.sources import DatasetSource
from refine_pl.attacks import Attack
from refine_pl.errors import ConfigError, cli_flag
from refine_pl.images import image_files
from refine_pl.internals import global_seed, unrepeated_sampler
from refine_pl.victims import VictimRecord


def check_loader_settings(batch_size: int, val_fraction: float, num_workers: int) -> None:
    """Refuses loader settings that would fail (or silently train on nothing) only once training has started.

    Raises:
        ConfigError: ``batch_size < 1``, ``val_fraction`` outside [0, 1) or ``num_workers < 0``, naming the flag.
    """
    if type(batch_size) is not int or batch_size < 1:
        raise ConfigError(f"{cli_flag('data', 'batch_size')} must be an integer >= 1, got {batch_size!r}.")
    if not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
        raise ConfigError(
            f"{cli_flag('data', 'val_fraction')} is the share of each class held out for validation and must be in "
            f"[0, 1), got {val_fraction!r}."
        )
    if type(num_workers) is not int or num_workers < 0:
        raise ConfigError(
            f"{cli_flag('data', 'num_workers')} must be an integer >= 0 (0: load in the main process), got "
            f"{num_workers!r}."
        )


class BackdoorDataModule(LightningDataModule):
    """What the victim and REFINE datamodules share: the source, the split and the evaluation loaders.

    Args:
        source: Where the images come from.
        attack: The backdoor attack that poisons evaluation images (and, for victims, training images).
        batch_size: Batch size of every loader.
        val_fraction: Share of each class of the training set held out for validation (of unlabeled training
            images: a share drawn uniformly, :func:`uniform_fraction`).
        split_seed: Seed of the train / validation split.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        source: DatasetSource,
        attack: Attack | None = None,
        batch_size: int = 128,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        check_loader_settings(batch_size, val_fraction, num_workers)
        self.source = source
        self.attack = attack
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.num_workers = num_workers
        self.train_set: LabeledImageDataset | None = None
        self.val_set: LabeledImageDataset | None = None
        self.test_set: LabeledImageDataset | None = None

    @property
    def num_classes(self) -> int:
        return self.source.num_classes

    @property
    def in_channels(self) -> int:
        return self.source.in_channels

    @property
    def image_size(self) -> int:
        return self.source.image_size

    @property
    def mean(self) -> tuple[float, ...]:
        return self.source.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.source.std

    @property
    def class_names(self) -> tuple[str, ...] | None:
        """Name of each class when the data has them (for folders: known once :meth:`setup` has read them)."""
        return self.source.class_names

    def prepare_data(self) -> None:
        self.source.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        if self.attack is not None and self.attack.target_label >= self.num_classes:
            raise ConfigError(
                f"The attack's target_label {self.attack.target_label} is not a class of {self.source.name}, "
                f"which has classes 0..{self.num_classes - 1}: set {cli_flag('data', 'attack', 'target_label')}."
            )
        if self.train_set is not None:
            return
        train, self.test_set = self.source.load()
        if not self.source.labeled_train:  # no label to stratify by: a uniform share, for the label-free agreement
            held_out = torch.zeros(len(train), dtype=torch.bool)
            if self.val_fraction > 0 and len(train) > 1:
                held_out[uniform_fraction(len(train), self.val_fraction, self.split_seed)] = True
            self.train_set, self.val_set = (
                train.subset((~held_out).nonzero()[:, 0]),
                train.subset(held_out.nonzero()[:, 0]),
            )
            return
        train_idx, val_idx = stratified_split(train.labels, self.val_fraction, self.split_seed)
        self.train_set, self.val_set = train.subset(train_idx), train.subset(val_idx)

    def _processes(self) -> tuple[int, int]:
        """``(world size, global rank)`` of the run this datamodule is attached to, ``(1, 0)`` when alone."""
        if self.trainer is None:
            return 1, 0
        return self.trainer.world_size, self.trainer.global_rank

    def _loader(self, dataset: Dataset, shuffle: bool = False, min_epoch_samples: int = 0) -> DataLoader:
        """A training loader (``shuffle``) or an evaluation loader over this process's share of ``dataset``.

        Training order and augmentation are functions of the run's seed (``seed_everything``) and the
        epoch, and the loader resumes mid-epoch (see :mod:`datamodules.sampling`); a training epoch draws at least
        ``min_epoch_samples`` samples (a smaller set is passed over more than once). Batches of a run on a CUDA
        GPU are in pinned memory. Evaluation loaders of a multi-process run split the images over the processes
        without padding, so every image is counted exactly once in BA / ASR (Lightning's own sampler would repeat
        some to even out the shares).
        """
        world_size, rank = self._processes()
        # Page-locked batches copy to a GPU asynchronously; on a CPU run they would only cost the pinning.
        pin_memory = self.trainer is not None and isinstance(self.trainer.accelerator, CUDAAccelerator)
        if shuffle:
            sampler = ResumableSampler(
                dataset, self.batch_size, global_seed(), world_size, rank, min_epoch_samples=min_epoch_samples
            )
            return ResumableDataLoader(
                dataset, sampler, num_workers=self.num_workers, trainer=self.trainer, pin_memory=pin_memory
            )
        sampler = None
        if world_size > 1:
            if 0 < len(dataset) < world_size:
                raise ConfigError(
                    f"An evaluation set of {len(dataset)} images cannot give each of {world_size} processes one: "
                    "evaluate on fewer devices or a larger set."
                )
            sampler = unrepeated_sampler(dataset, world_size, rank)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=pin_memory,
        )

    def _evaluation_loaders(self, clean: LabeledImageDataset) -> list[DataLoader]:
        loaders = [self._loader(clean)]
        if self.attack is not None:
            loaders.append(self._loader(PoisonedTestSet(clean, self.attack)))
        return loaders

    def val_dataloader(self) -> list[DataLoader]:
        return self._evaluation_loaders(self.val_set)

    def test_dataloader(self) -> list[DataLoader]:
        return self._evaluation_loaders(self.test_set)


def victim_augmentation(image_size: int, crop_padding: int, horizontal_flip: bool) -> ImageAugmentation | None:
    """The usual augmentation for training a classifier, or None when both of its steps are off.

    A random ``image_size`` crop of the image padded by ``crop_padding`` pixels (0: no crop), and a horizontal flip.
    """
    steps: list[v2.Transform] = []
    if crop_padding > 0:
        steps.append(v2.RandomCrop(image_size, padding=crop_padding))
    if horizontal_flip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps) if steps else None


class VictimDataModule(BackdoorDataModule):
    """Data for training a victim: the training split with ``attack`` applied to its poisoned share.

    On ``setup("fit")`` the attack is prepared once from the clean training split (:meth:`Attack.prepare`).
    A training-controlled attack gets clean training batches and poisons them in the victim's training
    step.

    Args:
        source: Where the images come from.
        attack: The backdoor attack (None trains a clean model).
        batch_size: Batch size of every loader.
        crop_padding: Train on random crops of the images padded by this many pixels (0: off; 4 is usual
            at 32 px). Applied after poisoning, as a data pipeline would.
        horizontal_flip: Flip training images horizontally at random (off for digits and signs).
        **kwargs: The split and loader settings of every datamodule (:class:`BackdoorDataModule`): ``val_fraction``,
            ``split_seed``, ``num_workers``.
    """

    def __init__(
        self,
        source: DatasetSource,
        attack: Attack | None = None,
        batch_size: int = 128,
        crop_padding: int = 0,
        horizontal_flip: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(source, attack, batch_size, **kwargs)
        if crop_padding < 0:
            raise ConfigError(f"crop_padding must be >= 0 pixels, got {crop_padding}.")
        self.crop_padding = crop_padding
        self.horizontal_flip = horizontal_flip
        self._prepared_attack: Attack | None = None

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if stage in ("fit", None) and self.attack is not None and self._prepared_attack is not self.attack:
            self.attack.prepare(self.train_set, self.train_set.labels, self.num_classes)
            self._prepared_attack = self.attack

    def train_dataloader(self) -> DataLoader:
        augmentation = victim_augmentation(self.image_size, self.crop_padding, self.horizontal_flip)
        if self.attack is not None and not self.attack.training_controlled:
            labels = self.train_set.labels
            poison_indices = self.attack.select_poison_indices(labels)
            cover_indices = self.attack.select_cover_indices(labels, poison_indices)
            dataset = PoisonedTrainingSet(self.train_set, self.attack, poison_indices, augmentation, cover_indices)
        elif augmentation is not None:
            dataset = AugmentedImages(self.train_set, augmentation)
        else:
            dataset = self.train_set
        return self._loader(dataset, shuffle=True)


def refine_augmentation(
    image_size: int, in_channels: int, horizontal_flip: bool, max_rotation: float = 0.0
) -> ImageAugmentation:
    """The REFINE reference augmentation, with an optional random rotation first.

    A rotation by up to ``max_rotation`` degrees either way (bilinear, zero fill; none at 0), random resized crop
    (scale 0.8-1), horizontal flip, and random grayscale (p=0.2, colour images only).
    """
    steps: list[v2.Transform] = []
    if max_rotation > 0:
        steps.append(v2.RandomRotation(max_rotation, interpolation=v2.InterpolationMode.BILINEAR))
    steps.append(v2.RandomResizedCrop(image_size, scale=(0.8, 1.0), antialias=True))
    if horizontal_flip:
        steps.append(v2.RandomHorizontalFlip())
    if in_channels == 3:
        steps.append(v2.RandomGrayscale(p=0.2))
    return v2.Compose(steps)


def uniform_fraction(num_samples: int, fraction: float, seed: int) -> Tensor:
    """``round(fraction * num_samples)`` indices (at least 1) drawn uniformly without replacement from ``seed``, sorted.

    The draw is the start of one seeded permutation, so with one seed a smaller fraction is a subset of a larger
    one.
    """
    count = max(1, round(fraction * num_samples))
    return torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))[:count].sort().values


class RefineDataModule(BackdoorDataModule):
    """Data for REFINE: unlabeled benign training images, clean and poisoned evaluation images.

    Training batches carry no label of the benign set, so none can reach the REFINE loss: augmented images
    are image tensors, un-augmented ones (``augment=False``) come with their dataset indices
    (:class:`~refine_pl.batches.IndexedImages`), so that their pseudo-labels can be computed once, and with
    ``consistency`` augmented images come with their originals and indices
    (:class:`~refine_pl.batches.AugmentedViews`).
    ``attack`` only builds the poisoned evaluation loaders; when it is left unset,
    :meth:`use_recorded_attack` takes the attack a victim checkpoint records (the CLI calls it). A source that
    holds triggered test images (:meth:`~datamodules.sources.DatasetSource.triggered_test_set`) gives the poisoned
    test loader instead of an attack. ``fraction`` trains on a share of the training split, drawn uniformly (the
    defender has no labels to stratify by). ``predict_root`` is the folder ``predict`` classifies: batches are
    :class:`~refine_pl.batches.IndexedImages`, the indices into :attr:`predict_paths`.

    Args:
        source: Where the images come from.
        attack: The attack whose ASR is measured (None: report BA only).
        batch_size: Batch size of every loader.
        augment: Apply the reference augmentation to the training images.
        horizontal_flip: Include the horizontal flip in that augmentation (off for digits and signs).
        max_rotation: Rotate augmented images by up to this many degrees either way first (0: no rotation).
        consistency: Give each augmented image the pseudo-label of its un-augmented original (batches of
            :class:`~refine_pl.batches.AugmentedViews`) instead of the victim's prediction on the augmented
            image itself, so that ``T`` learns to map every view of an image to the victim's class of the image.
        min_epoch_samples: The least number of images a training epoch draws: a smaller training set is passed
            over several times an epoch (with augmentation, each pass gives new views), so that the number of
            optimisation steps of a schedule in epochs does not shrink with the user's data. 0: one pass.
        predict_root: Folder of images to classify with ``predict`` (any nesting), or None.
        fraction: Share of the training split given as unlabeled training images, in (0, 1], drawn uniformly
            from ``split_seed`` (:func:`uniform_fraction`); validation and test images are not affected.
        **kwargs: The split and loader settings of every datamodule (:class:`BackdoorDataModule`): ``val_fraction``,
            ``split_seed``, ``num_workers``.
    """

    def __init__(
        self,
        source: DatasetSource,
        attack: Attack | None = None,
        batch_size: int = 256,
        augment: bool = True,
        horizontal_flip: bool = True,
        predict_root: str | None = None,
        fraction: float = 1.0,
        max_rotation: float = 0.0,
        consistency: bool = False,
        min_epoch_samples: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(source, attack, batch_size, **kwargs)
        if not isinstance(min_epoch_samples, int) or isinstance(min_epoch_samples, bool) or min_epoch_samples < 0:
            raise ConfigError(
                f"{cli_flag('data', 'min_epoch_samples')} is the least number of images a training epoch draws and "
                f"must be a whole number >= 0 (0: one pass over the training images), got {min_epoch_samples!r}."
            )
        if not isinstance(max_rotation, (int, float)) or not 0 <= max_rotation <= 180:
            raise ConfigError(
                f"{cli_flag('data', 'max_rotation')} is the largest rotation of the augmentation in degrees and must "
                f"be in [0, 180], got {max_rotation!r}."
            )
        if consistency and not augment:
            raise ConfigError(
                f"{cli_flag('data', 'consistency')} gives augmented images the pseudo-labels of their originals, but "
                f"{cli_flag('data', 'augment')} is false: turn augmentation on, or consistency off."
            )
        if not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ConfigError(
                f"{cli_flag('data', 'fraction')} is the share of the training images to train on and must be in "
                f"(0, 1], got {fraction!r}."
            )
        self.augment = augment
        self.horizontal_flip = horizontal_flip
        self.predict_root = predict_root
        self.predict_paths: list[str] = []
        self.fraction = fraction
        self.max_rotation = max_rotation
        self.consistency = consistency
        self.min_epoch_samples = min_epoch_samples

    def setup(self, stage: str | None = None) -> None:
        already_set_up = self.train_set is not None
        super().setup(stage)
        if not already_set_up and self.fraction < 1:
            self.train_set = self.train_set.subset(
                uniform_fraction(len(self.train_set), self.fraction, self.split_seed)
            )

    def use_recorded_attack(self, victim: VictimRecord) -> None:
        """Measures ASR with the attack ``victim`` was trained with, unless this datamodule was given one.

        The attack is rebuilt from the victim checkpoint's record alone; without either, only BA is measured.
        """
        if self.attack is None:
            self.attack = victim.build_attack()

    def train_dataloader(self) -> DataLoader:
        if not self.augment:
            dataset: Dataset = IndexedUnlabeledImages(self.train_set)
        else:
            augmentation = refine_augmentation(
                self.image_size, self.in_channels, self.horizontal_flip, self.max_rotation
            )
            views = IndexedAugmentedViews if self.consistency else UnlabeledImages
            dataset = views(self.train_set, augmentation)
        return self._loader(dataset, shuffle=True, min_epoch_samples=self.min_epoch_samples)

    def val_dataloader(self) -> list[DataLoader]:
        if self.source.labeled_train:
            return super().val_dataloader()
        return [self._loader(self.val_set)] if len(self.val_set) else []  # label-free agreement only

    def test_dataloader(self) -> list[DataLoader]:
        triggered = self.source.triggered_test_set()
        if triggered is not None and self.attack is not None:
            raise ConfigError(
                f"Both an attack ({self.attack.name}) and a folder of triggered images measure ASR: give one of "
                f"{cli_flag('data', 'attack')} and {cli_flag('data', 'source', 'triggered_root')}."
            )
        loaders = (
            super().test_dataloader() if triggered is None else [self._loader(self.test_set), self._loader(triggered)]
        )
        if not any(len(loader.dataset) for loader in loaders):
            raise ConfigError(
                f"Nothing to test: {self.source.name} has no labeled test images (BA) and no triggered ones (ASR). "
                f"Give {cli_flag('data', 'source', 'test_root')}, or {cli_flag('data', 'source', 'triggered_root')} "
                "with its target_label or an attack; fit already wrote the defended model and its deployment files."
            )
        return loaders

    def predict_dataloader(self) -> DataLoader:
        if self.predict_root is None:
            raise ConfigError(
                f"predict classifies the images of a folder: pass {cli_flag('data', 'predict_root')} FOLDER."
            )
        folder = Path(self.predict_root)
        self.predict_paths = [str(p) for p in image_files(folder)] if folder.is_dir() else []
        if not self.predict_paths:
            raise ConfigError(
                f"No image files under {folder} (jpg, png, ppm, bmp, pgm, tif, webp): check "
                f"{cli_flag('data', 'predict_root')}."
            )
        labels = torch.full((len(self.predict_paths),), UNLABELED)
        images = ImageFileDataset(self.predict_paths, labels, self.image_size, self.source.crop, self.in_channels)
        return self._loader(IndexedUnlabeledImages(images))
