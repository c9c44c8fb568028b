"""Inference on your own files: captions and answers for images or short videos, batched.

    import evlgen
    model = evlgen.load("runs/demo/run/model")
    model.caption(["cat.jpg", "clip.mp4"])            # -> ["a cat on a sofa", ...]
    model.answer(["cat.jpg"], ["what colour is the cat?"])

The command-line forms are `evlgen caption --checkpoint DIR FILE...` and
`evlgen vqa --checkpoint DIR FILE "question"`. Inputs go through the same eval transforms as
`evlgen eval` (the model's own resize, mean and std; videos as `data.frames` uniformly sampled
frames), and decoding uses the model's `caption` / `vqa` settings unless overridden.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from evlgen.data.pipeline import format_prompt, make_sample_maker
from evlgen.data.records import Record
from evlgen.eval.run import generation_kwargs

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
ImageInput = str | os.PathLike[str] | Image.Image


def is_video(item: ImageInput) -> bool:
    return not isinstance(item, Image.Image) and Path(item).suffix.lower() in VIDEO_SUFFIXES


def pixels_for(vlm: Any, items: Sequence[ImageInput]) -> Tensor:
    """Files or PIL images -> [B, T, 3, H, W] with the model's eval transforms (images: T = 1, repeated
    to the batch's T when videos are mixed in, which leaves the frame mean unchanged)."""
    maker = make_sample_maker(vlm.config, vlm.vision.image_size, train=False)
    out = []
    for item in items:
        if isinstance(item, Image.Image):
            out.append(maker.transform(item.convert("RGB"), None).unsqueeze(0))  # [1, 3, H, W]
        else:  # a file: read exactly as a dataset row naming it would be
            path = str(item)
            video = is_video(item)
            rec = Record(
                location=path, key=path, image=None if video else path, video=path if video else None
            )
            out.append(maker.pixels(rec, None))  # [T, 3, H, W]
    t = max(p.shape[0] for p in out)
    return torch.stack([p.expand(t, -1, -1, -1) for p in out])  # [B, T, 3, H, W]


def _device(vlm: Any) -> torch.device:
    return next(vlm.parameters()).device


@torch.no_grad()
def caption(
    vlm: Any,
    items: Sequence[ImageInput],
    *,
    prompt: str | None = None,
    batch_size: int = 16,
    **overrides: Any,
) -> list[str]:
    """One caption per image or video. `overrides`: num_beams, max_new_tokens, ... (default: the model's
    `caption` settings)."""
    g = dataclasses.replace(vlm.config.caption, **({"prompt": prompt} if prompt is not None else {}))
    gen = {**generation_kwargs(g), **overrides}
    out: list[str] = []
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        pixels = pixels_for(vlm, chunk).to(_device(vlm))
        out += [t.strip() for t in vlm.generate(pixels, [g.prompt] * len(chunk), **gen)]
    return out


@torch.no_grad()
def answer(
    vlm: Any,
    items: Sequence[ImageInput],
    questions: Sequence[str],
    *,
    batch_size: int = 16,
    **overrides: Any,
) -> list[str]:
    """One answer per (image or video, question) pair, with the model's `vqa` prompt and settings."""
    if len(items) != len(questions):
        raise ValueError(f"{len(items)} inputs but {len(questions)} questions: give one question per input")
    g = vlm.config.vqa
    gen = {**generation_kwargs(g), **overrides}
    out: list[str] = []
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        prompts = [format_prompt(g.prompt, q) for q in questions[i : i + batch_size]]
        out += [t.strip() for t in vlm.generate(pixels_for(vlm, chunk).to(_device(vlm)), prompts, **gen)]
    return out
