"""The two LightningDataModules: a victim's poisoned training data, and REFINE's unlabeled benign data.

Both split the source's training set into train / validation (stratified, seeded) in ``setup`` and give
two validation and two test loaders, clean and poisoned, in the order of
:data:`refine_pl.metrics.CLEAN_LOADER` and :data:`refine_pl.metrics.POISONED_LOADER`, so one evaluation
pass reports BA and ASR together. Without an attack only the clean loader is given.
"""

import os

from pytorch_lightning import LightningDataModule
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from datamodules.datasets import (
    ImageAugmentation,
    ImageTensorDataset,
    PoisonedTestSet,
    PoisonedTrainingSet,
    UnlabeledImages,
    stratified_split,
)
from datamodules.sampling import ResumableDataLoader, ResumableSampler
from datamodules.sources import DatasetSource
from refine_pl.attacks import Attack
from refine_pl.errors import ConfigError


class BackdoorDataModule(LightningDataModule):
    """What the victim and REFINE datamodules share: the source, the split and the evaluation loaders.

    Args:
        source: Where the images come from.
        attack: The backdoor attack that poisons evaluation images (and, for victims, training images).
        batch_size: Batch size of every loader.
        val_fraction: Share of each class of the training set held out for validation.
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
        self.source = source
        self.attack = attack
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.num_workers = num_workers
        self.train_set: ImageTensorDataset | None = None
        self.val_set: ImageTensorDataset | None = None
        self.test_set: ImageTensorDataset | None = None

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

    def prepare_data(self) -> None:
        self.source.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        if self.attack is not None and self.attack.target_label >= self.num_classes:
            raise ConfigError(
                f"The attack's target_label {self.attack.target_label} is not a class of {self.source.name}, "
                f"which has classes 0..{self.num_classes - 1}: set --data.attack.init_args.target_label."
            )
        if self.train_set is not None:
            return
        train, self.test_set = self.source.load()
        train_idx, val_idx = stratified_split(train.labels, self.val_fraction, self.split_seed)
        self.train_set, self.val_set = train.subset(train_idx), train.subset(val_idx)

    def _processes(self) -> tuple[int, int]:
        """``(world size, global rank)`` of the run this datamodule is attached to, ``(1, 0)`` when alone."""
        if self.trainer is None:
            return 1, 0
        return self.trainer.world_size, self.trainer.global_rank

    def _loader(self, dataset: Dataset, shuffle: bool = False) -> DataLoader:
        """A training loader (``shuffle``) or an evaluation loader over this process's share of ``dataset``.

        Training order and augmentation are functions of the run's seed (``seed_everything``) and the
        epoch, and the loader resumes mid-epoch (see :mod:`datamodules.sampling`). Evaluation loaders of a
        multi-process run split the images over the processes without padding, so every image is counted
        exactly once in BA / ASR (Lightning's own sampler would repeat some to even out the shares).
        """
        world_size, rank = self._processes()
        if shuffle:
            seed = int(os.environ.get("PL_GLOBAL_SEED", 0))  # what seed_everything sets, as Lightning's samplers use
            sampler = ResumableSampler(dataset, self.batch_size, seed, num_replicas=world_size, rank=rank)
            return ResumableDataLoader(dataset, sampler, num_workers=self.num_workers, trainer=self.trainer)
        sampler = None
        if world_size > 1:
            if len(dataset) < world_size:
                raise ConfigError(
                    f"An evaluation set of {len(dataset)} images cannot give each of {world_size} processes one: "
                    "evaluate on fewer devices or a larger set."
                )
            sampler = UnrepeatedDistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def _evaluation_loaders(self, clean: ImageTensorDataset) -> list[DataLoader]:
        loaders = [self._loader(clean)]
        if self.attack is not None:
            loaders.append(self._loader(PoisonedTestSet(clean, self.attack)))
        return loaders

    def val_dataloader(self) -> list[DataLoader]:
        return self._evaluation_loaders(self.val_set)

    def test_dataloader(self) -> list[DataLoader]:
        return self._evaluation_loaders(self.test_set)


class VictimDataModule(BackdoorDataModule):
    """Data for training a victim: the training split with ``attack`` applied to its poisoned share.

    Args:
        source: Where the images come from.
        attack: The backdoor attack (None trains a clean model).
        batch_size: Batch size of every loader.
        val_fraction: Share of each class of the training set held out for validation.
        split_seed: Seed of the train / validation split.
        num_workers: DataLoader worker processes.
    """

    def train_dataloader(self) -> DataLoader:
        if self.attack is None:
            return self._loader(self.train_set, shuffle=True)
        poison_indices = self.attack.select_poison_indices(self.train_set.labels)
        return self._loader(PoisonedTrainingSet(self.train_set, self.attack, poison_indices), shuffle=True)


def refine_augmentation(image_size: int, in_channels: int, horizontal_flip: bool) -> ImageAugmentation:
    """The REFINE reference augmentation: random resized crop (scale 0.8-1), horizontal flip, and
    random grayscale (p=0.2, colour images only)."""
    steps: list[v2.Transform] = [v2.RandomResizedCrop(image_size, scale=(0.8, 1.0), antialias=True)]
    if horizontal_flip:
        steps.append(v2.RandomHorizontalFlip())
    if in_channels == 3:
        steps.append(v2.RandomGrayscale(p=0.2))
    return v2.Compose(steps)


class RefineDataModule(BackdoorDataModule):
    """Data for REFINE: unlabeled benign training images, clean and poisoned evaluation images.

    Training batches are image tensors only, so no label of the benign set can reach the REFINE loss.
    ``attack`` only builds the poisoned evaluation loaders; the CLI fills it from the victim checkpoint
    when left unset.

    Args:
        source: Where the images come from.
        attack: The attack whose ASR is measured (None: report BA only).
        batch_size: Batch size of every loader.
        val_fraction: Share of each class of the training set held out for validation.
        split_seed: Seed of the train / validation split.
        num_workers: DataLoader worker processes.
        augment: Apply the reference augmentation to the training images.
        horizontal_flip: Include the horizontal flip in that augmentation (off for digits and signs).
    """

    def __init__(
        self,
        source: DatasetSource,
        attack: Attack | None = None,
        batch_size: int = 256,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        num_workers: int = 0,
        augment: bool = True,
        horizontal_flip: bool = True,
    ) -> None:
        super().__init__(source, attack, batch_size, val_fraction, split_seed, num_workers)
        self.augment = augment
        self.horizontal_flip = horizontal_flip

    def train_dataloader(self) -> DataLoader:
        augmentation = None
        if self.augment:
            augmentation = refine_augmentation(self.image_size, self.in_channels, self.horizontal_flip)
        return self._loader(UnlabeledImages(self.train_set, augmentation), shuffle=True)
