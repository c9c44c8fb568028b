"""The training loop behind `evlgen train`: plain PyTorch, iteration-based, one loss.

`train.objective` picks the loss and nothing else: `lm` (next-token loss through the frozen LM) or
`qformer-stage1` (BLIP-2's ITC + ITM + ITG on the Q-Former, no LM; its validation loss is the summed
losses per sample and there are no sample captions). A loss's parts (itc, itm, itg) are logged beside
it as loss_<part>.

One step = `grad_accum` micro-batches (DDP gradient sync only on the last), clipping, an AdamW update
at the step's scheduled learning rate. Around it: bad-sample and non-finite-loss accounting agreed by
all ranks every step, periodic validation loss and sample captions, checkpoints that resume exactly,
and a clean stop on SIGTERM/SIGUSR1 (checkpoint, then exit) for preemptible clusters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from evlgen.config import Config, ConfigError, dump_yaml, load_config, to_dict
from evlgen.data.features import FeatureSource, refuse_trainable_tower, tower_digest
from evlgen.data.pipeline import (
    Batch,
    TrainStream,
    fixed_batches,
    make_loader,
    make_sample_maker,
    open_sources,
)
from evlgen.model.build import build_vlm, from_pretrained, init_from_pretrained, state_digest
from evlgen.model.vlm import VLM
from evlgen.train import checkpoint as ckpt_io
from evlgen.train.distributed import Dist
from evlgen.train.logger import RunLogger, truncate_metrics
from evlgen.train.optim import build_optimizer, lr_at, set_lr
from evlgen.train.precision import Precision, autocast, resolve_precision

log = logging.getLogger(__name__)

# Config keys a resumed run may change: they do not alter what the model computes or sees.
RESUMABLE_CHANGES = (
    "train.steps",
    "train.log_every",
    "train.val_every",
    "train.sample_every",
    "train.ckpt_every",
    "train.keep_last",
    "train.max_nonfinite",
    "train.tensorboard",
    "train.wandb_project",
    "data.num_workers",
    "data.max_bad_fraction",
    "data.bad_grace",
    "data.val",
    "data.val_samples",
)


MAX_BAD_REPORTED = 20


class TrainingError(RuntimeError):
    """The run cannot continue (too much bad data, repeated non-finite losses); the message says why."""


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "arch" and k != "val":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resume_config(cfg: Config, saved_path: Path) -> None:
    """A resumed run must compute what the saved run computed; list every key that differs otherwise."""
    try:  # through the loader, so keys added since the run was saved compare as their defaults
        saved = _flat(to_dict(load_config(str(saved_path))))
    except ConfigError:
        saved = _flat(yaml.safe_load(saved_path.read_text()))
    now = _flat(to_dict(cfg))
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    bad = [k for k in changed if k not in RESUMABLE_CHANGES]
    if bad:
        detail = "; ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in bad[:8])
        raise ConfigError(f"cannot resume {saved_path.parent} with a different config ({detail})")
    for k in changed:
        log.warning("resuming with %s changed: %r -> %r", k, saved.get(k), now.get(k))


class _StopRequest:
    """SIGTERM/SIGUSR1 set a flag; the loop checkpoints at the end of the step and exits."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopRequest:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            with contextlib.suppress(ValueError):  # not the main thread
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        log.warning("signal %d: will checkpoint and stop after this step", signum)
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclasses.dataclass
class Counters:
    """Running totals kept in the train state (all ranks summed)."""

    samples: int = 0
    bad: int = 0
    nonfinite: int = 0
    bad_examples: list[list[str]] = dataclasses.field(default_factory=list)


def _dummy_loss(model: torch.nn.Module, vlm: VLM, device: torch.device) -> Tensor:
    # A micro-batch whose samples were all bad still runs forward/backward with zero weight, so DDP's
    # collective calls stay matched across ranks.
    size = vlm.vision.image_size
    pixels = torch.zeros(1, 1, 3, size, size, device=device)  # [1, T=1, 3, H, W]
    return model(pixels, [""], ["."]).loss * 0.0


def _evaluate(vlm: VLM, batches: list[Batch], prec: Precision, dist: Dist) -> float:
    """Token-weighted validation loss, with the fixed batches split over ranks."""
    was_training = vlm.training
    vlm.eval()
    total, tokens = 0.0, 0.0
    devices = [dist.device] if dist.device.type == "cuda" else []
    # Stage 1 draws its ITM negatives at random: a fixed draw makes validations comparable, and the
    # fork leaves the training stream's RNG (hence exact resume) untouched.
    with torch.no_grad(), torch.random.fork_rng(devices=devices), autocast(prec, dist.device):
        torch.manual_seed(0)
        for batch in batches[dist.rank :: dist.world_size]:
            pixels, features = _inputs(batch, dist.device)
            out = vlm(pixels, batch.prompts, batch.targets, features=features)
            total += out.loss.float().item() * out.num_tokens
            tokens += out.num_tokens
    total, tokens = dist.all_sum([total, tokens])
    vlm.train(was_training)
    return total / max(tokens, 1.0)


def _inputs(batch: Batch, device: torch.device, n: int | None = None) -> tuple[Tensor | None, Tensor | None]:
    """(pixels, features) of a batch on the device; exactly one is set."""
    pixels = batch.pixels[:n].to(device, non_blocking=True) if batch.pixels is not None else None
    features = batch.features[:n].to(device, non_blocking=True) if batch.features is not None else None
    return pixels, features


def _samples(
    vlm: VLM, batch: Batch, cfg: Config, prec: Precision, device: torch.device, n: int = 8
) -> list[str]:
    was_training = vlm.training
    vlm.eval()
    pixels, features = _inputs(batch, device, n)
    with autocast(prec, device):
        out = vlm.generate(
            pixels,
            batch.prompts[:n],
            features=features,
            num_beams=cfg.caption.num_beams,
            max_new_tokens=cfg.caption.max_new_tokens,
            min_new_tokens=cfg.caption.min_new_tokens,
        )
    vlm.train(was_training)
    return [f"{k}: {t!r} -> {o!r}" for k, t, o in zip(batch.keys, batch.targets, out, strict=False)]


def train(
    cfg: Config,
    run_dir: str | Path,
    *,
    dist: Dist | None = None,
    resume: str | None = None,
    cache_dir: str | None = None,
) -> dict[str, Any]:
    """Train `cfg` into `run_dir`; returns the run summary (also written to summary.json)."""
    dist = dist or Dist()
    tc, dc = cfg.train, cfg.data
    run_dir = Path(run_dir)
    device = dist.device
    prec = resolve_precision(tc.precision, device)

    # -- run directory and resume point ---------------------------------------------------------
    ckpt = ckpt_io.resolve_resume(resume, run_dir)
    state = ckpt_io.load_state(ckpt) if ckpt is not None else None
    start = int(state["step"]) if state is not None else 0
    saved_cfg = run_dir / "config.yaml"
    if ckpt is None and ckpt_io.list_checkpoints(run_dir):
        raise ConfigError(f"{run_dir} already holds checkpoints: pass --resume auto, or choose another --out")
    if ckpt is not None and saved_cfg.is_file():
        check_resume_config(cfg, saved_cfg)
    # -- datasets first: a wrong path fails before anything is written or a large model loads ----
    if dist.is_main:  # build annotation indexes once, before the other ranks look for them
        sources = open_sources(dc.train, cache_dir)
    dist.barrier()
    if not dist.is_main:
        sources = open_sources(dc.train, cache_dir)

    if ckpt is None and tc.init_from is not None and not (Path(tc.init_from) / "model.safetensors").is_file():
        # Before a large model loads: init_from_pretrained would fail the same way, minutes later.
        raise ConfigError(
            f"train.init_from: {tc.init_from} is not a saved evlgen model (no model.safetensors)"
        )
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_yaml(cfg, saved_cfg)
        truncate_metrics(run_dir, start)
    dist.barrier()

    # -- model and optimizer ----------------------------------------------------------------------
    torch.manual_seed(cfg.seed)  # identical random init on every rank
    if ckpt is None:
        vlm = build_vlm(cfg, log_table=dist.is_main)
        if tc.init_from is not None:
            init_from_pretrained(vlm, tc.init_from)
    else:
        vlm = from_pretrained(ckpt / ckpt_io.MODEL)
        vlm.config = cfg
    vlm.to(device).train()
    model: torch.nn.Module = vlm
    if dist.enabled:
        frozen = [n for n, p in vlm.named_parameters() if not p.requires_grad]
        frozen += [n for n, _ in vlm.named_buffers()]
        # Frozen weights are identical on every rank by construction; broadcasting a 7B LM is waste.
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(vlm, frozen)
        model = DistributedDataParallel(vlm, device_ids=[device.index] if device.type == "cuda" else None)
    params = [p for _, p in vlm.trainable_named_parameters()]
    optimizer = build_optimizer(vlm.trainable_named_parameters(), tc)
    scaler = torch.amp.GradScaler(device.type, enabled=prec.scaler)
    counters = Counters()
    if ckpt is not None:
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        counters = Counters(**state["counters"])
        same_layout = _check_layout(state, dist, cfg)
        del state  # no longer needed: the optimizer has taken what it needs
        log.info("resuming from %s at step %d", ckpt, start)
    else:
        torch.manual_seed(cfg.seed + dist.rank)  # dropout differs across ranks

    # -- data -------------------------------------------------------------------------------------
    caches = [s for s in sources if isinstance(s, FeatureSource)]
    if caches:
        refuse_trainable_tower(cfg)
        digest = tower_digest(vlm.vision)
        for cache in caches:
            cache.check_compatible(cfg, digest)
    maker = make_sample_maker(cfg, vlm.vision.image_size, train=True)
    stream = TrainStream(
        sources,
        [d.weight for d in dc.train],
        maker,
        batch_size=tc.batch_size,
        seed=cfg.seed,
        rank=dist.rank,
        world_size=dist.world_size,
        start=start * tc.grad_accum,
    )
    eval_maker = make_sample_maker(cfg, vlm.vision.image_size, train=False)
    val_source = open_sources([dc.val], cache_dir, "data.val")[0] if dc.val is not None else sources[0]
    val_batches, _ = fixed_batches(val_source, eval_maker, dc.val_samples, tc.batch_size)
    if not val_batches and (tc.val_every or tc.sample_every):
        log.warning("no usable validation samples: validation loss and sample captions are off")
    sample_every = tc.sample_every if vlm.llm is not None else 0  # Q-Former stage 1 has no LM to caption

    if ckpt is not None and same_layout:
        ckpt_io.restore_rng(ckpt_io.load_rng(ckpt, dist.rank))
    elif ckpt is not None:
        torch.manual_seed(cfg.seed + dist.rank + start)
    logger = RunLogger(
        run_dir,
        total_steps=tc.steps,
        start_step=start,
        enabled=dist.is_main,
        tensorboard=tc.tensorboard,
        wandb_project=tc.wandb_project,
        wandb_config=to_dict(cfg),
    )
    if dist.is_main:
        log.info(
            "training %s for %d steps: global batch %d (%d x %d accumulation x %d ranks), %s, %s",
            cfg.name,
            tc.steps,
            tc.batch_size * tc.grad_accum * dist.world_size,
            tc.batch_size,
            tc.grad_accum,
            dist.world_size,
            prec.name,
            device,
        )

    def save(step: int) -> None:
        snapshot = {
            "step": step,
            "data_position": step * tc.grad_accum,
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if prec.scaler else {},
            "counters": dataclasses.asdict(counters),
            "layout": _layout(dist, cfg),
        }
        ckpt_io.save_checkpoint(run_dir, step, vlm, snapshot, dist, tc.keep_last)

    # -- loop ---------------------------------------------------------------------------------------
    loader = make_loader(stream, dc.num_workers, pin_memory=device.type == "cuda")
    batches = iter(loader)
    window = {"loss": 0.0, "n": 0, "images": 0, "t": time.perf_counter(), "grad_norm": 0.0}
    parts_window: dict[str, float] = {}
    nonfinite_run = 0
    last_loss = float("nan")
    done = start
    t_start = time.perf_counter()
    with _StopRequest() as stop:
        for step in range(start, tc.steps):
            lr = lr_at(step, tc)
            set_lr(optimizer, lr)
            loss_sum, local_images, local_bad, local_nonfinite = 0.0, 0, 0, False
            parts_sum: dict[str, float] = {}
            examples: list[list[str]] = []
            for micro in range(tc.grad_accum):
                batch: Batch = next(batches)
                expected = step * tc.grad_accum + micro
                if batch.index != expected:
                    raise RuntimeError(
                        f"data stream out of order: got micro-batch {batch.index}, expected {expected}"
                    )
                local_images += len(batch)
                local_bad += batch.num_bad
                examples += [list(b) for b in batch.bad]
                last = micro == tc.grad_accum - 1
                sync = contextlib.nullcontext() if last or not dist.enabled else model.no_sync()
                with sync:
                    with autocast(prec, device):
                        if len(batch):
                            pixels, features = _inputs(batch, device)
                            out = model(pixels, batch.prompts, batch.targets, features=features)
                            loss, parts = out.loss, getattr(out, "parts", {})
                        else:
                            loss, parts = _dummy_loss(model, vlm, device), {}
                    if not torch.isfinite(loss):
                        local_nonfinite = True
                    scaler.scale(loss / tc.grad_accum).backward()
                loss_sum += loss.detach().float().item() / tc.grad_accum
                for k, v in parts.items():  # read after backward: no extra device sync before it
                    parts_sum[k] = parts_sum.get(k, 0.0) + float(v) / tc.grad_accum
            # One small all-reduce per step keeps every rank's decisions identical.
            flag_nf, images, bad, stop_flag = dist.all_sum(
                [float(local_nonfinite), local_images, local_bad, float(stop.requested)]
            )
            counters.samples += int(images + bad)
            counters.bad += int(bad)
            for loc, why in examples:
                # Each bad file is reported once, and only the first few: a broken shard can hold thousands.
                if len(counters.bad_examples) < MAX_BAD_REPORTED and [loc, why] not in counters.bad_examples:
                    log.warning("skipped a bad sample (rank %d) %s: %s", dist.rank, loc, why)
                    counters.bad_examples.append([loc, why])
                    if len(counters.bad_examples) == MAX_BAD_REPORTED:
                        log.warning("further bad samples are counted but not logged")
            if counters.samples >= dc.bad_grace and counters.bad > dc.max_bad_fraction * counters.samples:
                shown = "; ".join(f"{loc}: {why}" for loc, why in counters.bad_examples[:5])
                frac = counters.bad / counters.samples
                raise TrainingError(
                    f"{counters.bad} of {counters.samples} samples were bad ({frac:.1%} > "
                    f"data.max_bad_fraction={dc.max_bad_fraction}); first: {shown}. "
                    "Run `evlgen data check` on the dataset."
                )
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.clip_grad if tc.clip_grad else math.inf)
            if flag_nf > 0 or (not prec.scaler and not torch.isfinite(grad_norm)):
                optimizer.zero_grad(set_to_none=True)
                if prec.scaler:
                    scaler.update()  # lets the scaler back off too
                counters.nonfinite += 1
                nonfinite_run += 1
                log.warning(
                    "step %d: non-finite loss or gradient, update skipped (%d in a row)",
                    step + 1,
                    nonfinite_run,
                )
                if nonfinite_run >= tc.max_nonfinite:
                    raise TrainingError(
                        f"{nonfinite_run} non-finite steps in a row at step {step + 1} (lr {lr:.3g}, "
                        f"last finite loss {last_loss:.4g}, precision {prec.name}); "
                        "lower train.lr or use bf16/fp32"
                    )
            else:
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                nonfinite_run = 0
                last_loss = loss_sum
                window["loss"] += loss_sum
                window["n"] += 1
                for k, v in parts_sum.items():
                    parts_window[k] = parts_window.get(k, 0.0) + v
                window["grad_norm"] += float(grad_norm)
            window["images"] += int(images)
            done = step + 1

            if done % tc.log_every == 0 or done == tc.steps:
                names = sorted(parts_window)
                mean_loss, n, *part_sums = dist.all_sum(
                    [window["loss"], window["n"], *(parts_window[k] for k in names)]
                )
                elapsed = time.perf_counter() - window["t"]
                metrics = {
                    "loss": mean_loss / max(n, 1) if n else float("nan"),
                    **{f"loss_{k}": v / max(n, 1) for k, v in zip(names, part_sums, strict=True)},
                    "lr": lr,
                    "images_per_s": window["images"] / max(elapsed, 1e-9),
                    "grad_norm": window["grad_norm"] / max(window["n"], 1),
                    "bad_samples": counters.bad,
                    "nonfinite_steps": counters.nonfinite,
                }
                logger.log(done, metrics)
                window = {"loss": 0.0, "n": 0, "images": 0, "t": time.perf_counter(), "grad_norm": 0.0}
                parts_window = {}
            if val_batches and tc.val_every and done % tc.val_every == 0:
                logger.log(done, {"loss": _evaluate(vlm, val_batches, prec, dist)}, kind="val")
            if val_batches and sample_every and done % sample_every == 0 and dist.is_main:
                logger.log_text(done, "captions", _samples(vlm, val_batches[0], cfg, prec, device))
            if done % tc.ckpt_every == 0 or done == tc.steps or stop_flag > 0:
                save(done)
            if stop_flag > 0:
                log.warning("stopped by signal after step %d; resume with --resume auto", done)
                break

    # -- end ------------------------------------------------------------------------------------------
    del batches, loader
    final_loss = _evaluate(vlm, val_batches, prec, dist) if val_batches and done >= tc.steps else None
    if dist.is_main and done >= tc.steps:
        vlm.save_pretrained(run_dir / "model")
    summary = {
        "steps": done,
        "completed": done >= tc.steps,
        "seconds": round(time.perf_counter() - t_start, 2),
        "last_train_loss": last_loss,
        "val_loss": final_loss,
        "samples": counters.samples,
        "bad_samples": counters.bad,
        "bad_examples": counters.bad_examples[:10],
        "nonfinite_steps": counters.nonfinite,
        "world_size": dist.world_size,
        # Differing digests would mean the ranks' trainable weights drifted apart.
        "rank_weight_digests": dist.all_gather_str(state_digest(vlm.trainable_state_dict())),
        "model": str(run_dir / "model") if done >= tc.steps else None,
    }
    logger.summary(summary)
    logger.close()
    dist.barrier()
    return summary


def _layout(dist: Dist, cfg: Config) -> dict[str, int]:
    return {
        "world_size": dist.world_size,
        "num_workers": cfg.data.num_workers,
        "batch_size": cfg.train.batch_size,
        "grad_accum": cfg.train.grad_accum,
    }


def _check_layout(state: dict[str, Any], dist: Dist, cfg: Config) -> bool:
    """True when the run resumes on its own layout (then it is exact); False for another process count."""
    was, now = state.get("layout", {}), _layout(dist, cfg)
    for key in ("batch_size", "grad_accum"):
        if was.get(key, now[key]) != now[key]:
            raise ConfigError(f"cannot resume: train.{key} was {was[key]}, now {now[key]}")
    if was.get("num_workers", now["num_workers"]) != now["num_workers"]:
        log.warning(
            "data.num_workers changed (%s -> %s): streamed shards will be read in another order",
            was["num_workers"],
            now["num_workers"],
        )
    if was.get("world_size", now["world_size"]) != now["world_size"]:
        log.warning(
            "resuming on %d processes (was %d): data order and dropout differ from an uninterrupted run",
            now["world_size"],
            was["world_size"],
        )
        return False
    return True
