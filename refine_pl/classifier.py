"""The classifiers refine-pl evaluates: a victim that normalises its own input, and the REFINE-defended classifier."""

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from refine_pl.errors import ConfigError
from refine_pl.remap import OutputRemap


class NormalizedClassifier(nn.Module):
    """``net((images - mean) / std)``: image-space input, normalised-space network.

    REFINE's transform works in image space [0, 1] while the victim expects the normalisation it was
    trained with; keeping the normalisation inside the classifier makes that one place. ``mean`` and
    ``std`` are non-persistent buffers, so the ``state_dict`` is exactly the network's (prefixed ``net.``)
    and third-party weights load without extra keys.

    Args:
        net: Network on normalised images, returning ``[B, num_classes]`` logits.
        mean: Per-channel mean of the training images.
        std: Per-channel standard deviation of the training images.
        arch: Registered architecture name of ``net`` (see :mod:`refine_pl.architectures`), when it was
            built from the registry; recorded so that the classifier can be rebuilt from its weights.
    """

    mean: Tensor
    std: Tensor
    query_only: bool = False
    """True for a victim that only answers queries: its forward pass runs without autograd, so no gradient can
    flow through it (set by a defense built with ``victim_access: query_only``)."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float], arch: str | None = None) -> None:
        super().__init__()
        problem = normalisation_problem(mean, std, len(mean))
        if problem is not None:
            raise ConfigError(f"NormalizedClassifier got the normalisation {problem}: give one value per channel.")
        self.net = net
        self.arch = arch
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        """Logits ``[B, num_classes]`` for images ``[B, C, H, W]`` in [0, 1]."""
        if self.query_only:
            with torch.no_grad():
                return self.net((images - self.mean) / self.std)
        return self.net((images - self.mean) / self.std)


class DefendedClassifier(nn.Module):
    """``remap(victim(transform(images)))``: the REFINE-defended classifier ``M(f(T(x)))``.

    The one definition of the defended forward pass: :class:`~refine_pl.RefineLitModule` trains its
    ``transform`` and evaluates it, :mod:`refine_pl.export` saves and rebuilds it. Its ``state_dict`` holds the
    three parts under ``transform.``, ``victim.`` and ``remap.``.

    Args:
        transform: The input transform ``T`` (images in [0, 1] to images in [0, 1]).
        victim: The frozen suspect classifier ``f`` on images in [0, 1].
        remap: The fixed output remap ``M``.
        in_channels: Channels of the images the victim was built for; other inputs are refused (None: any).
        image_size: Side of the square images the victim was built for; other inputs are refused (None: any).
    """

    def __init__(
        self,
        transform: nn.Module,
        victim: NormalizedClassifier,
        remap: OutputRemap,
        in_channels: int | None = None,
        image_size: int | None = None,
    ) -> None:
        super().__init__()
        self.transform = transform
        self.victim = victim
        self.remap = remap
        self.in_channels = in_channels
        self.image_size = image_size

    def forward(self, images: Tensor) -> Tensor:
        """Defended logits ``[B, num_classes]`` for images ``[B, C, H, W]`` in [0, 1].

        Raises:
            ConfigError: The images are not a ``[B, in_channels, image_size, image_size]`` batch, are not float,
                hold a NaN or infinite pixel, or leave [0, 1].
        """
        self._check_shape(images)
        check_images(images, "The defended classifier's input")
        return self.unchecked(images)

    def _check_shape(self, images: Tensor) -> None:
        # A victim runs on other sizes and channel counts too (global pooling, the U-Net's padding), but what it
        # answers there was never measured: the shape it was built and tested for is the only one accepted.
        side = self.image_size
        fixes = []
        if images.ndim != 4:
            fixes.append("pass a batch [B, C, H, W]")
        else:
            if self.in_channels is not None and images.shape[1] != self.in_channels:
                fixes.append(f"read the images with {self.in_channels} channel(s)")
            if side is not None and tuple(images.shape[2:]) != (side, side):
                fixes.append(f"resize them to {side}x{side} (refine-pl-predict reads image files at the recorded size)")
        if fixes:
            expected = f"[B, {self.in_channels or 'C'}, {f'{side}, {side}' if side else 'H, W'}]"
            raise ConfigError(
                f"The defended classifier takes images {expected} (the victim's input), got a tensor of shape "
                f"{tuple(images.shape)}: {' and '.join(fixes)}."
            )

    def unchecked(self, images: Tensor) -> Tensor:
        """:meth:`forward` without the input check, for exporters that trace the computation (ONNX, TorchScript)."""
        return self.remap(self.victim(self.transform(images)))


IMAGE_RANGE_TOLERANCE = 1e-3
"""How far outside [0, 1] a pixel may lie before :func:`check_images` refuses it: float rounding of a resize or a
blend stays far below it (1e-7), a 0-255 image or a normalised one (min about -0.4) is far above it."""


def check_images(images: Tensor, what: str, fix: str | None = None) -> None:
    """Refuses a tensor that is not float images in [0, 1] with finite pixels, in one pass over it.

    A NaN pixel gives NaN logits, whose argmax is class 0 (often a backdoor's target), and one such image
    poisons a whole training batch; uint8 or 0-255 images saturate every pixel. Both would be silently wrong
    results, so the data boundary and the defended classifier's input go through this check.

    Args:
        images: Images of any shape (``[B, C, H, W]`` or ``[C, H, W]``).
        what: What the tensor is, for the message (``"image file x.tif"``, ``"the defended classifier's input"``).
        fix: What the user should do, replacing the advice for in-memory tensors (dtype conversion, scaling).

    Raises:
        ConfigError: Non-float dtype, a NaN or infinite pixel, or a value outside [0, 1].
    """
    if not images.is_floating_point():
        advice = "convert with images.float() / 255" if images.dtype == torch.uint8 else "pass float images"
        raise ConfigError(f"{what} has dtype {images.dtype}; pixels must be floats in [0, 1]: {fix or advice}.")
    if images.numel() == 0:
        return
    # aminmax propagates NaN and shows inf as an extreme, so this one pass finds every bad pixel; the
    # counts of the message are computed only when something is wrong.
    low, high = (float(value) for value in torch.aminmax(images.detach()))
    if (
        math.isfinite(low)
        and math.isfinite(high)
        and low >= -IMAGE_RANGE_TOLERANCE
        and high <= 1 + IMAGE_RANGE_TOLERANCE
    ):
        return
    bad = int((~torch.isfinite(images)).sum())
    if bad:
        raise ConfigError(
            f"{what} has {bad} NaN or infinite pixel value(s); every pixel must be a finite value in [0, 1]: "
            f"{fix or 'repair or drop those images'}."
        )
    if low >= 0 and high <= 255:
        advice = "0-255 pixels must be divided by 255"
    elif low < 0:
        advice = "pass images in [0, 1], not normalised ones (the model normalises them itself)"
    else:
        advice = "rescale the images to [0, 1]"
    raise ConfigError(f"{what} has pixel values in [{low:g}, {high:g}], outside [0, 1]: {fix or advice}.")


IMAGENET_MEAN = (0.485, 0.456, 0.406)
"""The per-channel mean of ImageNet's training images, which torchvision's classification models normalise with."""

IMAGENET_STD = (0.229, 0.224, 0.225)
"""The per-channel standard deviation of ImageNet's training images (torchvision's models)."""

MEAN_BOUNDS = (-10.0, 10.0)
"""Inclusive bounds of a normalisation mean. Pixels lie in [0, 1], so a channel's mean does too; the margin admits
other conventions (mean 0.5 with std 0.5 maps to [-1, 1]) and refuses values that are no one's statistics (1e308),
whose normalised pixels overflow to infinity and give NaN logits."""

STD_BOUNDS = (1e-3, 100.0)
"""Inclusive bounds of a normalisation std. A [0, 1] channel's std is at most 0.5; the lower bound admits a model
trained on 0-255 pixels (std 1/255 in [0, 1] terms) and refuses a std so small (1e-300) that normalised pixels
overflow."""


def normalisation_problem(mean: Any, std: Any, in_channels: int) -> str | None:
    """What is wrong with a normalisation for ``in_channels`` channels, or None when nothing is.

    Each of ``mean`` and ``std`` must be a list or tuple of ``in_channels`` real numbers within
    :data:`MEAN_BOUNDS` and :data:`STD_BOUNDS` (so finite, and std > 0).
    """
    for name, values, (low, high) in (("mean", mean, MEAN_BOUNDS), ("std", std, STD_BOUNDS)):
        if (
            not isinstance(values, (list, tuple))
            or len(values) != in_channels
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and low <= v <= high for v in values)
        ):
            return f"{name}={values!r}, which is not {in_channels} number(s) in [{low:g}, {high:g}] (one per channel)"
    return None


def check_normalisation(mean: Any, std: Any, in_channels: int, source: str) -> None:
    """Refuses a normalisation recorded in a file that does not fit ``in_channels`` channels or a sane range.

    Args:
        mean: Per-channel mean, as read (any type).
        std: Per-channel standard deviation, as read (any type).
        in_channels: Channels of the images.
        source: Where the values come from, for the message (a file name).

    Raises:
        ConfigError: See :func:`normalisation_problem`.
    """
    problem = normalisation_problem(mean, std, in_channels)
    if problem is not None:
        raise ConfigError(
            f"{source} records the normalisation {problem}: the file is damaged or made for other data. Use a file "
            "made for this data, or one that records no normalisation (the data's own is then used)."
        )


def check_transform_input(images: Tensor, in_channels: int, transform: str) -> None:
    """Refuses a tensor that is not a ``[B, in_channels, H, W]`` batch, naming the transform and the fix."""
    if images.ndim != 4 or images.shape[1] != in_channels:
        raise ConfigError(
            f"{transform} built for {in_channels}-channel images got a tensor of shape {tuple(images.shape)}; "
            "its in_channels must be the data's channel count."
        )
