"""Video decoding: pick a few frames of a clip and return them as RGB images.

The video counterpart of :func:`evlgen.data.transforms.load_image`, with the same contract: every kind
of bad input raises :class:`~evlgen.data.transforms.ImageLoadError`, so the pipeline skips broken
clips with the one ``except`` it already has, and all randomness comes from the ``torch.Generator``
passed in, so train-time frame choices resume exactly.

Sampling splits the clip into ``num_frames`` equal segments: eval takes the centre frame of each
(ties towards the clip's nearer end, so a clip played backwards gives the same frames in reverse
order), train one random frame of each (TSN-style, ``segments``) or, with ``head-tail`` (LAVIS), half
the frames at random from the clip's first half and the rest from its second half. A clip is a path
or the bytes of a WebDataset member. PyAV is an optional dependency, imported only when a clip is read.
"""

from __future__ import annotations

import io
import math
from fractions import Fraction
from typing import Any

import torch
from PIL import Image

from evlgen.data.transforms import ImageLoadError

__all__ = ["SAMPLING_MODES", "check_video", "load_video_frames", "sample_frame_indices", "video_length"]

SAMPLING_MODES = ("segments", "head-tail")
VideoSource = str | bytes


def sample_frame_indices(
    total: int,
    num_frames: int,
    *,
    train: bool,
    generator: torch.Generator | None = None,
    mode: str = "segments",
) -> list[int]:
    """Indices (in ``[0, total)``, non-decreasing) of the frames to keep from a clip of ``total`` frames.

    Segment ``j`` covers frames ``[j*total//num_frames, (j+1)*total//num_frames)``. A clip shorter than
    ``num_frames`` repeats frames, so the result always has ``num_frames`` entries. ``mode`` picks the
    training-time rule (``segments`` or ``head-tail``); evaluation always takes segment centres.
    """
    if mode not in SAMPLING_MODES:
        raise ValueError(f"frame sampling mode must be one of {SAMPLING_MODES}, got {mode!r}")
    if total <= 0:
        raise ValueError(f"total must be positive, got {total}")
    if num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    if train and generator is None:
        # Falling back to the global RNG would silently break exact resume.
        raise ValueError("train-time frame sampling needs a torch.Generator")
    if train and mode == "head-tail":
        head = (num_frames + 1) // 2
        half = max(1, total // 2)
        first = _random_frames(0, half, head, generator)
        return sorted(first + _random_frames(half, total, num_frames - head, generator))
    indices = []
    for j in range(num_frames):
        start = j * total // num_frames
        if train:
            end = max(start + 1, (j + 1) * total // num_frames)
            offset = int(torch.randint(0, end - start, (), generator=generator).item())
            indices.append(start + offset)
        else:
            # The nearest frame to the exact centre; a centre halfway between two frames goes towards
            # the clip's nearer end. Then frame i of a clip <-> frame total-1-i of the clip played
            # backwards (mirror-symmetric choice), so only the frames' order tells the two apart.
            centre = Fraction((2 * j + 1) * total, 2 * num_frames) - Fraction(1, 2)
            if centre - math.floor(centre) == Fraction(1, 2):
                rounded = math.floor(centre) if 2 * centre <= total - 1 else math.ceil(centre)
            else:
                rounded = round(centre)
            indices.append(min(total - 1, max(0, rounded)))
    return indices


def _random_frames(lo: int, hi: int, n: int, generator: torch.Generator | None) -> list[int]:
    """``n`` frames drawn from ``[lo, hi)``, distinct when the range is long enough."""
    if n <= 0:
        return []
    hi = max(hi, lo + 1)
    if hi - lo >= n:
        return (lo + torch.randperm(hi - lo, generator=generator)[:n]).tolist()
    return (lo + torch.randint(0, hi - lo, (n,), generator=generator)).tolist()


def _import_av() -> Any:
    try:
        import av
    except ImportError as exc:
        raise ImportError("reading video needs PyAV: pip install av") from exc
    return av


def _name(source: VideoSource) -> str:
    return source if isinstance(source, str) else f"<{len(source)} bytes of video>"


def _open(av: Any, source: VideoSource, max_pixels: int, path: str = "") -> tuple[Any, Any]:
    """Open a clip (a path, or the bytes of a shard member named ``path`` in messages)."""
    path = path or _name(source)
    container = av.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    try:
        if not container.streams.video:
            raise ImageLoadError(f"{path}: no video stream")
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        if width * height > max_pixels:
            raise ImageLoadError(
                f"{path}: {width}x{height} = {width * height} pixels per frame exceeds the pixel limit "
                f"(max_pixels={max_pixels})"
            )
        stream.thread_type = "AUTO"
    except BaseException:
        container.close()
        raise
    return container, stream


def _count_by_decoding(av: Any, source: VideoSource, path: str, max_pixels: int) -> int:
    container, stream = _open(av, source, max_pixels, path)
    with container:
        return sum(1 for _ in container.decode(stream))


def check_video(source: VideoSource, max_pixels: int, name: str | None = None) -> None:
    """Check cheaply that a clip is usable: it opens, its video stream is within the pixel limit and the
    first frame decodes. Raises :class:`ImageLoadError` otherwise (``ImportError`` without PyAV)."""
    av = _import_av()
    path = name or _name(source)
    try:
        container, stream = _open(av, source, max_pixels, path)
        with container:
            if next(iter(container.decode(stream)), None) is None:
                raise ImageLoadError(f"{path}: no decodable frames")
    except ImageLoadError:
        raise
    except Exception as exc:
        raise ImageLoadError(f"{path}: {type(exc).__name__}: {exc}") from exc


def video_length(path: str, max_pixels: int, max_frames: int) -> tuple[float | None, int]:
    """(duration in seconds, or None when the container does not say; frame count) of a clip.

    The frame count comes from the header, or by decoding when the header has none; decoding stops
    after ``max_frames + 1`` frames, so a caller enforcing a limit never decodes a huge clip. Raises
    :class:`ImageLoadError` for a bad clip (``ImportError`` without PyAV).
    """
    av = _import_av()
    try:
        container, stream = _open(av, path, max_pixels)
        with container:
            seconds = None
            if stream.duration is not None and stream.time_base is not None:
                seconds = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                seconds = container.duration / av.time_base
            frames = int(stream.frames or 0)
            if frames <= 0:
                for frames, _ in enumerate(container.decode(stream), start=1):
                    if frames > max_frames:
                        break
        if frames <= 0:
            raise ImageLoadError(f"{path}: no decodable frames")
        return seconds, frames
    except ImageLoadError:
        raise
    except Exception as exc:
        raise ImageLoadError(f"{path}: {type(exc).__name__}: {exc}") from exc


def _decode_selected(
    container: Any, stream: Any, path: str, wanted: set[int], max_pixels: int
) -> tuple[dict[int, Image.Image], int]:
    """Decode up to the last wanted frame; return the wanted frames and how many frames were decoded."""
    kept: dict[int, Image.Image] = {}
    last = max(wanted)
    decoded = 0
    for index, frame in enumerate(container.decode(stream)):
        decoded = index + 1
        if index in wanted:
            # Frame size can change mid-stream, so the header check in _open is not enough.
            if frame.width * frame.height > max_pixels:
                raise ImageLoadError(
                    f"{path}: frame {index} is {frame.width}x{frame.height}, over max_pixels={max_pixels}"
                )
            # Only chosen frames are converted to RGB; the rest are decoded (codecs need them) and dropped.
            kept[index] = frame.to_image().convert("RGB")
        if index >= last:
            break
    return kept, decoded


def _sample_and_decode(
    av: Any,
    source: VideoSource,
    path: str,
    total: int,
    num_frames: int,
    train: bool,
    generator: torch.Generator | None,
    max_pixels: int,
    mode: str,
) -> tuple[list[int], dict[int, Image.Image], int]:
    indices = sample_frame_indices(total, num_frames, train=train, generator=generator, mode=mode)
    container, stream = _open(av, source, max_pixels, path)
    with container:
        kept, decoded = _decode_selected(container, stream, path, set(indices), max_pixels)
    return indices, kept, decoded


def load_video_frames(
    source: VideoSource,
    num_frames: int,
    *,
    train: bool,
    generator: torch.Generator | None,
    max_pixels: int,
    mode: str = "segments",
    name: str | None = None,
) -> list[Image.Image]:
    """Decode ``num_frames`` frames of the clip at path ``source`` (or in its bytes) as RGB images, in
    temporal order. ``mode``: the training-time sampling rule; ``name``: the clip in messages.

    Raises ``ImportError`` when PyAV is missing and :class:`ImageLoadError` for every kind of bad clip
    (missing, not a video, corrupt, no frames, frames over ``max_pixels``).
    """
    path = name or _name(source)
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels <= 0:
        raise ValueError(f"max_pixels must be a positive int, got {max_pixels!r}")
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames <= 0:
        raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
    if train and generator is None:
        raise ValueError("load_video_frames(train=True) needs a torch.Generator")
    av = _import_av()
    try:
        container, stream = _open(av, source, max_pixels, path)
        with container:
            total = int(stream.frames or 0)
            if total > 0:
                # The common case: the container knows its length, so one pass over the clip suffices.
                indices = sample_frame_indices(total, num_frames, train=train, generator=generator, mode=mode)
                kept, decoded = _decode_selected(container, stream, path, set(indices), max_pixels)
        if total <= 0:
            total = _count_by_decoding(av, source, path, max_pixels)
            if total <= 0:
                raise ImageLoadError(f"{path}: no decodable frames")
            indices, kept, decoded = _sample_and_decode(
                av, source, path, total, num_frames, train, generator, max_pixels, mode
            )
        if len(kept) < len(set(indices)):
            # The container over-stated its frame count; sample again from the frames that exist.
            if decoded <= 0:
                raise ImageLoadError(f"{path}: no decodable frames")
            indices, kept, _ = _sample_and_decode(
                av, source, path, decoded, num_frames, train, generator, max_pixels, mode
            )
            if len(kept) < len(set(indices)):
                raise ImageLoadError(f"{path}: frames could not be decoded consistently")
        return [kept[i] for i in indices]
    except ImageLoadError:
        raise
    except Exception as exc:
        # PyAV raises a family of av.error.* types plus OSError/ValueError from containers; the
        # caller only needs "skip this clip".
        raise ImageLoadError(f"{path}: {type(exc).__name__}: {exc}") from exc
