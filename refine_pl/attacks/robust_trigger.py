"""A trigger trained to survive the input transforms REFINE can learn: an adaptive attack on REFINE (issue 25)."""

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from refine_pl.attacks.badnets import BadNets
from refine_pl.attacks.base import draw_cover_indices, require_indices, sample_generator
from refine_pl.attacks.registry import ATTACKS
from refine_pl.errors import ConfigError
from refine_pl.transform import UNet

TransformKind = Literal["unet", "blur", "noise", "color", "affine"]
TRANSFORM_KINDS: tuple[str, ...] = ("unet", "blur", "noise", "color", "affine")

MAX_UNETS = 8
"""Most random U-Nets in the bank: each is a full network (about 1.2M parameters at width 16, depth 4)."""
MAX_UNET_WIDTH = 32
MAX_UNET_DEPTH = 4
_UNET_SEED_OFFSET = 2**40
"""U-Net ``k`` of the bank is initialised from ``sample_generator(seed, _UNET_SEED_OFFSET + k)``: a stream no
dataset index reaches, so the bank's randomness is unrelated to any sample's."""


@ATTACKS.add
@dataclass(eq=False, repr=False, kw_only=True)
class TransformRobustTrigger(BadNets):
    """A BadNets patch that the victim learns through random input transforms, so it survives a learned T.

    An attacker who knows REFINE knows that the defended model sees ``T(x)``, a U-Net's re-encoding of the
    input, not ``x``. This attack trains the trigger to survive such re-encodings: every poisoned training
    image is stamped with the patch (the BadNets settings), then passes through one random transform; the
    kind of transform and its parameters are drawn per sample from ``sample_generator(seed, index)``, so a
    sample is always poisoned alike. The kinds (``transforms``, one chosen uniformly per sample):

    - ``unet``: one of ``unet_count`` randomly initialised U-Nets of refine-pl's own transform
      (:class:`~refine_pl.transform.UNet`, ``unet_width`` / ``unet_depth``: the MNIST recipe's T is width 16,
      depth 4), initialised from the attack's seed, in eval mode, blended in at strength ``s``:
      ``x + s * (U(x) - x)``. An untrained U-Net's output is nearly constant (on the embedded digits its
      standard deviation was 0.002-0.006 and the clamp to [0, 1] made it all zeros), so ``U(x)`` is the
      network's output before the clamp, shifted and scaled per image and channel to the input's mean and
      standard deviation: a random, image-dependent re-encoding with the image's intensity statistics;
    - ``blur``: Gaussian blur, sigma in ``[blur_sigma / 2, blur_sigma]`` pixels;
    - ``noise``: additive Gaussian noise, standard deviation in ``[noise_std / 2, noise_std]``;
    - ``color``: brightness and contrast factors in ``[1 - brightness, 1 + brightness]`` and
      ``[1 - contrast, 1 + contrast]`` (torchvision's ``adjust_brightness`` / ``adjust_contrast``);
    - ``affine``: rotation in ``[-max_rotation, max_rotation]`` degrees, scale in
      ``[1 - max_scale, 1 + max_scale]``, shift up to ``max_shift`` of the image side on each axis (bilinear,
      zero fill).

    Results are clamped to [0, 1]. Cover samples (``cover_rate`` of the training set, any class, label kept)
    get the same kind of random transforms without the patch, so the victim learns the patch and not the
    transforms' artefacts. At test, :meth:`apply` stamps the bare patch, no transform. The patch defaults to a
    solid white square, larger than BadNets' (a checkerboard is high-frequency: blur removes it).

    The attack keeps no state: the U-Nets are rebuilt from the seed, and only training images use them.

    Args:
        target_label: The class the trigger should force.
        poison_rate: Fraction of the training set that is poisoned.
        seed: Seed of the samples' choice, of each sample's transform and of the U-Nets.
        patch_size: Side of the square patch in pixels.
        location: Corner of the patch.
        margin: Pixels between the patch and the image border.
        pattern: ``"white"`` or ``"checkerboard"``.
        cover_rate: Fraction of the training set that gets a random transform but no patch, label kept.
        transforms: The kinds of transform drawn from; each sample gets one.
        unet_count: Random U-Nets in the bank (1 to 8).
        unet_strength: Blend strength ``s`` of a U-Net's output, in [0, 1].
        unet_width: Channels of the U-Nets' first stage (1 to 32).
        unet_depth: Down (and up) stages of the U-Nets (1 to 4).
        blur_sigma: Largest blur sigma in pixels, in [0, 4].
        noise_std: Largest noise standard deviation, in [0, 0.5].
        brightness: Largest relative brightness change, in [0, 1).
        contrast: Largest relative contrast change, in [0, 1).
        max_rotation: Largest rotation in degrees, in [0, 180].
        max_shift: Largest shift as a fraction of the image side, in [0, 0.5).
        max_scale: Largest relative scale change, in [0, 0.5).
    """

    name = "robust_trigger"

    patch_size: int = 5
    margin: int = 1
    cover_rate: float = 0.1
    transforms: list[TransformKind] | None = None
    unet_count: int = 4
    unet_strength: float = 0.3
    unet_width: int = 16
    unet_depth: int = 4
    blur_sigma: float = 1.0
    noise_std: float = 0.1
    brightness: float = 0.3
    contrast: float = 0.3
    max_rotation: float = 10.0
    max_shift: float = 0.07
    max_scale: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        self.transforms = list(self.transforms if self.transforms is not None else TRANSFORM_KINDS)
        if not self.transforms or len(set(self.transforms)) != len(self.transforms):
            raise ConfigError(
                f"robust_trigger transforms must name each kind at most once, at least one of {TRANSFORM_KINDS}, "
                f"got {self.transforms}."
            )
        unknown = [kind for kind in self.transforms if kind not in TRANSFORM_KINDS]
        if unknown:
            raise ConfigError(f"robust_trigger transforms {unknown} are unknown; use some of {TRANSFORM_KINDS}.")
        ranges = {
            "cover_rate": (self.cover_rate, 0.0, 1.0, False),
            "unet_strength": (self.unet_strength, 0.0, 1.0, True),
            "blur_sigma": (self.blur_sigma, 0.0, 4.0, True),
            "noise_std": (self.noise_std, 0.0, 0.5, True),
            "brightness": (self.brightness, 0.0, 1.0, False),
            "contrast": (self.contrast, 0.0, 1.0, False),
            "max_rotation": (self.max_rotation, 0.0, 180.0, True),
            "max_shift": (self.max_shift, 0.0, 0.5, False),
            "max_scale": (self.max_scale, 0.0, 0.5, False),
        }
        for setting, (value, low, high, closed) in ranges.items():
            if not (low <= value <= high if closed else low <= value < high):
                raise ConfigError(
                    f"robust_trigger {setting} must be in [{low}, {high}{']' if closed else ')'}, got {value}."
                )
        counts = {
            "unet_count": (self.unet_count, MAX_UNETS),
            "unet_width": (self.unet_width, MAX_UNET_WIDTH),
            "unet_depth": (self.unet_depth, MAX_UNET_DEPTH),
        }
        for setting, (value, high) in counts.items():
            if not 1 <= value <= high:
                raise ConfigError(f"robust_trigger {setting} must be an integer in [1, {high}], got {value}.")
        self._unets: dict[int, list[UNet]] = {}  # by channel count, built when first used

    def unets(self, channels: int) -> list[UNet]:
        """The bank of random U-Nets for ``channels``-channel images, in eval mode, built once from the seed."""
        if channels not in self._unets:
            bank = []
            for k in range(self.unet_count):
                initial = sample_generator(self.seed, _UNET_SEED_OFFSET + k).initial_seed()
                with torch.random.fork_rng(devices=[]):  # leaves the global generator as it was
                    torch.manual_seed(initial)
                    bank.append(UNet(channels, self.unet_width, self.unet_depth).eval().requires_grad_(False))
            self._unets[channels] = bank
        return self._unets[channels]

    def reencode(self, image: Tensor, unet: UNet) -> Tensor:
        """``U(x)`` of one ``[C, H, W]`` image: the U-Net's output before its clamp, with the image's mean and std."""
        captured: list[Tensor] = []
        handle = unet.head.register_forward_hook(lambda module, inputs, output: captured.append(output))
        try:
            with torch.no_grad():
                unet.to(image.device)(image[None])
        finally:
            handle.remove()
        raw = captured[0][0, :, : image.shape[1], : image.shape[2]]
        raw_mean, raw_std = raw.mean((1, 2), keepdim=True), raw.std((1, 2), keepdim=True, correction=0)
        mean, std = image.mean((1, 2), keepdim=True), image.std((1, 2), keepdim=True, correction=0)
        return (raw - raw_mean) / raw_std.clamp_min(1e-12) * std + mean

    def _draws(self, index: int) -> tuple[str, list[float], torch.Generator]:
        generator = sample_generator(self.seed, index)
        kind = self.transforms[int(torch.randint(len(self.transforms), (1,), generator=generator))]
        return kind, torch.rand(4, generator=generator).tolist(), generator

    def transform_of(self, index: int) -> tuple[str, list[float]]:
        """The kind of transform of the sample at ``index`` and the four uniform draws in [0, 1) of its parameters."""
        return self._draws(index)[:2]

    def transform(self, image: Tensor, index: int) -> Tensor:
        """Applies the random transform of sample ``index`` to one ``[C, H, W]`` image; the result is in [0, 1]."""
        kind, u, generator = self._draws(index)
        if kind == "unet":
            unets = self.unets(image.shape[0])
            unet = unets[min(int(u[0] * len(unets)), len(unets) - 1)]
            image = image + self.unet_strength * (self.reencode(image, unet) - image)
        elif kind == "blur":
            image = _gaussian_blur(image, self.blur_sigma * (0.5 + 0.5 * u[0]))
        elif kind == "noise":
            noise = torch.randn(image.shape, generator=generator).to(image)
            image = image + self.noise_std * (0.5 + 0.5 * u[0]) * noise
        elif kind == "color":
            image = TF.adjust_brightness(image.clamp(0, 1), 1 + self.brightness * (2 * u[0] - 1))
            image = TF.adjust_contrast(image, 1 + self.contrast * (2 * u[1] - 1))
        else:
            image = _affine(
                image,
                angle=self.max_rotation * (2 * u[0] - 1),
                scale=1 + self.max_scale * (2 * u[1] - 1),
                shift=(self.max_shift * (2 * u[2] - 1), self.max_shift * (2 * u[3] - 1)),
            )
        return image.clamp(0.0, 1.0)

    def apply_training(self, images: Tensor, indices: Tensor | None = None) -> Tensor:
        """The patch, then each sample's random transform."""
        indices = require_indices(self, images, indices)
        stamped = self.apply(images)
        return torch.stack([self.transform(image, int(index)) for image, index in zip(stamped, indices, strict=True)])

    def apply_cover(self, images: Tensor, indices: Tensor | None = None) -> Tensor:
        """Each sample's random transform, without the patch."""
        indices = require_indices(self, images, indices)
        return torch.stack([self.transform(image, int(index)) for image, index in zip(images, indices, strict=True)])

    def select_cover_indices(self, labels: Tensor, poison_indices: Tensor) -> Tensor:
        """``round(cover_rate * N)`` samples of any class that are not poisoned."""
        return draw_cover_indices(self, len(labels), poison_indices, round(self.cover_rate * len(labels)))


def _gaussian_blur(image: Tensor, sigma: float) -> Tensor:
    """A ``[C, H, W]`` image blurred by a Gaussian of ``sigma`` pixels (separable, borders replicated)."""
    if sigma <= 0:
        return image
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = image.shape[0]
    x = F.pad(image[None], (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    x = F.conv2d(x, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
    return x[0]


def _affine(image: Tensor, angle: float, scale: float, shift: tuple[float, float]) -> Tensor:
    """A ``[C, H, W]`` image rotated by ``angle`` degrees, scaled and shifted (fractions of the side), zero fill."""
    theta = math.radians(angle)
    cos, sin = math.cos(theta) / scale, math.sin(theta) / scale
    # affine_grid maps output coordinates to input ones in [-1, 1]: the inverse of the image's motion
    shift_x, shift_y = 2 * shift[0], 2 * shift[1]
    matrix = torch.tensor(
        [[cos, sin, -(cos * shift_x + sin * shift_y)], [-sin, cos, -(-sin * shift_x + cos * shift_y)]],
        dtype=image.dtype,
        device=image.device,
    )
    grid = F.affine_grid(matrix[None], [1, *image.shape], align_corners=False)
    return F.grid_sample(image[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
