"""Tiny end-to-end check: build a preset with random weights, fit one fixed batch, generate, save, reload.

This proves the whole path (tower -> connector -> frozen LM -> loss -> generate -> save/load) works
on a CPU in seconds. It is not a training recipe: real training is `evlgen train` (a later issue).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from evlgen.config import dump_yaml, load_config
from evlgen.model.build import build_vlm
from evlgen.model.vlm import VLM

log = logging.getLogger(__name__)

CAPTIONS = [
    "a red square on the left",
    "two blue circles",
    "a small green triangle at the top",
    "three yellow stars in a row",
]


def fixed_batch(vlm: VLM, n: int = 4, seed: int = 0) -> tuple[torch.Tensor, list[str], list[str]]:
    """n random images (one per caption) with distinct captions and empty prompts."""
    size = vlm.vision.image_size
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(n, 1, 3, size, size, generator=g)  # [B, T=1, C, H, W]
    targets = [CAPTIONS[i % len(CAPTIONS)] for i in range(n)]
    return pixels, [""] * n, targets


def fit(
    vlm: VLM, pixels: torch.Tensor, prompts: list[str], targets: list[str], steps: int, lr: float
) -> list[float]:
    """Plain AdamW steps on one batch; returns the loss before each step."""
    params = [p for _, p in vlm.trainable_named_parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    vlm.train()
    losses = []
    for _ in range(steps):
        loss = vlm(pixels, prompts, targets).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    vlm.eval()
    return losses


def run_smoke(
    out: str | Path, steps: int = 30, preset: str = "tiny", overrides: list[str] | tuple[str, ...] = ()
) -> int:
    """Returns a process exit code: 0 when the loss halves and the reloaded model generates identically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(preset, list(overrides))
    dump_yaml(cfg, out / "config.yaml")
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    vlm = build_vlm(cfg)
    pixels, prompts, targets = fixed_batch(vlm)
    losses = fit(vlm, pixels, prompts, targets, steps, lr=1e-2)
    gen = dict(num_beams=cfg.caption.num_beams, max_new_tokens=cfg.caption.max_new_tokens, min_new_tokens=1)
    captions = vlm.generate(pixels, prompts, **gen)
    vlm.save_pretrained(out / "model")
    again = VLM.from_pretrained(out / "model").eval()
    same = again.generate(pixels, prompts, **gen) == captions
    ok = losses[-1] <= 0.5 * losses[0] and same
    result = {
        "preset": cfg.name,
        "steps": steps,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "captions": dict(zip(targets, captions, strict=True)),
        "reload_identical": same,
        "seconds": round(time.perf_counter() - t0, 2),
        "ok": ok,
    }
    (out / "smoke.json").write_text(json.dumps(result, indent=2))
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in {steps} steps; reload identical: {same}")
    for t, c in result["captions"].items():
        print(f"  target {t!r:40} generated {c!r}")
    print(f"{'OK' if ok else 'FAILED'}: wrote {out / 'smoke.json'} and {out / 'model'}")
    return 0 if ok else 1
