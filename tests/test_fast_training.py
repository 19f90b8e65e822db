"""The fast training step (bf16 autocast, channels_last, pseudo-label cache) against the plain float32 step."""

from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from pytorch_lightning import Callback, LightningModule, Trainer, seed_everything
from pytorch_lightning.accelerators import CUDAAccelerator
from torch import Tensor

from datamodules import RefineDataModule
from datamodules.datasets import IndexedAugmentedViews, IndexedUnlabeledImages, UnlabeledImages
from refine_pl import ConfigError, RefineLitModule
from refine_pl.batches import AugmentedViews, IndexedImages
from refine_pl.internals import native_bf16
from refine_pl.transform import UNet
from tests.conftest import SmallDigits, quiet_trainer, tiny_refine_module

PLAIN = {"bf16": False, "channels_last": False, "pseudo_label_cache": False}


def _digits(count: int = 64) -> Tensor:
    """``count`` real training digits ``[count, 1, 28, 28]``."""
    train, _ = SmallDigits(train_per_class=(count // 10 + 1,) * 10).load()
    return torch.stack([train[i][0] for i in range(count)])


def _loss_and_gradient(victim: Path, images: Tensor, **options) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """Losses, the transform's flattened gradient, and the pseudo-labels of one step of a fresh module (seed 0)."""
    torch.manual_seed(0)
    module = tiny_refine_module(victim, transform=partial(UNet, base_width=16), **{**PLAIN, **options}).train()
    losses = module.refine_loss(images)
    losses["loss"].backward()
    gradient = torch.cat([p.grad.flatten() for p in module.transform.parameters()])
    with module.training_autocast():
        labels = module.pseudo_labels(images)
    return {k: v.detach() for k, v in losses.items()}, gradient, labels


@pytest.mark.parametrize(
    ("options", "loss_rtol", "min_cosine"),
    [
        # Same arithmetic in another memory layout: only float32 rounding differs, but it can flip exact ties of the
        # victim's max-pooling (many pixels of T(x) are clamped to exactly 0 or 1), which routes some gradient
        # elsewhere: measured loss 2e-6 - 6e-5 relative, gradient cosine 0.997-0.9985 (width 8, 3 batches).
        ({"channels_last": True}, 1e-4, 0.99),
        # bf16 keeps 8 bits of mantissa; the rounding of activations grows along the backward pass through the
        # U-Net (relative error 4% at its head, 35% at its stem against float64, while float32 is exact to 1e-6).
        # Measured: loss 1e-3 - 3e-3 relative, gradient cosine 0.90-0.96 (width 8 and 16); the gradient of another
        # batch of the same data has cosine 0.50-0.53 with this one, so the bf16 error is far below SGD's noise.
        ({"channels_last": True, "bf16": True}, 1e-2, 0.9),
        ({"bf16": True}, 1e-2, 0.9),
    ],
)
def test_fast_step_gives_the_float32_loss_and_gradients_within_tolerance(
    victim_checkpoint: Path, options: dict, loss_rtol: float, min_cosine: float
) -> None:
    images = _digits()
    plain_losses, plain_gradient, plain_labels = _loss_and_gradient(victim_checkpoint, images)
    losses, gradient, labels = _loss_and_gradient(victim_checkpoint, images, **options)
    assert torch.equal(labels, plain_labels)
    for name, value in plain_losses.items():
        assert losses[name].dtype == torch.float32
        assert losses[name].item() == pytest.approx(value.item(), rel=loss_rtol), name
    assert F.cosine_similarity(gradient, plain_gradient, dim=0) >= min_cosine
    assert 0.9 <= gradient.norm() / plain_gradient.norm() <= 1.1


class _VictimCalls(Callback):
    """Counts, per training step, the victim's forward passes without gradient (the pseudo-label passes)."""

    def __init__(self) -> None:
        self.per_step: list[int] = []

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pl_module.victim.register_forward_hook(self._count)

    def _count(self, *_) -> None:
        if self.per_step and not torch.is_grad_enabled():
            self.per_step[-1] += 1

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        self.per_step.append(0)


def _fit(
    victim: Path, root: Path, augment: bool, steps: int, consistency: bool = False, **options
) -> tuple[RefineLitModule, _VictimCalls]:
    seed_everything(0)
    module = tiny_refine_module(victim, **options)
    # 90 training images, batch 18: 5 steps an epoch, each image once per epoch
    data = RefineDataModule(
        SmallDigits(), batch_size=18, augment=augment, horizontal_flip=False, consistency=consistency
    )
    calls = _VictimCalls()
    trainer = quiet_trainer(root, max_steps=steps, limit_val_batches=0, enable_checkpointing=False, callbacks=[calls])
    trainer.fit(module, datamodule=data)
    return module, calls


def test_pseudo_label_cache_is_exact_and_runs_the_victim_on_each_image_once(
    victim_checkpoint: Path, tmp_path: Path
) -> None:
    cached, calls = _fit(victim_checkpoint, tmp_path / "cached", augment=False, steps=12)
    uncached, uncached_calls = _fit(
        victim_checkpoint, tmp_path / "plain", augment=False, steps=12, pseudo_label_cache=False
    )
    assert calls.per_step == [1] * 5 + [0] * 7  # the first epoch computes every image's label, later epochs read it
    assert uncached_calls.per_step == [1] * 12
    for name, value in uncached.transform.state_dict().items():
        assert torch.equal(cached.transform.state_dict()[name], value), name
    assert_cache_holds_the_victims_class_of_every_training_image(cached)


def assert_cache_holds_the_victims_class_of_every_training_image(module: RefineLitModule) -> None:
    """The label cache holds the victim's prediction on every (un-augmented) training image, by its index."""
    data = RefineDataModule(SmallDigits(), batch_size=16, augment=False)
    data.setup("fit")
    images = torch.stack([data.train_set[i][0] for i in range(len(data.train_set))])
    with module.training_autocast():
        expected = module.pseudo_labels(images.contiguous(memory_format=torch.channels_last))
    assert torch.equal(module._cached_labels[: len(expected)], expected)


def test_pseudo_label_cache_is_never_used_for_augmented_images(victim_checkpoint: Path, tmp_path: Path) -> None:
    data = RefineDataModule(SmallDigits(), batch_size=16, augment=True)
    data.setup("fit")
    loader = data.train_dataloader()
    assert isinstance(loader.dataset.base, UnlabeledImages)  # inside the per-sample seeding wrapper
    assert isinstance(next(iter(loader)), Tensor)  # no indices: nothing to key a cache by
    module, calls = _fit(victim_checkpoint, tmp_path, augment=True, steps=7)
    assert module._cached_labels is None
    assert calls.per_step == [1] * 7  # the victim labels every augmented batch anew


def test_indexed_images_are_the_training_images_at_their_indices() -> None:
    data = RefineDataModule(SmallDigits(), batch_size=16, augment=False)
    data.setup("fit")
    loader = data.train_dataloader()
    assert isinstance(loader.dataset.base, IndexedUnlabeledImages)
    batch = next(iter(loader))
    assert isinstance(batch, IndexedImages) and batch.indices.dtype == torch.long
    for image, index in zip(batch.images, batch.indices, strict=True):
        assert torch.equal(image, data.train_set[int(index)][0])


def test_consistency_batches_are_augmented_views_of_the_training_images_at_their_indices() -> None:
    data = RefineDataModule(
        SmallDigits(), batch_size=16, augment=True, horizontal_flip=False, consistency=True, max_rotation=15
    )
    data.setup("fit")
    loader = data.train_dataloader()
    assert isinstance(loader.dataset.base, IndexedAugmentedViews)
    batch = next(iter(loader))
    assert isinstance(batch, AugmentedViews) and batch.indices.dtype == torch.long
    for view, image, index in zip(batch.views, batch.images, batch.indices, strict=True):
        assert torch.equal(image, data.train_set[int(index)][0])
        assert view.shape == image.shape and view.min() >= 0 and view.max() <= 1
    assert not torch.equal(batch.views, batch.images)


def test_consistency_views_are_trained_to_the_pseudo_labels_of_their_originals(victim_checkpoint: Path) -> None:
    images = _digits()
    views = images.rot90(1, dims=(-2, -1))  # a view the victim classifies differently
    module = tiny_refine_module(victim_checkpoint, **PLAIN).train()
    with torch.no_grad():
        labels = module.victim(images).argmax(1)
        assert not torch.equal(labels, module.victim(views).argmax(1))
    torch.manual_seed(0)
    losses = module.refine_loss(views, originals=images)
    transformed = module.transform(views)
    utility = module.utility_loss(module.remap(module.victim(transformed)), labels)
    contrastive = module.contrastive_loss(F.normalize(transformed.flatten(1), dim=1), labels)
    assert losses["utility"].item() == pytest.approx(utility.item(), rel=1e-6)
    assert losses["contrastive"].item() == pytest.approx(contrastive.item(), rel=1e-6)


def test_consistency_labels_each_original_once_through_the_cache(victim_checkpoint: Path, tmp_path: Path) -> None:
    module, calls = _fit(victim_checkpoint, tmp_path, augment=True, steps=12, consistency=True)
    assert calls.per_step == [1] * 5 + [0] * 7  # the originals' labels are computed in the first epoch, then read
    assert_cache_holds_the_victims_class_of_every_training_image(module)


@pytest.mark.parametrize(
    ("options", "message"),
    [({"augment": False, "consistency": True}, "turn augmentation on"), ({"max_rotation": 200}, "max_rotation")],
)
def test_consistency_and_rotation_settings_are_checked(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RefineDataModule(SmallDigits(), **options)


def test_a_labeled_batch_is_refused(untrained_victim: Path) -> None:
    module = tiny_refine_module(untrained_victim)
    with pytest.raises(ConfigError, match=r"never \(images, labels\)"):
        module.training_step([torch.rand(4, 1, 28, 28), torch.arange(4)], 0)


def test_bf16_follows_the_hardware_and_the_trainer_and_can_be_turned_off(
    untrained_victim: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = tiny_refine_module(untrained_victim)
    assert module.uses_bf16() == native_bf16(torch.device("cpu"))
    module.trainer = Trainer(accelerator="cpu", precision="64-true", logger=False)
    assert not module.uses_bf16()  # the trainer chose a precision: it is left alone
    assert not tiny_refine_module(untrained_victim, bf16=False).uses_bf16()
    assert tiny_refine_module(untrained_victim, bf16=True).uses_bf16()
    for capable in (True, False):  # a CUDA device has native bf16 from Ampere on
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True, c=capable: c)
        assert native_bf16(torch.device("cuda")) is capable


def test_the_transform_and_victim_are_kept_in_channels_last_unless_turned_off(untrained_victim: Path) -> None:
    weights = [p for p in tiny_refine_module(untrained_victim).defended.parameters() if p.ndim == 4]
    assert weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
    assert all(p.is_contiguous() for p in tiny_refine_module(untrained_victim, channels_last=False).parameters())


def test_loaders_pin_memory_on_a_cuda_run_only() -> None:
    data = RefineDataModule(SmallDigits(), batch_size=16)
    data.setup("fit")
    assert not data.train_dataloader().pin_memory and not data.val_dataloader()[0].pin_memory
    data.trainer = SimpleNamespace(accelerator=CUDAAccelerator(), world_size=1, global_rank=0)
    assert data.train_dataloader().pin_memory and all(loader.pin_memory for loader in data.val_dataloader())
