"""Training data order that is a function of the seed and the epoch, sharded over processes, resumable mid-epoch.

Lightning 2.6 saves the loop counters in every checkpoint and, on resume, continues the epoch at the saved
batch; it also saves and restores the state of a training DataLoader that has ``state_dict`` /
``load_state_dict``. It does not save the global random state, so a plain shuffling DataLoader draws a new
order on resume and restarts the epoch from its first batch. The loader here makes everything that decides
the data a function of ``(seed, epoch, position)``:

- the order of epoch ``e`` is a permutation drawn from a generator seeded with ``(seed, e)``;
- every sample gets its own seed from the same generator, and the dataset item is built with torch's CPU
  generator seeded with it (so random augmentation does not depend on workers, processes or resumes);
- the loader's state is ``(seed, epoch, samples of the epoch already trained on)``, saved in the checkpoint
  by Lightning and used to skip exactly those samples on resume.

The order is cut into global batches of ``num_replicas * batch_size`` samples and process ``r`` trains on the
``r``-th slice of each, so ``W`` processes with batch ``b`` see the same global batches as one process with
batch ``W * b``.
"""

from collections.abc import Iterator
from itertools import islice
from typing import Any, NamedTuple

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from refine_pl.errors import ConfigError, cli_flag
from refine_pl.internals import KeptDistributedSampler, batches_done_in_epoch


class SampleKey(NamedTuple):
    """What :class:`ResumableSampler` yields: a dataset index and the seed of that sample's randomness."""

    index: int
    seed: int


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A generator seeded from ``(seed, epoch)``, well mixed so that nearby seeds and epochs do not overlap."""
    state = np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


class ResumableSampler(KeptDistributedSampler):
    """Shuffled training order of one process, a function of ``(seed, epoch)``.

    Lightning keeps it in multi-process runs instead of injecting its own, and calls :meth:`set_epoch` every
    epoch (see :class:`~refine_pl.internals.KeptDistributedSampler`). Incomplete global
    batches at the end of an epoch are dropped, so every process trains on the same number of full batches.

    Args:
        dataset: The dataset (only its length is used).
        batch_size: Batch size of one process.
        seed: Seed of the order and of the per-sample seeds.
        num_replicas: Number of processes.
        rank: This process's rank.
        min_epoch_samples: The least number of samples an epoch draws (over all processes): a smaller dataset is
            passed over several times in one epoch (each pass a new permutation, each sample its own seed, so a
            repeated image is augmented anew). 0: one pass.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int,
        num_replicas: int = 1,
        rank: int = 0,
        min_epoch_samples: int = 0,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.batch_size = batch_size
        self.global_batch_size = batch_size * num_replicas
        self.epoch_samples = max(len(dataset), min_epoch_samples) if len(dataset) else 0
        self.num_batches = self.epoch_samples // self.global_batch_size
        if self.num_batches == 0:
            raise ConfigError(
                f"The training set has {len(dataset)} images, fewer than one global batch of {num_replicas} "
                f"process(es) x batch_size {batch_size}: lower {cli_flag('data', 'batch_size')}."
            )
        self.num_samples = self.num_batches * batch_size
        self.total_size = self.num_batches * self.global_batch_size
        self.skip_batches = 0
        """Batches at the start of the next iteration to leave out (set by :class:`ResumableDataLoader`)."""

    def epoch_plan(self) -> tuple[Tensor, Tensor]:
        """``(order, seeds)`` of the current epoch: the dataset indices and their seeds, one per sample drawn.

        The first pass is a permutation of the dataset, each further pass (``min_epoch_samples``) another one.
        """
        generator = epoch_generator(self.seed, self.epoch)
        size = len(self.dataset)
        order = torch.randperm(size, generator=generator)
        seeds = torch.randint(0, 2**62, (size,), generator=generator)[order]
        orders, all_seeds = [order], [seeds]
        for _ in range(1, -(-self.epoch_samples // size)):
            orders.append(torch.randperm(size, generator=generator))
            all_seeds.append(torch.randint(0, 2**62, (size,), generator=generator))
        return torch.cat(orders), torch.cat(all_seeds)

    def __iter__(self) -> Iterator[SampleKey]:
        order, seeds = self.epoch_plan()
        positions = torch.arange(self.total_size).view(self.num_batches, self.num_replicas, self.batch_size)
        mine = positions[self.skip_batches :, self.rank].flatten()
        return (SampleKey(index, seed) for index, seed in zip(order[mine].tolist(), seeds[mine].tolist(), strict=True))

    def __len__(self) -> int:
        return self.num_samples


class SeededSamples(Dataset):
    """Builds ``base[key.index]`` with torch's CPU generator seeded from ``key.seed``, then restores it.

    Random augmentation inside ``base`` (torchvision transforms draw from torch's CPU generator) thus gives
    the same image for the same sample, seed and epoch, whatever the worker, process or resume.
    """

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: SampleKey) -> Any:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(key.seed)
            return self.base[key.index]


class ResumableDataLoader(DataLoader):
    """Training DataLoader whose position in the epoch is saved in checkpoints and restored on resume.

    Lightning sees ``state_dict`` / ``load_state_dict`` and stores the state with the loop state of every
    checkpoint. The state is ``{"seed", "epoch", "samples_seen"}`` (``samples_seen`` counts global samples,
    so a resume needs the same global batch size, not the same number of processes). The underlying
    iterator is only created at the first ``next()``, after Lightning has called ``set_epoch``, so worker
    processes never prefetch from a stale epoch.

    Attached to a trainer, the loader follows the training loop: an iteration is as long as
    ``trainer.num_training_batches`` and belongs to the epoch ``trainer.current_epoch`` (Lightning 2.6 passes
    ``set_epoch`` its count of *processed* epochs, one ahead after a run stopped by ``max_steps``). The first
    iteration after a restore gives exactly the batches the loop still expects in its epoch: the rest of the
    saved epoch when the loop continues it, the next epoch when the loop starts a new one. The loop's epoch
    number can then differ from the data's (a checkpoint written by ``ModelCheckpoint.on_train_end`` after
    ``max_steps`` marks the interrupted epoch as completed), so the offset between them is kept.

    Args:
        dataset: The training dataset; it is wrapped in :class:`SeededSamples`.
        sampler: The order of this process.
        num_workers: DataLoader worker processes.
        trainer: The trainer whose training loop iterates this loader.
        pin_memory: Give batches in page-locked memory (for a fast copy to a GPU).
    """

    sampler: ResumableSampler

    def __init__(
        self,
        dataset: Dataset,
        sampler: ResumableSampler,
        num_workers: int = 0,
        trainer: "pl.Trainer | None" = None,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(
            SeededSamples(dataset),
            batch_size=sampler.batch_size,
            sampler=sampler,
            drop_last=True,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            pin_memory=pin_memory,
        )
        self.trainer = trainer
        self._position: tuple[int, int] | None = None  # (epoch, batches yielded) of the current iteration
        self._resume: tuple[int, int] | None = None  # (epoch, batches seen) from a loaded state
        self._epoch_offset = 0  # data epoch - the training loop's epoch

    def _start(self, length: int) -> tuple[int, int]:
        """``(epoch, batches to skip)`` of the iteration about to start, which may yield ``length`` batches."""
        resume, self._resume = self._resume, None
        if self.trainer is None:
            epoch = self.sampler.epoch
            return epoch, resume[1] if resume is not None and resume[0] == epoch else 0
        if resume is None:
            return self.trainer.current_epoch + self._epoch_offset, 0
        saved_epoch, seen = resume
        # Batches of its current epoch the loop counts as trained; it expects the rest from this iteration.
        # It can be one less than ``seen`` when the checkpoint was written while a batch was in flight (Lightning's
        # SLURM requeue checkpoint is written from a signal handler); the loop then trains that batch again.
        done = batches_done_in_epoch(self.trainer)
        if done == 0 and seen >= length:
            epoch, skip = saved_epoch + 1, 0
        elif done <= seen:
            epoch, skip = saved_epoch, done
        else:
            raise ConfigError(
                f"The checkpoint's data position (epoch {saved_epoch}, {seen} batches) does not match its training "
                f"loop ({done} batches into an epoch of {length}): resume with the limit_train_batches and batch "
                "size of the interrupted run."
            )
        self._epoch_offset = epoch - self.trainer.current_epoch
        return epoch, skip

    def __iter__(self) -> Iterator[Any]:
        length = len(self) if self.trainer is None else min(len(self), self.trainer.num_training_batches)
        epoch, skip = self._start(length)
        self.sampler.set_epoch(epoch)
        self.sampler.skip_batches = skip
        self._position = (epoch, skip)
        for batches, batch in enumerate(islice(super().__iter__(), max(0, length - skip)), start=skip + 1):
            self._position = (epoch, batches)
            yield batch

    def state_dict(self) -> dict[str, int]:
        """The position to resume from: the epoch and how many of its global samples were handed out."""
        epoch, batches = self._resume or self._position or (self.sampler.epoch, 0)
        return {
            "seed": self.sampler.seed,
            "epoch": epoch,
            "samples_seen": batches * self.sampler.global_batch_size,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continues from ``state``: the next iteration resumes the saved epoch after the samples already seen.

        Raises:
            ConfigError: The saved position does not fall on a batch boundary of this run's global batch size.
        """
        global_batch_size = self.sampler.global_batch_size
        if state["samples_seen"] % global_batch_size:
            raise ConfigError(
                f"The checkpoint stopped after {state['samples_seen']} samples of epoch {state['epoch']}, which "
                f"is not a whole number of global batches of {global_batch_size} (processes x batch_size): "
                "resume with the global batch size of the interrupted run."
            )
        self.sampler.seed = state["seed"]
        self._resume = (state["epoch"], state["samples_seen"] // global_batch_size)
