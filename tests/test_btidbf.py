"""BTI-DBF (U) and (P): the feature layer and mask, the bounded generator, labels never read, the victim never
written, the phase schedule and its resumption, and both uses through the CLI.
"""

import hashlib
import json
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from pytorch_lightning import Callback, LightningModule, Trainer, seed_everything
from torch import nn

from callbacks import RunCheckpoint
from datamodules import RefineDataModule
from datamodules.datasets import ImageTensorDataset
from refine_pl import ConfigError
from refine_pl.architectures import build_architecture
from refine_pl.classifier import NormalizedClassifier
from refine_pl.cli import cli_main
from refine_pl.defenses import DEFENSES, BTIDBFPurification, BTIDBFUnlearning
from refine_pl.defenses.btidbf import (
    GENERATOR,
    MASK,
    PRETRAIN,
    PURIFY,
    UNLEARN,
    BoundedGenerator,
    FeatureMask,
    FeatureTap,
    default_feature_layer,
    normalised_distance,
)
from refine_pl.pipeline import config_flags
from refine_pl.transform import UNet
from tests.conftest import MNIST_FACTS, QUIET, REFINE_CONFIGS, SmallDigits, quiet_trainer

USES = {"btidbf_unlearning": BTIDBFUnlearning, "btidbf_purification": BTIDBFPurification}
BOTH_USES = [
    pytest.param(BTIDBFUnlearning, id="btidbf_unlearning"),
    pytest.param(BTIDBFPurification, id="btidbf_purification", marks=pytest.mark.slow),  # the quick tier runs (U)
]
TINY_SCHEDULE = {"rounds": 2, "pretrain_epochs": 1, "mask_epochs": 1, "generator_epochs": 1, "repair_epochs": 1}
"""7 epochs: pretraining, then two rounds of mask, generator and repair (the second round aims at the target)."""


def _tiny(use: type, victim: Path, **kwargs: Any) -> LightningModule:
    settings = {"generator": partial(UNet, base_width=4, depth=2), **TINY_SCHEDULE, **kwargs}
    torch.manual_seed(0)  # the generator's initial weights
    return use(victim_checkpoint=str(victim), **MNIST_FACTS, **settings)


class _Relabeled(SmallDigits):
    """SmallDigits whose training labels are replaced: all ``label`` (-1: none; else poisoned), and so declared."""

    def __init__(self, label: int | None) -> None:
        super().__init__(train_per_class=(4,) * 10, test_per_class=(2,) * 10)
        self.label = label
        self.labeled_train = label is None or label >= 0

    def load(self) -> tuple[ImageTensorDataset, ImageTensorDataset]:
        train, test = super().load()
        if self.label is not None:
            train = ImageTensorDataset(train.images, torch.full_like(train.labels, self.label))
        return train, test


def _data(label: int | None = None) -> RefineDataModule:
    # No validation share: the split of a labeled source is stratified by its labels, which would change the images.
    return RefineDataModule(_Relabeled(label), batch_size=16, augment=False, val_fraction=0.0)


def _fit(module: LightningModule, root: Path, data: RefineDataModule | None = None, **trainer: Any) -> Trainer:
    seed_everything(0)
    settings = {"max_epochs": module.schedule_epochs, "limit_train_batches": 1, "limit_val_batches": 0, **trainer}
    fitted = quiet_trainer(root, **settings)
    fitted.fit(module, datamodule=data or _data())
    return fitted


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_default_feature_layer_is_the_last_feature_map_and_a_missing_one_is_named() -> None:
    assert default_feature_layer(build_architecture("small_cnn", 10, 1), 1, 28) == "6"
    assert default_feature_layer(build_architecture("resnet18_cifar", 10, 3), 3, 32) == "layer4"
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))
    with pytest.raises(ConfigError, match="no layer of this victim outputs a feature map.*feature_layer.*one of: 0, 1"):
        default_feature_layer(mlp, 1, 28)
    classifier = NormalizedClassifier(mlp, (0.5,), (0.5,))
    with pytest.raises(ConfigError, match="no layer 'fc'.*feature_layer"):
        FeatureTap(classifier, "fc")
    tap = FeatureTap(classifier, "2")  # an MLP's features are named
    images = torch.rand(3, 1, 28, 28)
    assert tap.features(images).shape == (3, 32)
    features, logits = tap.features_and_logits(images)
    assert torch.equal(logits, classifier(images)) and features.shape == (3, 32)
    assert torch.equal(tap.logits_with(images, lambda z: z), classifier(images))
    assert torch.equal(tap.logits_with(images, torch.zeros_like), classifier.net[3](torch.zeros(3, 32)))


def test_the_feature_mask_lies_in_the_open_unit_interval_and_is_redrawn_from_its_seed() -> None:
    mask = FeatureMask((4, 2, 2))
    mask.reset(torch.Generator().manual_seed(3))
    first = mask().detach().clone()
    assert first.shape == (4, 2, 2) and bool((first > 0).all()) and bool((first < 1).all())
    mask.reset(torch.Generator().manual_seed(3))
    assert torch.equal(mask(), first)


def test_the_generators_output_lies_within_its_bound_of_every_input() -> None:
    std = (0.3081,)
    far = BoundedGenerator(nn.Identity(), bound=0.3, std=std)
    images = torch.rand(8, 1, 28, 28)
    proposals = 1 - images  # far beyond the bound
    generated = far.bounded(images, proposals)
    distances = normalised_distance(images, generated, far.std)
    assert bool((distances <= 0.3 * (1 + 1e-5)).all()) and bool((distances > 0.2).all())
    assert float(generated.min()) >= 0 and float(generated.max()) <= 1
    near = images + 0.01 * torch.randn_like(images)
    assert torch.allclose(far.bounded(images, near), near.clamp(0, 1))  # within the bound: left as proposed
    generator = BoundedGenerator(UNet(1, base_width=4, depth=2), bound=0.05, std=std)
    assert bool((normalised_distance(images, generator(images), generator.std) <= 0.05 * (1 + 1e-5)).all())
    with pytest.raises(ConfigError, match="norm_bound must be positive"):
        BoundedGenerator(nn.Identity(), bound=0.0, std=std)


def test_the_schedule_runs_one_phase_an_epoch_and_a_short_trainer_is_refused(
    untrained_victim: Path, tmp_path: Path
) -> None:
    module = _tiny(BTIDBFUnlearning, untrained_victim)
    assert module.schedule_epochs == 7
    phases = [module.phase_at(epoch) for epoch in range(9)]
    assert phases[:7] == [
        (-1, PRETRAIN, 0), (0, MASK, 0), (0, GENERATOR, 0), (0, UNLEARN, 0), (1, MASK, 0), (1, GENERATOR, 0),
        (1, UNLEARN, 0),
    ]  # fmt: skip
    assert phases[7] == phases[8] == phases[6]
    assert _tiny(BTIDBFPurification, untrained_victim).phase_at(3) == (0, PURIFY, 0)
    with pytest.raises(ConfigError, match="takes 7 epochs.*--trainer.max_epochs 7"):
        _fit(module, tmp_path, max_epochs=5)
    with pytest.raises(ConfigError, match="labels must be victim .* or true"):
        _tiny(BTIDBFUnlearning, untrained_victim, labels="gold")
    with pytest.raises(ConfigError, match="scheduler null"):
        _tiny(BTIDBFUnlearning, untrained_victim, scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1))


@pytest.mark.parametrize("use", BOTH_USES)
def test_mask_and_generator_train_on_unlabeled_images_and_read_no_label(
    use: type, untrained_victim: Path, tmp_path: Path
) -> None:
    trained = {}
    for label in (None, 3, -1):  # the true labels, poisoned ones, none at all
        module = _tiny(use, untrained_victim)
        initial = {key: value.clone() for key, value in module.state_dict().items()}
        _fit(module, tmp_path / str(label), _data(label))
        trained[label] = module.state_dict()
        for part in ("mask.weight", "generator.net.head.weight"):
            assert not torch.equal(trained[label][part], initial[part]), part
        assert 0 <= int(module.target_label) < 10
    for label in (3, -1):
        assert trained[label].keys() == trained[None].keys()
        assert all(torch.equal(trained[label][key], trained[None][key]) for key in trained[None]), label


def test_true_labels_are_a_choice_and_need_labels(untrained_victim: Path, tmp_path: Path) -> None:
    victim_labels = _tiny(BTIDBFUnlearning, untrained_victim)
    true_labels = _tiny(BTIDBFUnlearning, untrained_victim, labels="true")
    _fit(victim_labels, tmp_path / "victim")
    _fit(true_labels, tmp_path / "true")
    assert not torch.equal(victim_labels.defended.net[-1].weight, true_labels.defended.net[-1].weight)
    with pytest.raises(ConfigError, match="labels: true reads the training set's labels.*labels victim"):
        _fit(_tiny(BTIDBFUnlearning, untrained_victim, labels="true"), tmp_path / "none", _data(-1))


def test_unlearning_changes_a_copy_never_the_victim_nor_its_file(untrained_victim: Path, tmp_path: Path) -> None:
    digest = _sha256(untrained_victim)
    module = _tiny(BTIDBFUnlearning, untrained_victim)
    victim_before = {key: value.clone() for key, value in module.victim.state_dict().items()}
    assert module.defended is not module.victim
    _fit(module, tmp_path)
    assert _sha256(untrained_victim) == digest
    assert all(torch.equal(value, victim_before[key]) for key, value in module.victim.state_dict().items())
    assert not all(torch.equal(value, victim_before[key]) for key, value in module.defended.state_dict().items())
    assert not any(parameter.requires_grad for parameter in module.victim.parameters())


class _StopAfter(Callback):
    """Stops the fit at the end of epoch ``epoch`` (a killed run's last checkpoint)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


class _Phases(Callback):
    """Records the round and phase of every epoch trained."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, str, int]] = []

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.seen.append(pl_module.phase_at(trainer.current_epoch))


@pytest.mark.parametrize("use", BOTH_USES)
def test_a_resumed_run_continues_its_round_and_phase_and_ends_where_an_uninterrupted_one_does(
    use: type, untrained_victim: Path, tmp_path: Path
) -> None:
    whole = _tiny(use, untrained_victim)
    _fit(whole, tmp_path / "whole")

    first = _tiny(use, untrained_victim)
    _fit(first, tmp_path / "parts", callbacks=[RunCheckpoint(), _StopAfter(4)])  # killed inside round 1's mask
    last = tmp_path / "parts" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["epoch"] == 4
    assert int(first.target_label) == int(whole.target_label)  # detected in round 0's repair, kept

    phases = _Phases()
    resumed = _tiny(use, untrained_victim)
    seed_everything(0)
    trainer = quiet_trainer(
        tmp_path / "parts", max_epochs=7, limit_train_batches=1, limit_val_batches=0, callbacks=[phases]
    )
    trainer.fit(resumed, datamodule=_data(), ckpt_path=str(last))
    assert phases.seen == [(1, GENERATOR, 0), (1, use.repair_phase, 0)]
    assert int(resumed.target_label) == int(whole.target_label)
    expected = whole.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in resumed.state_dict().items())


@pytest.mark.slow
@pytest.mark.parametrize("defense", list(USES))
def test_each_use_runs_through_the_cli_and_writes_its_report(
    defense: str, victim_checkpoint: Path, tmp_path: Path
) -> None:
    digest = _sha256(victim_checkpoint)
    common = [
        *config_flags(DEFENSES[defense].configs(REFINE_CONFIGS)),
        "--model.init_args.victim_checkpoint", str(victim_checkpoint),
        "--trainer.default_root_dir", str(tmp_path),
        "--model.init_args.generator.init_args.base_width", "4",
        "--model.init_args.rounds", "1",
        "--model.init_args.pretrain_epochs", "1",
        "--model.init_args.repair_epochs", "1",
        "--model.init_args.generator_epochs", "1",
        "--trainer.max_epochs", "4",
        "--trainer.limit_train_batches", "2",
        "--trainer.limit_val_batches", "1",
        "--trainer.limit_test_batches", "2",
        *QUIET,
    ]  # fmt: skip
    fit = cli_main(["fit", *common])
    assert type(fit.model) is USES[defense] and fit.trainer.current_epoch == 4 and fit.trainer.global_step == 8
    cli_main(["test", *common, "--ckpt_path", "last"])
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["defense"] == defense and report["attack"] == "badnets"
    assert all(isinstance(report["defended"][key], float) for key in ("ba", "asr", "ra", "der"))
    assert f"| {DEFENSES[defense].label} |" in (tmp_path / "report.md").read_text()
    findings = report["findings"]  # the first round's repair voted: a target was detected
    assert 0 <= findings["detected_target"] < 10 and sum(findings["target_votes"]) > 0
    assert f"took class {findings['detected_target']} for the backdoor's target" in (tmp_path / "report.md").read_text()
    assert _sha256(victim_checkpoint) == digest
