"""`evlgen bench convergence`: the paper's claim in miniature, connectors compared on equal terms.

Every contender (TomeFormer one-stage, TomeFormer without merging, Q-Former one- and two-stage, an MLP
projector) trains on the synthetic world with the demo's frozen backbones, the same data, batch size
and step budget, for several seeds. Checkpoints at several budgets (early ones too: differences show
early) are scored on unseen test scenes: attribute accuracy (colour, shape and count all right in the
caption) and CIDEr. Beside every result stands the tower's own ceiling, a linear probe of its tokens on
the same attributes (`synth.probe`), so a reader can tell whether the connector or the tower limits.

Time is the training loop's own (the sum of its logged step windows), so validation and evaluation are
not charged; a two-stage contender's curve starts after its stage 1, whose steps and seconds count.
Time to target is read off each seed's curve (linear interpolation between budgets) and compared with
TomeFormer one-stage as a ratio of means. Everything lands in DIR: `results.json`, `report.md` and PNG
plots of quality against steps and against seconds.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from evlgen.config import Config, ConfigError, to_dict, with_overrides
from evlgen.fsutil import atomic_write_bytes

METRICS = ("attribute_accuracy", "cider")


@dataclasses.dataclass(frozen=True)
class Contender:
    """One connector setting: overrides of the demo config, and for a two-stage recipe the overrides
    (relative to the same base) of its stage-1 run, whose final weights stage 2 starts from."""

    name: str
    overrides: tuple[str, ...] = ()
    stage1: tuple[str, ...] | None = None
    stage1_steps: int = 0


def contenders(stage1_steps: int = 400) -> dict[str, Contender]:
    """The shipped comparison. The demo config's TomeFormer (4 layers, hidden 128, r=10: 65 -> 25 tokens)
    is the reference; the Q-Former uses the same layer shape with 32 learned queries."""
    qformer = ("connector.kind=qformer", "connector.r=0", "connector.num_queries=32")
    return {
        "tomeformer": Contender("tomeformer"),
        "tomeformer-r0": Contender("tomeformer-r0", ("connector.r=0",)),
        "qformer": Contender("qformer", qformer),
        "qformer-2stage": Contender(
            "qformer-2stage",
            qformer,
            stage1=(*qformer, "train.objective=qformer-stage1"),
            stage1_steps=stage1_steps,
        ),
        "mlp": Contender("mlp", ("connector.kind=mlp", "connector.r=0")),
    }


# -- reading a run -----------------------------------------------------------------------------------


def step_seconds(metrics_jsonl: Path, batch_size: int) -> list[tuple[int, float]]:
    """(step, cumulative training seconds) at every logged train step of a run.

    Each train row reports `images_per_s` over the window since the previous row, so the window's
    seconds are its images over that rate (validation and sample captions are off in benchmark runs).
    The first window also holds one-off costs (DataLoader workers starting, first-call kernels) that
    would swamp the early budgets; it is charged at the median rate of the later windows instead.
    """
    rows = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line.strip()]
    windows, last_step = [], 0
    for r in rows:
        if r.get("kind") == "train":
            windows.append((r["step"], (r["step"] - last_step) * batch_size, r["images_per_s"]))
            last_step = r["step"]
    if len(windows) > 1:
        step, images, _ = windows[0]
        windows[0] = (step, images, statistics.median(rate for _, _, rate in windows[1:]))
    out, total = [], 0.0
    for step, images, rate in windows:
        total += images / rate
        out.append((step, total))
    return out


def seconds_at(curve: Sequence[tuple[int, float]], step: int) -> float:
    for s, seconds in curve:
        if s >= step:
            return seconds
    raise ValueError(f"step {step} was never logged (last logged: {curve[-1][0] if curve else None})")


def crossing(points: Sequence[tuple[float, float]], target: float) -> float | None:
    """First x at which y reaches `target`, linearly interpolated between points; None if never."""
    prev: tuple[float, float] | None = None
    for x, y in points:
        if y >= target:
            if prev is None or prev[1] >= target:
                return x
            (x0, y0) = prev
            return x0 + (x - x0) * (target - y0) / (y - y0)
        prev = (x, y)
    return None


# -- the benchmark --------------------------------------------------------------------------------------


def split_scoped(
    overrides: Sequence[str], known: dict[str, Contender]
) -> tuple[list[str], dict[str, list[str]]]:
    """Overrides for every contender, and ``NAME:key=value`` ones for contender NAME only (both stages of
    a two-stage one), e.g. ``qformer:connector.num_queries=8``."""
    shared: list[str] = []
    scoped: dict[str, list[str]] = {}
    for item in overrides:
        head = item.split("=", 1)[0]
        if ":" not in head:
            shared.append(item)
            continue
        name, _, rest = item.partition(":")
        if name not in known:
            raise ConfigError(
                f"override {item!r} names unknown contender {name!r}; choose from {sorted(known)}"
            )
        scoped.setdefault(name, []).append(rest)
    return shared, scoped


def _run_config(base: Config, extra: Sequence[str], *, seed: int, steps: int, every: int) -> Config:
    return with_overrides(
        base,
        [
            *extra,
            f"seed={seed}",
            f"train.steps={steps}",
            f"train.ckpt_every={every}",
            f"train.log_every={every}",
            "train.keep_last=0",
            "train.val_every=0",
            "train.sample_every=0",
            f"train.warmup_steps={min(base.train.warmup_steps, max(1, steps // 10))}",
        ],
    )


def _train(cfg: Config, run_dir: Path, cache_dir: str | None) -> dict[str, Any]:
    from evlgen.train.loop import train

    shutil.rmtree(run_dir, ignore_errors=True)
    return train(cfg, run_dir, cache_dir=cache_dir)


def _measure(
    c: Contender,
    base: Config,
    seed: int,
    budgets: list[int],
    every: int,
    eval_samples: int,
    run_root: Path,
    world_dir: Path,
    cache_dir: str | None,
) -> dict[str, Any]:
    """Train one contender for one seed (both stages) and score its checkpoints at the budgets."""
    from evlgen.model.vlm import VLM
    from evlgen.synth.demo import caption_quality
    from evlgen.train.checkpoint import MODEL, list_checkpoints

    extra = list(c.overrides)
    stage1_seconds = 0.0
    if c.stage1 is not None:
        cfg1 = _run_config(base, c.stage1, seed=seed, steps=c.stage1_steps, every=c.stage1_steps)
        s1 = _train(cfg1, run_root / "stage1", cache_dir)
        curve1 = step_seconds(run_root / "stage1" / "metrics.jsonl", cfg1.train.batch_size)
        stage1_seconds = seconds_at(curve1, c.stage1_steps)
        extra.append(f"connector.init_from={s1['model']}")
    cfg = _run_config(base, extra, seed=seed, steps=budgets[-1], every=every)
    t0 = time.perf_counter()
    _train(cfg, run_root / "stage2", cache_dir)
    curve = step_seconds(run_root / "stage2" / "metrics.jsonl", cfg.train.batch_size)
    points = []
    for ckpt in list_checkpoints(run_root / "stage2"):
        step = int(ckpt.name.split("-")[-1])
        if step not in budgets:
            continue
        vlm = VLM.from_pretrained(ckpt / MODEL).eval()
        q = caption_quality(vlm, cfg, world_dir, "test", max_samples=eval_samples)
        points.append(
            {
                "step": step,
                "total_steps": step + c.stage1_steps * (c.stage1 is not None),
                "seconds": seconds_at(curve, step) + stage1_seconds,
                **{m: q.metrics[m] for m in METRICS},
            }
        )
    return {"points": points, "stage1_seconds": stage1_seconds, "wall_seconds": time.perf_counter() - t0}


def run_convergence(
    out: str | Path,
    *,
    names: Sequence[str] = ("tomeformer", "tomeformer-r0", "qformer", "qformer-2stage", "mlp"),
    seeds: Sequence[int] = (0, 1, 2),
    budgets: Sequence[int] = (25, 50, 100, 200, 400),
    stage1_steps: int = 400,
    eval_samples: int = 200,
    target: tuple[str, float] | None = None,
    overrides: Sequence[str] = (),
    world_seed: int = 0,
    cache_dir: str | None = None,
    sizes: dict[str, int] | None = None,
    recipe: Any = None,
    probe_scenes: tuple[int, int] = (2000, 500),
    lm_scenes: int = 200,
) -> dict[str, Any]:
    """Train and score every contender; write results.json, report.md and plots into `out`."""
    from evlgen.model.build import build_vision
    from evlgen.synth import world
    from evlgen.synth.backbones import Recipe, ensure_backbones
    from evlgen.synth.demo import demo_config, from_features
    from evlgen.synth.probe import lm_ceiling, tower_ceiling

    known = contenders(stage1_steps)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"unknown contenders {unknown}; choose from {sorted(known)}")
    overrides, scoped = split_scoped(overrides, known)
    known = {
        n: dataclasses.replace(
            c,
            overrides=(*c.overrides, *scoped.get(n, ())),
            stage1=None if c.stage1 is None else (*c.stage1, *scoped.get(n, ())),
        )
        for n, c in known.items()
    }
    budgets = sorted(set(budgets))
    if not budgets or budgets[0] <= 0:
        raise ConfigError(f"budgets must be positive step counts, got {budgets}")
    if target is not None and target[0] not in METRICS:
        raise ConfigError(f"target metric must be one of {METRICS}, got {target[0]!r}")
    every = math.gcd(*budgets)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    world_dir = out / "world"
    print("world and backbones", file=sys.stderr)
    world.write_world(world_dir, seed=world_seed, sizes=sizes)
    backbones = ensure_backbones(recipe or Recipe(seed=world_seed), cache_dir)
    base = demo_config(
        backbones,
        [
            f"data.train=[{{path: {world_dir / 'train.jsonl'}}}]",
            f"data.val={{path: {world_dir / 'val.jsonl'}}}",
            *overrides,
        ],
    )
    base = from_features(base, out / "features", cache_dir)
    ceiling = tower_ceiling(
        build_vision(base.vision), train_scenes=probe_scenes[0], test_scenes=probe_scenes[1], seed=world_seed
    )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm = AutoModelForCausalLM.from_pretrained(backbones / "llm").eval()
    lm_ceil = lm_ceiling(
        lm, AutoTokenizer.from_pretrained(backbones / "llm"), scenes=lm_scenes, seed=world_seed
    )
    del lm

    results: dict[str, Any] = {
        "budgets": budgets,
        "seeds": list(seeds),
        "eval_samples": eval_samples,
        "batch_size": base.train.batch_size,
        "base_overrides": list(overrides),
        "world_sizes": dict(sizes or {}),
        "backbones": backbones.name,
        "tower_ceiling": ceiling,
        "lm_ceiling": lm_ceil,
        "contenders": {},
    }
    for name in names:
        c = known[name]
        results["contenders"][name] = {"overrides": list(c.overrides), "stage1": c.stage1, "runs": {}}
    # Seed-major, so that a bench stopped early holds every contender for the first seeds.
    for seed in seeds:
        for name in names:
            c = known[name]
            run_root = out / "runs" / f"{name}-seed{seed}"
            key = {
                "base": to_dict(base),
                "contender": dataclasses.asdict(c),
                "seed": seed,
                "budgets": budgets,
                "eval_samples": eval_samples,
            }
            done = run_root / "result.json"
            if done.is_file() and json.loads(done.read_text()).get("key") == json.loads(json.dumps(key)):
                print(f"{name} seed {seed}: measured before, reused", file=sys.stderr)
                run = json.loads(done.read_text())["run"]
            else:
                print(f"{name} seed {seed}", file=sys.stderr)
                run = _measure(c, base, seed, budgets, every, eval_samples, run_root, world_dir, cache_dir)
                atomic_write_bytes(done, json.dumps({"key": key, "run": run}).encode())
            results["contenders"][name]["runs"][str(seed)] = run
            last = run["points"][-1]
            print(
                f"  -> {', '.join(f'{m} {last[m]:.3f}' for m in METRICS)}, {last['seconds']:.0f} s",
                file=sys.stderr,
            )
    results["summary"] = summarise(results, target)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot(results, out)
    (out / "report.md").write_text(render(results))
    return results


# -- summaries, plots, report -----------------------------------------------------------------------------


def _mean_curve(entry: dict[str, Any], metric: str, x: str) -> list[tuple[float, float, float]]:
    """(x, mean, std over seeds) per budget."""
    runs = list(entry["runs"].values())
    out = []
    for i in range(len(runs[0]["points"])):
        xs = [r["points"][i][x] for r in runs]
        ys = [r["points"][i][metric] for r in runs]
        out.append(
            (statistics.fmean(xs), statistics.fmean(ys), statistics.pstdev(ys) if len(ys) > 1 else 0.0)
        )
    return out


def _default_target(entries: dict[str, Any]) -> tuple[str, float] | None:
    """80% of TomeFormer's final mean attribute accuracy; None without a tomeformer run."""
    ref = entries.get("tomeformer")
    if ref is None:
        return None
    return ("attribute_accuracy", round(0.8 * _mean_curve(ref, "attribute_accuracy", "step")[-1][1], 3))


def _to_target(entry: dict[str, Any], metric: str, value: float, key: str) -> tuple[float | None, int]:
    """Mean over seeds of the first `key` (total_steps or seconds) at which `metric` reaches `value`
    (None unless every seed reaches it), and how many seeds reach it."""
    hits = [crossing([(p[key], p[metric]) for p in run["points"]], value) for run in entry["runs"].values()]
    reached = [h for h in hits if h is not None]
    return (statistics.fmean(reached) if len(reached) == len(hits) else None), len(reached)


def summarise(results: dict[str, Any], target: tuple[str, float] | None) -> dict[str, Any]:
    """Final quality per contender and the time-to-target ratios relative to TomeFormer one-stage.

    Without an explicit target, the target is 80% of TomeFormer's final mean attribute accuracy (so it
    is reached by the reference by construction, and the others' ratios say how much longer they take).
    """
    entries = results["contenders"]
    target = target or _default_target(entries)
    if target is None:
        return {"target": None, "note": "no tomeformer run: no reference for the target"}
    metric, value = target
    table: dict[str, Any] = {}
    for name, entry in entries.items():
        final = {m: _mean_curve(entry, m, "step")[-1][1:] for m in METRICS}
        row: dict[str, Any] = {f"final_{m}": final[m][0] for m in METRICS}
        row.update({f"final_{m}_std": final[m][1] for m in METRICS})
        for axis, key in (("steps", "total_steps"), ("seconds", "seconds")):
            row[f"{axis}_to_target"], row[f"{axis}_seeds_reached"] = _to_target(entry, metric, value, key)
        table[name] = row
    ref = table.get("tomeformer")
    for row in table.values():
        for axis in ("steps", "seconds"):
            mine, theirs = row[f"{axis}_to_target"], ref and ref[f"{axis}_to_target"]
            row[f"{axis}_ratio"] = mine / theirs if mine is not None and theirs else None
    return {"target": {"metric": metric, "value": value}, "contenders": table}


def plot(results: dict[str, Any], out: Path) -> None:
    from evlgen.synth.plots import Series, line_chart_png

    ceiling = results["tower_ceiling"]["scene_accuracy"]
    for metric in METRICS:
        for x, label in (("total_steps", "step"), ("seconds", "s")):
            series = []
            for name, entry in results["contenders"].items():
                curve = _mean_curve(entry, metric, x)
                series.append(
                    Series(
                        name,
                        [(cx, m) for cx, m, _ in curve],
                        band=[(m - s, m + s) for _, m, s in curve],
                    )
                )
            hlines = (
                [("tower ceiling (linear probe, all objects)", ceiling)]
                if metric == "attribute_accuracy"
                else []
            )
            line_chart_png(
                series,
                out / f"{metric}_vs_{'steps' if x == 'total_steps' else 'seconds'}.png",
                title=f"{metric.replace('_', ' ')} (mean over seeds; bars: +-1 std)",
                xlabel=label,
                hlines=hlines,
            )


def _fmt(v: float | None, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def _lm_ceiling_line(lm: dict[str, Any] | None) -> list[str]:
    if not lm:
        return []
    return [
        f"LM ceiling (attribute accuracy of the frozen LM's captions from the true scene description, "
        f"{lm['scenes']} unseen scenes): **{lm['in_order']:.3f}** with the slots in column order, "
        f"{lm['shuffled']:.3f} shuffled.",
    ]


def render(results: dict[str, Any]) -> str:
    s = results["summary"]
    entries = results["contenders"].items()
    per_contender = ", ".join(f"{n}: {list(e['overrides'])}" for n, e in entries if e["overrides"]) or "none"
    sizes = results.get("world_sizes") or "default"
    c = results["tower_ceiling"]
    lines = [
        "# Connector convergence on the synthetic world",
        "",
        f"Seeds {results['seeds']}, batch {results['batch_size']}, budgets {results['budgets']} steps, "
        f"{results['eval_samples']} unseen test scenes per evaluation.",
        "",
        f"Backbones `{results.get('backbones', '?')}`; world sizes {sizes}; overrides for every "
        f"contender: {results['base_overrides'] or 'none'}; per contender: {per_contender}.",
        "",
        f"Tower ceiling (linear probe of the frozen tower, {c['scenes']} unseen scenes): shape "
        f"{c['shape_accuracy']:.3f}, colour {c['colour_accuracy']:.3f}, size {c['size_accuracy']:.3f} per "
        f"object; every object's shape and colour right: **{c['scene_accuracy']:.3f}** per scene.",
        "",
        *_lm_ceiling_line(results.get("lm_ceiling")),
        "",
        "Attribute accuracy (mean +- std over seeds) at each budget:",
        "",
        "| connector | "
        + " | ".join(str(b) for b in results["budgets"])
        + " | CIDEr (last) | seconds (last) |",
        "| --- " * (len(results["budgets"]) + 3) + "|",
    ]
    for name, entry in results["contenders"].items():
        curve = _mean_curve(entry, "attribute_accuracy", "step")
        cider = _mean_curve(entry, "cider", "step")[-1]
        secs = _mean_curve(entry, "attribute_accuracy", "seconds")[-1][0]
        cells = [f"{m:.3f} +- {sd:.3f}" for _, m, sd in curve]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {cider[1]:.3f} | {secs:.0f} |")
    if s.get("target"):
        t = s["target"]
        lines += [
            "",
            f"Time to {t['metric']} >= {t['value']} (two-stage counts both stages), relative to TomeFormer:",
            "",
            "| connector | steps | ratio | seconds | ratio | seeds reaching |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for name, row in s["contenders"].items():
            lines.append(
                f"| {name} | {_fmt(row['steps_to_target'], '.0f')} | {_fmt(row['steps_ratio'], '.2f')} | "
                f"{_fmt(row['seconds_to_target'], '.0f')} | {_fmt(row['seconds_ratio'], '.2f')} | "
                f"{row['steps_seeds_reached']}/{len(results['seeds'])} |"
            )
    return "\n".join(lines) + "\n"


def compare(folders: Sequence[str | Path], target: tuple[str, float] | None = None) -> str:
    """One markdown table over several convergence runs, e.g. the points of a sweep.

    Per folder and contender: the settings that differ from the shipped bench, the tower's and the
    LM's ceilings (LM: slots in order; '-' for runs made before it was measured), attribute accuracy
    at every budget (mean over seeds) and the steps to one common `target` (default: 80% of the first
    folder's TomeFormer final attribute accuracy), so that rows compare across runs.
    """
    runs = []
    for folder in folders:
        path = Path(folder) / "results.json"
        if not path.is_file():
            raise ConfigError(f"{folder}: no results.json (not a finished `evlgen bench convergence` run)")
        runs.append((Path(folder), json.loads(path.read_text())))
    target = target or _default_target(runs[0][1]["contenders"])
    if target is None:
        raise ConfigError(f"{runs[0][0]}: no tomeformer run to set the target from; pass a target")
    metric, value = target
    budgets = sorted({b for _, r in runs for b in r["budgets"]})
    lines = [
        f"Steps to {metric} >= {value} (mean over seeds; two-stage counts both stages; '-': not every "
        "seed reached it).",
        "",
        "| run | connector | settings | backbones | tower | LM | "
        + " | ".join(str(b) for b in budgets)
        + " | steps to target | seeds |",
        "| --- " * (len(budgets) + 8) + "|",
    ]
    for folder, r in runs:
        for name, entry in r["contenders"].items():
            at = {round(x): m for x, m, _ in _mean_curve(entry, "attribute_accuracy", "step")}
            steps, reached = _to_target(entry, metric, value, "total_steps")
            # Later overrides of a key win (a scoped `connector.num_queries=8` over the contender's 32).
            latest = {o.split("=", 1)[0]: o for o in [*r["base_overrides"], *entry["overrides"]]}
            settings = list(latest.values())
            if r.get("world_sizes"):
                settings.append(f"world {r['world_sizes']}")
            cells = [_fmt(at.get(b)) for b in budgets]
            lm = r.get("lm_ceiling")
            lines.append(
                f"| {folder.name} | {name} | {', '.join(settings) or '-'} | {r.get('backbones', '?')} | "
                f"{r['tower_ceiling']['scene_accuracy']:.3f} | {_fmt(lm and lm['in_order'])} | "
                + " | ".join(cells)
                + f" | {_fmt(steps, '.0f')} | {reached}/{len(entry['runs'])} |"
            )
    return "\n".join(lines) + "\n"
