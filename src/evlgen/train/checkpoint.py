"""Training checkpoints: atomic, pruned, and complete enough to resume a run bit for bit.

Layout under a run directory:

    checkpoints/
      step-00001000/
        model/               trainable weights (safetensors) + resolved config (VLM.save_pretrained)
        train_state.pt       optimizer, grad scaler, step, data position, bad-sample counters
        rng-rank00000.pt     torch / CUDA / numpy / python RNG of each rank
      latest                 the name of the newest complete checkpoint

A checkpoint is written into a hidden temporary folder, fsync'ed, and renamed into place, so a crash
while saving leaves the previous checkpoint and `latest` untouched. Loading uses
`torch.load(weights_only=True)`: train state holds only tensors and plain Python values.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evlgen.fsutil import atomic_write_bytes, fsync_dir, fsync_tree
from evlgen.model.vlm import VLM
from evlgen.train.distributed import Dist

CHECKPOINTS = "checkpoints"
LATEST = "latest"
MODEL = "model"
STATE = "train_state.pt"
_STEP_RE = re.compile(r"^step-(\d{8,})$")


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def rng_file(rank: int) -> str:
    return f"rng-rank{rank:05d}.pt"


# -------------------------------------------------------------------------------------------------
# RNG state of one process, as tensors and plain values (loadable with weights_only=True)


def capture_rng() -> dict[str, Any]:
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
    }


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


# -------------------------------------------------------------------------------------------------
# Saving


def _save_file(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def write_latest(root: Path, name: str) -> None:
    atomic_write_bytes(root / LATEST, (name + "\n").encode())


def save_checkpoint(
    run_dir: str | Path, step: int, vlm: VLM, state: dict[str, Any], dist: Dist, keep_last: int
) -> Path:
    """Write checkpoint `step` (every rank calls this; ranks must share the run directory)."""
    root = Path(run_dir) / CHECKPOINTS
    name = step_name(step)
    tmp = root / f".{name}.tmp"
    if dist.is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".step-*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    _save_file(capture_rng(), tmp / rng_file(dist.rank))
    if dist.is_main:
        vlm.save_pretrained(tmp / MODEL)
        _save_file(state, tmp / STATE)
    dist.barrier()
    final = root / name
    if dist.is_main:
        missing = [r for r in range(dist.world_size) if not (tmp / rng_file(r)).is_file()]
        if missing:
            raise RuntimeError(f"ranks {missing} wrote no RNG state into {tmp}: is {root} on a shared disk?")
        fsync_tree(tmp)
        if final.exists():  # the same step saved again (e.g. the final save right after a periodic one)
            shutil.rmtree(final)
        tmp.rename(final)
        fsync_dir(root)
        write_latest(root, name)
        prune(root, keep_last)
    dist.barrier()
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders never match)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def prune(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for old in list_checkpoints(root.parent)[:-keep_last]:
        shutil.rmtree(old)


# -------------------------------------------------------------------------------------------------
# Loading


def find_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint `latest` names, or the newest complete one if the pointer is missing or stale."""
    root = Path(run_dir) / CHECKPOINTS
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if _STEP_RE.match(candidate.name) and (candidate / STATE).is_file():
            return candidate
    complete = [p for p in list_checkpoints(run_dir) if (p / STATE).is_file()]
    return complete[-1] if complete else None


def resolve_resume(resume: str | None, run_dir: str | Path) -> Path | None:
    """`--resume`: None (fresh run), "auto" (latest in the run dir, if any), or a checkpoint folder."""
    if resume is None:
        return None
    if resume == "auto":
        return find_checkpoint(run_dir)
    path = Path(resume)
    if (path / STATE).is_file():
        return path
    found = find_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"--resume {resume}: neither a checkpoint nor a run directory with one")
    return found


def load_state(ckpt: Path) -> dict[str, Any]:
    return torch.load(ckpt / STATE, map_location="cpu", weights_only=True)


def load_rng(ckpt: Path, rank: int) -> dict[str, Any]:
    path = ckpt / rng_file(rank)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: was this checkpoint written with fewer processes?")
    return torch.load(path, map_location="cpu", weights_only=True)
