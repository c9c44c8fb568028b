"""The synthetic world: seeded scenes of bold shapes, their images, captions, questions and dataset files.

A scene holds 1-3 objects (shape, colour, size), each alone in its column (left / middle / right) on a
dark grey background, so every attribute is visible at 64 px and every position is unambiguous. All
functions are pure given the ``random.Random`` passed in, so a seed fixes the world. Captions come from
a small grammar with paraphrases (size words have synonyms; shape and colour words are canonical) and
parse back with :func:`parse_caption`, which is how generated captions are scored
(:func:`attribute_match`). :func:`write_world` writes the splits in the formats ``evlgen.data`` reads.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
import re
import shutil
import struct
import tarfile
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = ("red", "green", "blue", "yellow", "purple", "white")
SIZES = ("small", "large")
POSITIONS = ("left", "middle", "right")
# (colour, shape) pairs seen only in the "comp" split: each word occurs in training, the pairing never.
COMPOSITIONAL_HOLDOUT: frozenset[tuple[str, str]] = frozenset(
    {("red", "triangle"), ("blue", "circle"), ("yellow", "star"), ("green", "square")}
)
RGB = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (40, 90, 255),
    "yellow": (245, 220, 30),
    "purple": (170, 60, 220),
    "white": (245, 245, 245),
}
BACKGROUND = (48, 48, 48)
NUMBERS = ("zero", "one", "two", "three")
DEFAULT_SIZES = {"train": 4000, "val": 200, "test": 500, "comp": 300}
FORMAT_VERSION = 1
SHARD_SIZE = 1000

PAIRS = tuple((c, s) for c in COLOURS for s in SHAPES)
_REPEAT = 0.35  # chance that an object copies an earlier object's colour and shape, so counts above one occur
# Geometry in fractions of the image side. _EXTENT bounds every shape's half-width and half-height in radii.
RADIUS = {"small": 5 / 64, "large": 7.5 / 64}
_EXTENT = 1.25
_SUPERSAMPLE = 3  # shapes are drawn 3x larger and box-filtered down: anti-aliased edges, still deterministic
AT = {"left": "on the left", "middle": "in the middle", "right": "on the right"}


@dataclass(frozen=True)
class Obj:
    """One object. ``dx`` / ``dy``: offset of its centre from its column centre / the image centre, as a
    fraction of the image side (rendering jitter; captions never mention it)."""

    shape: str
    colour: str
    size: str
    position: str
    dx: float = 0.0
    dy: float = 0.0

    def __post_init__(self) -> None:
        for value, allowed in ((self.shape, SHAPES), (self.colour, COLOURS), (self.size, SIZES)):
            if value not in allowed:
                raise ValueError(f"{value!r} is not one of {allowed}")
        if self.position not in POSITIONS:
            raise ValueError(f"{self.position!r} is not one of {POSITIONS}")


@dataclass(frozen=True)
class Scene:
    """1-3 objects sorted left to right, at most one per column."""

    objects: tuple[Obj, ...]

    def __post_init__(self) -> None:
        columns = [POSITIONS.index(o.position) for o in self.objects]
        if not 1 <= len(columns) <= 3 or columns != sorted(set(columns)):
            raise ValueError(
                f"a scene needs 1-3 objects in distinct columns, sorted left to right: {columns}"
            )

    def describe(self) -> str:
        """Canonical text, e.g. ``"a large red circle on the left. a small blue star in the middle."``"""
        return " ".join(f"a {o.size} {o.colour} {o.shape} {AT[o.position]}." for o in self.objects)

    def slots(self, rng: random.Random | None = None) -> str:
        """One slot per column, empty ones included, e.g.
        ``"left: a large red circle. middle: a small blue star. right: nothing."``; with `rng`, the
        slots in a random order (each still named by its column)."""
        by = {o.position: o for o in self.objects}
        parts = [
            f"{p}: a {by[p].size} {by[p].colour} {by[p].shape}." if p in by else f"{p}: nothing."
            for p in POSITIONS
        ]
        if rng is not None:
            rng.shuffle(parts)
        return " ".join(parts)


def _jitter(size: str) -> tuple[float, float]:
    """Largest |dx| and |dy| that keep an object inside its column and away from the image border."""
    extent = RADIUS[size] * _EXTENT
    return min(3 / 64, max(0.0, 1 / 6 - extent - 1 / 64)), 0.6 * (0.5 - extent - 4 / 64)


def sample_scene(
    rng: random.Random,
    *,
    holdout: frozenset[tuple[str, str]] = COMPOSITIONAL_HOLDOUT,
    compositional: bool = False,
) -> Scene:
    """A random scene. ``compositional=False``: no object is a held-out (colour, shape) pair; ``True``: at
    least one is (the others are unrestricted)."""
    if compositional and not holdout:
        raise ValueError("compositional scenes need a non-empty holdout")
    held = sorted(holdout)  # sorted: set order depends on the process's string hash seed
    allowed = PAIRS if compositional else tuple(p for p in PAIRS if p not in holdout)
    n = rng.randint(1, 3)
    columns = sorted(rng.sample(range(3), n))
    forced = rng.randrange(n) if compositional else -1
    objects: list[Obj] = []
    for i, column in enumerate(columns):
        if i == forced:
            colour, shape = rng.choice(held)
        elif objects and rng.random() < _REPEAT:
            twin = rng.choice(objects)
            colour, shape = twin.colour, twin.shape
        else:
            colour, shape = rng.choice(allowed)
        size = rng.choice(SIZES)
        max_dx, max_dy = _jitter(size)
        dx, dy = round(rng.uniform(-max_dx, max_dx), 4), round(rng.uniform(-max_dy, max_dy), 4)
        objects.append(Obj(shape, colour, size, POSITIONS[column], dx, dy))
    return Scene(tuple(objects))


def draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, colour: str, cx: float, cy: float, radius: float
) -> None:
    """Draw a filled shape centred at (cx, cy); ``radius`` sets the scale (areas are roughly comparable)."""
    fill = RGB[colour]
    if shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
    elif shape == "square":
        h = 0.88 * radius
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "triangle":
        # Apex up; shifted down by a quarter of the circumradius so the box, not the centroid, is centred.
        r = 1.35 * radius
        draw.polygon(
            [(cx, cy - 0.75 * r), (cx + 0.866 * r, cy + 0.75 * r), (cx - 0.866 * r, cy + 0.75 * r)], fill=fill
        )
    elif shape == "star":
        outer, inner = _EXTENT * radius, 0.45 * _EXTENT * radius
        points = []
        for k in range(10):
            angle, r = -90 + 36 * k, outer if k % 2 == 0 else inner
            points.append((cx + r * math.cos(math.radians(angle)), cy + r * math.sin(math.radians(angle))))
        draw.polygon(points, fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def centre(o: Obj) -> tuple[float, float]:
    """(x, y) of an object's centre as fractions of the image side."""
    return (2 * POSITIONS.index(o.position) + 1) / 6 + o.dx, 0.5 + o.dy


def half_extent(o: Obj) -> float:
    """Half the side of a square around :func:`centre` that holds the whole shape (image fractions)."""
    return RADIUS[o.size] * _EXTENT


def render(scene: Scene, size: int = 64) -> Image.Image:
    """The scene as an RGB image of ``size`` x ``size`` pixels (a pure function of the scene)."""
    big = size * _SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for o in scene.objects:
        cx, cy = centre(o)
        draw_shape(draw, o.shape, o.colour, cx * big, cy * big, RADIUS[o.size] * big)
    return canvas.resize((size, size), Image.Resampling.BOX)


# ---------------------------------------------------------------------------------------------
# Captions: a small grammar with paraphrases. Every phrase names colour and shape; counts are exact.

_SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
_PLACES = {
    "left": ("on the left", "on the left side"),
    "middle": ("in the middle", "in the centre"),
    "right": ("on the right", "on the right side"),
}


def _size_word(size: str, mode: str, rng: random.Random) -> str | None:
    """``mode``: "canonical" (small / large), "synonym" (either word of the pair) or "none" (omitted)."""
    if mode == "none":
        return None
    return size if mode == "canonical" else rng.choice(_SIZE_WORDS[size])


def _phrase(count: int, colour: str, shape: str, size_word: str | None, rng: random.Random) -> str:
    if count == 1:
        head = "a"
    else:
        head = "a pair of" if count == 2 and rng.random() < 0.3 else NUMBERS[count]
    noun = f"{colour} {shape}" + ("s" if count > 1 else "")
    return " ".join(w for w in (head, size_word, noun) if w)


def _join(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"


def _nps(scene: Scene, rng: random.Random, mode: str) -> list[str]:
    return [_phrase(1, o.colour, o.shape, _size_word(o.size, mode, rng), rng) for o in scene.objects]


def _positional(scene: Scene, rng: random.Random, mode: str) -> str:
    # "a large red circle on the left and a small blue star in the middle"
    nps = _nps(scene, rng, mode)
    parts = [f"{np} {rng.choice(_PLACES[o.position])}" for np, o in zip(nps, scene.objects, strict=True)]
    return rng.choice(("", "", "there is ", "an image of ", "a picture of ")) + _join(parts)


def _ordered(scene: Scene, rng: random.Random, mode: str) -> str:
    # "a red circle and a blue star from left to right" (or the reverse order, said so)
    nps = _nps(scene, rng, mode)
    order = "from left to right"
    if rng.random() < 0.5:
        nps, order = nps[::-1], "from right to left"
    return f"{_join(nps)} {order}" if rng.random() < 0.5 else f"{order}: {_join(nps)}"


def _relational(scene: Scene, rng: random.Random, mode: str) -> str:
    # "there is a big red circle to the left of a small blue star"; three objects: "b between a and c"
    nps = _nps(scene, rng, mode)
    if len(nps) == 3:
        text = f"{nps[1]} between {nps[0]} and {nps[2]}"
    elif rng.random() < 0.5:
        text = f"{nps[0]} to the left of {nps[1]}"
    else:
        text = f"{nps[1]} to the right of {nps[0]}"
    return rng.choice(("", "there is ")) + text


def _groups(scene: Scene) -> list[list[Obj]]:
    """Objects grouped by (colour, shape), groups in left-to-right order of their first member."""
    groups: dict[tuple[str, str], list[Obj]] = {}
    for o in scene.objects:
        groups.setdefault((o.colour, o.shape), []).append(o)
    return list(groups.values())


def _group_text(scene: Scene, rng: random.Random, mode: str) -> str:
    # "two red circles and a blue star"; a group's size is named only when all its members share it
    parts = []
    for group in _groups(scene):
        word = _size_word(group[0].size, mode, rng) if len({o.size for o in group}) == 1 else None
        parts.append(_phrase(len(group), group[0].colour, group[0].shape, word, rng))
    return _join(parts)


def _grouped(scene: Scene, rng: random.Random, mode: str) -> str:
    prefix = rng.choice(("", "there are " if len(_groups(scene)[0]) > 1 else "there is "))
    return prefix + _group_text(scene, rng, mode)


def _listed(scene: Scene, rng: random.Random, mode: str) -> str:
    # "a red circle, a blue star"
    return ", ".join(_nps(scene, rng, mode))


def _counted(scene: Scene, rng: random.Random, mode: str) -> str:
    # "three objects: two red circles and a blue star" / "a single big red circle"
    if len(scene.objects) == 1:
        o = scene.objects[0]
        words = (rng.choice(("a single", "only one")), _size_word(o.size, mode, rng), o.colour, o.shape)
        return " ".join(w for w in words if w)
    noun = rng.choice(("objects", "shapes"))
    return f"{NUMBERS[len(scene.objects)]} {noun}: {_group_text(scene, rng, mode)}"


_STYLES: tuple[Callable[[Scene, random.Random, str], str], ...] = (_positional, _grouped, _listed, _counted)
_MULTI_STYLES = (_ordered, _relational)


def captions(scene: Scene, rng: random.Random, n: int = 5) -> list[str]:
    """``n`` distinct reference captions, lower case, no final period. The first is always the canonical
    one (``describe()`` as a single phrase); the others are drawn from the grammar's paraphrases."""
    out = [_join([f"a {o.size} {o.colour} {o.shape} {AT[o.position]}" for o in scene.objects])][:n]
    styles = _STYLES + (_MULTI_STYLES if len(scene.objects) > 1 else ())
    for _ in range(50 * n):
        if len(out) >= n:
            break
        text = rng.choice(styles)(scene, rng, rng.choice(("canonical", "synonym", "none")))
        if text not in out:
            out.append(text)
    return out


# ---------------------------------------------------------------------------------------------
# Parsing captions back, and scoring them against a scene

_COUNT_WORDS = {"a": 1, "an": 1, "one": 1, "single": 1, "the": 1, "two": 2, "pair": 2, "three": 3}
_SIZE_OF = {w: size for size, words in _SIZE_WORDS.items() for w in words}
_SHAPE_OF = {s: s for s in SHAPES} | {f"{s}s": s for s in SHAPES}
_GENERIC = {"object", "objects", "shape", "shapes", "thing", "things"}

Mention = tuple[int, str | None, str | None, str | None]


def parse_caption(text: str) -> list[Mention]:
    """``(count, size, colour, shape)`` for each object mention, in order.

    A mention is a run of count / size / colour words closed by a shape word (``"two red circles"`` ->
    ``(2, None, "red", "circle")``). Unknown words are skipped. A colour or size left without a shape (at a
    new count word, a generic noun such as "object", or the end) becomes a mention with ``shape=None``.
    Without a count word the count is 1, or 2 for a plural noun. "a pair of" counts 2.
    """
    mentions: list[Mention] = []
    count: int | None = None
    size: str | None = None
    colour: str | None = None

    def close(shape: str | None, plural: bool) -> None:
        nonlocal count, size, colour
        if shape is not None or size is not None or colour is not None:
            mentions.append((count if count is not None else 2 if plural else 1, size, colour, shape))
        count = size = colour = None

    for word in re.findall(r"[a-z]+", text.lower()):
        if word in _COUNT_WORDS:
            if size is not None or colour is not None:
                close(None, False)
            # "a pair" and "a single": the second word refines the article, "one of the" never happens.
            count = _COUNT_WORDS[word]
        elif word in _SIZE_OF:
            size = _SIZE_OF[word]
        elif word in COLOURS:
            colour = word
        elif word in _SHAPE_OF:
            close(_SHAPE_OF[word], word.endswith("s"))
        elif word in _GENERIC:
            close(None, word.endswith("s"))
    close(None, False)
    return mentions


def attribute_match(text: str, scene: Scene) -> dict[str, bool]:
    """Does a caption name the scene's objects? Each parsed mention stands for ``count`` objects; then

    * ``colour``: every mention names a colour and the multiset of colours equals the scene's;
    * ``shape``: every mention names a shape and the multiset of shapes equals the scene's;
    * ``count``: the mention counts add up to the number of objects;
    * ``all``: colour and shape and count;
    * ``pairs`` (stricter, not part of ``all``): the multiset of (colour, shape) equals the scene's.

    Sizes and positions are not checked: many correct captions leave them out.
    """
    mentions = parse_caption(text)
    named = [m for m in mentions for _ in range(m[0])]
    colour = Counter(m[2] for m in named) == Counter(o.colour for o in scene.objects)
    shape = Counter(m[3] for m in named) == Counter(o.shape for o in scene.objects)
    count = len(named) == len(scene.objects)
    pairs = Counter((m[2], m[3]) for m in named) == Counter((o.colour, o.shape) for o in scene.objects)
    return {
        "colour": colour,
        "shape": shape,
        "count": count,
        "all": colour and shape and count,
        "pairs": pairs,
    }


# ---------------------------------------------------------------------------------------------
# Questions with one-word answers; only questions whose answer is unique are asked


def _options(
    kind: str, objs: Sequence[Obj], counts: tuple[Counter, Counter, Counter], rng: random.Random
) -> list[tuple[str, str]]:
    # An object can be named by an attribute (or pair) only when no other object shares it.
    pairs, shapes, colours = counts
    if kind == "colour":
        return [(f"what colour is the object {AT[o.position]}?", o.colour) for o in objs] + [
            (f"what colour is the {o.shape}?", o.colour) for o in objs if shapes[o.shape] == 1
        ]
    if kind == "shape":
        return [(f"what shape is the object {AT[o.position]}?", o.shape) for o in objs] + [
            (f"what shape is the {o.colour} object?", o.shape) for o in objs if colours[o.colour] == 1
        ]
    if kind == "count":
        return (
            [("how many objects are there?", NUMBERS[len(objs)])]
            + [(f"how many {s}s are there?", NUMBERS[k]) for s, k in shapes.items()]
            + [(f"how many {c} objects are there?", NUMBERS[k]) for c, k in colours.items()]
        )
    if kind == "position":
        return (
            [
                (f"where is the {o.colour} {o.shape}?", o.position)
                for o in objs
                if pairs[o.colour, o.shape] == 1
            ]
            + [(f"where is the {o.shape}?", o.position) for o in objs if shapes[o.shape] == 1]
            + [(f"where is the {o.colour} object?", o.position) for o in objs if colours[o.colour] == 1]
        )
    # yes/no, balanced: the answer is drawn first, then a question that has it.
    if rng.random() < 0.5:
        o = rng.choice(objs)
        return [(rng.choice((f"is there a {o.colour} {o.shape}?", f"is there a {o.shape}?")), "yes")]
    form = rng.choice(("pair", "shape", "colour"))
    if form == "pair":
        # Held-out pairs are never named outside the compositional split, not even in negative questions.
        absent = [p for p in PAIRS if p not in pairs and p not in COMPOSITIONAL_HOLDOUT]
        return [(f"is there a {c} {s}?", "no") for c, s in absent]
    if form == "shape":
        return [(f"is there a {s}?", "no") for s in SHAPES if s not in shapes]
    return [(f"is there a {c} object?", "no") for c in COLOURS if c not in colours]


_KINDS = ("colour", "shape", "count", "position", "yesno")


def questions(scene: Scene, rng: random.Random, n: int = 4) -> list[tuple[str, str]]:
    """Up to ``n`` distinct (question, one-word answer) pairs of different kinds where possible: colour,
    shape, count, position and yes/no (half "yes"). Numbers are spelled out ("two")."""
    objs = scene.objects
    counts = (
        Counter((o.colour, o.shape) for o in objs),
        Counter(o.shape for o in objs),
        Counter(o.colour for o in objs),
    )
    kinds = list(_KINDS)
    rng.shuffle(kinds)
    out: list[tuple[str, str]] = []
    for attempt in range(20 * n):
        if len(out) >= n:
            break
        options = _options(kinds[attempt % len(kinds)], objs, counts, rng)
        if options:
            qa = rng.choice(options)
            if qa[0] not in {q for q, _ in out}:
                out.append(qa)
    return out


def lm_corpus(rng: random.Random, n: int) -> list[str]:
    """Text to pretrain the tiny LM, one line per fresh train-distribution scene: its description, then a
    caption (``"... caption: ..."``) or a question and answer (``"... Question: q Short answer: a"``), so
    that what follows depends on the context, as with a real LLM."""
    lines = []
    for _ in range(n):
        scene = sample_scene(rng)
        if rng.random() < 0.5:
            lines.append(f"{scene.describe()} caption: {rng.choice(captions(scene, rng))}")
        else:
            q, a = rng.choice(questions(scene, rng))
            lines.append(f"{scene.describe()} Question: {q} Short answer: {a}")
    return lines


def scene_to_dict(scene: Scene) -> dict[str, Any]:
    """JSON-ready form of a scene (stored as ``"scene"`` in every row); inverse of :func:`scene_from_dict`."""
    keys = ("shape", "colour", "size", "position", "dx", "dy")
    return {"objects": [{k: getattr(o, k) for k in keys} for o in scene.objects]}


def scene_from_dict(d: dict[str, Any]) -> Scene:
    """The scene stored by :func:`scene_to_dict` (attribute values are validated)."""
    return Scene(tuple(Obj(**o) for o in d["objects"]))


# ---------------------------------------------------------------------------------------------
# Writing the dataset


def stream(seed: int, *names: object) -> random.Random:
    """An independent generator for ``(seed, *names)``: splits never share random numbers."""
    digest = hashlib.sha256("/".join(map(str, (seed, *names))).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def png_bytes(image: Image.Image) -> bytes:
    """Encode an RGB image as PNG: no row filter, zlib level 6. Hand-rolled because PIL's encoder costs
    twice as much on tiny images; the bytes depend only on the pixels (and the zlib version)."""
    width, height = image.size
    data, stride = image.convert("RGB").tobytes(), 3 * width
    raw = b"".join(b"\0" + data[y * stride : (y + 1) * stride] for y in range(height))

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """One JSON object per line, keys in insertion order (so the bytes are reproducible)."""
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _save_png(scene: Scene, image_size: int, path: Path) -> bytes:
    png = png_bytes(render(scene, image_size))
    path.write_bytes(png)
    return png


def _write_shards(root: Path, split: str, pngs: Sequence[bytes], rows: Sequence[dict[str, Any]]) -> None:
    """img2dataset layout: ``{i:06d}.png`` + ``.txt`` (first caption) + ``.json`` (the other captions: the
    shard reader joins the .txt and .json captions, so each caption is read once), no clock or owner."""
    (root / "shards").mkdir()
    for start in range(0, len(rows), SHARD_SIZE):
        path = root / "shards" / f"{split}-{start // SHARD_SIZE:05d}.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(start, min(start + SHARD_SIZE, len(rows))):
                row = rows[i]
                meta = {"captions": row["captions"][1:], "scene": row["scene"], "id": row["id"]}
                for suffix, data in (
                    ("png", pngs[i]),
                    ("txt", row["captions"][0].encode()),
                    ("json", json.dumps(meta).encode()),
                ):
                    info = tarfile.TarInfo(f"{i:06d}.{suffix}")
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    tar.addfile(info, io.BytesIO(data))


def _write_split(root: Path, split: str, n: int, seed: int, image_size: int, shards: bool) -> dict[str, int]:
    rngs = [stream(seed, split, part) for part in ("scenes", "captions", "qa")]
    (root / "images" / split).mkdir(parents=True)
    rows, qa_rows, pending = [], [], []
    # PIL releases the GIL while resizing and encoding, so threads render while this one writes text.
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        for i in range(n):
            scene = sample_scene(rngs[0], compositional=split == "comp")
            image, key, data = f"images/{split}/{i:06d}.png", f"{split}-{i:06d}", scene_to_dict(scene)
            pending.append(pool.submit(_save_png, scene, image_size, root / image))
            rows.append({"image": image, "captions": captions(scene, rngs[1]), "scene": data, "id": key})
            for j, (q, a) in enumerate(questions(scene, rngs[2])):
                qa_rows.append(
                    {"image": image, "question": q, "answers": [a], "scene": data, "id": f"{key}-q{j}"}
                )
        pngs = [f.result() for f in pending]
    if shards:
        _write_shards(root, split, pngs, rows)
    write_jsonl(root / f"{split}.jsonl", rows)
    write_jsonl(root / f"{split}_vqa.jsonl", qa_rows)
    return {"images": n, "captions": sum(len(r["captions"]) for r in rows), "questions": len(qa_rows)}


def write_world(
    out: str | Path,
    *,
    seed: int = 0,
    sizes: dict[str, int] | None = None,
    image_size: int = 64,
    videos: int = 0,
    shards: bool = False,
) -> dict[str, Any]:
    """Generate the world's splits into ``out`` (idempotent: a folder already holding the same world is kept).

    ``sizes`` (images per split) is merged over :data:`DEFAULT_SIZES`; the splits are train, val, test
    (unseen scenes: each split has its own random stream derived from ``(seed, split)``) and comp (every
    scene holds a :data:`COMPOSITIONAL_HOLDOUT` pair, which no other split contains). Writes
    ``images/{split}/{i:06d}.png``, ``{split}.jsonl`` (caption rows), ``{split}_vqa.jsonl`` (one row per
    question), ``world.json`` (parameters and counts), with ``shards`` img2dataset-layout tars of the train
    split (``shards/train-{k:05d}.tar``), and with ``videos=N`` clips (``N`` for train, ``N // 4`` but at
    least one for val and test; see :func:`evlgen.synth.video.write_videos`).

    The same arguments give byte-identical files. Files are written into a temporary sibling folder that is
    renamed into place, so ``out`` is never half-written. Returns ``{"out", "cached", "counts", "seconds"}``.
    """
    start = time.perf_counter()
    out = Path(out)
    merged = DEFAULT_SIZES | dict(sizes or {})
    unknown = set(merged) - set(DEFAULT_SIZES)
    if unknown or any(type(v) is not int or v < 0 for v in merged.values()):
        raise ValueError(f"sizes must map {sorted(DEFAULT_SIZES)} to counts >= 0, got {sizes}")
    if videos < 0 or image_size < 8 or (videos and image_size % 2):
        raise ValueError(
            f"need videos >= 0 and image_size >= 8 (even with videos), got {videos}, {image_size}"
        )
    if videos:
        from evlgen.synth.video import import_av, write_videos

        import_av()  # fail before writing thousands of images, not after
    params = {
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "sizes": merged,
        "image_size": image_size,
        "videos": videos,
        "shards": shards,
        "holdout": [list(p) for p in sorted(COMPOSITIONAL_HOLDOUT)],
    }
    cached = _cached(out, params)
    if cached is not None:
        return {"out": str(out), "cached": True, "counts": cached, "seconds": time.perf_counter() - start}
    if out.exists() and not (out / "world.json").is_file() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(
            f"{out} exists and is not a synthetic world (no world.json); pick another folder"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the world is ordinary data
        counts = {
            s: _write_split(tmp, s, n, seed, image_size, shards and s == "train") for s, n in merged.items()
        }
        if videos:
            for split, n in (("train", videos), ("val", max(1, videos // 4)), ("test", max(1, videos // 4))):
                counts[split]["videos"] = write_videos(tmp, split, n, seed, image_size)
        (tmp / "world.json").write_text(json.dumps(params | {"counts": counts}, indent=2) + "\n")
        if _cached(out, params) is not None:
            # Another process wrote the same world meanwhile; theirs is as good as ours.
            shutil.rmtree(tmp)
            return {"out": str(out), "cached": True, "counts": counts, "seconds": time.perf_counter() - start}
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return {"out": str(out), "cached": False, "counts": counts, "seconds": time.perf_counter() - start}


def _cached(out: Path, params: dict[str, Any]) -> dict[str, Any] | None:
    """The counts recorded in ``out/world.json`` when it was written with ``params``, else None."""
    try:
        existing = json.loads((out / "world.json").read_text())
    except (OSError, ValueError):
        return None
    same = isinstance(existing, dict) and all(existing.get(k) == v for k, v in params.items())
    return existing.get("counts") if same else None
