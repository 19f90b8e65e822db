"""A run interrupted at any point and resumed from its checkpoint ends exactly where an uninterrupted run ends."""

import contextlib
from functools import partial
from pathlib import Path

import pytest
import torch
from pytorch_lightning import Callback, LightningModule, Trainer, seed_everything
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.optim.lr_scheduler import MultiStepLR

from datamodules import RefineDataModule
from refine_pl.cli import cli_main
from refine_pl.errors import ConfigError
from tests.conftest import QUIET, REFINE_JOB, SmallDigits, quiet_trainer, tiny_refine_module

TOTAL_STEPS = 12  # 90 training images, batch 16: 5 steps per epoch, so 2.4 epochs


class _KilledError(Exception):
    """Stands for the process being killed."""


class _KillAt(Callback):
    """Ends the process's training abruptly after ``step`` optimizer steps, before that step's checkpoint."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise _KilledError


def _run(
    victim: Path,
    root: Path,
    max_steps: int,
    ckpt_path: Path | None = None,
    kill_at: int | None = None,
    augment: bool = True,
) -> tuple[Trainer, LightningModule]:
    seed_everything(0)
    # The epoch-stepped scheduler and the random augmentation (on by default) must both be restored exactly; without
    # augmentation the pseudo-labels come from the cache, which a resumed run fills again.
    module = tiny_refine_module(victim, scheduler=partial(MultiStepLR, milestones=[1, 2], gamma=0.5))
    datamodule = RefineDataModule(SmallDigits(), batch_size=16, augment=augment)
    checkpoints = ModelCheckpoint(dirpath=root, save_last=True, every_n_train_steps=1 if kill_at else None)
    trainer = quiet_trainer(
        root,
        max_steps=max_steps,
        limit_val_batches=0,
        callbacks=[checkpoints] + ([_KillAt(kill_at)] if kill_at else []),
    )
    with contextlib.suppress(_KilledError):
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return trainer, module


def _assert_same_run(trainer: Trainer, module: LightningModule, reference: tuple[Trainer, LightningModule]) -> None:
    reference_trainer, reference_module = reference
    assert trainer.global_step == reference_trainer.global_step == TOTAL_STEPS
    assert trainer.current_epoch == reference_trainer.current_epoch
    for name, value in reference_module.state_dict().items():  # transform, remap, victim: bit for bit
        assert torch.equal(module.state_dict()[name], value), name
    optimizer, reference_optimizer = trainer.optimizers[0], reference_trainer.optimizers[0]
    assert optimizer.param_groups[0]["lr"] == reference_optimizer.param_groups[0]["lr"] == 0.0025
    for state, reference_state in zip(
        optimizer.state_dict()["state"].values(), reference_optimizer.state_dict()["state"].values(), strict=True
    ):
        assert torch.equal(state["momentum_buffer"], reference_state["momentum_buffer"])


@pytest.fixture
def uninterrupted(untrained_victim: Path, tmp_path: Path) -> tuple[Trainer, LightningModule]:
    return _run(untrained_victim, tmp_path / "uninterrupted", TOTAL_STEPS)


@pytest.mark.parametrize(
    ("stopped_by", "step"),
    [
        ("max_steps", 7),  # mid-epoch
        ("max_steps", 10),  # at the end of an epoch
        ("kill", 8),  # mid-epoch, from the checkpoint of step 7
    ],
)
def test_interrupted_and_resumed_run_equals_the_uninterrupted_run(
    untrained_victim: Path, tmp_path: Path, uninterrupted, stopped_by: str, step: int
) -> None:
    root = tmp_path / "interrupted"
    if stopped_by == "max_steps":
        _run(untrained_victim, root, max_steps=step)
    else:
        stopped, _ = _run(untrained_victim, root, max_steps=TOTAL_STEPS, kill_at=step)
        assert stopped.global_step == step
    checkpoint = torch.load(root / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == (step if stopped_by == "max_steps" else step - 1)

    trainer, module = _run(untrained_victim, root, TOTAL_STEPS, ckpt_path=root / "last.ckpt")
    _assert_same_run(trainer, module, uninterrupted)


@pytest.mark.parametrize("step", [3, 8])  # in the epoch that fills the pseudo-label cache, and in the next one
def test_a_run_with_cached_pseudo_labels_resumes_exactly(untrained_victim: Path, tmp_path: Path, step: int) -> None:
    reference = _run(untrained_victim, tmp_path / "uninterrupted", TOTAL_STEPS, augment=False)
    root = tmp_path / "interrupted"
    stopped, _ = _run(untrained_victim, root, max_steps=TOTAL_STEPS, kill_at=step, augment=False)
    assert stopped.global_step == step
    trainer, module = _run(untrained_victim, root, TOTAL_STEPS, ckpt_path=root / "last.ckpt", augment=False)
    assert module._cached_labels is not None
    _assert_same_run(trainer, module, reference)


@pytest.mark.slow  # a CLI run or worker processes
def test_cli_resumes_from_last_with_the_saved_remap(victim_checkpoint: Path, tmp_path: Path) -> None:
    """``train.py fit ... --ckpt_path last`` continues mid-epoch and keeps the remap of the checkpoint; a resume
    that asks for another remap seed is refused (the run folder's ``run.json`` records the one it started with).
    With the REFINE config (validation every 5 epochs) the
    checkpoint of a run stopped by max_steps is written at the end of training, after Lightning has counted the
    cut epoch as completed; the data, weights, optimizer and scheduler still continue exactly.
    """
    common = [
        *REFINE_JOB,
        "--model.init_args.victim_checkpoint", str(victim_checkpoint),
        "--model.init_args.transform.init_args.base_width", "4",
        "--data.init_args.batch_size", "16",
        "--trainer.limit_train_batches", "4",
        "--trainer.limit_val_batches", "0",
        "--model.init_args.scheduler", "torch.optim.lr_scheduler.MultiStepLR",
        "--model.init_args.scheduler.milestones", "[1, 2]",
        *QUIET,
    ]  # fmt: skip

    def fit(root: Path, steps: int, *extra: str) -> Path:
        cli_main(["fit", *common, "--trainer.default_root_dir", str(root), "--trainer.max_steps", str(steps), *extra])
        return root / "checkpoints" / "last.ckpt"

    uninterrupted = torch.load(fit(tmp_path / "uninterrupted", 10), weights_only=True)
    first = torch.load(fit(tmp_path / "resumed", 6), weights_only=True)
    with pytest.raises(ConfigError, match="started with model.init_args.remap_seed 0, not 7"):
        fit(tmp_path / "resumed", 10, "--ckpt_path", "last", "--model.init_args.remap_seed", "7")
    resumed = torch.load(fit(tmp_path / "resumed", 10, "--ckpt_path", "last"), weights_only=True)
    assert first["global_step"] == 6 and resumed["global_step"] == uninterrupted["global_step"] == 10
    assert torch.equal(
        resumed["state_dict"]["defended.remap.permutation"], first["state_dict"]["defended.remap.permutation"]
    )
    for name, value in uninterrupted["state_dict"].items():
        assert torch.equal(resumed["state_dict"][name], value), name
    assert resumed["loops"]["fit_loop"]["state_dict"] == uninterrupted["loops"]["fit_loop"]["state_dict"]
    assert resumed["lr_schedulers"] == uninterrupted["lr_schedulers"]
    for state, reference in zip(
        resumed["optimizer_states"][0]["state"].values(),
        uninterrupted["optimizer_states"][0]["state"].values(),
        strict=True,
    ):
        assert torch.equal(state["momentum_buffer"], reference["momentum_buffer"])
