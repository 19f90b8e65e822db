"""LightningModule that trains REFINE's input transformation in front of a frozen victim."""

from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn

from refine_pl.base_module import BackdoorLitModule
from refine_pl.batches import AugmentedViews, IndexedImages
from refine_pl.classifier import DefendedClassifier, NormalizedClassifier
from refine_pl.distributed import gather_no_grad, use_global_batch_norm
from refine_pl.errors import ConfigError, cli_flag
from refine_pl.losses import SupConLoss, UtilityLoss
from refine_pl.predict import predict_batch
from refine_pl.remap import OutputRemap
from refine_pl.state_dicts import describe_key_mismatch
from refine_pl.transform import UNet
from refine_pl.weights import load_victim

VICTIM_KEY = "victim"
"""Key under which a REFINE checkpoint identifies its victim (the weights file's sha256 and path) instead of
holding a copy of the victim's weights."""


def reference_sgd(params: Any) -> torch.optim.Optimizer:
    """The REFINE reference optimizer: SGD, lr 0.01, momentum 0.9, weight decay 5e-4."""
    return torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)


class RefineLitModule(BackdoorLitModule):
    """The defended classifier ``M(f(T(x)))`` and the training of ``T``.

    ``f`` is the victim, loaded safely from ``victim_checkpoint`` (read once; what the file records besides
    the weights is :attr:`victim_record`) and frozen (its weights never change and it always runs in eval
    mode). ``T`` is the trainable transform. ``M`` is an :class:`OutputRemap` whose derangement is a buffer,
    drawn once from ``remap_seed`` and afterwards only restored from checkpoints. The three make up
    :attr:`defended`, a :class:`~refine_pl.classifier.DefendedClassifier`. Training batches are images only:
    the pseudo-label of each image is the victim's prediction on it, so no label of the benign set can reach
    the loss.

    Checkpoints hold the transform, the remap and the training state, not the victim: they record the victim
    file's sha256, and loading one checks that this module's victim is the same file's model.

    Validation and test log BA / ASR / RA of the defended classifier (``ba``, ``asr``, ``ra``) and of the victim
    alone (``victim_ba``, ``victim_asr``, ``victim_ra``) on the same images, and the defended classifier's DER
    against the victim (``der``). ``predict`` gives both classifiers' classes for
    each image (:meth:`predict_step`).

    In a multi-process run the contrastive loss covers the global batch, the transform's batch norm uses the
    global batch's statistics (``global_batch_norm``) and the remap is checked to be the same on every process
    at the start of fitting, validation and testing; the transform's gradients are then those of one process
    with the whole batch. Under mixed precision ``T`` and ``f`` run in 16 bits and the losses in float32.

    Args:
        victim_checkpoint: The suspect model: a refine-pl victim .ckpt, a state_dict or safetensors file (with
            ``victim_arch``), or a torch.export archive (.pt2).
        num_classes: Number of classes (linked from the datamodule by the CLI).
        in_channels: Image channels (linked).
        image_size: Image side in pixels (linked).
        mean: Normalisation mean the victim expects, used when its checkpoint records none (linked).
        std: Normalisation std the victim expects, used when its checkpoint records none (linked).
        victim_arch: Architecture of bare weights files: a refine-pl or torchvision name, or the import path of
            your own builder (``package.module:function``); a refine-pl victim checkpoint records its own.
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
        scheduler: Builds the learning-rate scheduler (stepped every epoch) from the optimizer.
        clean_reference: Weights of a model of the victim's architecture trained on the same data without the
            attack. It is evaluated beside the victim (``clean_ba``, ``clean_asr``): its ASR is the floor of
            every ASR, how often triggered images land in the target class with no backdoor at all (transforming
            triggers such as rotations have a real one). Like the victim, it is not copied into checkpoints.
        bf16: Train under bfloat16 autocast. None (default): where the hardware computes bf16 natively (x86 CPUs
            with AVX512-BF16 or AMX, NVIDIA GPUs from Ampere on) and the trainer runs in ``32-true`` precision;
            False: in the trainer's precision.
        channels_last: Keep the transform and the victim, and feed them images, in channels-last memory layout
            (results differ by float rounding only; faster convolutions on CPUs and tensor-core GPUs).
        pseudo_label_cache: Remember the victim's prediction on each un-augmented training image (batches of
            :class:`IndexedImages`) instead of running the victim on it again every epoch. Exact: the victim is
            frozen. Augmented batches never use it.
        compile: ``torch.compile`` the transform and the victim (compiled on the first steps; see
            ``benchmarks/speed.py`` for the compile time and what it gains).
    """

    def __init__(
        self,
        victim_checkpoint: str,
        num_classes: int,
        in_channels: int,
        image_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        victim_arch: str | None = None,
        transform: Callable[[int], nn.Module] = UNet,
        remap_seed: int = 0,
        derange: bool = True,
        global_batch_norm: bool = True,
        contrastive_weight: float = 0.1,
        temperature: float = 0.07,
        optimizer: OptimizerCallable = reference_sgd,
        scheduler: LRSchedulerCallable | None = None,
        clean_reference: str | None = None,
        bf16: bool | None = None,
        channels_last: bool = True,
        pseudo_label_cache: bool = True,
        compile: bool = False,
    ) -> None:
        prefixes = ("", "victim_", "clean_")[: 3 if clean_reference else 2]
        super().__init__(optimizer, scheduler, prefixes, bf16, channels_last, undefended_prefix="victim_")
        self.save_hyperparameters(ignore=["transform", "optimizer", "scheduler"])
        victim, self.victim_record = load_victim(
            victim_checkpoint, num_classes, in_channels, image_size, mean, std, victim_arch
        )
        self.clean_reference: NormalizedClassifier | None = None
        if clean_reference is not None:
            self.clean_reference = load_victim(
                clean_reference, num_classes, in_channels, image_size, mean, std
            ).classifier
        remap = OutputRemap(num_classes, seed=remap_seed, derange=derange)
        self.defended = DefendedClassifier(transform(in_channels), victim, remap)
        self.utility_loss = UtilityLoss()
        self.contrastive_loss = SupConLoss(temperature=temperature)
        self.contrastive_weight = contrastive_weight
        self.global_batch_norm = global_batch_norm
        self.pseudo_label_cache = pseudo_label_cache
        self._cached_labels: Tensor | None = None  # [N] long, -1 where not yet computed
        if channels_last:
            for model in (self.defended, self.clean_reference):
                if model is not None:
                    model.to(memory_format=torch.channels_last)
        if compile:
            self.transform.compile()
            self.victim.compile()

    @property
    def transform(self) -> nn.Module:
        """The trainable input transform ``T``."""
        return self.defended.transform

    @property
    def victim(self) -> NormalizedClassifier:
        """The frozen victim ``f``."""
        return self.defended.victim

    @property
    def remap(self) -> OutputRemap:
        """The fixed output remap ``M``."""
        return self.defended.remap

    def setup(self, stage: str) -> None:
        if self.global_batch_norm and self.trainer.world_size > 1:
            self.defended.transform = use_global_batch_norm(self.transform, self.trainer.strategy.root_device.type)

    def _check_remap_is_shared(self) -> None:
        """Stops a multi-process run whose processes hold different remaps (e.g. different checkpoints)."""
        permutations = gather_no_grad(self.remap.permutation[None])
        if not bool((permutations == permutations[0]).all()):
            raise ConfigError(
                f"The output remap differs between processes ({permutations.tolist()}): every process must "
                "load the same checkpoint and use the same remap_seed."
            )

    def on_fit_start(self) -> None:
        self._check_remap_is_shared()
        self._cached_labels = None  # the indices may belong to another training set than the last fit's

    def on_validation_start(self) -> None:
        if self.trainer.state.fn != TrainerFn.FITTING:  # during fit, on_fit_start has checked the fixed buffer
            self._check_remap_is_shared()

    def on_test_start(self) -> None:
        self._check_remap_is_shared()
        if self.victim_record.attack is not None and getattr(self.trainer.datamodule, "attack", None) is None:
            rank_zero_warn(
                f"The victim records the attack {self.victim_record.attack.get('name')!r} but the datamodule has "
                "none, so ASR is not measured: call datamodule.use_recorded_attack(module.victim_record)."
            )

    def _frozen_models(self) -> dict[str, nn.Module]:
        """The models that never train, by their ``state_dict`` prefix: the victim and the clean reference."""
        frozen = {"defended.victim.": self.victim}
        if self.clean_reference is not None:
            frozen["clean_reference."] = self.clean_reference
        return frozen

    def train(self, mode: bool = True) -> "RefineLitModule":
        """Switches the transform's mode; the frozen models stay in eval mode so their BN statistics never move."""
        super().train(mode)
        for model in self._frozen_models().values():
            model.eval()
        return self

    def forward(self, images: Tensor) -> Tensor:
        """Defended logits ``[B, num_classes]`` for images ``[B, C, H, W]`` in [0, 1]."""
        return self.defended(images)

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
            transformed = self.transform(images)
            utility = self.utility_loss(self.remap(self.victim(transformed)), pseudo_labels)
            features = F.normalize(transformed.flatten(1).float(), dim=1)
            contrastive = self.contrastive_loss(features, pseudo_labels)
        return {
            "loss": utility + self.contrastive_weight * contrastive,
            "utility": utility,
            "contrastive": contrastive,
        }

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

    def predict_step(self, batch: IndexedImages, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """For a batch of images and their indices: :func:`~refine_pl.predict.predict_batch` and the index."""
        return {**predict_batch(self.defended, batch.images), "index": batch.indices}

    def evaluated_classifiers(self) -> tuple[nn.Module, ...]:
        return (self.defended, *self._frozen_models().values())

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return self.transform.parameters()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The victim is the user's file: the checkpoint names it by digest instead of holding a second copy (and
        # the clean reference is read from its own file at every job).
        frozen = tuple(self._frozen_models())
        checkpoint["state_dict"] = {
            key: value for key, value in checkpoint["state_dict"].items() if not key.startswith(frozen)
        }
        checkpoint[VICTIM_KEY] = {"sha256": self.victim_record.sha256, "path": self.victim_record.path}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        recorded = checkpoint.get(VICTIM_KEY)
        if not isinstance(recorded, dict) or "sha256" not in recorded:
            raise ConfigError(
                "The checkpoint does not come from a refine-pl REFINE run (it names no victim): pass a checkpoint "
                "of this run's checkpoints/ folder with --ckpt_path."
            )
        if recorded["sha256"] != self.victim_record.sha256:
            raise ConfigError(
                f"The checkpoint was trained in front of the victim {recorded.get('path')} (sha256 "
                f"{str(recorded['sha256'])[:12]}...), but {self.victim_record.path} holds another model (sha256 "
                f"{self.victim_record.sha256[:12]}...): pass the victim the run was trained with in "
                f"{cli_flag('model', 'victim_checkpoint')}."
            )
        for prefix, model in self._frozen_models().items():
            checkpoint["state_dict"].update({prefix + key: value for key, value in model.state_dict().items()})
        problem = describe_key_mismatch(self.state_dict(), checkpoint["state_dict"])
        if problem is not None:
            raise ConfigError(
                f"The checkpoint's transform does not fit this run's: {problem}. Use the transform settings of the "
                f"run that wrote it ({cli_flag('model', 'transform')})."
            )
