"""Defenses of the input-transform kind: ``M(f(T(x)))``, an input transform and an output map around the victim."""

from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
from pytorch_lightning.trainer.states import TrainerFn
from torch import Tensor, nn

from refine_pl.batches import IndexedImages
from refine_pl.classifier import DefendedClassifier
from refine_pl.defended_module import DefendedLitModule
from refine_pl.distributed import gather_no_grad
from refine_pl.errors import ConfigError
from refine_pl.predict import predict_batch
from refine_pl.remap import OutputRemap


class InputTransformDefense(DefendedLitModule):
    """The defended classifier ``M(f(T(x)))`` (:class:`~refine_pl.classifier.DefendedClassifier`, :attr:`defended`).

    ``T`` is built from the channel count by ``transform``; ``M`` is an :class:`OutputRemap` whose derangement
    (or identity) is a buffer, drawn once from ``remap_seed`` and afterwards only restored from checkpoints. What
    trains ``T``, if anything, is the subclass's training step; the optimizer gets ``T``'s parameters only. In a
    multi-process run the remap is checked to be the same on every process at the start of fitting, validation
    and testing. ``predict`` gives the defended and the victim's class of each image (:meth:`predict_step`).

    Args:
        transform: Builds ``T`` from the channel count.
        remap_seed: Seed of the output derangement.
        derange: Put a derangement behind the victim; False puts the identity there.
        **kwargs: The arguments every defense takes (:class:`~refine_pl.DefendedLitModule`): the victim, the data
            facts, the clean reference, the optimizer and the training precision.
    """

    kind = "input_transform"
    trained_part: ClassVar[str] = "transform"

    def __init__(
        self, transform: Callable[[int], nn.Module], remap_seed: int = 0, derange: bool = True, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        remap = OutputRemap(self.hparams["num_classes"], seed=remap_seed, derange=derange)
        in_channels = self.hparams["in_channels"]
        self.defended = DefendedClassifier(
            transform(in_channels), self.victim, remap, in_channels=in_channels, image_size=self.hparams["image_size"]
        )
        if self.channels_last:
            self.defended.transform.to(memory_format=torch.channels_last)

    @property
    def transform(self) -> nn.Module:
        """The input transform ``T``."""
        return self.defended.transform

    @property
    def remap(self) -> OutputRemap:
        """The fixed output remap ``M``."""
        return self.defended.remap

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

    def on_validation_start(self) -> None:
        if self.trainer.state.fn != TrainerFn.FITTING:  # during fit, on_fit_start has checked the fixed buffer
            self._check_remap_is_shared()

    def on_test_start(self) -> None:
        self._check_remap_is_shared()
        super().on_test_start()

    def predict_step(self, batch: IndexedImages, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """For a batch of images and their indices: :func:`~refine_pl.predict.predict_batch` and the index."""
        return {**predict_batch(self.defended, batch.images), "index": batch.indices}

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return self.transform.parameters()


class TrainingFreeDefense(InputTransformDefense):
    """A defended classifier ``M(f(T(x)))`` whose ``T`` is fixed: nothing is trained, the defense is only tested.

    Input pre-processing defenses (ShrinkPad, bit-depth reduction, median filtering: ``T`` the pre-processing,
    ``M`` the identity) and REFINE's remap alone (``T`` the identity, ``M`` the derangement) are of this kind.
    ``train.py test`` runs it without ``--ckpt_path``; ``fit`` is refused.

    Args:
        transform: Builds the fixed ``T`` from the channel count (default: the identity).
        derange: Put REFINE's derangement behind the victim (False: the identity).
        remap_seed: Seed of the derangement.
        **kwargs: The arguments every defense takes (:class:`~refine_pl.DefendedLitModule`).
    """

    trains = False

    def __init__(
        self,
        transform: Callable[[int], nn.Module] = nn.Identity,
        derange: bool = False,
        remap_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(transform=transform, remap_seed=remap_seed, derange=derange, **kwargs)
        self.transform.requires_grad_(False)

    def configure_optimizers(self) -> None:
        raise ConfigError(
            f"{type(self).__name__} has nothing to train: test it without fitting (train.py test, no --ckpt_path)."
        )
