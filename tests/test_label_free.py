"""The label-free agreement (no label read), its place in checkpoints, reports and cards, and the stopping rule."""

import math
from functools import partial
from pathlib import Path

import pytest
import torch
from pytorch_lightning import LightningModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks import DefenseReport, LabelFreeStopping, format_report_table
from callbacks.deployment import model_card
from datamodules import RefineDataModule, UnlabeledFolder
from datamodules.datasets import UNLABELED
from refine_pl import ConfigError
from refine_pl.metric_names import AGREEMENT, LABEL_FREE
from refine_pl.metrics import Agreement
from refine_pl.schedules import WarmupCosineLR
from tests.conftest import SmallDigits, quiet_trainer, tiny_refine_module
from tests.test_unlabeled_folder import write_images


def test_agreement_counts_the_images_two_classifiers_give_the_same_class_without_a_label() -> None:
    metric = Agreement()
    metric.update(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 0, 0]))
    metric.update(torch.tensor([5]), torch.tensor([5]))
    assert float(metric.compute()) == pytest.approx(3 / 5)
    assert torch.isnan(Agreement().compute())  # over no image: not measured, not 0
    with pytest.raises(ValueError, match="class indices"):
        metric.update(torch.rand(3), torch.tensor([0, 1, 2]))


def _held_out_images(count: int, seed: int = 0) -> DataLoader:
    """Unlabeled validation batches ``(images, UNLABELED)``, as a folder's held-out share gives them."""
    images = torch.rand(count, 1, 28, 28, generator=torch.Generator().manual_seed(seed))
    return DataLoader(TensorDataset(images, torch.full((count,), UNLABELED)), batch_size=8)


def test_validation_on_held_out_unlabeled_images_measures_the_agreement_and_no_accuracy(
    untrained_victim: Path, tmp_path: Path
) -> None:
    module = tiny_refine_module(untrained_victim)
    trainer = quiet_trainer(tmp_path)
    (metrics,) = trainer.validate(module, dataloaders=_held_out_images(20))
    with torch.no_grad():
        images = _held_out_images(20).dataset.tensors[0]
        expected = (module.defended(images).argmax(1) == module.victim(images).argmax(1)).float().mean()
    assert metrics["val/agreement"] == pytest.approx(float(expected))
    assert module.label_free_estimate == {AGREEMENT: round(float(expected), 6), "held_out_images": 20, "epoch": 1}
    assert "val/ba" not in metrics and "val/der" not in metrics  # the images carry no label to measure BA with
    assert module.evaluated_images("val") == (0, 0)


def test_the_estimate_travels_in_the_checkpoint_to_the_tests_report_and_card(
    victim_checkpoint: Path, tmp_path: Path
) -> None:
    module = tiny_refine_module(victim_checkpoint)
    data = RefineDataModule(SmallDigits(), batch_size=16, augment=False)
    data.use_recorded_attack(module.victim_record)
    trainer = quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=2)
    trainer.fit(module, datamodule=data)
    estimate = module.label_free_estimate
    assert estimate is not None and estimate["held_out_images"] == 10 and estimate["epoch"] == 1  # a tenth of 100
    trainer.save_checkpoint(tmp_path / "fitted.ckpt")

    tested = tiny_refine_module(victim_checkpoint)
    assert tested.label_free_estimate is None
    report = DefenseReport()
    quiet_trainer(tmp_path, callbacks=[report]).test(tested, datamodule=data, ckpt_path=str(tmp_path / "fitted.ckpt"))
    assert tested.label_free_estimate == estimate
    assert report.report[LABEL_FREE] == estimate
    table = format_report_table(report.report)
    assert f"on 10 held-out training images (epoch 1): {estimate[AGREEMENT]:.4f}" in table
    assert "reads no label" in table


def test_a_card_after_fitting_shows_the_estimate(victim_checkpoint: Path, tmp_path: Path) -> None:
    module = tiny_refine_module(victim_checkpoint)
    module.label_free_estimate = {AGREEMENT: 0.9625, "held_out_images": 400, "epoch": 8}
    data = RefineDataModule(SmallDigits(), batch_size=16, augment=False)
    data.setup("fit")
    trainer = quiet_trainer(tmp_path)
    trainer.datamodule = data  # what a fit attaches
    card = model_card(trainer, module, None, {})
    assert "Not measured yet" in card and "on 400 held-out training images (epoch 8): 0.9625" in card


def test_an_unlabeled_folder_trains_on_the_rest_and_validates_on_its_held_out_share(tmp_path: Path) -> None:
    write_images(tmp_path / "images", 20)
    data = RefineDataModule(UnlabeledFolder(str(tmp_path / "images"), num_classes=10, image_size=28, in_channels=1,
                                            mean=(0.5,), std=(0.5,)), batch_size=4)  # fmt: skip
    data.setup("fit")
    assert (len(data.train_set), len(data.val_set)) == (18, 2)
    (loader,) = data.val_dataloader()
    images, labels = next(iter(loader))
    assert images.shape == (2, 1, 28, 28) and bool((labels == UNLABELED).all())


class ScriptedAgreement(LightningModule):
    """Logs a given agreement at each validation, so the stopping rule meets a known curve."""

    def __init__(self, curve: list[float], cosine: bool = False) -> None:
        super().__init__()
        self.curve = curve
        self.cosine = cosine
        self.rates: list[float] = []
        self.weight = nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return (self.weight - 1).pow(2).sum()

    def validation_step(self, batch, batch_idx):
        pass

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.log("val/agreement", self.curve[self.current_epoch])

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        if not self.cosine:
            return optimizer
        scheduler = WarmupCosineLR(optimizer, T_max=len(self.curve), warmup_epochs=0)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def on_train_epoch_start(self) -> None:
        self.rates.append(self.trainer.optimizers[0].param_groups[0]["lr"])


def _epochs_trained(
    curve: list[float], stopping: LabelFreeStopping, tmp_path: Path, max_epochs: int | None = None, **fit: str
) -> int:
    loader = DataLoader(TensorDataset(torch.zeros(2, 1)), batch_size=2)
    trainer = quiet_trainer(tmp_path, max_epochs=max_epochs or len(curve), callbacks=[stopping], num_sanity_val_steps=0)
    trainer.fit(ScriptedAgreement(curve), train_dataloaders=loader, val_dataloaders=loader, **fit)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    return trainer.current_epoch


def test_the_fit_stops_once_the_agreement_has_not_risen_for_patience_epochs(tmp_path: Path) -> None:
    curve = [0.5, 0.8, 0.9, 0.95, 0.951, 0.9505, 0.95, 0.96, 0.97, 0.98]
    # Best 0.95 at epoch 4 (0.951 is no rise of 0.002): epochs 5, 6, 7 do not rise by min_delta, so it stops after 7.
    assert _epochs_trained(curve, LabelFreeStopping(patience=3, min_delta=0.002, min_epochs=2), tmp_path) == 7
    # Any rise counts at min_delta 0: 0.951 is the best, two epochs below it, then the curve rises again to the end.
    assert _epochs_trained(curve, LabelFreeStopping(patience=3, min_delta=0.0, min_epochs=2), tmp_path) == 10


def test_with_the_cosine_the_rate_decays_to_0_over_the_cooldown_before_the_fit_stops(tmp_path: Path) -> None:
    curve = [0.5, 0.8, 0.9, 0.95, 0.95, 0.95, 0.95, 0.95, 0.95, 0.95, 0.95, 0.95, 0.95, 0.95, 0.95, 0.95]
    loader = DataLoader(TensorDataset(torch.zeros(2, 1)), batch_size=2)
    module = ScriptedAgreement(curve, cosine=True)
    stopping = LabelFreeStopping(patience=2, min_epochs=2, cooldown_epochs=3)
    trainer = quiet_trainer(tmp_path, max_epochs=len(curve), callbacks=[stopping], num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)
    # Best 0.95 at epoch 4; epochs 5 and 6 do not rise: after epoch 6 three cooldown epochs, then the stop.
    assert trainer.current_epoch == 9 and stopping.last_epoch == 8
    schedule = [0.1 * 0.5 * (1 + math.cos(math.pi * epoch / len(curve))) for epoch in range(6)]
    assert module.rates[:6] == pytest.approx(schedule)
    start = 0.5 * (1 + math.cos(math.pi * 6 / len(curve)))  # the scheduled share of epoch 7 (index 6)
    cooldown = [0.1 * start * 0.5 * (1 + math.cos(math.pi * i / 4)) for i in (1, 2, 3)]
    assert module.rates[6:] == pytest.approx(cooldown) and cooldown[-1] < 0.15 * 0.1 * start  # to 0, smoothly


def test_a_resumed_fit_stops_where_an_uninterrupted_one_does(tmp_path: Path) -> None:
    curve = [0.5, 0.8, 0.9, 0.95, 0.951, 0.9505, 0.95, 0.96, 0.97, 0.98]
    assert _epochs_trained(curve, LabelFreeStopping(patience=3, min_delta=0.002, min_epochs=2), tmp_path, 5) == 5
    resumed = LabelFreeStopping(patience=3, min_delta=0.002, min_epochs=2)
    assert _epochs_trained(curve, resumed, tmp_path, ckpt_path=str(tmp_path / "last.ckpt")) == 7
    assert resumed.stopped_epoch == 6  # its count of epochs without a rise came back with the checkpoint


def test_the_rule_never_stops_before_min_epochs_and_max_epochs_bounds_it(tmp_path: Path) -> None:
    flat = [0.9] * 8
    assert _epochs_trained(flat, LabelFreeStopping(patience=1, min_delta=0.001, min_epochs=6), tmp_path) == 7
    rising = [0.1 * epoch for epoch in range(1, 9)]
    assert _epochs_trained(rising, LabelFreeStopping(patience=1, min_epochs=1), tmp_path) == 8  # max_epochs


def test_a_run_without_held_out_images_warns_and_trains_to_max_epochs(tmp_path: Path) -> None:
    loader = DataLoader(TensorDataset(torch.zeros(2, 1)), batch_size=2)
    trainer = quiet_trainer(tmp_path, max_epochs=3, callbacks=[LabelFreeStopping(patience=1, min_epochs=1)])
    module = ScriptedAgreement([0.5] * 3)
    module.on_validation_epoch_end = lambda: None  # logs nothing: no held-out images
    with pytest.warns(UserWarning, match="No label-free agreement was measured"):
        trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)
    assert trainer.current_epoch == 3


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"patience": 0}, "patience must be an integer >= 1"),
        ({"min_epochs": 1.5}, "min_epochs must be an integer >= 1"),
        ({"min_delta": 1.0}, "min_delta is a rise of a share and must be in"),
    ],
)
def test_settings_that_cannot_work_are_refused(settings: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        LabelFreeStopping(**settings)


def test_a_dead_transform_is_drawn_anew_at_the_end_of_its_epoch_and_the_restart_is_recorded(
    victim_checkpoint: Path, tmp_path: Path
) -> None:
    module = tiny_refine_module(victim_checkpoint, optimizer=partial(torch.optim.SGD, lr=0.0, momentum=0.9))
    with torch.no_grad():
        module.transform.head.bias.fill_(-100.0)  # every output pixel clamped to 0: no gradient reaches T
    data = RefineDataModule(SmallDigits(), batch_size=16, augment=False)
    trainer = quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=0)
    with pytest.warns(UserWarning, match=r"became one constant image in epoch 1.*drawn anew \(restart 1\)"):
        trainer.fit(module, datamodule=data)
    assert module.transform_restarts == 1
    assert float(module.transform.head.bias.abs().max()) < 1  # drawn again, not the dead weights
    images = next(iter(data.val_dataloader()[0]))[0]
    with torch.no_grad():
        output = module.transform(images)
    assert float(output.amax() - output.amin()) > 0  # alive: its output varies again
    assert not trainer.optimizers[0].state  # no momentum of the dead weights pushes the new ones
    trainer.save_checkpoint(tmp_path / "restarted.ckpt")
    resumed = tiny_refine_module(victim_checkpoint)
    resumed.on_load_checkpoint(torch.load(tmp_path / "restarted.ckpt", weights_only=True))
    assert resumed.transform_restarts == 1


def test_a_living_transform_is_never_redrawn(victim_checkpoint: Path, tmp_path: Path) -> None:
    module = tiny_refine_module(victim_checkpoint)
    before = {name: value.clone() for name, value in module.transform.state_dict().items()}
    trainer = quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=0)
    trainer.fit(module, datamodule=RefineDataModule(SmallDigits(), batch_size=16, augment=False))
    assert module.transform_restarts == 0
    head = module.transform.head.weight
    moved = float((head - before["head.weight"]).abs().max())
    assert 0 < moved < 0.05  # one small SGD step, not a new draw (whose weights differ by the init's scale)
