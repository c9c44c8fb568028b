"""PNG figures for the demo report, drawn with PIL alone (no plotting dependency)."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

PALETTE = ((30, 90, 200), (220, 60, 30), (40, 150, 60), (150, 60, 180), (200, 150, 20), (20, 160, 170))


@dataclass(frozen=True)
class Series:
    """One line (or, with `dots`, a scatter) of a chart; `band` optionally gives (low, high) per point."""

    label: str
    points: list[tuple[float, float]]
    dots: bool = False
    band: list[tuple[float, float]] | None = None


def line_chart_png(
    series: list[Series],
    out: str | Path,
    *,
    title: str,
    xlabel: str,
    hlines: Sequence[tuple[str, float]] = (),
    size: tuple[int, int] = (640, 360),
) -> None:
    """A minimal line chart: the series in PALETTE colours, a legend in the title area, optional
    horizontal reference lines (dashed grey, labelled), a shaded band per series when given."""
    w, h = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 56, w - 16, 24 + 14 * ((len(series) + 2) // 3), h - 36
    ys = [v for s in series for _, v in s.points] + [v for s in series for b in s.band or [] for v in b]
    ys += [v for _, v in hlines]
    xs = [x for s in series for x, _ in s.points]
    if not xs:
        d.text((left, top), "nothing to plot", fill="black")
        img.save(out)
        return
    x0, x1 = min(0.0, min(xs)), max(xs)
    y0, y1 = min(ys), max(ys)
    y1 = y1 if y1 > y0 else y0 + 1.0

    def xy(x: float, value: float) -> tuple[float, float]:
        return (
            left + (right - left) * (x - x0) / max(x1 - x0, 1e-9),
            bottom - (bottom - top) * (value - y0) / (y1 - y0),
        )

    d.rectangle((left, top, right, bottom), outline="black")
    for i in range(5):
        value = y0 + (y1 - y0) * i / 4
        _, y = xy(x0, value)
        d.line((left - 4, y, left, y), fill="black")
        d.text((4, y - 6), f"{value:.2f}", fill="black")
    d.text((left, bottom + 8), f"{xlabel} {x0:g}", fill="black")
    d.text((right - 90, bottom + 8), f"{xlabel} {x1:g}", fill="black")
    for label, value in hlines:
        _, y = xy(x0, value)
        for x in range(left, right, 12):
            d.line((x, y, min(x + 6, right), y), fill=(140, 140, 140))
        d.text((left + 4, y - 12), label, fill=(110, 110, 110))
    for k, s in enumerate(series):
        colour = PALETTE[k % len(PALETTE)]
        if s.band:
            light = tuple(c + (255 - c) * 3 // 4 for c in colour)
            for (x, _), (lo, hi) in zip(s.points, s.band, strict=True):
                (px, plo), (_, phi) = xy(x, lo), xy(x, hi)
                d.line((px, plo, px, phi), fill=light, width=5)
        if s.dots or len(s.points) == 1:
            for x, v in s.points:
                px, py = xy(x, v)
                d.ellipse((px - 4, py - 4, px + 4, py + 4), fill=colour)
        else:
            d.line([xy(x, v) for x, v in s.points], fill=colour, width=2)
        d.text((8 + 210 * (k % 3), 4 + 14 * (k // 3)), f"- {s.label}", fill=colour)
    d.text(((w - 6 * len(title)) // 2, bottom + 8), title, fill="black")
    img.save(out)


def loss_curve_png(metrics_jsonl: str | Path, out: str | Path, size: tuple[int, int] = (640, 360)) -> None:
    """Train loss (and validation loss points) against step, from a run's metrics.jsonl."""
    rows = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line.strip()]
    train = [
        (r["step"], r["loss"]) for r in rows if r.get("kind") == "train" and r.get("loss") == r.get("loss")
    ]
    val = [(r["step"], r["loss"]) for r in rows if r.get("kind") == "val"]
    series = [Series("train loss", train), Series("validation loss", val, dots=True)]
    line_chart_png([s for s in series if s.points], out, title="loss", xlabel="step", size=size)


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
