"""The REFINE job built from Python objects equals the CLI job, and a job reads the suspect model's file once."""

import json
import os
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from pytorch_lightning import Trainer, seed_everything
from pytorch_lightning.callbacks import ModelCheckpoint
from safetensors.torch import load_file

from callbacks import DefenseReport, ExportDefendedClassifier
from datamodules import EmbeddedMNIST, RefineDataModule
from refine_pl import RefineLitModule
from refine_pl.cli import cli_main
from refine_pl.schedules import WarmupCosineLR
from refine_pl.transform import UNet
from tests.conftest import QUIET, REFINE_JOB

STEPS, WIDTH, TEST_BATCHES = 6, 4, 3
CLI_SETTINGS = [
    "--trainer.max_steps", str(STEPS),
    "--trainer.limit_val_batches", "0",
    "--trainer.limit_test_batches", str(TEST_BATCHES),
    "--model.init_args.transform.init_args.base_width", str(WIDTH),
    *QUIET,
]  # fmt: skip


def _cli_job(victim: Path, root: Path) -> None:
    common = [*REFINE_JOB, "--model.init_args.victim_checkpoint", str(victim), "--trainer.default_root_dir", str(root)]
    cli_main(["fit", *common, *CLI_SETTINGS])
    cli_main(["test", *common, *CLI_SETTINGS, "--ckpt_path", "last"])


@pytest.mark.slow
def test_a_job_built_from_python_objects_reports_and_exports_what_the_cli_job_does(
    victim_checkpoint: Path, tmp_path: Path
) -> None:
    _cli_job(victim_checkpoint, tmp_path / "cli")

    # The same job as a Python user writes it: the MNIST config's values, no config file, no CLI.
    seed_everything(0)
    data = RefineDataModule(
        EmbeddedMNIST(),
        batch_size=64,
        horizontal_flip=False,
        consistency=True,
        max_rotation=15.0,
        min_epoch_samples=3200,
    )
    module = RefineLitModule(
        victim_checkpoint=str(victim_checkpoint),
        num_classes=data.num_classes,
        in_channels=data.in_channels,
        image_size=data.image_size,
        mean=data.mean,
        std=data.std,
        transform=partial(UNet, base_width=WIDTH),
        optimizer=partial(torch.optim.SGD, lr=0.01, momentum=0.9, weight_decay=5e-4),
        scheduler=WarmupCosineLR,  # a warmup epoch, then a cosine that ends at the trainer's max_epochs
    )
    data.use_recorded_attack(module.victim_record)  # what the CLI does: ASR with the attack the victim records
    root = tmp_path / "python"
    trainer = Trainer(
        accelerator="cpu",
        default_root_dir=root,
        max_epochs=30,
        max_steps=STEPS,
        gradient_clip_val=5.0,
        limit_val_batches=0,
        limit_test_batches=TEST_BATCHES,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[
            ModelCheckpoint(dirpath=root / "checkpoints", save_last=True),
            DefenseReport(),
            ExportDefendedClassifier(),
        ],
    )
    trainer.fit(module, datamodule=data)
    trainer.test(module, datamodule=data, ckpt_path="last")

    reports = [json.loads((tmp_path / job / "report.json").read_text()) for job in ("cli", "python")]
    for report in reports:
        report.pop("defense_checkpoint")
    assert reports[0] == reports[1]
    assert reports[1]["attack"] == "badnets" and reports[1]["defended"]["asr"] is not None
    exported = [load_file(str(tmp_path / job / "defended.safetensors")) for job in ("cli", "python")]
    assert exported[0].keys() == exported[1].keys()
    for name, tensor in exported[0].items():
        assert torch.equal(tensor, exported[1][name]), name


_OPENED: list[str] | None = None
"""Paths opened while a test is counting (an audit hook sees every open, torch.load's and safetensors' in Python)."""


def _record_opens(event: str, args: tuple) -> None:
    if event == "open" and _OPENED is not None and isinstance(args[0], str | os.PathLike):
        _OPENED.append(os.path.realpath(args[0]))


sys.addaudithook(_record_opens)


@pytest.mark.slow
def test_each_job_opens_the_victim_file_once(victim_checkpoint: Path, tmp_path: Path) -> None:
    global _OPENED
    victim = os.path.realpath(victim_checkpoint)
    common = [*REFINE_JOB, "--model.init_args.victim_checkpoint", str(victim_checkpoint), *CLI_SETTINGS]
    counts = []
    for job in (["fit"], ["test", "--ckpt_path", "last"]):
        _OPENED = []
        try:
            cli_main([job[0], *common, "--trainer.default_root_dir", str(tmp_path), *job[1:]])
        finally:
            opened, _OPENED = _OPENED, None
        counts.append(opened.count(victim))
    assert counts == [1, 1]
