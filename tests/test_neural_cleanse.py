"""Neural Cleanse: the anomaly index, the cost schedule, the reversed trigger of a planted patch, unlearning on a copy,
resumption, labels that are never read, and the run through the CLI with its findings in the report.
"""

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pytorch_lightning import seed_everything
from torch import nn
from torch.utils.data import DataLoader, Dataset

from callbacks import RunCheckpoint
from datamodules import RefineDataModule
from refine_pl import ConfigError
from refine_pl.batches import IndexedImages
from refine_pl.cli import cli_main
from refine_pl.defenses import DEFENSES, NeuralCleanse
from refine_pl.defenses.neural_cleanse import (
    CONSISTENCY_CONSTANT,
    CostSchedule,
    ScheduleSettings,
    anomaly_indices,
    flagged_classes,
)
from refine_pl.pipeline import config_flags
from tests.conftest import MNIST_FACTS, QUIET, REFINE_CONFIGS, SmallDigits, quiet_trainer

SIDE, CLASSES, TARGET = 12, 6, 0
FACTS = {"num_classes": CLASSES, "in_channels": 1, "image_size": SIDE, "mean": (0.5,), "std": (0.5,)}
PATCH = (slice(SIDE - 3, SIDE), slice(SIDE - 3, SIDE))  # the planted 3x3 white patch, bottom right


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- the outlier rule ------------------------------------------------------------------------------------------


def test_the_anomaly_index_is_the_deviation_from_the_median_in_scaled_mads() -> None:
    norms = np.array([10.0, 11.0, 12.0, 13.0, 2.0, 30.0, 11.5, 12.5, 10.5, 11.0])
    median = np.median(norms)  # 11.25: the mean of the two middle values
    mad = CONSISTENCY_CONSTANT * np.median(np.abs(norms - median))
    expected = np.abs(norms - median) / mad
    assert torch.allclose(anomaly_indices(torch.tensor(norms)), torch.tensor(expected), rtol=1e-12)
    # Class 4 (norm 2) and class 5 (norm 30) are both far out; only the small mask is a backdoor's sign.
    assert expected[4] > 2 and expected[5] > 2
    assert flagged_classes(torch.tensor(norms)) == [4]
    assert flagged_classes(torch.tensor(norms), threshold=100.0) == []


def test_equal_norms_flag_nothing_and_a_zero_mad_flags_only_smaller_norms() -> None:
    assert flagged_classes(torch.full((10,), 7.0)) == []
    norms = torch.tensor([5.0, 5.0, 5.0, 5.0, 1.0, 9.0])  # MAD 0: every deviation is infinitely anomalous
    assert anomaly_indices(norms)[4] == math.inf and anomaly_indices(norms)[0] == 0
    assert flagged_classes(norms) == [4]


# -- the cost schedule -----------------------------------------------------------------------------------------


def test_the_cost_rises_after_patience_successes_and_falls_after_patience_failures() -> None:
    settings = ScheduleSettings(init_cost=1e-3, patience=5)
    schedule = CostSchedule(cost=1e-3)
    for round_ in range(5):
        improved, stop = schedule.end_round(settings, success=1.0, norm=100.0 - round_)
        assert improved and not stop
    assert schedule.cost == pytest.approx(2e-3) and schedule.raised and not schedule.lowered
    for _ in range(5):
        improved, stop = schedule.end_round(settings, success=0.5, norm=10.0)
        assert not improved and not stop  # below the success threshold: never the best mask
    assert schedule.cost == pytest.approx(2e-3 / 2**1.5) and schedule.lowered
    assert schedule.best_norm == 96.0


def test_a_class_stops_once_the_cost_moved_both_ways_and_the_norm_stalled_or_at_max_rounds() -> None:
    settings = ScheduleSettings(patience=1, early_stop_patience=3, max_rounds=1000)
    schedule = CostSchedule(cost=1e-3)
    schedule.end_round(settings, 1.0, 50.0)  # raised
    schedule.end_round(settings, 0.0, 50.0)  # lowered; the best norm (50) did not improve: one stalled round
    assert schedule.raised and schedule.lowered and schedule.stalled_rounds == 1
    stops = [schedule.end_round(settings, 1.0, 49.9)[1] for _ in range(2)]  # 0.2 % better is still a stall
    assert stops == [False, True] and schedule.best_norm == 49.9
    capped = ScheduleSettings(max_rounds=4)
    fresh = CostSchedule(cost=1e-3)
    assert [fresh.end_round(capped, 1.0, 10.0 - r)[1] for r in range(4)] == [False, False, False, True]


# -- a tiny victim with a planted patch ------------------------------------------------------------------------


def tiny_cnn(num_classes: int, in_channels: int) -> nn.Module:
    """A small CNN for 12 px images (imported by path as the victim's architecture)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * (SIDE // 2) ** 2, num_classes),
    )


def synthetic_images(per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of CLASSES random binary templates with noise, in [0, 1], and their labels."""
    templates = (torch.rand(CLASSES, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(CLASSES).repeat_interleave(per_class)
    noise = torch.rand(len(labels), 1, SIDE, SIDE, generator=generator)
    return 0.6 * templates[labels] + 0.4 * noise, labels


def with_patch(images: torch.Tensor) -> torch.Tensor:
    patched = images.clone()
    patched[..., PATCH[0], PATCH[1]] = 1.0
    return patched


class Unlabeled(Dataset):
    """Images with their indices, as the defenses' training batches carry them (never labels)."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> IndexedImages:
        return IndexedImages(self.images[index], index)


@pytest.fixture(scope="module")
def patched_victim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny CNN on the synthetic classes, 15 % of its training images carrying the patch and labelled TARGET."""
    seed_everything(0)
    images, labels = synthetic_images(100, seed=1)
    poisoned = torch.rand(len(images), generator=torch.Generator().manual_seed(2)) < 0.15
    images[poisoned], labels[poisoned] = with_patch(images[poisoned]), TARGET
    net = tiny_cnn(CLASSES, 1)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(15):
        for batch in torch.randperm(len(images)).split(64):
            optimizer.zero_grad()
            F.cross_entropy(net((images[batch] - 0.5) / 0.5), labels[batch]).backward()
            optimizer.step()
    clean, clean_labels = synthetic_images(20, seed=3)
    with torch.no_grad():
        assert (net((clean - 0.5) / 0.5).argmax(1) == clean_labels).float().mean() > 0.9
        assert (net((with_patch(clean) - 0.5) / 0.5).argmax(1) == TARGET).float().mean() > 0.9
    path = tmp_path_factory.mktemp("nc_victim") / "victim.pt"
    torch.save(net.state_dict(), path)
    return path


def tiny_neural_cleanse(victim: Path, **kwargs) -> NeuralCleanse:
    settings = {
        "round_steps": 2,
        "max_rounds": 30,
        "early_stop_patience": 5,
        "unlearn_epochs": 10,
        "channels_last": False,
        "bf16": False,
    }
    return NeuralCleanse(
        victim_checkpoint=str(victim), victim_arch=f"{__name__}:tiny_cnn", **FACTS, **{**settings, **kwargs}
    )


def defense_data() -> DataLoader:
    images, _ = synthetic_images(200, seed=4)  # the defender's benign images: no label reaches the loader
    return DataLoader(Unlabeled(images), batch_size=128)


def fit(module: NeuralCleanse, root: Path, ckpt_path: str | None = None, **trainer_kwargs) -> None:
    settings = {"max_epochs": -1, "limit_val_batches": 0, "callbacks": [RunCheckpoint()], **trainer_kwargs}
    trainer = quiet_trainer(root, **settings)
    trainer.fit(module, train_dataloaders=defense_data(), ckpt_path=ckpt_path)


@pytest.fixture(scope="module")
def cleansed(patched_victim: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[NeuralCleanse, str]:
    """Neural Cleanse fitted to the end against the patched victim; and the victim file's sha256 before the fit."""
    before = sha256(patched_victim)
    seed_everything(0)
    module = tiny_neural_cleanse(patched_victim)
    fit(module, tmp_path_factory.mktemp("nc_run"), callbacks=[], enable_checkpointing=False)
    return module, before


def test_neural_cleanse_flags_the_target_and_its_mask_lies_over_the_patch(cleansed: tuple[NeuralCleanse, str]) -> None:
    module, _ = cleansed
    assert module.progress.phase == "done"
    assert module.flagged() == [TARGET]
    findings = module.findings()
    assert findings["flagged"] and findings["flagged_classes"] == [TARGET] and findings["unlearned"]
    assert findings["anomaly_index"][TARGET] > 2 and len(findings["mask_l1_norm"]) == CLASSES
    mask = module.masks[TARGET, 0]
    assert mask[PATCH].sum() / mask.sum() > 0.5  # most of the reversed mask's mass is on the patch
    assert float(module.mask_norms[TARGET]) < 0.5 * float(module.mask_norms.median())


def test_unlearning_repairs_a_copy_and_never_the_victim_or_its_file(
    cleansed: tuple[NeuralCleanse, str], patched_victim: Path
) -> None:
    module, before = cleansed
    assert sha256(patched_victim) == before
    original = tiny_cnn(CLASSES, 1)
    original.load_state_dict(torch.load(patched_victim, weights_only=True))
    weights = original.state_dict()
    assert all(torch.equal(value, weights[key]) for key, value in module.victim.net.state_dict().items())
    assert module.defended is not module.victim
    assert any(not torch.equal(value, weights[key]) for key, value in module.defended.net.state_dict().items())
    clean, labels = synthetic_images(20, seed=5)
    module.eval()
    with torch.no_grad():
        victim_asr = (module.victim(with_patch(clean)).argmax(1) == TARGET)[labels != TARGET].float().mean()
        repaired_asr = (module(with_patch(clean)).argmax(1) == TARGET)[labels != TARGET].float().mean()
        repaired_ba = (module(clean).argmax(1) == labels).float().mean()
    assert victim_asr > 0.9 and repaired_asr < 0.2 and repaired_ba > 0.8


@pytest.mark.slow
def test_a_killed_fit_resumes_to_the_same_masks_and_repaired_model(
    cleansed: tuple[NeuralCleanse, str], patched_victim: Path, tmp_path: Path
) -> None:
    whole, _ = cleansed
    seed_everything(0)
    first = tiny_neural_cleanse(patched_victim)
    fit(first, tmp_path, max_epochs=8)  # stops in the middle of the reversal (an epoch is 10 steps)
    assert first.progress.phase == "reverse" and 0 < first.reversed < CLASSES
    seed_everything(0)
    resumed = tiny_neural_cleanse(patched_victim)
    fit(resumed, tmp_path, ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"))
    assert resumed.progress == whole.progress
    for name in ("masks", "patterns", "mask_norms"):
        assert torch.equal(getattr(resumed, name), getattr(whole, name)), name
    for key, value in resumed.defended.state_dict().items():
        assert torch.equal(value, whole.defended.state_dict()[key]), key
    steps = resumed.trainer.global_step
    again = tiny_neural_cleanse(patched_victim)
    fit(again, tmp_path, ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"))  # a finished fit trains nothing
    assert again.trainer.global_step == steps


# -- the threat model --------------------------------------------------------------------------------------------


def _labels_run(victim: Path, root: Path, labels: str, train_labels: torch.Tensor | None) -> NeuralCleanse:
    """A minimal fit on 40 digits whose unlearning always runs (threshold -1 flags half the classes)."""
    seed_everything(0)
    data = RefineDataModule(SmallDigits(train_per_class=(4,) * 10), batch_size=16, augment=False, val_fraction=0)
    data.setup("fit")
    if train_labels is not None:
        data.train_set.labels = train_labels
    module = NeuralCleanse(
        victim_checkpoint=str(victim), **MNIST_FACTS, labels=labels, round_steps=1, max_rounds=1,
        anomaly_threshold=-1.0, unlearn_epochs=1, channels_last=False, bf16=False,
    )  # fmt: skip
    quiet_trainer(root, max_epochs=-1, limit_val_batches=0).fit(module, datamodule=data)
    return module


def test_victim_labels_never_read_a_true_label(untrained_victim: Path, tmp_path: Path) -> None:
    read = _labels_run(untrained_victim, tmp_path / "a", "victim", None)
    unlabeled = _labels_run(untrained_victim, tmp_path / "b", "victim", torch.full((40,), -1))
    assert read.progress.phase == unlabeled.progress.phase == "done" and read.findings()["unlearned"]
    for key, value in read.defended.state_dict().items():
        assert torch.equal(value, unlabeled.defended.state_dict()[key]), key
    true = _labels_run(untrained_victim, tmp_path / "c", "true", None)
    assert any(not torch.equal(v, read.defended.state_dict()[k]) for k, v in true.defended.state_dict().items())
    with pytest.raises(ConfigError, match="labels true, but the training images have no labels"):
        _labels_run(untrained_victim, tmp_path / "d", "true", torch.full((40,), -1))


def test_the_copy_unlearns_in_train_mode_and_the_victims_statistics_never_move(
    untrained_victim: Path, tmp_path: Path
) -> None:
    # Fine-tuned in the victim's eval mode, the copy's batch norm ran on frozen statistics and the MNIST victims'
    # copies diverged to NaN within a few steps (every input then went to one class).
    module = _labels_run(untrained_victim, tmp_path, "victim", None)
    victim, copy = module.victim.state_dict(), module.defended.state_dict()
    statistics = [key for key in copy if key.endswith("running_mean")]
    assert statistics and all(not torch.equal(copy[key], victim[key]) for key in statistics)
    assert all(torch.isfinite(value.float()).all() for value in copy.values())
    assert not module.victim.training
    checkpoint = torch.load(untrained_victim, weights_only=True)
    saved = {key.removeprefix("model."): value for key, value in checkpoint["state_dict"].items()}
    assert set(saved) <= set(victim) and all(torch.equal(victim[key], value) for key, value in saved.items())


def test_neural_cleanse_refuses_a_scheduler_and_unknown_labels(untrained_victim: Path) -> None:
    with pytest.raises(ConfigError, match="anneals its unlearning rate itself"):
        NeuralCleanse(victim_checkpoint=str(untrained_victim), **MNIST_FACTS, scheduler=torch.optim.lr_scheduler.StepLR)
    with pytest.raises(ConfigError, match="labels must be victim or true"):
        NeuralCleanse(victim_checkpoint=str(untrained_victim), **MNIST_FACTS, labels="oracle")


# -- through the CLI -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_neural_cleanse_runs_through_the_cli_and_reports_its_findings(victim_checkpoint: Path, tmp_path: Path) -> None:
    common = [
        *config_flags(DEFENSES["neural_cleanse"].configs(REFINE_CONFIGS)),
        "--model.init_args.victim_checkpoint", str(victim_checkpoint),
        "--trainer.default_root_dir", str(tmp_path),
        "--model.init_args.round_steps", "1", "--model.init_args.max_rounds", "2",
        "--model.init_args.unlearn_epochs", "1",
        "--trainer.limit_val_batches", "0", "--trainer.limit_test_batches", "2",
        *QUIET,
    ]  # fmt: skip
    before = sha256(victim_checkpoint)
    fit = cli_main(["fit", *common])
    assert type(fit.model) is NeuralCleanse and fit.model.progress.phase == "done"
    cli_main(["test", *common, "--ckpt_path", "last"])
    report = json.loads((tmp_path / "report.json").read_text())
    findings = report["findings"]
    assert report["defense"] == "neural_cleanse" and findings["complete"] and findings["labels"] == "victim"
    assert len(findings["anomaly_index"]) == len(findings["mask_l1_norm"]) == 10
    assert isinstance(findings["flagged"], bool) and isinstance(findings["flagged_classes"], list)
    assert findings["summary"] in (tmp_path / "report.md").read_text()
    assert sha256(victim_checkpoint) == before
