"""LightningModule that trains REFINE's input transformation in front of a frozen victim."""

from collections.abc import Callable
from typing import Any

import torch
from pytorch_lightning.cli import OptimizerCallable
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn

from refine_pl.batches import AugmentedViews, IndexedImages
from refine_pl.distributed import gather_no_grad, use_global_batch_norm
from refine_pl.errors import ConfigError
from refine_pl.input_transform_module import InputTransformDefense
from refine_pl.internals import global_seed
from refine_pl.losses import SupConLoss, UtilityLoss, refine_objective
from refine_pl.transform import UNet

TRANSFORM_RESTARTS = "transform_restarts"
"""Key of the number of dead-transform restarts (:meth:`RefineLitModule.redraw_transform`) in checkpoints."""


def reference_sgd(params: Any) -> torch.optim.Optimizer:
    """The REFINE reference optimizer: SGD, lr 0.01, momentum 0.9, weight decay 5e-4."""
    return torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)


class RefineLitModule(InputTransformDefense):
    """REFINE: the defended classifier ``M(f(T(x)))`` and the training of ``T``.

    ``f`` is the frozen victim, ``T`` the trainable transform (a U-Net by default), ``M`` a derangement
    (:class:`~refine_pl.input_transform_module.InputTransformDefense`). Training batches are images only: the
    pseudo-label of each image is the victim's prediction on it, so no label of the benign set can reach the loss.
    The loss is the utility loss of ``M(f(T(x)))`` against the pseudo-label plus ``contrastive_weight`` times the
    supervised contrastive loss of the flattened, L2-normalised ``T(x)`` grouped by pseudo-label.

    In a multi-process run the contrastive loss covers the global batch and the transform's batch norm uses the
    global batch's statistics (``global_batch_norm``); the transform's gradients are then those of one process
    with the whole batch. Under mixed precision ``T`` and ``f`` run in 16 bits and the losses in float32.

    A transform whose output has become one constant image on a whole training batch is dead: its output is
    clamped to [0, 1] everywhere, so no gradient reaches it again (a tuning victim's transform went all black in its
    first epoch and stayed so, at the BA of a constant guess). At the end of such an epoch ``T`` is drawn anew
    (seeded by the run's seed and the restart's number), its optimizer state cleared, and training goes on;
    :attr:`transform_restarts` counts the restarts (kept in checkpoints).

    Args:
        transform: Builds ``T`` from the channel count, e.g. ``UNet`` with its width set in the config.
        remap_seed: Seed of the output derangement.
        derange: Put the derangement behind the victim; False puts the identity there (REFINE's ablation without
            the remap: ``T`` is trained with the same losses, but no class has to move).
        global_batch_norm: In a multi-process run, make the transform's batch-norm layers normalise with the
            statistics of the global batch, so that training matches one process with the whole batch
            (false: per-process statistics, as plain DDP does).
        contrastive_weight: Weight of the supervised contrastive loss (0.1 in the reference).
        temperature: Temperature of the supervised contrastive loss (0.07 in the reference).
        optimizer: Builds the optimizer from the transform's parameters (the only trainable ones).
        pseudo_label_cache: Remember the victim's prediction on each un-augmented training image (batches of
            :class:`~refine_pl.batches.IndexedImages`) instead of running the victim on it again every epoch.
            Exact: the victim is frozen. Augmented batches never use it.
        compile: ``torch.compile`` the transform and the victim (compiled on the first steps; see
            ``benchmarks/speed.py`` for the compile time and what it gains).
        **kwargs: The arguments every defense takes (:class:`~refine_pl.DefendedLitModule`): the victim
            (``victim_checkpoint``, ``victim_arch``, ``victim_access``), the data facts (``num_classes``,
            ``in_channels``, ``image_size``, ``mean``, ``std``), ``clean_reference``, ``scheduler``, ``bf16`` and
            ``channels_last``.
    """

    needs_victim_gradients = True

    def __init__(
        self,
        transform: Callable[[int], nn.Module] = UNet,
        remap_seed: int = 0,
        derange: bool = True,
        global_batch_norm: bool = True,
        contrastive_weight: float = 0.1,
        temperature: float = 0.07,
        optimizer: OptimizerCallable = reference_sgd,
        pseudo_label_cache: bool = True,
        compile: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(transform=transform, remap_seed=remap_seed, derange=derange, optimizer=optimizer, **kwargs)
        self.utility_loss = UtilityLoss()
        self.contrastive_loss = SupConLoss(temperature=temperature)
        self.contrastive_weight = contrastive_weight
        self.global_batch_norm = global_batch_norm
        self.pseudo_label_cache = pseudo_label_cache
        self._cached_labels: Tensor | None = None  # [N] long, -1 where not yet computed
        self._output_spread: Tensor | None = None  # max - min of T's output on the last training batch
        self.transform_restarts = 0
        if compile:
            self.transform.compile()
            self.victim.compile()

    def setup(self, stage: str) -> None:
        if self.global_batch_norm and self.trainer.world_size > 1:
            self.defended.transform = use_global_batch_norm(self.transform, self.trainer.strategy.root_device.type)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self._cached_labels = None  # the indices may belong to another training set than the last fit's

    def on_train_epoch_end(self) -> None:
        # Before the epoch's checkpoint is written (Lightning saves after the module's hook), so it holds the new T.
        dead = self._output_spread is not None and float(self._output_spread) == 0.0
        if self.trainer.strategy.reduce_boolean_decision(dead, all=True):
            self.redraw_transform()

    def redraw_transform(self) -> None:
        """Draws ``T``'s weights anew and clears their optimizer state (a dead transform, see the class)."""
        self.transform_restarts += 1
        rank_zero_warn(
            f"The transform's output became one constant image in epoch {self.current_epoch + 1}, where no gradient "
            f"can move it again: it is drawn anew (restart {self.transform_restarts}) and trains on."
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(global_seed() * 1000 + self.transform_restarts)
            for module in self.transform.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
        for optimizer in self.trainer.optimizers:
            for parameter in self.transform.parameters():
                optimizer.state.pop(parameter, None)
        self._output_spread = None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[TRANSFORM_RESTARTS] = self.transform_restarts

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        restarts = checkpoint.get(TRANSFORM_RESTARTS, 0)
        self.transform_restarts = restarts if isinstance(restarts, int) else 0

    @property
    def gradient_victim(self) -> nn.Module:
        """The network ``T``'s gradients flow through: the victim (a black-box defense puts its surrogate here)."""
        return self.victim

    def pseudo_labels(self, images: Tensor, indices: Tensor | None = None) -> Tensor:
        """The victim's predictions ``[B]`` (long) on images ``[B, C, H, W]``; no gradient flows.

        With ``indices`` (``[B]`` dataset positions of un-augmented images) and ``pseudo_label_cache`` on, each
        image's prediction is computed once and then read from the cache. A batch with any image not yet cached is
        predicted as a whole, so the victim always sees batches of the training batch size. In a multi-process run
        every process adds the other processes' predictions to its cache too (one all-gather of ``[B, 2]`` longs a
        step), so after the first epoch each process finds the images of its shards, whatever the sampler gives it.
        """
        if indices is None or not self.pseudo_label_cache:
            with torch.no_grad():
                return self.victim(images).argmax(1)
        cache = self._cached_labels
        known = cache is not None and len(cache) > int(indices.max())
        labels = cache[indices] if known else indices.new_full(indices.shape, -1)
        if bool((labels < 0).any()):
            with torch.no_grad():
                labels = self.victim(images).argmax(1)
        shared = gather_no_grad(torch.stack([indices, labels], dim=1))
        needed = int(shared[:, 0].max()) + 1
        if cache is None or len(cache) < needed:
            grown = torch.full((needed,), -1, dtype=torch.long, device=indices.device)
            if cache is not None:
                grown[: len(cache)] = cache
            cache = self._cached_labels = grown
        cache[shared[:, 0]] = shared[:, 1]
        return labels

    def refine_loss(
        self, images: Tensor, indices: Tensor | None = None, originals: Tensor | None = None
    ) -> dict[str, Tensor]:
        """The REFINE losses on a batch of unlabeled images ``[B, C, H, W]``, in the training step's precision.

        Args:
            images: The batch the transform trains on.
            indices: ``[B]`` dataset positions of the images whose pseudo-labels are taken (``originals``, else
                ``images``) when those are un-augmented (see :class:`IndexedImages`), which lets the pseudo-labels
                come from the cache; None for augmented images.
            originals: ``[B, C, H, W]`` un-augmented images whose victim predictions are the pseudo-labels of the
                augmented ``images`` (see :class:`AugmentedViews`); None: the pseudo-labels of ``images`` themselves.

        Returns:
            ``{"loss", "utility", "contrastive"}`` scalars, ``loss = utility + weight * contrastive``.
        """
        images = self.training_layout(images)
        labelled = images if originals is None else self.training_layout(originals)
        with self.training_autocast():
            pseudo_labels = self.pseudo_labels(labelled, indices)
            terms = refine_objective(
                images,
                pseudo_labels,
                self.transform,
                self.gradient_victim,
                self.remap,
                self.utility_loss,
                self.contrastive_loss,
                self.contrastive_weight,
            )
            transformed = terms.transformed.detach()
            self._output_spread = transformed.amax() - transformed.amin()  # read at the epoch's end
        return {"loss": terms.loss, "utility": terms.utility, "contrastive": terms.contrastive}

    def training_step(self, batch: Tensor | IndexedImages | AugmentedViews, batch_idx: int) -> Tensor:
        if isinstance(batch, AugmentedViews):
            losses = self.refine_loss(batch.views, batch.indices, batch.images)
        elif isinstance(batch, IndexedImages):
            losses = self.refine_loss(batch.images, batch.indices)
        elif isinstance(batch, Tensor):
            losses = self.refine_loss(batch)
        else:
            raise ConfigError(
                f"REFINE trains on unlabeled images, but a training batch is a {type(batch).__name__}: give a "
                "DataLoader of image tensors (or IndexedImages, AugmentedViews), never (images, labels), e.g. "
                "RefineDataModule."
            )
        for name, value in losses.items():
            self.log(f"train/{name}", value, prog_bar=name == "loss", sync_dist=True)
        return losses["loss"]
