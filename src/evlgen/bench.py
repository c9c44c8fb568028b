"""Benchmarks behind `evlgen bench train` and `evlgen bench data`: where training time goes.

`bench_train` times one training step of a preset on synthetic input, stage by stage (each stage is
closed by a device synchronisation, so the stages add up and each gets the time it really spent), then
end to end without intermediate synchronisation, which is the honest throughput figure. With
`features=True` it skips the frozen tower, as a run on the frozen-feature cache does. `bench_data`
measures the real input pipeline in images/s for several DataLoader worker counts. Results are plain,
JSON-ready dicts; `format_report` renders them as text.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from evlgen.config import Config, with_overrides
from evlgen.data.pipeline import TrainStream, make_loader, make_sample_maker, open_sources
from evlgen.model.build import build_vlm, describe, plan
from evlgen.model.llm import LMOutput
from evlgen.model.vlm import VLM
from evlgen.train.optim import build_optimizer
from evlgen.train.precision import autocast, resolve_precision

STAGES = ("vision", "connector", "llm_forward", "backward", "optimizer")
# Dense bf16 (= fp16) tensor-core peak per GPU, by substring of the device name; the first match wins,
# so the slower PCIe H100 comes before the SXM part.
PEAK_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))
CPU_BATCH_CAP = 8
# Repeated until the caption fills max_text_len tokens: every sample then costs what the longest does.
SENTENCE = "a man in a red jacket rides a bicycle past a row of parked cars on a quiet street"

Lap = Callable[[str], None]


def _no_lap(stage: str) -> None:
    """The lap function of an unstaged run: no synchronisation, nothing recorded."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Stopwatch:
    """Per-stage wall time. Each lap waits for the device first, so queued GPU work is charged to the
    stage that queued it rather than to whichever later stage happens to block."""

    def __init__(self, device: torch.device, stages: tuple[str, ...]) -> None:
        self.device = device
        self.totals = dict.fromkeys(stages, 0.0)
        self.last = 0.0

    def start(self) -> None:
        _sync(self.device)
        self.last = time.perf_counter()

    def lap(self, stage: str) -> None:
        _sync(self.device)
        now = time.perf_counter()
        self.totals[stage] += now - self.last
        self.last = now


# -------------------------------------------------------------------------------------------------
# FLOPs


def train_flops_per_image(
    *,
    vision_params: int,
    visual_tokens: int,
    connector_macs: int,
    llm_params: int,
    llm_tokens: int,
    head_params: int = 0,
    head_tokens: int = 0,
) -> float:
    """Model FLOPs of one training step per image (the MFU numerator), from parameter and token counts.

    A linear layer costs 2 FLOPs per weight per token forward; its backward costs 2 more for the input
    gradient and 2 more for the weight gradient (hence the usual 6 x params x tokens). Here:
    - frozen vision tower: forward only, nothing flows back into it: 2 x params x tokens;
    - trainable connector and projections (given as linear-layer MACs, as `describe` counts them):
      forward and both backward products: 3 x 2 x MACs;
    - frozen LLM: forward 2 x params x tokens, plus the input-gradient half of a backward, 2 x params x
      tokens: its weights get no gradient, but the gradient must reach the visual prefix through every
      layer (so 4, not 6, per weight per token);
    - LM head: the same 2 + 2, but only at the positions whose logits are computed (`head_tokens`).
    Attention score products (QK^T, AV) and embedding lookups are not counted, as in the 6ND convention.
    """
    vision = 2 * vision_params * visual_tokens
    connector = 3 * 2 * connector_macs
    llm = (2 + 2) * llm_params * llm_tokens + (2 + 2) * head_params * head_tokens
    return float(vision + connector + llm)


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a known GPU, else None (then no MFU is reported)."""
    for key, flops in PEAK_FLOPS:
        if key in device_name:
            return flops
    return None


def _flop_counts(vlm: VLM, info: dict[str, Any], llm_tokens: int, head_tokens: int, features: bool) -> dict:
    """The inputs of train_flops_per_image for this model; matmul weights only, lookups excluded."""
    tower = vlm.vision
    run = [tower.model.embeddings.patch_embedding, *tower.model.encoder.layers[: tower.num_blocks]]
    vision_params = 0 if features else sum(p.numel() for m in run for p in m.parameters())
    connector_macs = info["connector_macs"] + info["projection_macs"]
    if vlm.llm is None:  # Q-Former stage 1: connector_macs already counts its ITG head
        return {
            "vision_params": vision_params,
            "visual_tokens": info["visual_tokens"],
            "connector_macs": connector_macs,
            "llm_params": 0,
            "llm_tokens": 0,
        }
    lm = vlm.llm.model
    head = lm.get_output_embeddings()
    lookups = {id(m.weight) for m in lm.modules() if isinstance(m, nn.Embedding)}
    if head is not None:
        lookups.add(id(head.weight))  # counted apart: it runs only where logits are needed
    return {
        "vision_params": vision_params,
        "visual_tokens": info["visual_tokens"],
        "connector_macs": connector_macs,
        "llm_params": sum(p.numel() for p in lm.parameters() if id(p) not in lookups),
        "llm_tokens": llm_tokens,
        "head_params": 0 if head is None else head.weight.numel(),
        # A model whose logits are post-processed gets the head on every position (see FrozenLM).
        "head_tokens": head_tokens if vlm.llm.head_only_logits else llm_tokens,
    }


# -------------------------------------------------------------------------------------------------
# Training step


def staged_forward(
    vlm: VLM,
    inputs: Tensor,
    prompts: list[str],
    targets: list[str],
    *,
    features: bool = False,
    lap: Lap = _no_lap,
) -> LMOutput:
    """VLM.forward split into stages, calling the VLM's own submodules in `VLM.encode`'s order.

    inputs: pixels [B, T, C, H, W], or with features=True the tower's output [B, N, Dv] (a cache entry).
    Inputs are expected on the device already: the host-to-device copy (similar in size for pixels and
    features) is the input pipeline's cost, not the model's.
    """
    if features:
        feats = inputs  # [B, N, Dv]: a cache entry is already the mean over frames
    else:
        # The tower turns autograd off itself unless something inside it trains (video adapters).
        frames = vlm.vision(inputs)  # [B, T, N, Dv]
        # Frames are averaged in float32 (exact for an image, T = 1), then go on like cached features.
        feats = frames.mean(dim=1, dtype=torch.float32)  # [B, N, Dv]
        lap("vision")
    x = vlm.vl_proj(vlm.ln_vision(feats.to(vlm.ln_vision.weight.dtype)))  # [B, N, Dc]
    if vlm.llm is None:  # Q-Former stage 1: its three losses are the connector's work; no LM runs
        out = vlm.stage1(vlm.connector, x, targets)
        lap("connector")
        lap("llm_forward")
        return out
    x, state = vlm.connector.forward_with_state(x)  # [B, P, Dc]
    prefix = vlm.llm_proj(x)  # [B, P, D_llm]
    lap("connector")
    out = vlm.llm(prefix, prompts, targets, prefix_mask=state.mask)
    lap("llm_forward")
    return out


def synthetic_batch(
    vlm: VLM, cfg: Config, batch_size: int, device: torch.device, features: bool = False
) -> tuple[Tensor, list[str], list[str]]:
    """Random pixels [B, 1, C, H, W] (or tower features [B, N, Dv]) and captions that fill max_text_len."""
    g = torch.Generator().manual_seed(cfg.seed)
    tower = vlm.vision
    if features:
        shape = (batch_size, tower.num_tokens, tower.hidden_size)
        # float16 is what `evlgen cache-features` stores by default.
        inputs = torch.randn(shape, generator=g).to(device, torch.float16)  # [B, N, Dv]
    else:
        shape = (batch_size, 1, tower.num_channels, tower.image_size, tower.image_size)
        inputs = torch.randn(shape, generator=g).to(device)  # [B, 1, C, H, W]
    prompt, caption = cfg.caption.prompt, SENTENCE
    # target_ids truncates at max_text_len (end token included), so this stops once the target is full;
    # likewise the Q-Former stage-1 text path at its own max length.
    if vlm.llm is None:
        while vlm.stage1.text([caption])[0].shape[1] < vlm.stage1.text.max_len:
            caption += " " + SENTENCE
        return inputs, [prompt] * batch_size, [caption] * batch_size
    while len(vlm.llm.target_ids(prompt, caption)) < vlm.llm.max_text_len:
        caption += " " + SENTENCE
    return inputs, [prompt] * batch_size, [caption] * batch_size


def _offline_tokenizer(cfg: Config, notes: list[str]) -> Config:
    """The byte tokenizer in place of one that would need a download (random weights need no vocabulary)."""
    source = cfg.llm.tokenizer or cfg.llm.name_or_path
    if source is None or source == "byte":
        return cfg
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(source, revision=cfg.llm.revision, local_files_only=True)
        return cfg
    except (OSError, ValueError):
        notes.append(f"tokenizer {source} is not available offline: the byte tokenizer stands in")
        return dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, tokenizer="byte"))


def bench_train(
    cfg: Config,
    *,
    random_weights: bool,
    batch_size: int | None,
    steps: int = 10,
    warmup: int = 3,
    device: str = "auto",
    precision: str | None = None,
    features: bool = False,
) -> dict:
    """Time `steps` training steps after `warmup`, staged and end to end; see the module docstring."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    notes: list[str] = []
    bs = batch_size or cfg.train.batch_size
    if batch_size is None and dev.type == "cpu" and bs > CPU_BATCH_CAP:
        notes.append(f"batch size capped at {CPU_BATCH_CAP} on CPU (train.batch_size is {bs})")
        bs = CPU_BATCH_CAP
    if random_weights:
        cfg = _offline_tokenizer(cfg, notes)
    prec = resolve_precision(precision or cfg.train.precision, dev)
    info = describe(cfg)
    vlm = build_vlm(cfg, random_weights=random_weights, log_table=False).to(dev).train()
    if vlm.llm is not None:
        vlm.llm.head_only_logits  # noqa: B018 -- runs FrozenLM's one-off probe now, outside the timings
    inputs, prompts, targets = synthetic_batch(vlm, cfg, bs, dev, features)
    params = [p for _, p in vlm.trainable_named_parameters()]
    optimizer = build_optimizer(vlm.trainable_named_parameters(), cfg.train)
    scaler = torch.amp.GradScaler(dev.type, enabled=prec.scaler)
    clip = cfg.train.clip_grad or math.inf

    def step(lap: Lap) -> Tensor:
        # The trainer's step for one micro-batch: autocast forward, scaled backward, grad norm, update.
        with autocast(prec, dev):
            loss = staged_forward(vlm, inputs, prompts, targets, features=features, lap=lap).loss
        scaler.scale(loss).backward()
        lap("backward")
        scaler.unscale_(optimizer)
        # The trainer always takes the norm (it logs it), clipping or not.
        torch.nn.utils.clip_grad_norm_(params, clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        lap("optimizer")
        return loss.detach()

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    for _ in range(warmup):
        step(_no_lap)
    watch = _Stopwatch(dev, STAGES[1:] if features else STAGES)
    for _ in range(steps):
        watch.start()
        step(watch.lap)
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step(_no_lap)
    _sync(dev)
    step_s = (time.perf_counter() - t0) / steps

    stages_ms = {k: 1e3 * v / steps for k, v in watch.totals.items()}
    staged_ms = sum(stages_ms.values())
    if vlm.llm is None:
        llm_tokens = head_tokens = 0
    else:
        llm_tokens = info["llm_visual_tokens"] + len(vlm.llm.prompt_ids(prompts[0]))
        head_tokens = len(vlm.llm.target_ids(prompts[0], targets[0]))
    counts = _flop_counts(vlm, info, llm_tokens + head_tokens, head_tokens, features)
    flops = train_flops_per_image(**counts)
    images_per_s = bs / step_s
    name = (
        torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    )
    result: dict[str, Any] = {
        "kind": "train",
        "preset": cfg.name,
        "device": name,
        "precision": prec.name,
        "batch_size": bs,
        "features": features,
        "random_weights": random_weights,
        "steps": steps,
        "warmup": warmup,
        "stages_ms": stages_ms,
        "stages_pct": {k: 100.0 * v / staged_ms for k, v in stages_ms.items()},
        "staged_ms": staged_ms,
        "step_ms": 1e3 * step_s,
        "images_per_s": images_per_s,
        "loss": float(loss),
        "trainable_params": info["trainable_params"],
        "frozen_params": info["frozen_params"],
        "flop_counts": counts,
        "flops_per_image": flops,
        "achieved_tflops": flops * images_per_s / 1e12,
        "notes": notes,
    }
    if dev.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
        peak = peak_flops(result["device"])
        if peak is not None and prec.autocast is not None:
            result["peak_tflops"] = peak / 1e12
            result["mfu"] = flops * images_per_s / peak
        else:
            notes.append("MFU needs bf16/fp16 on a GPU in the peak table (H100, H200, A100)")
    return result


# -------------------------------------------------------------------------------------------------
# Connectors side by side

# `evlgen bench throughput` variants: overrides of the preset under test, so every other part (tower,
# LLM, batch, text length, precision) is identical across them.
CONNECTOR_VARIANTS: dict[str, tuple[str, ...]] = {
    "tomeformer": (),
    "tomeformer-r0": ("connector.r=0",),
    "qformer": ("connector.kind=qformer", "connector.r=0"),
    "mlp": ("connector.kind=mlp", "connector.r=0", "connector.init=null"),
}


def bench_throughput(
    cfg: Config,
    *,
    variants: list[str] | None = None,
    rounds: int = 3,
    **train_kwargs: Any,
) -> dict:
    """`bench_train` of each connector variant of `cfg`, interleaved over `rounds` (the order rotates
    each round) so that machine noise hits every variant alike; each variant keeps its median round.

    Ratios are step times relative to the first variant (TomeFormer as configured by default).
    """
    names = variants or list(CONNECTOR_VARIANTS)
    unknown = [n for n in names if n not in CONNECTOR_VARIANTS]
    if unknown:
        raise ValueError(f"unknown connector variants {unknown}; expected some of {list(CONNECTOR_VARIANTS)}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    configs = {n: with_overrides(cfg, CONNECTOR_VARIANTS[n]) for n in names}
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for k in range(rounds):
        for n in names[k % len(names) :] + names[: k % len(names)]:
            runs[n].append(bench_train(configs[n], **train_kwargs))
    out: dict[str, dict] = {}
    for n in names:
        ordered = sorted(runs[n], key=lambda r: r["step_ms"])
        best = ordered[(len(ordered) - 1) // 2]
        info = describe(configs[n])
        out[n] = {
            **best,
            "overrides": list(CONNECTOR_VARIANTS[n]),
            "round_step_ms": [r["step_ms"] for r in runs[n]],
            "llm_visual_tokens": info["llm_visual_tokens"],
            "connector_macs": info["connector_macs"],
            "projection_macs": info["projection_macs"],
        }
    ref = out[names[0]]["step_ms"]
    for r in out.values():
        r["step_ratio"] = r["step_ms"] / ref
    return {
        "kind": "throughput",
        "preset": cfg.name,
        "rounds": rounds,
        "reference": names[0],
        "variants": out,
    }


# -------------------------------------------------------------------------------------------------
# Data pipeline


def bench_data(
    cfg: Config, *, workers: list[int], batches: int = 20, warmup: int = 2, batch_size: int | None = None
) -> dict:
    """Images/s of the training input pipeline (decode + augment + collate) per DataLoader worker count.

    Start-up (until the first batch) is reported apart. Then at least `warmup` and at least as many
    batches as workers are dropped (the first round finishes together, so those are already waiting),
    and `batches` batches are timed.
    """
    if batches < 1 or warmup < 0:
        raise ValueError(f"need batches >= 1 and warmup >= 0, got batches={batches}, warmup={warmup}")
    plan(cfg)  # fails early, naming the key, when vision.arch lacks image_size
    bs = batch_size or cfg.train.batch_size
    sources = open_sources(cfg.data.train)
    maker = make_sample_maker(cfg, cfg.vision.arch["image_size"], train=True)
    runs = []
    for w in workers:
        stream = TrainStream(sources, [d.weight for d in cfg.data.train], maker, batch_size=bs, seed=cfg.seed)
        t0 = time.perf_counter()
        it = iter(make_loader(stream, w))
        next(it)
        startup_s = time.perf_counter() - t0
        for _ in range(max(warmup, w)):
            next(it)
        images = bad = 0
        t1 = time.perf_counter()
        for _ in range(batches):
            batch = next(it)
            images, bad = images + len(batch), bad + batch.num_bad
        elapsed = time.perf_counter() - t1
        del it  # stops this run's workers before the next one starts
        runs.append(
            {
                "workers": w,
                "startup_s": startup_s,
                "images": images,
                "bad_samples": bad,
                "seconds": elapsed,
                "images_per_s": images / elapsed,
                # workers=0 decodes in the main process: one worker's worth.
                "images_per_s_per_worker": images / elapsed / max(w, 1),
            }
        )
    return {
        "kind": "data",
        "preset": cfg.name,
        "datasets": [d.path for d in cfg.data.train],
        "batch_size": bs,
        "batches": batches,
        "image_size": cfg.vision.arch["image_size"],
        "cpu_count": os.cpu_count(),
        "runs": runs,
    }


# -------------------------------------------------------------------------------------------------
# Reports


def _format_train(r: dict) -> str:
    weights = "random weights" if r["random_weights"] else "weights from the preset's sources"
    source = "cached features (no tower)" if r["features"] else "pixels"
    lines = [
        f"bench train: {r['preset']} on {r['device']}, {r['precision']}, batch {r['batch_size']}, {weights}, "
        f"{source}; {r['steps']} steps after {r['warmup']} warm-up",
        f"{'stage':<14} {'ms/step':>10} {'%':>7}",
    ]
    lines += [f"{k:<14} {v:>10.2f} {r['stages_pct'][k]:>7.1f}" for k, v in r["stages_ms"].items()]
    lines.append(f"{'staged total':<14} {r['staged_ms']:>10.2f} {100.0:>7.1f}")
    lines.append(f"end to end (no syncs): {r['step_ms']:.2f} ms/step, {r['images_per_s']:.2f} images/s")
    lines.append(f"parameters: {r['trainable_params']:,} trainable, {r['frozen_params']:,} frozen")
    flops = (
        f"model FLOPs/image {r['flops_per_image'] / 1e9:.3g} G, achieved {r['achieved_tflops']:.3g} TFLOP/s"
    )
    if "mfu" in r:
        flops += f", MFU {100 * r['mfu']:.1f}% of {r['peak_tflops']:.0f} TFLOP/s"
    lines.append(flops)
    if "peak_memory_gib" in r:
        lines.append(f"peak GPU memory: {r['peak_memory_gib']:.2f} GiB")
    lines += [f"note: {n}" for n in r["notes"]]
    return "\n".join(lines)


def _format_data(r: dict) -> str:
    lines = [
        f"bench data: {r['preset']}, batch {r['batch_size']} at {r['image_size']} px, {r['batches']} timed "
        f"batches, {r['cpu_count']} CPUs; {', '.join(r['datasets'])}",
        f"{'workers':>7} {'start-up s':>11} {'images/s':>10} {'per worker':>11} {'bad':>5}",
    ]
    for run_ in r["runs"]:
        lines.append(
            f"{run_['workers']:>7} {run_['startup_s']:>11.2f} {run_['images_per_s']:>10.1f} "
            f"{run_['images_per_s_per_worker']:>11.1f} {run_['bad_samples']:>5}"
        )
    return "\n".join(lines)


def _format_throughput(r: dict) -> str:
    first = next(iter(r["variants"].values()))
    lines = [
        f"bench throughput: {r['preset']} on {first['device']}, {first['precision']}, batch "
        f"{first['batch_size']}, {'random weights' if first['random_weights'] else 'preset weights'}, "
        f"{'cached features' if first['features'] else 'pixels'}; median of {r['rounds']} interleaved rounds",
        f"{'connector':<14} {'LLM visual':>10} {'conn. GMACs':>11} {'ms/step':>9} "
        f"{'x ' + r['reference']:>14}  " + "  ".join(f"{s:>9}" for s in first["stages_ms"]),
    ]
    for name, v in r["variants"].items():
        lines.append(
            f"{name:<14} {v['llm_visual_tokens']:>10} {v['connector_macs'] / 1e9:>11.4g} "
            f"{v['step_ms']:>9.1f} {v['step_ratio']:>14.2f}  "
            + "  ".join(f"{ms:>9.1f}" for ms in v["stages_ms"].values())
        )
        extras = []
        if "peak_memory_gib" in v:
            extras.append(f"peak GPU memory {v['peak_memory_gib']:.2f} GiB")
        if "mfu" in v:
            extras.append(f"MFU {100 * v['mfu']:.1f}%")
        if extras:
            lines.append(f"{'':<14} " + ", ".join(extras))
    lines.append("(stage columns: ms/step of each stage, synchronised; ms/step: end to end without syncs)")
    return "\n".join(lines)


def format_report(result: dict) -> str:
    """A readable table for a bench_train, bench_data or bench_throughput result."""
    formats = {"train": _format_train, "data": _format_data, "throughput": _format_throughput}
    return formats[result["kind"]](result)


def run(kind: str, cfg: Config, **kwargs: Any) -> dict:
    """Dispatch to bench_train, bench_data or bench_throughput by name, with their keyword arguments."""
    benches = {"train": bench_train, "data": bench_data, "throughput": bench_throughput}
    if kind not in benches:
        raise ValueError(f"unknown benchmark {kind!r}; expected one of {sorted(benches)}")
    return benches[kind](cfg, **kwargs)
