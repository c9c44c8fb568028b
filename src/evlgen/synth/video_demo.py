"""`evlgen demo --video`: the video path on synthetic clips, order-blind and order-aware variants compared.

1. write clips of the synthetic world (objects that move left or right, appear, disappear or stay;
   event captions only: every caption says what each object does), cached;
2. get the video backbones: the image demo's recipe with clip descriptions and captions added to the
   LM's corpus (`Recipe.video_clips`), cached under their own key: the image demo's LM never saw
   "moves from left to right", and a frozen LM cannot say what it does not know;
3. for each variant and training seed, train EVLGen on the clips (4 frames, the `demo-video` preset)
   through `evlgen train`'s loop, from the videos themselves (temporal modules make the tower's output
   trainable, so there is no feature cache);
4. caption the unseen test clips and score: CIDEr, objects named (order-free), and per object what it
   does, split into the order-free part (still / moving / appearing-or-disappearing) and the part that
   needs frame order (left-to-right vs right-to-left, appears vs disappears).

Evaluation frames are mirror-symmetric (data/video.py), so a clip played backwards gives exactly the
reversed frames: an order-blind model (frame mean, the paper's module) must be at chance, 0.5, on the
order-dependent part.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from evlgen.config import Config, DatasetConfig
from evlgen.synth import video
from evlgen.synth.backbones import Recipe, ensure_backbones
from evlgen.synth.demo import DEMO_METRICS, EVAL_BATCH, _bar, _rows, demo_config

log = logging.getLogger(__name__)

# Each variant is overrides of the demo-video preset (which is the paper's module).
VARIANTS: dict[str, list[str]] = {
    "frame-mean": ["video.temporal=none"],
    "paper": ["video.temporal=paper"],
    "time-embed": ["video.temporal=time-embed"],
    "concat": ["video.temporal=none", "video.frames_to_connector=concat"],
    "time-embed+concat": ["video.temporal=time-embed", "video.frames_to_connector=concat"],
}
SIZES = {"train": 2000, "val": 64, "test": 300}
CLIP_WORLD_VERSION = 1


def video_recipe(seed: int = 0) -> Recipe:
    """The image demo's backbones recipe plus clips in the LM corpus (and steps to learn them)."""
    return Recipe(seed=seed, video_clips=3000, lm_steps=900)


def write_clip_world(out: Path, seed: int = 0, sizes: dict[str, int] | None = None) -> Path:
    """`{split}_video.jsonl` + mp4s for train / val / test (event captions only); kept when it exists."""
    sizes = SIZES | dict(sizes or {})
    params = {"version": CLIP_WORLD_VERSION, "seed": seed, "sizes": sizes}
    marker = out / "clips.json"
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return out
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for split, n in sizes.items():
        video.write_videos(tmp, split, n, seed, listing=False)
    (tmp / "clips.json").write_text(json.dumps(params))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def variant_config(backbones: Path, world_dir: Path, variant: str, seed: int, overrides: list[str]) -> Config:
    if variant not in VARIANTS:
        raise ValueError(f"unknown video variant {variant!r}; expected one of {list(VARIANTS)}")
    return demo_config(
        backbones,
        [
            f"seed={seed}",
            f"data.train=[{{path: {world_dir / 'train_video.jsonl'}}}]",
            f"data.val={{path: {world_dir / 'val_video.jsonl'}}}",
            *VARIANTS[variant],
            *overrides,
        ],
        preset="demo-video",
    )


def evaluate_clips(vlm: Any, cfg: Config, world_dir: Path, split: str = "test") -> dict[str, Any]:
    """Captions of a split's clips through `evlgen eval`'s own predict / score, parsed with the grammar."""
    from evlgen.eval.run import predict, score

    data = DatasetConfig(path=str(world_dir / f"{split}_video.jsonl"))
    e = dataclasses.replace(
        cfg.eval, task="video-caption", data=data, batch_size=EVAL_BATCH, metrics=DEMO_METRICS
    )
    cfg = dataclasses.replace(cfg, eval=e)
    pred = predict(vlm, cfg)
    if pred.num_bad:
        raise RuntimeError(f"{pred.num_bad} unreadable clips in the generated {split} split: {pred.bad[:3]}")
    scores = score(pred, cfg)
    clips = {r["id"]: video.clip_from_dict(r["clip"]) for r in _rows(world_dir / f"{split}_video.jsonl")}
    matches = {k: video.clip_match(text, clips[k]) for k, text in pred.texts.items()}
    tracks = [t for m in matches.values() for t in m["tracks"]]
    ordered = [t for t in tracks if t["motion"] in video.ORDER_MOTIONS]
    still = [t for t in tracks if t["motion"] == "still"]

    def frac(items: list[dict[str, Any]], key: str) -> float:
        return sum(t[key] for t in items) / max(1, len(items))

    return {
        "clips": len(matches),
        "cider": scores["scores"].get("cider"),
        "bleu4": scores["scores"].get("bleu4"),
        "objects": sum(m["objects"] for m in matches.values()) / len(matches),
        # Order-free: what kind of thing happens (still / moves / appears-or-disappears).
        "motion_kind": frac(ordered, "kind_correct"),
        # Needs frame order: which way it moves, whether it appears or disappears.
        "order": frac(ordered, "correct"),
        "order_given_kind": frac(ordered, "correct") / max(1e-9, frac(ordered, "kind_correct")),
        "still": frac(still, "correct"),
        "order_tracks": len(ordered),
        "still_tracks": len(still),
        "examples": [
            {"clip": k, "caption": pred.texts[k], "reference": list(pred.records[k].captions)[0]}
            for k in list(pred.texts)[:6]
        ],
    }


def run_video_demo(
    out: str | Path,
    *,
    variants: list[str],
    seeds: list[int],
    overrides: list[str] | tuple[str, ...] = (),
    world_seed: int = 0,
    sizes: dict[str, int] | None = None,
    cache_dir: str | None = None,
) -> dict[str, Any]:
    """Train and score every (variant, seed); writes `results.json` and `report.md` to `out`."""
    from evlgen.model.vlm import VLM
    from evlgen.train.loop import train

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"unknown video variant {v!r}; expected one of {list(VARIANTS)}")
    print("1/3 synthetic clips", file=sys.stderr)
    world_dir = write_clip_world(out / "clips", world_seed, sizes)
    print("2/3 video backbones (trained once, then cached)", file=sys.stderr)
    backbones = ensure_backbones(video_recipe(world_seed), cache_dir, progress=_bar)
    results_file = out / "results.json"
    print("3/3 training and scoring the variants", file=sys.stderr)
    for seed in seeds:
        for variant in variants:
            name = f"{variant}/seed{seed}"
            cfg = variant_config(backbones, world_dir, variant, seed, list(overrides))
            run_dir = out / variant / f"seed{seed}"
            shutil.rmtree(run_dir, ignore_errors=True)
            t0 = time.perf_counter()
            summary = train(cfg, run_dir, cache_dir=cache_dir)
            seconds = time.perf_counter() - t0
            vlm = VLM.from_pretrained(run_dir / "model").eval()
            metrics = evaluate_clips(vlm, cfg, world_dir)
            metrics |= {
                "train_seconds": round(seconds, 1),
                "steps": summary["steps"],
                "val_loss": summary["val_loss"],
            }
            log.info("%s: %s", name, {k: v for k, v in metrics.items() if k != "examples"})
            # Read again just before writing: other processes may fill other variants of the same `out`.
            results = json.loads(results_file.read_text()) if results_file.is_file() else {}
            results[name] = metrics
            tmp = results_file.with_name(f".results.{os.getpid()}.json")
            tmp.write_text(json.dumps(results, indent=2))
            tmp.replace(results_file)
            (out / "report.md").write_text(render_table(results))
    return json.loads(results_file.read_text())


_COLUMNS = (
    ("CIDEr", "cider"),
    ("objects (order-free)", "objects"),
    ("still objects (order-free)", "still"),
    ("motion kind (order-free)", "motion_kind"),
    ("direction / appear vs disappear (needs order)", "order"),
    ("... given the kind right", "order_given_kind"),
)


def render_table(results: dict[str, Any]) -> str:
    """Mean (min-max over seeds) of each metric per variant, as a markdown table."""
    by_variant: dict[str, list[dict[str, Any]]] = {}
    for name, m in results.items():
        by_variant.setdefault(name.split("/")[0], []).append(m)
    lines = [
        "| variant | seeds | " + " | ".join(c for c, _ in _COLUMNS) + " | train s |",
        "| --- | --- | " + " | ".join("---" for _ in _COLUMNS) + " | --- |",
    ]
    for variant in VARIANTS:
        runs = by_variant.get(variant)
        if not runs:
            continue
        cells = []
        for _, key in _COLUMNS:
            vals = [r[key] for r in runs]
            mean = sum(vals) / len(vals)
            cells.append(f"{mean:.3f}" + (f" ({min(vals):.2f}-{max(vals):.2f})" if len(vals) > 1 else ""))
        secs = sum(r["train_seconds"] for r in runs) / len(runs)
        lines.append(f"| {variant} | {len(runs)} | " + " | ".join(cells) + f" | {secs:.0f} |")
    return "\n".join(lines) + "\n"
