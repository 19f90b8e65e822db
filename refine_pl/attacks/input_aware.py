"""Input-aware dynamic backdoor, IAD (Nguyen & Tran, 2020): a generator trained with the victim, a trigger per image."""

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from refine_pl.attacks.base import TrainingControlledAttack
from refine_pl.attacks.registry import ATTACKS
from refine_pl.errors import ConfigError
from refine_pl.state_dicts import describe_key_mismatch


class TriggerNet(nn.Module):
    """A small convolutional encoder-decoder from ``[B, C, H, W]`` images to ``[B, out, H, W]`` maps in [0, 1].

    Two stages of two 3x3 convolutions and a 2x2 max-pool, then two of bilinear upsampling (back to the
    input's sizes) and 3x3 convolutions. Every hidden convolution is followed by a per-sample GroupNorm (no
    batch statistics, so train and eval mode compute the same; without a normalisation an untrained
    network's output hardly depends on its input, and the diversity loss's ratio explodes) and a ReLU.
    """

    def __init__(self, in_channels: int, out_channels: int, width: int = 16) -> None:
        super().__init__()

        def conv(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(1, cout), nn.ReLU(inplace=True)]

        self.stage1 = nn.Sequential(*conv(in_channels, width), *conv(width, width))
        self.stage2 = nn.Sequential(*conv(width, 2 * width), *conv(2 * width, 2 * width))
        self.middle = nn.Sequential(*conv(2 * width, 2 * width))
        self.up2 = nn.Sequential(*conv(2 * width, width))
        self.up1 = nn.Sequential(*conv(width, width), nn.Conv2d(width, out_channels, 3, padding=1))

    def forward(self, images: Tensor) -> Tensor:
        first = self.stage1(images)
        second = self.stage2(F.max_pool2d(first, 2))
        features = self.middle(F.max_pool2d(second, 2))
        features = self.up2(F.interpolate(features, size=second.shape[2:], mode="bilinear", align_corners=False))
        features = self.up1(F.interpolate(features, size=first.shape[2:], mode="bilinear", align_corners=False))
        return (torch.tanh(features) + 1) / 2


def _distance(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample root mean squared difference ``[B]``.

    A 1e-12 under the root keeps the gradient finite where two samples are equal: sharp masks are often exactly
    0 everywhere for two images, and the root's gradient at 0 turned the mask network's weights into NaN (victims
    of seeds 1 and 2 of the attacks table, the first time the sharp mask ran).
    """
    return ((a - b).pow(2).flatten(1).mean(1) + 1e-12).sqrt()


def sharpen(masks: Tensor) -> Tensor:
    """A steep step at 0.5 from [0, 1] to [0, 1]: ``(tanh(20 m - 10) + 1) / 2`` (0.0000454 at 0, 0.99995 at 1)."""
    return (torch.tanh(masks * 20 - 10) + 1) / 2


def diversity_loss(images: Tensor, others: Tensor, outputs: Tensor, other_outputs: Tensor) -> Tensor:
    """IAD's diversity loss ``mean(d(x, x') / d(g(x), g(x')))``: small when different images get different outputs."""
    return (_distance(images, others) / (_distance(outputs, other_outputs) + 1e-7)).mean()


@ATTACKS.add
@dataclass(eq=False, repr=False, kw_only=True)
class InputAwareDynamic(TrainingControlledAttack):
    """Every image gets its own trigger: ``x + mask(x) * (pattern(x) - x)`` with two learned networks.

    Training-controlled. :meth:`prepare` first trains the mask network alone (``mask_epochs`` epochs of
    Adam on the clean training set): a diversity loss makes different images get different masks and a
    norm loss (weight ``mask_norm_weight``) pushes every mask value below ``mask_density``; then the mask
    network is frozen. With ``sharp_mask`` (the authors' form) the mask network's output passes through a steep
    step at 0.5 (:func:`sharpen`) wherever a mask is used, so the norm loss makes masks sparse and nearly binary:
    a few pixels take the pattern's value outright. Without it every mask value stays below ``mask_density``, and
    the trigger is a faint blend over the whole image. During victim training the pattern network learns jointly
    with the victim: in every batch, a ``poison_rate`` share of the images carries its own trigger and the target
    label, a ``cross_rate`` share carries the trigger computed from another image and keeps its label (so triggers
    do not transfer between images), and the diversity loss on the patterns (weight
    ``diversity_weight``) is added to the victim's loss. The networks (and ``in_channels``) are the
    attack's state, stored in the victim checkpoint.

    Args:
        cross_rate: Share of every training batch given another image's trigger and its true label.
        sharp_mask: Pass the mask network's output through :func:`sharpen` (the authors' form).
        generator_lr: Learning rate of the pattern network (its own parameter group).
        diversity_weight: Weight of the diversity losses.
        mask_density: Mask value above which the norm loss penalises.
        mask_norm_weight: Weight of the mask norm loss.
        mask_epochs: Training epochs of the mask network.
        mask_lr: Learning rate of the mask network.
        width: Channels of the first stage of both networks.
    """

    name = "iad"

    cross_rate: float = 0.1
    sharp_mask: bool = True
    generator_lr: float = 0.01
    diversity_weight: float = 1.0
    mask_density: float = 0.032
    mask_norm_weight: float = 100.0
    mask_epochs: int = 10
    mask_lr: float = 0.01
    width: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.cross_rate < 1 or self.poison_rate + self.cross_rate >= 1:
            raise ConfigError(f"IAD needs 0 <= cross_rate and poison_rate + cross_rate < 1, got {self.cross_rate}.")
        if self.mask_epochs < 0 or self.width < 1 or not 0 < self.mask_density < 1:
            raise ConfigError(
                f"IAD needs mask_epochs >= 0, width >= 1 and mask_density in (0, 1), got {self.mask_epochs}, "
                f"{self.width}, {self.mask_density}."
            )
        self._networks: nn.ModuleDict | None = None
        self._in_channels: int | None = None

    def _build(self, in_channels: int) -> nn.ModuleDict:
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            networks = nn.ModuleDict(
                {
                    "pattern": TriggerNet(in_channels, in_channels, self.width),
                    "mask": TriggerNet(in_channels, 1, self.width),
                }
            )
        self._networks, self._in_channels = networks, in_channels
        return networks

    def networks(self) -> nn.ModuleDict:
        if self._networks is None:
            raise ConfigError(
                "iad has no trigger networks yet: they are trained with the victim (VictimDataModule prepares the "
                "attack) and come from its checkpoint; give the REFINE job no attack so it reads them from there."
            )
        return self._networks

    def _masks(self, images: Tensor) -> Tensor:
        masks = self.networks()["mask"](images)
        return sharpen(masks) if self.sharp_mask else masks

    def parameter_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.networks()["pattern"].parameters()), "lr": self.generator_lr}]

    def prepare(self, train_set: Dataset, labels: Tensor, num_classes: int) -> None:
        """Builds both networks and trains the mask network alone, then freezes it."""
        networks = self._build(train_set[0][0].shape[0])
        mask_net = networks["mask"]
        optimizer = torch.optim.Adam(mask_net.parameters(), lr=self.mask_lr, betas=(0.5, 0.9))
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            loader = DataLoader(train_set, batch_size=128, shuffle=True, drop_last=True)
            for _ in range(self.mask_epochs):
                for images, _ in loader:
                    others = images.roll(1, 0)
                    masks, other_masks = self._masks(images), self._masks(others)
                    norm = F.relu(masks - self.mask_density).mean()
                    loss = self.mask_norm_weight * norm + self.diversity_weight * diversity_loss(
                        images, others, masks, other_masks
                    )
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
        mask_net.zero_grad(set_to_none=True)
        mask_net.requires_grad_(False)

    @staticmethod
    def _blend(images: Tensor, patterns: Tensor, masks: Tensor) -> Tensor:
        return images + masks * (patterns - images)

    def apply(self, images: Tensor, indices: Tensor | None = None) -> Tensor:
        networks = self.networks()
        device = next(networks.parameters()).device
        with torch.no_grad():
            inputs = images.to(device)
            poisoned = self._blend(inputs, networks["pattern"](inputs), self._masks(inputs))
        return poisoned.to(images)

    def training_batch(self, images: Tensor, labels: Tensor, classifier: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
        """Poisons the first ``poison_rate`` of the batch and crosses the next ``cross_rate``; the rest stays clean.

        Poisoned images get their own trigger and the target label, crossed ones another image's trigger and
        their true label. The loader shuffles, so which images these are is random.
        """
        networks = self.networks()
        num_poisoned, num_cross = int(len(images) * self.poison_rate), int(len(images) * self.cross_rate)
        head = num_poisoned + num_cross
        others = images.roll(1, 0)[num_poisoned:head]  # the images whose triggers the cross samples get
        patterns = networks["pattern"](images[:head])
        other_patterns = networks["pattern"](others)
        masks, other_masks = self._masks(images[:head]), self._masks(others)
        poisoned = self._blend(images[:num_poisoned], patterns[:num_poisoned], masks[:num_poisoned])
        cross = self._blend(images[num_poisoned:head], other_patterns, other_masks)
        inputs = torch.cat([poisoned, cross, images[head:]])
        targets = torch.cat([labels.new_full((num_poisoned,), self.target_label), labels[num_poisoned:]])
        if num_cross == 0:
            return inputs, targets, images.new_zeros(())
        diversity = diversity_loss(images[num_poisoned:head], others, patterns[num_poisoned:], other_patterns)
        return inputs, targets, self.diversity_weight * diversity

    def state_dict(self) -> dict[str, Any]:
        if self._networks is None:
            return {}
        weights = {key: value.detach().cpu() for key, value in self._networks.state_dict().items()}
        return {"in_channels": self._in_channels, "networks": weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        in_channels, weights = state.get("in_channels"), state.get("networks")
        if (
            set(state) != {"in_channels", "networks"}
            or type(in_channels) is not int
            or in_channels < 1
            or not isinstance(weights, dict)
            or not all(isinstance(value, Tensor) for value in weights.values())
        ):
            raise ConfigError(
                "iad state needs in_channels (an integer >= 1) and networks (a dict of tensors), got "
                f"{ {key: type(value).__name__ for key, value in state.items()} }."
            )
        # The networks are first built on the meta device (no memory) and compared with the state, so a damaged
        # checkpoint cannot make refine-pl allocate networks of any size.
        try:
            with torch.device("meta"):
                skeleton = nn.ModuleDict(
                    {
                        "pattern": TriggerNet(in_channels, in_channels, self.width),
                        "mask": TriggerNet(in_channels, 1, self.width),
                    }
                )
            problem = describe_key_mismatch(skeleton.state_dict(), weights)
        except (RuntimeError, OverflowError) as error:  # sizes beyond what torch can describe at all
            problem = str(error)
        if problem is not None:
            raise ConfigError(f"iad networks in the checkpoint do not fit width={self.width}: {problem}.")
        if self._networks is None or self._in_channels != in_channels:
            self._build(in_channels)
        self._networks.load_state_dict(weights)
        self._networks["mask"].requires_grad_(False)
