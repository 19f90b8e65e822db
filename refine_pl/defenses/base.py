"""What every defense is, the registry of defenses by name, and the module of the defenses that train nothing.

Every defense of refine-pl is a :class:`~refine_pl.classifier.DefendedClassifier` ``M(f(T(x)))`` around the frozen
victim ``f``: an input transform ``T`` (REFINE's U-Net, an autoencoder, ShrinkPad, bit-depth reduction, a median
filter, the identity), an output map ``M`` (REFINE's derangement or the identity), and a way to train ``T`` from
unlabeled benign images, or none. A defense runs through ``train.py`` with the REFINE job of a dataset and its own
config merged after it (``fit`` first when it trains, then ``test``), which writes ``report.json``.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pytorch_lightning import LightningModule
from torch import Tensor, nn

from refine_pl.errors import ConfigError
from refine_pl.refine_module import RefineLitModule


@dataclass(frozen=True)
class Defense:
    """A registered defense.

    Attributes:
        name: Registry name: ``report.json``'s ``defense``, the benchmark's column.
        label: Name in tables.
        summary: One line: ``T``, ``M`` and what trains ``T``.
        module: The LightningModule class its config builds.
        overlay: Config merged after a dataset's REFINE job (``configs/refine/reference.yaml`` and
            ``configs/refine/<dataset>.yaml``), by name (see refine_pl.configs); None for REFINE itself.
    """

    name: str
    label: str
    summary: str
    module: type[LightningModule]
    overlay: str | None

    @property
    def trains(self) -> bool:
        """Whether the defense is fitted before it is tested (``fit`` then ``test --ckpt_path last``)."""
        return self.module.trains

    def configs(self, job: Sequence[str]) -> list[str]:
        """The configs of this defense, merged in order: the dataset's REFINE ``job``, then the overlay."""
        return [*job, *([self.overlay] if self.overlay else [])]


DEFENSES: dict[str, Defense] = {}


def register_defense(name: str, label: str, summary: str, module: type[LightningModule], overlay: str | None) -> None:
    """Makes a defense available as ``name`` (see :class:`Defense` for the arguments)."""
    if name in DEFENSES:
        raise ValueError(f"defense name {name!r} is registered twice")
    DEFENSES[name] = Defense(name, label, summary, module, overlay)


def defense_named(name: str) -> Defense:
    """The defense registered as ``name``."""
    if name not in DEFENSES:
        raise ConfigError(f"Unknown defense {name!r}; known defenses: {', '.join(DEFENSES)}.")
    return DEFENSES[name]


def check_transform_input(images: Tensor, in_channels: int, transform: str) -> None:
    """Refuses a tensor that is not a ``[B, in_channels, H, W]`` batch, naming the transform and the fix."""
    if images.ndim != 4 or images.shape[1] != in_channels:
        raise ConfigError(
            f"{transform} built for {in_channels}-channel images got a tensor of shape {tuple(images.shape)}; "
            "its in_channels must be the data's channel count."
        )


class TrainingFreeDefense(RefineLitModule):
    """A defended classifier ``M(f(T(x)))`` whose ``T`` is fixed: nothing is trained, the defense is only tested.

    Input pre-processing defenses (ShrinkPad, bit-depth reduction, median filtering: ``T`` the pre-processing,
    ``M`` the identity) and REFINE's remap alone (``T`` the identity, ``M`` the derangement) are of this kind.
    ``train.py test`` runs it without ``--ckpt_path``; ``fit`` is refused.

    Args:
        victim_checkpoint: Weights of the suspect model (refine-pl victim .ckpt, state_dict or safetensors).
        num_classes: Number of classes (linked from the datamodule by the CLI).
        in_channels: Image channels (linked).
        image_size: Image side in pixels (linked).
        mean: Normalisation mean the victim expects, used when its checkpoint records none (linked).
        std: Normalisation std the victim expects, used when its checkpoint records none (linked).
        victim_arch: Architecture of bare weights files; a refine-pl victim checkpoint records its own.
        clean_reference: Weights of a model trained like the victim without the attack, evaluated beside it for the
            ASR floor (see :class:`~refine_pl.RefineLitModule`).
        transform: Builds the fixed ``T`` from the channel count (default: the identity).
        derange: Put REFINE's derangement behind the victim (False: the identity).
        remap_seed: Seed of the derangement.
    """

    trains = False

    def __init__(
        self,
        victim_checkpoint: str,
        num_classes: int,
        in_channels: int,
        image_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        victim_arch: str | None = None,
        clean_reference: str | None = None,
        transform: Callable[[int], nn.Module] = nn.Identity,
        derange: bool = False,
        remap_seed: int = 0,
    ) -> None:
        super().__init__(
            victim_checkpoint, num_classes, in_channels, image_size, mean, std, victim_arch,
            transform=transform, remap_seed=remap_seed, derange=derange, clean_reference=clean_reference,
        )  # fmt: skip
        self.transform.requires_grad_(False)

    def configure_optimizers(self) -> None:
        raise ConfigError(
            f"{type(self).__name__} has nothing to train: test it without fitting (train.py test, no --ckpt_path)."
        )
