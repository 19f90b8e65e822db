"""Mixed precision on CPU: bf16-mixed trains, the losses stay in float32, and what 16-mixed becomes."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pytorch_lightning import Callback, LightningModule, Trainer, seed_everything

from datamodules import RefineDataModule
from refine_pl.losses import SupConLoss
from tests.conftest import SmallDigits, quiet_trainer, tiny_refine_module


def test_contrastive_loss_is_computed_in_float32_under_autocast() -> None:
    features = F.normalize(torch.randn(32, 64), dim=1)
    labels = torch.randint(0, 4, (32,))
    expected = SupConLoss()(features, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = SupConLoss()(features, labels)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


class _Record(Callback):
    """Keeps every training loss and the dtype the transform produced in training."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.transform_dtypes: set[torch.dtype] = set()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pl_module.transform.register_forward_hook(lambda _, __, out: self.transform_dtypes.add(out.dtype))

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def test_bf16_mixed_training_on_cpu_lowers_the_loss_without_nan(victim_checkpoint: Path, tmp_path: Path) -> None:
    seed_everything(0)
    module = tiny_refine_module(victim_checkpoint)
    datamodule = RefineDataModule(SmallDigits(), batch_size=16, augment=False)
    datamodule.setup("fit")
    probe = torch.stack([datamodule.train_set[i][0] for i in range(32)])
    with torch.no_grad():
        before = module.train().refine_loss(probe)["loss"].item()
    record = _Record()
    trainer = quiet_trainer(
        tmp_path,
        precision="bf16-mixed",
        max_steps=30,
        limit_val_batches=0,
        enable_checkpointing=False,
        callbacks=[record],
    )
    trainer.fit(module, datamodule=datamodule)

    assert record.transform_dtypes == {torch.bfloat16}  # the transform really ran in bf16
    assert len(record.losses) == 30 and all(torch.isfinite(torch.tensor(record.losses)))
    assert all(torch.isfinite(p).all() for p in module.transform.parameters())
    with torch.no_grad():
        after = module.train().refine_loss(probe)["loss"].item()
    assert after < 0.9 * before


def test_16_mixed_on_cpu_runs_as_bf16_mixed_with_a_warning() -> None:
    """Lightning 2.6 has no float16 autocast on CPU: it warns and switches to bf16-mixed (documented in README)."""
    with pytest.warns(UserWarning, match="AMP with fp16 is not supported on CPU"):
        trainer = Trainer(accelerator="cpu", precision="16-mixed", logger=False)
    assert trainer.precision == "bf16-mixed"
