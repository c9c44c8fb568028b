"""Small on-disk datasets for trainer tests: coloured images whose caption names the colour and side."""

import json
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}


def make_image(colour: str, side: str, size: int = 40) -> Image.Image:
    arr = np.full((size, size, 3), 128, dtype=np.uint8)
    half = size // 2
    cols = slice(0, half) if side == "left" else slice(half, size)
    arr[:, cols] = COLOURS[colour]
    return Image.fromarray(arr)


def caption_dataset(
    root: Path, n: int = 32, *, corrupt: int = 0, truncated: int = 0, missing: int = 0, empty: int = 0
) -> Path:
    """Write n rows (images + train.jsonl); the first rows can be made bad. Returns the JSONL path."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    names = sorted(COLOURS)
    rows = []
    for i in range(n):
        colour, side = names[i % len(names)], ("left", "right")[(i // len(names)) % 2]
        rel = f"images/{i:04d}.jpg"
        rows.append({"image": rel, "caption": f"a {colour} block on the {side}"})
        make_image(colour, side).save(root / rel, quality=95)
    bad = iter(range(n))
    for _ in range(corrupt):
        (root / rows[next(bad)]["image"]).write_bytes(b"this is not an image")
    for _ in range(truncated):
        path = root / rows[next(bad)]["image"]
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3])
    for _ in range(missing):
        (root / rows[next(bad)]["image"]).unlink()
    for _ in range(empty):
        rows[next(bad)]["caption"] = "   "
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
