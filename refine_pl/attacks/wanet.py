"""WaNet (Nguyen & Tran, 2021): a small, smooth warp of the image as the trigger."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from refine_pl.attacks.base import Attack, draw_cover_indices, require_indices, sample_generator
from refine_pl.attacks.registry import ATTACKS
from refine_pl.errors import ConfigError


@ATTACKS.add
@dataclass(eq=False, repr=False, kw_only=True)
class WaNet(Attack):
    """Warps poisoned images with one fixed, smooth displacement field drawn from ``seed``.

    The field: ``k x k`` uniform values in [-1, 1], scaled to mean absolute value 1, upsampled bicubically
    to the image size; a pixel moves by ``strength * field / size`` in grid coordinates ([-1, 1] across
    the image), i.e. about ``strength / 2`` pixels on average; the sampling grid is then multiplied by
    ``grid_rescale`` and clamped to the image. Noise mode: ``cross_ratio`` times as many other training
    samples (the cover samples) are warped with the same field plus per-sample random noise of up to half
    a pixel and keep their true label, so the victim learns the exact warp rather than warping in general.
    The attack's seed draws the warp field and the noise of the noise-mode samples too.

    Args:
        grid_size: ``k``, the side of the control grid of the warp.
        strength: ``s``, the warp's strength.
        grid_rescale: Scale of the warped grid (1 keeps it).
        cross_ratio: Noise-mode samples per poisoned sample (0 disables noise mode).
    """

    name = "wanet"

    grid_size: int = 4
    strength: float = 0.5
    grid_rescale: float = 1.0
    cross_ratio: float = 2.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.grid_size < 2 or self.strength <= 0 or self.grid_rescale <= 0 or self.cross_ratio < 0:
            raise ConfigError(
                "WaNet needs grid_size >= 2, strength > 0, grid_rescale > 0 and cross_ratio >= 0, got "
                f"{self.grid_size}, {self.strength}, {self.grid_rescale}, {self.cross_ratio}."
            )

    def displacement(self, height: int, width: int) -> Tensor:
        """The warp field ``[H, W, 2]`` (x, y) scaled to mean absolute value 1, before ``strength``."""
        if self.grid_size > min(height, width):
            raise ConfigError(
                f"WaNet's control grid of {self.grid_size}x{self.grid_size} is finer than the {height}x{width} images: "
                "lower grid_size (4 in the paper)."
            )
        generator = torch.Generator().manual_seed(self.seed)
        control = torch.rand(1, 2, self.grid_size, self.grid_size, generator=generator) * 2 - 1
        control = control / control.abs().mean()
        return F.interpolate(control, size=(height, width), mode="bicubic", align_corners=True)[0].permute(1, 2, 0)

    def warp_grid(self, height: int, width: int) -> Tensor:
        """The ``[H, W, 2]`` sampling grid of the trigger, for ``grid_sample(align_corners=True)``."""
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
        identity = torch.stack((xs, ys), dim=-1)
        scale = torch.tensor([1.0 / width, 1.0 / height])
        grid = (identity + self.strength * self.displacement(height, width) * scale) * self.grid_rescale
        return grid.clamp(-1, 1)

    def _warp(self, images: Tensor, grids: Tensor) -> Tensor:
        return F.grid_sample(images, grids.to(images), mode="bilinear", padding_mode="zeros", align_corners=True)

    def apply(self, images: Tensor, indices: Tensor | None = None) -> Tensor:
        grid = self.warp_grid(*images.shape[2:])
        return self._warp(images, grid.expand(len(images), -1, -1, -1))

    def select_cover_indices(self, labels: Tensor, poison_indices: Tensor) -> Tensor:
        """``round(cross_ratio * len(poison_indices))`` samples of any class that are not poisoned."""
        wanted = self.cross_ratio * len(poison_indices)  # above the training set's size, round() could overflow
        return draw_cover_indices(
            self, len(labels), poison_indices, round(wanted) if wanted <= len(labels) else len(labels) + 1
        )

    def apply_cover(self, images: Tensor, indices: Tensor | None = None) -> Tensor:
        """The noise mode: the trigger's grid plus per-sample uniform noise of up to half a pixel, clamped."""
        indices = require_indices(self, images, indices)
        height, width = images.shape[2:]
        grid = self.warp_grid(height, width)
        noise = torch.stack(
            [(torch.rand(height, width, 2, generator=sample_generator(self.seed, int(i))) * 2 - 1) for i in indices]
        )
        return self._warp(images, (grid + noise / torch.tensor([width, height])).clamp(-1, 1))
