"""Two CPU processes (gloo) give what one process gives: REFINE loss and gradients, training, BA / ASR."""

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pytorch_lightning import Trainer, seed_everything
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from datamodules import RefineDataModule
from refine_pl import RefineLitModule
from refine_pl.attacks import BadNets
from refine_pl.distributed import use_global_batch_norm
from refine_pl.errors import ConfigError
from tests.conftest import SmallDigits, free_port, quiet_trainer, tiny_refine_module


class _RefineLoss(nn.Module):
    """What Lightning's DDP wrapper does: the wrapped module's forward is the training loss."""

    def __init__(self, module: RefineLitModule) -> None:
        super().__init__()
        self.module = module

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        return self.module.refine_loss(images)


def _gradients(module: RefineLitModule) -> dict[str, Tensor]:
    return {name: p.grad.clone() for name, p in module.transform.named_parameters()}


def _double_module(victim: Path, global_batch_norm: bool = False) -> RefineLitModule:
    torch.manual_seed(0)
    module = tiny_refine_module(victim).double().train()
    if global_batch_norm:
        module.transform = use_global_batch_norm(module.transform, "cpu")
    return module


def _ddp_worker(rank: int, port: int, victim: Path, images: Tensor, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        local = images.chunk(2)[rank]
        for global_batch_norm in (True, False):
            module = _double_module(victim, global_batch_norm)
            ddp = DistributedDataParallel(_RefineLoss(module))
            losses = ddp(local)
            losses["loss"].backward()
            bn = module.transform.stem[1]
            results[rank, global_batch_norm] = (
                {k: v.detach() for k, v in losses.items()},
                _gradients(module),
                (bn.running_mean.clone(), bn.running_var.clone()),
            )
        module = tiny_refine_module(victim, remap_seed=rank)  # processes that disagree on the remap
        try:
            module._check_remap_is_shared()
        except ConfigError as error:
            results[rank, "remap"] = str(error)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_refine_loss_and_transform_gradients_equal_the_full_batch(untrained_victim: Path) -> None:
    """Under DDP with two processes, each holding half the batch, the gradients of the transform are the
    single-process gradients of the whole batch: SupCon sees the global batch, batch norm normalises with the
    global statistics, DDP averages. Run in float64: the transform's output clamp makes exact ties in the
    victim's max-pooling, and float32 rounding differences between the two computations can flip which input
    a tie routes the gradient to, which moves gradients by up to ~1% without any error in the method.
    """
    images = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    full = _double_module(untrained_victim)
    full_losses = full.refine_loss(images)
    full_losses["loss"].backward()
    stem_bn = full.transform.stem[1]

    results = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(free_port(), untrained_victim, images, results), nprocs=2, join=True)

    for rank in range(2):
        losses, gradients, (running_mean, running_var) = results[rank, True]
        # Every process computes the contrastive loss of the global batch.
        assert losses["contrastive"].item() == pytest.approx(full_losses["contrastive"].item(), rel=1e-5)
        # DDP averages the gradients: each process holds the full-batch gradient.
        for name, gradient in gradients.items():
            torch.testing.assert_close(gradient, full.transform.get_parameter(name).grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(running_mean, stem_bn.running_mean, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(running_var, stem_bn.running_var, rtol=1e-5, atol=1e-7)
    mean_loss = (results[0, True][0]["loss"] + results[1, True][0]["loss"]) / 2
    assert mean_loss.item() == pytest.approx(full_losses["loss"].item(), rel=1e-5)

    # The check has teeth: with per-process batch-norm statistics the gradients are not the full-batch ones.
    per_process = results[0, False][1]
    assert any(
        not torch.allclose(gradient, full.transform.get_parameter(name).grad, rtol=1e-3, atol=1e-7)
        for name, gradient in per_process.items()
    )
    for rank in range(2):
        assert "The output remap differs between processes" in results[rank, "remap"]


def _digits(batch_size: int, augment: bool = True) -> RefineDataModule:
    """Half of 15 + 9 x 10 real digits for validation: 8 + 9 x 5 = 53 clean images, 45 poisoned (both odd, so a
    padding sampler would count an image twice). A 2x2 patch triggers the 3x3-patch victim on some images only,
    so its ASR lies strictly between 0 and 1.
    """
    return RefineDataModule(
        SmallDigits(train_per_class=(15,) + (10,) * 9),
        BadNets(target_label=0, patch_size=2),
        batch_size=batch_size,
        val_fraction=0.5,
        augment=augment,
    )


def _fit(
    victim: Path,
    root: Path,
    devices: int,
    batch_size: int,
    augment: bool = True,
    precision: str = "64-true",  # see the gradient test: float32 ties in the victim would blur the comparison
    max_epochs: int = 1,
    limit_train_batches: int | None = 2,
) -> tuple[Trainer, RefineLitModule]:
    """Training (two steps unless told), validation, then a checkpoint."""
    seed_everything(0)
    module = tiny_refine_module(victim)
    datamodule = _digits(batch_size, augment)
    trainer = quiet_trainer(
        root,
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        precision=precision,
        max_epochs=max_epochs,
        limit_train_batches=limit_train_batches,
        num_sanity_val_steps=0,
        callbacks=[ModelCheckpoint(dirpath=root, save_last=True)],
    )
    trainer.fit(module, datamodule=datamodule)
    return trainer, module


@pytest.mark.slow
@pytest.mark.parametrize(
    ("augment", "global_batch", "epochs", "limit"),
    [
        (True, 16, 1, 2),
        # Un-augmented images: every process caches the pseudo-labels of its shard and shares them, so in the second
        # epoch each process reads its labels from the cache (global batch 4 covers all 52 training images).
        (False, 4, 2, None),
    ],
)
def test_ddp_spawn_fit_matches_one_process_and_its_checkpoint_validates_in_one_process(
    victim_checkpoint: Path, tmp_path: Path, augment: bool, global_batch: int, epochs: int, limit: int | None
) -> None:
    options = {"augment": augment, "max_epochs": epochs, "limit_train_batches": limit}
    ddp, ddp_module = _fit(victim_checkpoint, tmp_path / "ddp", devices=2, batch_size=global_batch // 2, **options)
    single, single_module = _fit(victim_checkpoint, tmp_path / "single", devices=1, batch_size=global_batch, **options)

    checkpoint = torch.load(tmp_path / "ddp" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == single.global_step == epochs * (limit or 52 // global_batch)
    # Two processes with half the batch train on the global batches of one process with the whole batch.
    for name, value in single_module.transform.state_dict().items():
        torch.testing.assert_close(ddp_module.transform.state_dict()[name].to(value.dtype), value, rtol=1e-5, atol=1e-7)
    if not augment:
        assert bool((single_module._cached_labels >= 0).all())

    # The checkpoint of the 2-process run loads in one process, and validating it there gives the BA / ASR
    # the two processes reported for the same weights.
    datamodule = _digits(batch_size=16)
    one = quiet_trainer(tmp_path / "one", devices=1, precision="64-true")
    module = tiny_refine_module(victim_checkpoint)
    one.validate(module, datamodule=datamodule, ckpt_path=tmp_path / "ddp" / "last.ckpt")
    for name in ("val/ba", "val/asr", "val/victim_ba", "val/victim_asr"):
        assert one.callback_metrics[name].item() == ddp.callback_metrics[name].item(), name
    assert torch.equal(checkpoint["state_dict"]["defended.remap.permutation"], single_module.remap.permutation)
