"""BATT (Xu et al., 2023): a fixed spatial transformation of the whole image as the trigger."""

from dataclasses import dataclass
from typing import Literal

from torch import Tensor
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from refine_pl.attacks.base import Attack
from refine_pl.attacks.registry import ATTACKS
from refine_pl.errors import ConfigError


@ATTACKS.add
@dataclass(eq=False, repr=False, kw_only=True)
class BATT(Attack):
    """Poisons by rotating the image by a fixed angle (BATT-R) or shifting it by fixed pixels (BATT-T).

    Rotation is about the image centre, bilinear, with zero fill; the shift moves the content by
    ``(shift_x, shift_y)`` pixels and fills the uncovered border with zeros. Nothing is added to the
    image: the trigger is the transformation itself.

    Args:
        transformation: ``"rotation"`` or ``"translation"``.
        angle: Rotation angle in degrees, counter-clockwise.
        shift_x: Horizontal shift in pixels (positive: right).
        shift_y: Vertical shift in pixels (positive: down).
    """

    name = "batt"

    transformation: Literal["rotation", "translation"] = "rotation"
    angle: float = 16.0
    shift_x: int = 3
    shift_y: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.transformation not in ("rotation", "translation"):
            raise ConfigError(f"Unknown BATT transformation {self.transformation!r}; use 'rotation' or 'translation'.")
        if (self.transformation == "rotation" and self.angle % 360 == 0) or (
            self.transformation == "translation" and self.shift_x == self.shift_y == 0
        ):
            raise ConfigError("BATT's transformation is the identity: set a non-zero angle or shift.")

    def apply(self, images: Tensor, indices: Tensor | None = None) -> Tensor:
        if self.transformation == "rotation":
            return TF.rotate(images, self.angle, interpolation=InterpolationMode.BILINEAR)
        height, width = images.shape[2:]
        if abs(self.shift_x) >= width or abs(self.shift_y) >= height:
            raise ConfigError(f"BATT shift ({self.shift_x}, {self.shift_y}) moves {height}x{width} images out of view.")
        (dst_y, src_y), (dst_x, src_x) = _shift_slices(self.shift_y, height), _shift_slices(self.shift_x, width)
        shifted = images.new_zeros(images.shape)
        shifted[..., dst_y, dst_x] = images[..., src_y, src_x]
        return shifted


def _shift_slices(shift: int, size: int) -> tuple[slice, slice]:
    """Destination and source slices of a shift by ``shift`` pixels along an axis of ``size`` pixels."""
    return slice(max(shift, 0), size + min(shift, 0)), slice(max(-shift, 0), size - max(shift, 0))
