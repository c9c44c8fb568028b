"""Short clips of the synthetic world: 1-2 objects that move across, appear or disappear, and their captions.

Each object keeps to its own horizontal band (upper or lower), so paths never cross. Some captions depend
on the order of frames ("a red circle moves from left to right", "a blue star appears"): played backwards
(:meth:`Clip.reversed`) the clip needs the mirrored caption. Others ("a red circle and a blue star") hold
in any order. Clips are written as mp4 with PyAV, imported only when writing.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from evlgen.synth.world import (
    AT,
    BACKGROUND,
    COLOURS,
    COMPOSITIONAL_HOLDOUT,
    PAIRS,
    POSITIONS,
    RADIUS,
    SHAPES,
    SIZES,
    draw_shape,
    stream,
    write_jsonl,
)

MOTIONS = ("still", "rightward", "leftward", "appear", "disappear")
FPS = 8
_BANDS = (0.3, 0.7)  # vertical centre of each band, as a fraction of the image side
_SUPERSAMPLE = 3
_EVENTS = {
    "still": ("stays {at}", "sits still {at}", "does not move"),
    "rightward": ("moves from left to right", "moves to the right", "slides from left to right"),
    "leftward": ("moves from right to left", "moves to the left", "slides from right to left"),
    "appear": ("appears", "appears {at}", "comes into view"),
    "disappear": ("disappears", "disappears from the {pos}", "vanishes"),
}
_MIRROR = dict(zip(MOTIONS, ("still", "leftward", "rightward", "disappear", "appear"), strict=True))


@dataclass(frozen=True)
class Track:
    """One object of a clip. ``position``: its column, or where a moving object starts (left for rightward).
    ``switch``: the first frame showing an appearing object, or the first without a disappearing one."""

    shape: str
    colour: str
    size: str
    motion: str
    position: str
    band: int
    switch: int = 0
    dy: float = 0.0

    def x(self, t: int, frames: int) -> float:
        """Horizontal centre at frame ``t``, as a fraction of the image side."""
        start = (2 * POSITIONS.index(self.position) + 1) / 6
        if self.motion in ("rightward", "leftward"):
            return start + (1 if self.motion == "rightward" else -1) * (4 / 6) * t / (frames - 1)
        return start

    def visible(self, t: int) -> bool:
        return {"appear": t >= self.switch, "disappear": t < self.switch}.get(self.motion, True)


@dataclass(frozen=True)
class Clip:
    tracks: tuple[Track, ...]
    frames: int = 8

    def reversed(self) -> Clip:
        """The same clip played backwards (order-dependent captions change, the others do not)."""
        tracks = []
        for tr in self.tracks:
            position = {"rightward": "right", "leftward": "left"}.get(tr.motion, tr.position)
            switch = self.frames - tr.switch if tr.motion in ("appear", "disappear") else tr.switch
            tracks.append(replace(tr, motion=_MIRROR[tr.motion], position=position, switch=switch))
        return Clip(tuple(tracks), self.frames)


def sample_clip(
    rng: random.Random, frames: int = 8, *, holdout: frozenset[tuple[str, str]] = COMPOSITIONAL_HOLDOUT
) -> Clip:
    """1-2 objects with distinct (colour, shape), none of them a held-out pair, each with a random motion."""
    if frames < 4:
        raise ValueError(f"a clip needs at least 4 frames, got {frames}")
    n = rng.randint(1, 2)
    pairs = rng.sample([p for p in PAIRS if p not in holdout], n)
    bands = [0, 1] if n == 2 else [rng.randrange(2)]
    tracks = []
    for (colour, shape), band in zip(pairs, bands, strict=True):
        motion, size = rng.choice(MOTIONS), rng.choice(SIZES)
        position = {"rightward": "left", "leftward": "right"}.get(motion) or rng.choice(POSITIONS)
        # The change happens between frames 2 and frames-2, so both states last at least two frames.
        switch = rng.randint(2, frames - 2) if motion in ("appear", "disappear") else 0
        dy = round(rng.uniform(-0.03, 0.03), 4)
        tracks.append(Track(shape, colour, size, motion, position, band, switch, dy))
    return Clip(tuple(tracks), frames)


def render_clip(clip: Clip, size: int = 64) -> list[Image.Image]:
    """The clip's frames as RGB images, in temporal order."""
    big = size * _SUPERSAMPLE
    out = []
    for t in range(clip.frames):
        canvas = Image.new("RGB", (big, big), BACKGROUND)
        draw = ImageDraw.Draw(canvas)
        for tr in clip.tracks:
            if tr.visible(t):
                cy = (_BANDS[tr.band] + tr.dy) * big
                draw_shape(draw, tr.shape, tr.colour, tr.x(t, clip.frames) * big, cy, RADIUS[tr.size] * big)
        out.append(canvas.resize((size, size), Image.Resampling.BOX))
    return out


def _noun(tr: Track, sized: bool) -> str:
    return f"a {tr.size} {tr.colour} {tr.shape}" if sized else f"a {tr.colour} {tr.shape}"


def clip_captions(clip: Clip, rng: random.Random, n: int = 5, *, listing: bool = True) -> list[str]:
    """``n`` distinct captions: first the canonical event caption ("a large red circle moves from left to
    right and a small blue star appears"), second an order-free list ("a red circle and a blue star"),
    then paraphrases of either kind. ``listing=False``: event captions only (every caption says what
    each object does)."""

    def events(canonical: bool) -> str:
        parts = []
        for tr in clip.tracks:
            phrase = _EVENTS[tr.motion][0 if canonical else rng.randrange(3)]
            phrase = phrase.format(at=AT[tr.position], pos=tr.position)
            parts.append(f"{_noun(tr, canonical or rng.random() < 0.5)} {phrase}")
        return (" and " if canonical else rng.choice((" and ", " while "))).join(parts)

    def listing_text() -> str:
        nouns = " and ".join(_noun(tr, rng.random() < 0.5) for tr in clip.tracks)
        return rng.choice(("", "a video of ", "a clip of ")) + nouns

    with_lists = listing
    out = ([events(True), listing_text()] if with_lists else [events(True)])[:n]
    for _ in range(50 * n):
        if len(out) >= n:
            break
        text = listing_text() if with_lists and rng.random() < 0.25 else events(False)
        if text not in out:
            out.append(text)
    return out


def clip_slots(clip: Clip) -> str:
    """The clip in words, one slot per band, as the video LM's context (what the visual prefix stands
    for), e.g. ``"top: a large red circle moves from left to right. bottom: nothing."``."""
    by_band = {tr.band: tr for tr in clip.tracks}
    slots = []
    for band, name in enumerate(("top", "bottom")):
        tr = by_band.get(band)
        if tr is None:
            slots.append(f"{name}: nothing.")
        else:
            event = _EVENTS[tr.motion][0].format(at=AT[tr.position], pos=tr.position)
            slots.append(f"{name}: {_noun(tr, True)} {event}.")
    return " ".join(slots)


# Motion words of the caption grammar, most specific first ("disappears" contains "appears").
_MOTION_CUES = (
    ("disappear", ("disappears", "vanishes")),
    ("appear", ("appears", "comes into view")),
    ("rightward", ("left to right", "to the right")),
    ("leftward", ("right to left", "to the left")),
    ("still", ("stays", "sits still", "does not move")),
)
ORDER_MOTIONS = ("rightward", "leftward", "appear", "disappear")  # captions that need frame order
_KIND = {
    "still": "still",
    "rightward": "moves",
    "leftward": "moves",
    "appear": "switch",
    "disappear": "switch",
}


def parse_clip_caption(text: str) -> list[tuple[str, str, str | None]]:
    """(colour, shape, motion or None) for each object a clip caption names, in order; the motion is
    read from the words after the object (None when the caption says nothing about it)."""
    colours, shapes = "|".join(COLOURS), "|".join(SHAPES)
    found = list(re.finditer(rf"\b({colours})\s+({shapes})s?\b", text.lower()))
    out = []
    for i, m in enumerate(found):
        end = found[i + 1].start() if i + 1 < len(found) else len(text)
        tail = text.lower()[m.end() : end]
        motion = next((mo for mo, cues in _MOTION_CUES if any(c in tail for c in cues)), None)
        out.append((m.group(1), m.group(2), motion))
    return out


def clip_match(text: str, clip: Clip) -> dict[str, Any]:
    """How a caption fits its clip. ``objects``: the named (colour, shape) multiset is exactly the clip's
    (order-free). Per track (``tracks``: motion, and whether the caption got its kind - still / moves /
    appears-or-disappears, order-free - and its exact motion: direction or appear vs disappear, which
    needs frame order, for the ORDER_MOTIONS)."""
    said = parse_clip_caption(text)
    truth = sorted((tr.colour, tr.shape) for tr in clip.tracks)
    tracks = []
    for tr in clip.tracks:
        motions = [mo for c, s, mo in said if (c, s) == (tr.colour, tr.shape)]
        motion = motions[0] if motions else None
        tracks.append(
            {
                "motion": tr.motion,
                "kind_correct": motion is not None and _KIND[motion] == _KIND[tr.motion],
                "correct": motion == tr.motion,
            }
        )
    return {"objects": sorted((c, s) for c, s, _ in said) == truth, "tracks": tracks}


def clip_to_dict(clip: Clip) -> dict[str, Any]:
    return {
        "frames": clip.frames,
        "tracks": [{f.name: getattr(tr, f.name) for f in fields(tr)} for tr in clip.tracks],
    }


def clip_from_dict(d: dict[str, Any]) -> Clip:
    return Clip(tuple(Track(**tr) for tr in d["tracks"]), d["frames"])


def import_av() -> Any:
    """PyAV, or an ImportError that says how to install it."""
    try:
        import av
    except ImportError as exc:
        raise ImportError('writing synthetic videos needs PyAV: pip install "evlgen[video]"') from exc
    return av


def write_mp4(path: str | Path, frames: list[Image.Image], fps: int = FPS) -> None:
    """Encode frames as an MPEG-4 Part 2 mp4 at a high bit rate (colours survive), single-threaded so the
    bytes are reproducible."""
    av = import_av()
    width, height = frames[0].size
    with av.open(str(path), "w", format="mp4") as container:
        stream_ = container.add_stream("mpeg4", rate=fps)
        stream_.width, stream_.height, stream_.pix_fmt = width, height, "yuv420p"
        stream_.bit_rate = 2_000_000
        stream_.codec_context.thread_count = 1
        for image in frames:
            container.mux(stream_.encode(av.VideoFrame.from_image(image)))
        container.mux(stream_.encode())


def write_videos(
    out: str | Path, split: str, n: int, seed: int, image_size: int = 64, *, listing: bool = True
) -> int:
    """Write ``n`` clips to ``out/videos/{split}/{i:06d}.mp4`` and their rows to ``out/{split}_video.jsonl``
    (``{"video", "captions", "clip", "id"}``); returns ``n``. Deterministic in ``(seed, split)``.
    ``listing=False``: event captions only (see :func:`clip_captions`)."""
    if image_size % 2:
        raise ValueError(f"video frames need an even size (yuv420p), got {image_size}")
    out = Path(out)
    (out / "videos" / split).mkdir(parents=True, exist_ok=True)
    clip_rng, caption_rng = stream(seed, split, "clips"), stream(seed, split, "clip-captions")
    rows = []
    for i in range(n):
        clip = sample_clip(clip_rng)
        video = f"videos/{split}/{i:06d}.mp4"
        write_mp4(out / video, render_clip(clip, image_size))
        rows.append(
            {
                "video": video,
                "captions": clip_captions(clip, caption_rng, listing=listing),
                "clip": clip_to_dict(clip),
                "id": f"{split}-video-{i:06d}",
            }
        )
    write_jsonl(out / f"{split}_video.jsonl", rows)
    return n
