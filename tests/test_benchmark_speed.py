"""benchmarks/speed.py times the module's own training step: one timed step moves the transform as Trainer.fit does."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from pytorch_lightning import Trainer
from torch.utils.data import DataLoader

from benchmarks import speed
from refine_pl import RefineLitModule
from refine_pl.batches import IndexedImages


@pytest.mark.parametrize("augmented", [False, True], ids=["indexed images", "augmented images"])
def test_the_timed_step_is_the_step_trainer_fit_takes(
    augmented: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    setting = replace(speed.SETTINGS["mnist"], batch=8, unet_width=4, augmented=augmented)
    victim = speed.write_victim(setting, tmp_path)
    images = setting.images(torch.device("cpu"))
    calls = []
    refine_loss = RefineLitModule.refine_loss

    def counted_refine_loss(*args, **kwargs):
        calls.append(args)
        return refine_loss(*args, **kwargs)

    monkeypatch.setattr(RefineLitModule, "refine_loss", counted_refine_loss)

    step = speed.ProjectStep(setting, victim, torch.device("cpu"))
    before = {name: value.clone() for name, value in step.module.transform.state_dict().items()}
    step(images)
    assert len(calls) == 1  # the module's own loss

    # The same module (project_module seeds it) fitted for one step on the batch its datamodule would give.
    fitted = speed.project_module(setting, victim)
    items = list(images) if augmented else [IndexedImages(image, index) for index, image in enumerate(images)]
    trainer = Trainer(
        max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(fitted, train_dataloaders=DataLoader(items, batch_size=setting.batch))
    assert len(calls) == 2

    after = step.module.transform.state_dict()
    assert any(not torch.equal(before[name], after[name]) for name in before)
    for name, value in fitted.transform.state_dict().items():
        torch.testing.assert_close(after[name], value, msg=name)
