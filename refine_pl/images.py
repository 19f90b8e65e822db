"""Image files as refine-pl reads them: which files count as images, and how one becomes a tensor in [0, 1].

The data sources (``datamodules``) and ``refine-pl-predict`` read images through these functions, so a folder is
read the same way for training, testing and prediction.
"""

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms.v2.functional import pil_to_tensor

from refine_pl.classifier import check_images
from refine_pl.errors import ConfigError

EIGHT_BIT_MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "HSV"})
"""Pillow modes of at most 8 bits per channel, which Pillow converts to 8-bit RGB exactly (alpha is dropped)."""

SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
"""Pillow modes of 16-bit unsigned grayscale (16-bit PNG, PGM and TIFF): white is 65535."""

_HIGH_DEPTH_ADVICE = "save it as an 8-bit or 16-bit PNG (or a float TIFF with values in [0, 1]), or delete it"


def _white_level(image: Image.Image) -> float | None:
    """The value of a white pixel of a single-channel image of more than 8 bits; None when the file does not say.

    Pillow opens 16-bit PNG and PGM files as mode ``I`` in some versions (and scales a PGM's maxval to 65535),
    so ``I`` from those formats is 16-bit; a TIFF says its bits per sample and whether they are signed.
    """
    if image.mode in SIXTEEN_BIT_MODES:
        return 65535.0
    if image.mode == "F":
        return 1.0
    if image.mode == "I" and image.format in ("PNG", "PPM"):
        return 65535.0
    if image.mode == "I" and image.format == "TIFF":
        tags = getattr(image, "tag_v2", {})
        bits, sample_format = tags.get(258, (0,)), tags.get(339, (1,))
        bits = bits[0] if isinstance(bits, tuple) else bits
        sample_format = sample_format[0] if isinstance(sample_format, tuple) else sample_format
        if sample_format == 1 and bits in (8, 16):
            return float(2**bits - 1)
    return None


def decode_image(path: str) -> Image.Image:
    """Reads an image file as what refine-pl resizes: 8-bit ``RGB``, or ``F`` (one channel) with values in [0, 1].

    Images of up to 8 bits per channel become RGB as Pillow converts them; 16-bit grayscale is divided by
    65535 and float images are taken as they are, so that no pixel is clipped (Pillow's own conversion of
    either to RGB saturates: a 16-bit image turns white, a float one black).

    Raises:
        ConfigError: The file cannot be decoded; its mode has no known white level (32-bit integers, LAB,
            ...); or a float image holds a NaN, an infinite value or a value outside [0, 1].
    """
    try:
        with warnings.catch_warnings():
            # Pillow only warns about images of 89-179 million pixels (a few hundred bytes can declare them); a
            # dataset image that large is no photo, and decoding it would take gigabytes, so it is refused too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as file:
                file.load()
                mode = file.mode
                if mode in EIGHT_BIT_MODES:
                    return file.convert("RGB")
                white = _white_level(file)
                pixels = np.asarray(file, dtype=np.float32) if white is not None else None
    except Exception as error:  # a damaged file makes Pillow's decoders raise almost any type (OSError, EOFError, ...)
        raise ConfigError(f"Cannot read image {path} ({error}): replace or delete the file.") from error
    if pixels is None or pixels.ndim != 2:
        raise ConfigError(
            f"Image {path} has pixel mode {mode}, whose white level refine-pl does not know, so it cannot map the "
            f"pixels to [0, 1] without guessing: {_HIGH_DEPTH_ADVICE}."
        )
    pixels = pixels / np.float32(white)
    check_images(torch.from_numpy(pixels), f"Image {path}", fix=_HIGH_DEPTH_ADVICE)
    return Image.fromarray(pixels)  # float32 [H, W]: mode F


def image_files(folder: Path) -> list[Path]:
    """Image files anywhere below ``folder``, sorted (extensions as torchvision's, any case).

    The folder the user names is read whole: symbolic links to files and to folders are followed, wherever they
    lead, as torchvision's ``ImageFolder`` does. A folder reached twice (a link loop, or two links to one folder)
    is refused rather than read once in silence or forever, and so is a sub-folder that cannot be listed.

    Raises:
        ConfigError: A folder below ``folder`` is reached twice or cannot be listed.
    """
    files, read = [], {}

    def unreadable(error: OSError) -> None:
        raise ConfigError(f"Cannot list {error.filename} ({error.strerror}): make it readable or remove it.")

    for current, folders, names in os.walk(folder, onerror=unreadable, followlinks=True):
        real = os.path.realpath(current)
        if real in read:
            raise ConfigError(
                f"{current} is {real} again, already read as {read[real]} (a link loop, or two links to one folder): "
                "remove the link so that every image is read once."
            )
        read[real] = current
        folders.sort()
        files += [Path(current, name) for name in names if Path(name).suffix.lower() in IMG_EXTENSIONS]
    return sorted(path for path in files if path.is_file())


def load_image_file(path: str, image_size: int, crop: bool, channels: int = 3) -> Tensor:
    """One image file as a float tensor ``[channels, image_size, image_size]`` in [0, 1].

    Decoded by :func:`decode_image` (by its real bit depth: 8-bit, 16-bit and float files keep their brightness),
    made RGB (grayscale is repeated, alpha dropped) or, for ``channels=1``, grayscale (ITU-R 601 luma), and brought to
    ``image_size`` x ``image_size``: resized so that its shorter side is ``image_size`` and centre-cropped
    (``crop``, for photographs) or stretched (for near-square crops such as GTSRB's signs).

    Raises:
        ConfigError: The file cannot be decoded or its pixels cannot be mapped to [0, 1] (see :func:`decode_image`).
        ValueError: ``channels`` is not 1 or 3.
    """
    if channels not in (1, 3):
        raise ValueError(f"image files are read as 1 or 3 channels, not {channels}")
    size = (image_size, image_size)
    image = decode_image(path)
    if channels == 1 and image.mode == "RGB":
        image = image.convert("L")
    if crop:
        image = ImageOps.fit(image, size, method=Image.Resampling.BILINEAR)
    elif image.size != size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    if image.mode == "F":  # bilinear weights are >= 0, so only float rounding can leave [0, 1]
        gray = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).clamp_(0.0, 1.0)
        return gray.expand(channels, -1, -1).contiguous()
    return pil_to_tensor(image).float().div_(255.0)
