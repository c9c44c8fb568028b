"""PNG figures for the demo report, drawn with PIL alone (no plotting dependency)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw


def loss_curve_png(metrics_jsonl: str | Path, out: str | Path, size: tuple[int, int] = (640, 360)) -> None:
    """Train loss (and validation loss points) against step, from a run's metrics.jsonl."""
    rows = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line.strip()]
    train = [
        (r["step"], r["loss"]) for r in rows if r.get("kind") == "train" and r.get("loss") == r.get("loss")
    ]
    val = [(r["step"], r["loss"]) for r in rows if r.get("kind") == "val"]
    w, h = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 56, w - 16, 24, h - 36
    points = train + val
    if not points:
        d.text((left, top), "no losses logged", fill="black")
        img.save(out)
        return
    x0, x1 = 0, max(s for s, _ in points)
    y0, y1 = min(v for _, v in points), max(v for _, v in points)
    y1 = y1 if y1 > y0 else y0 + 1.0

    def xy(step: float, value: float) -> tuple[float, float]:
        x = left + (right - left) * (step - x0) / max(x1 - x0, 1)
        y = bottom - (bottom - top) * (value - y0) / (y1 - y0)
        return x, y

    d.rectangle((left, top, right, bottom), outline="black")
    for i in range(5):
        value = y0 + (y1 - y0) * i / 4
        _, y = xy(0, value)
        d.line((left - 4, y, left, y), fill="black")
        d.text((4, y - 6), f"{value:.2f}", fill="black")
    d.text((left, bottom + 8), "step 0", fill="black")
    d.text((right - 60, bottom + 8), f"step {x1}", fill="black")
    if len(train) > 1:
        d.line([xy(s, v) for s, v in train], fill=(30, 90, 200), width=2)
    for s, v in val:
        x, y = xy(s, v)
        d.ellipse((x - 4, y - 4, x + 4, y + 4), fill=(220, 60, 30))
    d.text((left + 8, top + 4), "train loss (blue), validation loss (red)", fill="black")
    img.save(out)


def sample_grid_png(
    world_dir: str | Path,
    captions: list[dict[str, Any]],
    answers: list[dict[str, Any]],
    out: str | Path,
    columns: int = 4,
    cell: tuple[int, int] = (220, 200),
) -> None:
    """Test images with their generated captions, then images with a question and the model's answer."""
    items = [(c["image"], [c["caption"]], c.get("correct")) for c in captions[:8]]
    items += [
        (a["image"], [a["question"], "-> " + a["answer"]], a["answer"] == a["expected"]) for a in answers[:8]
    ]
    rows = (len(items) + columns - 1) // columns
    cw, ch = cell
    grid = Image.new("RGB", (columns * cw, max(rows, 1) * ch), "white")
    d = ImageDraw.Draw(grid)
    for i, (image, texts, ok) in enumerate(items):
        x, y = (i % columns) * cw, (i // columns) * ch
        with Image.open(Path(world_dir) / image) as im:
            grid.paste(
                im.convert("RGB").resize((96, 96), Image.Resampling.NEAREST), (x + (cw - 96) // 2, y + 6)
            )
        colour = (20, 120, 20) if ok else (180, 30, 30)
        lines = [line for t in texts for line in textwrap.wrap(t, 34)][:6]
        for j, line in enumerate(lines):
            d.text((x + 6, y + 108 + 14 * j), line, fill=colour)
    grid.save(out)
