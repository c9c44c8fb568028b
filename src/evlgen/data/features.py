"""Frozen-feature cache: run the frozen vision tower over a dataset once, then train from its outputs.

The tower never changes during EVLGen training, so its output for an un-augmented image (or for K
fixed augmented views) can be computed once. `evlgen cache-features` writes

    DIR/index.json                    format, tower identity + weight digest, shapes, shard list
    DIR/features-00000.safetensors    "features": [rows, K, N, D] (float16 by default)
    DIR/meta-00000.jsonl              one row per sample: key, location, captions / question, answers

and `FeatureSource` reads it as a map-style dataset (safetensors slices are memory-mapped, so nothing
is loaded whole). Training checks that the cache was made by the very tower it would run (same
config and same weights digest) before using it: stale features would silently train a different
model.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from evlgen.config import Config, ConfigError, DatasetConfig
from evlgen.data.sources import JsonlSource, iter_records, open_source
from evlgen.fsutil import fsync_tree

log = logging.getLogger(__name__)

FORMAT = "evlgen-features"
VERSION = 1
INDEX = "index.json"


@dataclass(frozen=True)
class FeatureRecord:
    """One cached sample: tower outputs for K views plus its text."""

    location: str
    key: str
    features: Tensor  # [K, N, D]
    captions: tuple[str, ...] = ()
    question: str | None = None
    answers: tuple[str, ...] = ()


def tower_identity(cfg: Config) -> dict[str, Any]:
    """Everything that decides the tower's output for a given image (or clip)."""
    v, d = cfg.vision, cfg.data
    identity = {
        "family": v.family,
        "name_or_path": v.name_or_path,
        "revision": v.revision,
        "layer": v.layer,
        "arch": dict(v.arch),
        "image_mean": list(v.image_mean),
        "image_std": list(v.image_std),
        "eval_resize": d.eval_resize,
        "frames": d.frames,
    }
    # Which frames a clip's augmented views hold. Named only when it is not the default, the one
    # behaviour before the option existed, so that caches written then still match.
    if d.frame_sampling != "segments":
        identity["frame_sampling"] = d.frame_sampling
    return identity


def refuse_trainable_tower(cfg: Config) -> None:
    """ConfigError when the tower's output is not a fixed function of the pixels, or not [N, D] per sample.

    With temporal modules the tower's features depend on weights being trained; with concatenated
    frames the connector needs every frame, not the mean this cache stores.
    """
    v = cfg.video
    if v.temporal != "none":
        raise ConfigError(
            f"video.temporal={v.temporal}: the temporal modules inside the vision tower are trained, so its "
            "features change every step and cannot be cached; train from the videos themselves"
        )
    if v.frames_to_connector != "mean":
        raise ConfigError(
            f"video.frames_to_connector={v.frames_to_connector}: the connector needs every frame's tokens, "
            "but a feature cache stores their mean; train from the videos themselves"
        )


def tower_digest(tower: torch.nn.Module) -> str:
    """Identity of the tower's weights, so a cache cannot be used with another tower."""
    from evlgen.model.build import state_digest

    return state_digest(tower.state_dict())


def is_feature_cache(path: str | Path) -> bool:
    index = Path(path) / INDEX
    if not index.is_file():
        return False
    try:
        return json.loads(index.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


class FeatureSource:
    """Map-style reader of a feature cache; picklable, each process opens its own file handles."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).resolve()
        index_file = self.path / INDEX
        if not is_feature_cache(self.path):
            raise FileNotFoundError(
                f"{self.path} is not an evlgen feature cache ({INDEX} missing or foreign)"
            )
        self.index = json.loads(index_file.read_text())
        if self.index.get("version") != VERSION:
            raise ValueError(f"{index_file}: cache version {self.index.get('version')}, expected {VERSION}")
        self._starts = [0]
        for shard in self.index["shards"]:
            self._starts.append(self._starts[-1] + shard["rows"])
        self._open: dict[int, tuple[Any, JsonlSource]] = {}
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_open"] = {}
        return state

    def __len__(self) -> int:
        return self._starts[-1]

    @property
    def views(self) -> int:
        return int(self.index["views"])

    def _shard(self, s: int) -> tuple[Any, JsonlSource]:
        if self._pid != os.getpid():  # forked into a DataLoader worker: do not share handles
            self._open, self._pid = {}, os.getpid()
        if s not in self._open:
            shard = self.index["shards"][s]
            tensors = safe_open(str(self.path / shard["features"]), framework="pt")
            self._open[s] = (tensors, JsonlSource(self.path / shard["meta"]))
        return self._open[s]

    def get(self, i: int) -> FeatureRecord:
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} out of range for {self.path} ({len(self)} rows)")
        s = next(k for k in range(len(self._starts) - 1) if i < self._starts[k + 1])
        j = i - self._starts[s]
        tensors, meta = self._shard(s)
        features = tensors.get_slice("features")[j : j + 1][0]  # [K, N, D]
        row, _ = meta.read_json(j)
        return FeatureRecord(
            location=row["location"],
            key=row["key"],
            features=features,
            captions=tuple(row.get("captions", ())),
            question=row.get("question"),
            answers=tuple(row.get("answers", ())),
        )

    def check_compatible(self, cfg: Config, digest: str | None = None) -> None:
        """ConfigError naming what differs between this cache's tower and the run's."""
        have, want = self.index["tower"], json.loads(json.dumps(tower_identity(cfg)))
        diff = [k for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k)]
        if diff:
            detail = "; ".join(f"{k}: cache {have.get(k)!r}, config {want.get(k)!r}" for k in diff)
            raise ConfigError(f"feature cache {self.path} was made with another vision setup ({detail})")
        if digest is not None and digest != self.index["tower_digest"]:
            raise ConfigError(
                f"feature cache {self.path} was made with different vision-tower weights "
                "(same config, other checkpoint or random seed); rebuild it with `evlgen cache-features`"
            )


# -------------------------------------------------------------------------------------------------
# Writing


def cache_features(
    cfg: Config,
    dataset: DatasetConfig,
    out: str | Path,
    *,
    views: int = 0,
    batch_size: int = 32,
    shard_size: int = 4096,
    dtype: str = "float16",
    cache_dir: str | None = None,
) -> dict[str, Any]:
    """Run the frozen tower over `dataset` and write a feature cache to `out` (atomically).

    views=0 stores one un-augmented view (eval transforms); views=K stores K augmented views (train
    transforms, seeded per sample and view), of which training draws one per sample per epoch.
    """
    from evlgen.data.pipeline import load_one, make_sample_maker, sample_generator
    from evlgen.model.build import build_vision, resolve_dtype

    refuse_trainable_tower(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)  # a random tower is built exactly as build_vlm builds it
    tower = build_vision(cfg.vision).to(device).eval()
    digest = tower_digest(tower)
    maker = make_sample_maker(cfg, tower.image_size, train=views > 0)
    k = max(views, 1)
    store = resolve_dtype(dtype)
    source = open_source(dataset, cache_dir)

    out = Path(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards: list[dict[str, Any]] = []
    pending: list[tuple[Tensor, dict[str, Any]]] = []
    bad: list[list[str]] = []
    num_bad = 0
    t0 = time.perf_counter()

    def run_tower(pixels: list[Tensor]) -> Tensor:
        t = max(p.shape[0] for p in pixels)  # images among videos repeat to T frames (same mean)
        x = torch.stack([p.expand(t, -1, -1, -1) for p in pixels]).to(device)  # [B, T, 3, H, W]
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            feats = tower(x)  # [B, T, N, D]
        return feats.float().mean(dim=1).to(store).cpu()  # [B, N, D]

    def flush_shard(final: bool = False) -> None:
        while len(pending) >= shard_size or (final and pending):
            rows, rest = pending[:shard_size], pending[shard_size:]
            pending[:] = rest
            s = len(shards)
            name, meta = f"features-{s:05d}.safetensors", f"meta-{s:05d}.jsonl"
            save_file({"features": torch.stack([r[0] for r in rows]).contiguous()}, str(tmp / name))
            (tmp / meta).write_text("".join(json.dumps(r[1]) + "\n" for r in rows))
            shards.append({"features": name, "meta": meta, "rows": len(rows)})

    batch: list[tuple[Any, dict[str, Any]]] = []

    def flush_batch() -> None:
        if not batch:
            return
        per_view = [run_tower([item[0][v] for item in batch]) for v in range(k)]  # K x [B, N, D]
        for b, (_, meta) in enumerate(batch):
            pending.append((torch.stack([pv[b] for pv in per_view]), meta))  # [K, N, D]
        batch.clear()
        flush_shard()

    for i, rec in enumerate(iter_records(source)):
        item, problem = None, None
        views_pixels = []
        for v in range(k):
            g = sample_generator(cfg.seed, 0x666561, v, i) if views > 0 else None
            item, problem = load_one(maker, rec, g)
            if item is None:
                break
            views_pixels.append(item[0])
        if item is None:
            num_bad += 1
            if len(bad) < 20:
                bad.append(list(problem))
            continue
        meta = {"key": rec.key, "location": rec.location}
        if rec.question is not None:
            meta.update(question=rec.question, answers=list(rec.answers))
        else:
            meta["captions"] = list(rec.captions)
        batch.append((views_pixels, meta))
        if len(batch) >= batch_size:
            flush_batch()
    flush_batch()
    flush_shard(final=True)
    rows = sum(s["rows"] for s in shards)
    if rows == 0:
        shutil.rmtree(tmp)
        raise ValueError(f"{dataset.path}: no usable samples to cache ({num_bad} bad)")
    first = safe_open(str(tmp / shards[0]["features"]), framework="pt").get_slice("features").get_shape()
    index = {
        "format": FORMAT,
        "version": VERSION,
        "source": dataset.path,
        "tower": tower_identity(cfg),
        "tower_digest": digest,
        "views": k,
        "augmented": views > 0,
        "shape": first[2:],
        "dtype": dtype,
        "rows": rows,
        "bad_samples": num_bad,
        "shards": shards,
    }
    (tmp / INDEX).write_text(json.dumps(index, indent=2))
    fsync_tree(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    seconds = time.perf_counter() - t0
    summary = {
        "out": str(out),
        "rows": rows,
        "views": k,
        "bad_samples": num_bad,
        "bad_examples": bad,
        "seconds": round(seconds, 2),
        "images_per_s": round(rows * k / max(seconds, 1e-9), 1),
    }
    log.info("cached %d samples x %d views into %s (%d bad) in %.1f s", rows, k, out, num_bad, seconds)
    return summary
