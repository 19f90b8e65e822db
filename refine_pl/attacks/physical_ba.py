"""PhysicalBA (Li et al., 2021): the BadNets trigger, then the physical transformations of a photo."""

from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from refine_pl.attacks.badnets import BadNets
from refine_pl.attacks.base import require_indices, sample_generator
from refine_pl.attacks.registry import ATTACKS
from refine_pl.errors import ConfigError


@ATTACKS.add
@dataclass(eq=False, repr=False, kw_only=True)
class PhysicalBA(BadNets):
    """Stamps the BadNets patch, then transforms the whole image as a camera would see it.

    Every poisoned image, in the training set and at test, gets its own transformation drawn from
    ``(seed, index)``: an affine map (rotation in ``[-degrees, degrees]``, translation up to
    ``translate`` of the image side, scale in ``[min_scale, max_scale]``, bilinear, zero fill), brightness
    and contrast factors in ``[1 - brightness, 1 + brightness]`` and ``[1 - contrast, 1 + contrast]``,
    and a horizontal flip with probability ``flip_prob``. Training on transformed triggers makes the
    backdoor survive the same transformations at test.

    Args:
        degrees: Largest rotation in degrees (at most 180, which allows every angle).
        translate: Largest translation as a fraction of the image side.
        min_scale: Smallest scale factor.
        max_scale: Largest scale factor.
        brightness: Largest relative brightness change.
        contrast: Largest relative contrast change.
        flip_prob: Probability of a horizontal flip.
    """

    name = "physical_ba"

    degrees: float = 10.0
    translate: float = 0.05
    min_scale: float = 0.9
    max_scale: float = 1.1
    brightness: float = 0.2
    contrast: float = 0.2
    flip_prob: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.degrees <= 180 or not 0 <= self.translate < 1 or not 0 < self.min_scale <= self.max_scale:
            raise ConfigError(
                "PhysicalBA needs 0 <= degrees <= 180, 0 <= translate < 1 and 0 < min_scale <= max_scale, got "
                f"{self.degrees}, {self.translate}, {self.min_scale}, {self.max_scale}."
            )
        if not 0 <= self.brightness < 1 or not 0 <= self.contrast < 1 or not 0 <= self.flip_prob <= 1:
            raise ConfigError(
                "PhysicalBA needs brightness and contrast in [0, 1) and flip_prob in [0, 1], got "
                f"{self.brightness}, {self.contrast}, {self.flip_prob}."
            )

    def transformation(self, index: int, height: int, width: int) -> dict[str, float | list[int] | bool]:
        """The physical transformation of the sample at ``index``: affine parameters, colour factors, flip."""
        generator = sample_generator(self.seed, index)
        u = torch.rand(7, generator=generator).tolist()

        def between(low: float, high: float, draw: float) -> float:
            return low + (high - low) * draw

        return {
            "angle": between(-self.degrees, self.degrees, u[0]),
            "translate": [round(between(-1, 1, u[1]) * self.translate * width),
                          round(between(-1, 1, u[2]) * self.translate * height)],
            "scale": between(self.min_scale, self.max_scale, u[3]),
            "brightness": between(1 - self.brightness, 1 + self.brightness, u[4]),
            "contrast": between(1 - self.contrast, 1 + self.contrast, u[5]),
            "flip": u[6] < self.flip_prob,
        }  # fmt: skip

    def transform(self, image: Tensor, index: int) -> Tensor:
        """Applies the physical transformation of sample ``index`` to one ``[C, H, W]`` image."""
        params = self.transformation(index, *image.shape[1:])
        image = TF.affine(
            image,
            angle=params["angle"],
            translate=params["translate"],
            scale=params["scale"],
            shear=[0.0, 0.0],
            interpolation=InterpolationMode.BILINEAR,
        )
        image = TF.adjust_contrast(TF.adjust_brightness(image, params["brightness"]), params["contrast"])
        return TF.horizontal_flip(image) if params["flip"] else image

    def apply(self, images: Tensor, indices: Tensor | None = None) -> Tensor:
        indices = require_indices(self, images, indices)
        stamped = super().apply(images)
        return torch.stack([self.transform(image, int(index)) for image, index in zip(stamped, indices, strict=True)])
