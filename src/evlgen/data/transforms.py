"""Image preprocessing: decode untrusted image files into RGB and turn them into normalised tensors.

This is the boundary between raw files on disk (or bytes from a shard) and the model. It is built on
PIL, numpy and torch only: torchvision breaks the pinned transformers, so it is never imported here.

Two guarantees the rest of the data pipeline relies on:

* ``load_image`` raises :class:`ImageLoadError` and nothing else for bad image input, so a loader can
  skip and count broken samples with a single ``except``.
* :class:`ImageTransform` draws every random number from the ``torch.Generator`` it is given, so the
  augmentation of each sample is a pure function of (image, generator state) and resumes exactly.
"""

import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ImageLoadError",
    "ImageTransform",
    "load_image",
    "random_resized_crop_box",
    "to_tensor",
]

# PIL's own default MAX_IMAGE_PIXELS (about 0.25 GiB of 24-bit pixels); kept as our default so the
# behaviour matches what users expect from PIL, but enforced by us rather than through PIL's global.
DEFAULT_MAX_PIXELS = 89_478_485

# Premultiplied modes are included: converting them straight to RGB would darken edges.
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})

# torchvision's RandomResizedCrop gives up after this many rejected samples and centre-crops.
_CROP_ATTEMPTS = 10


class ImageLoadError(Exception):
    """An image could not be used: unreadable, corrupt, truncated, or larger than the pixel limit."""


def _describe(source: object, name: str | None) -> str:
    if name is not None:
        return name
    if isinstance(source, str | Path):
        return str(source)
    if isinstance(source, bytes | bytearray | memoryview):
        return f"<{len(source)} bytes in memory>"
    stream_name = getattr(source, "name", None)
    return str(stream_name) if isinstance(stream_name, str | bytes) else "<binary stream>"


def _high_bit_depth_to_l(image: Image.Image) -> Image.Image:
    # PIL's own I/F -> L conversion clips instead of rescaling, which turns any real 16-bit image
    # almost entirely white, so rescale by hand.
    arr = np.asarray(image).astype(np.float64)  # [H, W]
    if image.mode.startswith("I;16"):
        arr = arr / 257.0
    elif arr.size and float(np.nanmax(arr)) > 255.0:
        # Mode "I"/"F" does not record its bit depth; values above 8-bit range are taken as 16-bit.
        arr = np.clip(arr, 0.0, 65535.0) / 257.0
    arr = np.nan_to_num(arr, nan=0.0)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _high_bit_depth_to_l(image)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        # Transparent regions usually hold black (0, 0, 0, 0); dropping alpha would paint logos and
        # cut-outs onto black, so composite onto white like a browser shows them.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _decode(fp: BinaryIO, max_pixels: int, what: str) -> Image.Image:
    # Our own max_pixels check is the authoritative one; PIL's warning would only be noise. (PIL's hard
    # DecompressionBombError above 2 * MAX_IMAGE_PIXELS still fires inside Image.open; it is reworded
    # below. We never touch PIL globals, because other code in the process may rely on them.)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = Image.open(fp)
    width, height = image.size  # from the header only; no pixel data decoded yet
    if width <= 0 or height <= 0:
        raise ImageLoadError(f"{what}: invalid size {width}x{height}")
    if width * height > max_pixels:
        raise ImageLoadError(
            f"{what}: {width}x{height} = {width * height} pixels exceeds the pixel limit "
            f"(max_pixels={max_pixels})"
        )
    # Decode everything now so truncated files fail here, inside the guarded region, not in a worker
    # halfway through a transform.
    image.load()
    image = ImageOps.exif_transpose(image)
    return _to_rgb(image)


def load_image(
    source: str | Path | bytes | BinaryIO,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str | None = None,
) -> Image.Image:
    """Decode an image fully into an upright RGB ``PIL.Image``.

    Args:
        source: a file path, the encoded bytes, or a binary stream (read from its current position and
            left open).
        max_pixels: refuse images whose header claims more than ``width * height`` pixels, before any
            pixel data is decoded. PIL additionally refuses anything above ``2 * PIL.Image.MAX_IMAGE_PIXELS``
            regardless of this value.
        name: how to refer to the image in error messages (e.g. a sample key); defaults to the path, the
            stream's name, or a short description of the bytes.

    Raises:
        ImageLoadError: for every kind of bad image input (missing or empty file, unknown format,
            corrupt or truncated data, too many pixels, undecodable mode). ``TypeError`` and
            ``ValueError`` are only raised for wrong arguments.
    """
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels <= 0:
        raise ValueError(f"max_pixels must be a positive int, got {max_pixels!r}")
    if not isinstance(source, str | Path | bytes | bytearray | memoryview) and not hasattr(source, "read"):
        raise TypeError(f"source must be a path, bytes or a binary stream, got {type(source).__name__}")
    what = _describe(source, name)
    try:
        if isinstance(source, str | Path):
            with open(source, "rb") as fp:
                return _decode(fp, max_pixels, what)
        if isinstance(source, bytes | bytearray | memoryview):
            return _decode(io.BytesIO(bytes(source)), max_pixels, what)
        return _decode(source, max_pixels, what)
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(f"{what}: exceeds PIL's pixel limit ({exc})") from exc
    except Exception as exc:
        # Decoder plugins raise a zoo of types (UnidentifiedImageError, OSError, SyntaxError,
        # ValueError, struct.error, EOFError, ...); the caller only needs "skip this one".
        raise ImageLoadError(f"{what}: {type(exc).__name__}: {exc}") from exc


def to_tensor(
    image: Image.Image,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
) -> Tensor:
    """Convert an RGB image to a float32 ``[3, H, W]`` tensor: scaled to [0, 1], then ``(x - mean) / std``."""
    if image.mode != "RGB":
        raise ValueError(f"to_tensor expects an RGB image (use load_image), got mode {image.mode!r}")
    hwc = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))  # [H, W, 3] uint8
    chw = hwc.permute(2, 0, 1).to(torch.float32).div_(255.0)  # [3, H, W] in [0, 1]
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)  # [3, 1, 1]
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)  # [3, 1, 1]
    return chw.sub_(mean_t).div_(std_t).contiguous()  # [3, H, W]


def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    # float64 so the sampled crop does not depend on float32 rounding of the bounds.
    u = torch.rand((), dtype=torch.float64, generator=generator).item()
    return low + (high - low) * u


def _randint(low: int, high_exclusive: int, generator: torch.Generator) -> int:
    return int(torch.randint(low, high_exclusive, (), generator=generator).item())


def random_resized_crop_box(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
) -> tuple[int, int, int, int]:
    """Sample a crop box ``(left, top, right, bottom)`` with torchvision's RandomResizedCrop semantics.

    The area fraction is uniform in ``scale`` and the aspect ratio (width / height) log-uniform in
    ``ratio``; after 10 samples that do not fit, fall back to the largest centred crop whose aspect ratio
    is ``ratio`` clamped to the image's own.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(_CROP_ATTEMPTS):
        target_area = area * _uniform(scale[0], scale[1], generator)
        aspect = math.exp(_uniform(log_lo, log_hi, generator))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = _randint(0, height - h + 1, generator)
            left = _randint(0, width - w + 1, generator)
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = max(1, min(height, int(round(w / min(ratio)))))
    elif in_ratio > max(ratio):
        h = height
        w = max(1, min(width, int(round(h * max(ratio)))))
    else:
        w, h = width, height
    top = (height - h) // 2
    left = (width - w) // 2
    return left, top, left + w, top + h


def _check_triple(field: str, value: object, positive: bool) -> tuple[float, float, float]:
    try:
        triple = tuple(float(v) for v in value)  # type: ignore[attr-defined]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{field} must be three numbers, got {value!r}") from exc
    if len(triple) != 3 or not all(math.isfinite(v) for v in triple):
        raise ValueError(f"{field} must be three finite numbers, got {value!r}")
    if positive and not all(v > 0 for v in triple):
        raise ValueError(f"{field} must be positive, got {value!r}")
    return triple  # type: ignore[return-value]


def _check_range(field: str, value: object, upper: float) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)  # type: ignore[attr-defined]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{field} must be two numbers (low, high), got {value!r}") from exc
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi <= upper):
        raise ValueError(f"{field} must satisfy 0 < low <= high <= {upper}, got {value!r}")
    return lo, hi


@dataclass(frozen=True)
class ImageTransform:
    """RGB image -> normalised float32 ``[3, image_size, image_size]`` tensor.

    Eval mode is deterministic: ``eval_resize="squash"`` resizes both sides to ``image_size`` (what
    BLIP-2/LAVIS evaluation does, keeping the whole image at the cost of aspect ratio);
    ``"center_crop"`` resizes the shorter side to ``image_size`` and crops the centre square.

    Train mode is RandomResizedCrop(``scale``, ``ratio``) then, if ``hflip``, a horizontal flip with
    probability 0.5. Flipping is off by default because it contradicts captions that say "left" or
    "right". Every resize is one PIL BICUBIC resample straight from the source crop box.
    """

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    train: bool = False
    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = False
    eval_resize: Literal["squash", "center_crop"] = "squash"

    def __post_init__(self) -> None:
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size <= 0:
            raise ValueError(f"image_size must be a positive int, got {self.image_size!r}")
        # Coerce to tuples so values coming from YAML lists still give a hashable, immutable transform.
        object.__setattr__(self, "mean", _check_triple("mean", self.mean, positive=False))
        object.__setattr__(self, "std", _check_triple("std", self.std, positive=True))
        object.__setattr__(self, "scale", _check_range("scale", self.scale, upper=1.0))
        object.__setattr__(self, "ratio", _check_range("ratio", self.ratio, upper=math.inf))
        if not isinstance(self.train, bool):
            raise ValueError(f"train must be a bool, got {self.train!r}")
        if not isinstance(self.hflip, bool):
            raise ValueError(f"hflip must be a bool, got {self.hflip!r}")
        if self.eval_resize not in ("squash", "center_crop"):
            raise ValueError(f"eval_resize must be 'squash' or 'center_crop', got {self.eval_resize!r}")

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> Tensor:
        """Transform one RGB image; train mode requires ``generator`` (the only source of randomness)."""
        if image.mode != "RGB":
            raise ValueError(f"ImageTransform expects an RGB image (use load_image), got mode {image.mode!r}")
        size = (self.image_size, self.image_size)
        width, height = image.size
        if self.train:
            if generator is None:
                # Falling back to the global RNG would silently break exact resume.
                raise ValueError("ImageTransform(train=True) needs a torch.Generator")
            box = random_resized_crop_box(width, height, self.scale, self.ratio, generator)
            out = image.resize(size, Image.Resampling.BICUBIC, box=box)
            # The coin is only drawn when flipping is enabled, so hflip=False consumes exactly the
            # random numbers of the crop.
            if self.hflip and torch.rand((), generator=generator).item() < 0.5:
                out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        elif self.eval_resize == "squash":
            out = image.resize(size, Image.Resampling.BICUBIC)
        else:
            # Centre square in source coordinates (fractional offsets allowed), so "resize shorter side,
            # then crop" is a single resample.
            side = min(width, height)
            left = (width - side) / 2
            top = (height - side) / 2
            out = image.resize(size, Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))
        return to_tensor(out, self.mean, self.std)  # [3, image_size, image_size]
