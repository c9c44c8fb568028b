"""`evlgen demo`: the whole method on the synthetic world, end to end, on a CPU in minutes.

1. generate the world (cached: same seed, same files);
2. get the tiny backbones (cached; trained once from scratch, then frozen);
3. train EVLGen one-stage with the LM loss only, through `evlgen train`'s own loop;
4. evaluate on the test split (unseen scenes) and the compositional split (unseen colour-shape
   pairs): CIDEr / BLEU-4, attribute accuracy (captions parsed with the world's grammar), zero-shot
   VQA through the frozen LM, and the same LM captioning with no image (`blind_cider`);
5. write `report.md`, `metrics.json`, `loss.png` and `samples.png`.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from evlgen.config import Config, GenerateConfig, load_config
from evlgen.data.pipeline import fixed_batches, make_sample_maker
from evlgen.data.sources import JsonlSource
from evlgen.model.vlm import VLM
from evlgen.synth import world
from evlgen.synth.backbones import Recipe, ensure_backbones
from evlgen.synth.plots import loss_curve_png, sample_grid_png

log = logging.getLogger(__name__)

DEMO_METRICS = ("bleu", "rouge_l", "cider")


def _bar(stage: str, done: int, total: int) -> None:
    if sys.stderr.isatty() or done == total or done % max(1, total // 5) == 0:
        width = 30
        fill = int(width * done / total)
        end = "\n" if done == total else ("\r" if sys.stderr.isatty() else "\n")
        print(f"  {stage:<16} [{'#' * fill}{'.' * (width - fill)}] {done}/{total}", end=end, file=sys.stderr)


def demo_config(backbones: Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The `demo` preset pointed at the cached backbones, with their architectures as built."""
    recipe = Recipe(**json.loads((backbones / "recipe.json").read_text())["recipe"])
    llm_saved = json.loads((backbones / "llm" / "config.json").read_text())
    llm_arch = {k: llm_saved[k] for k in recipe.lm_arch(0) if k in llm_saved}
    parts = [
        f"vision.name_or_path={backbones / 'vision'}",
        "vision.arch=" + json.dumps(recipe.vision_arch()),
        f"llm.name_or_path={backbones / 'llm'}",
        "llm.arch=" + json.dumps(llm_arch),
    ]
    return load_config("demo", [*parts, *overrides])


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def evaluate_split(
    vlm: VLM, cfg: Config, world_dir: Path, split: str, batch_size: int = 64
) -> dict[str, Any]:
    """Captions and zero-shot answers for one split, with every metric the report needs."""
    from evlgen.eval.captions import caption_scores
    from evlgen.eval.vqa import vqa_scores

    maker = make_sample_maker(cfg, vlm.vision.image_size, train=False)
    rows = _rows(world_dir / f"{split}.jsonl")
    source = JsonlSource(world_dir / f"{split}.jsonl")
    batches, bad = fixed_batches(source, maker, len(rows), batch_size)
    if bad:
        raise RuntimeError(f"{bad} unreadable images in the generated {split} split")
    gen = _generation(cfg.caption)
    with torch.no_grad():
        preds = _generate_all(vlm, batches, gen)
        # The same frozen LM with no image: what the captions would be from the language prior alone.
        prefix = torch.zeros(1, 0, vlm.llm.hidden_size)  # [1, P=0, D]
        blind = vlm.llm.generate(prefix, [cfg.caption.prompt], **gen)[0]
    by_key = {r["id"]: r for r in rows}  # rows carry an "id", which the reader uses as the key
    refs = {k: by_key[k]["captions"] for k in preds}
    scenes = {k: world.scene_from_dict(by_key[k]["scene"]) for k in preds}
    # METEOR's Java start-up (~10 s) is not worth it in a minutes-long demo; `evlgen eval` runs it.
    scores = caption_scores(preds, refs, metrics=DEMO_METRICS)
    blind_scores = caption_scores({k: blind for k in preds}, refs, metrics=DEMO_METRICS)
    matches = [world.attribute_match(preds[k], scenes[k]) for k in preds]
    out: dict[str, Any] = {
        "images": len(preds),
        "cider": scores.scores.get("cider"),
        "bleu4": scores.scores.get("bleu4"),
        "caption_scores": scores.to_dict(),
        "blind_caption": blind,
        "blind_cider": blind_scores.scores.get("cider"),
        "attribute_accuracy": sum(m["all"] for m in matches) / len(matches),
        "colour_accuracy": sum(m["colour"] for m in matches) / len(matches),
        "shape_accuracy": sum(m["shape"] for m in matches) / len(matches),
        "count_accuracy": sum(m["count"] for m in matches) / len(matches),
    }

    vqa_rows = _rows(world_dir / f"{split}_vqa.jsonl")
    vqa_source = JsonlSource(world_dir / f"{split}_vqa.jsonl")
    vqa_batches, _ = fixed_batches(vqa_source, maker, len(vqa_rows), batch_size)
    answers = _generate_all(vlm, vqa_batches, _generation(cfg.vqa))
    vqa_by_key = {r["id"]: r for r in vqa_rows}
    vqa = vqa_scores(answers, {k: vqa_by_key[k]["answers"] for k in answers})
    out["vqa_accuracy"] = vqa["accuracy"]
    out["vqa_questions"] = vqa["count"]
    out["examples"] = [
        {
            "image": by_key[k]["image"],
            "caption": preds[k],
            "reference": refs[k][0],
            "correct": matches[i]["all"],
        }
        for i, k in enumerate(list(preds)[:16])
    ]
    out["vqa_examples"] = [
        {
            "image": vqa_by_key[k]["image"],
            "question": vqa_by_key[k]["question"],
            "answer": answers[k],
            "expected": vqa_by_key[k]["answers"][0],
        }
        for k in list(answers)[:16]
    ]
    return out


def _generation(g: GenerateConfig) -> dict[str, int]:
    return {"num_beams": g.num_beams, "max_new_tokens": g.max_new_tokens, "min_new_tokens": g.min_new_tokens}


@torch.no_grad()
def _generate_all(vlm: VLM, batches: list[Any], gen: dict[str, int]) -> dict[str, str]:
    """Sample key -> generated text for every fixed batch."""
    out: dict[str, str] = {}
    for b in batches:
        out.update(zip(b.keys, vlm.generate(b.pixels, b.prompts, **gen), strict=True))
    return out


def majority_answer_accuracy(world_dir: Path, split: str) -> tuple[str, float]:
    """Always answering the most common training answer: the baseline zero-shot VQA must beat."""
    train = Counter(r["answers"][0] for r in _rows(world_dir / "train_vqa.jsonl"))
    top = train.most_common(1)[0][0]
    rows = _rows(world_dir / f"{split}_vqa.jsonl")
    return top, sum(top in r["answers"] for r in rows) / len(rows)


def run_demo(
    out: str | Path,
    *,
    seed: int = 0,
    overrides: list[str] | tuple[str, ...] = (),
    sizes: dict[str, int] | None = None,
    recipe: Recipe | None = None,
    cache_dir: str | None = None,
) -> dict[str, Any]:
    from evlgen.train.loop import train

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    world_dir = out / "world"
    print("1/4 generating the synthetic world", file=sys.stderr)
    world.write_world(world_dir, seed=seed, sizes=sizes)
    print("2/4 backbones (trained once, then cached)", file=sys.stderr)
    t_bb = time.perf_counter()
    backbones = ensure_backbones(recipe or Recipe(seed=seed), cache_dir, progress=_bar)
    backbone_seconds = time.perf_counter() - t_bb
    cfg = demo_config(
        backbones,
        [
            f"seed={seed}",
            f"data.train=[{{path: {world_dir / 'train.jsonl'}}}]",
            f"data.val={{path: {world_dir / 'val.jsonl'}}}",
            *overrides,
        ],
    )
    print("3/4 training EVLGen (one stage, LM loss only)", file=sys.stderr)
    run_dir = out / "run"
    shutil.rmtree(
        run_dir, ignore_errors=True
    )  # the demo always trains afresh; its world and backbones are cached
    t_train = time.perf_counter()
    summary = train(cfg, run_dir, cache_dir=cache_dir)
    train_seconds = time.perf_counter() - t_train
    print("4/4 evaluating on held-out splits", file=sys.stderr)
    vlm = VLM.from_pretrained(run_dir / "model").eval()
    results = {split: evaluate_split(vlm, cfg, world_dir, split) for split in ("test", "comp")}
    for split in results:
        top, acc = majority_answer_accuracy(world_dir, split)
        results[split]["vqa_majority_answer"] = top
        results[split]["vqa_majority_accuracy"] = acc
    metrics = {
        "seed": seed,
        "test": {k: v for k, v in results["test"].items() if "examples" not in k},
        "comp": {k: v for k, v in results["comp"].items() if "examples" not in k},
        "train_seconds": round(train_seconds, 1),
        "backbone_seconds": round(backbone_seconds, 1),
        "total_seconds": round(time.perf_counter() - t0, 1),
        "train_steps": summary["steps"],
        "final_val_loss": summary["val_loss"],
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    loss_curve_png(run_dir / "metrics.jsonl", out / "loss.png")
    sample_grid_png(
        world_dir, results["test"]["examples"], results["test"]["vqa_examples"], out / "samples.png"
    )
    (out / "report.md").write_text(render_report(metrics, results, cfg))
    return metrics


def render_report(metrics: dict[str, Any], results: dict[str, Any], cfg: Config) -> str:
    t, c = metrics["test"], metrics["comp"]

    def row(name: str, key: str, fmt: str = "{:.3f}") -> str:
        return f"| {name} | {fmt.format(t[key])} | {fmt.format(c[key])} |"

    lines = [
        "# evlgen demo: the synthetic world",
        "",
        f"Seed {metrics['seed']}; EVLGen trained {metrics['train_steps']} steps "
        f"in {metrics['train_seconds']} s "
        f"(backbones {metrics['backbone_seconds']} s, total {metrics['total_seconds']} s).",
        "",
        "| metric | test (unseen scenes) | compositional (unseen colour-shape pairs) |",
        "| --- | --- | --- |",
        row("CIDEr", "cider"),
        row("BLEU-4", "bleu4"),
        row("blind CIDEr (LM alone, no image)", "blind_cider"),
        row("attribute accuracy (colour, shape, count all right)", "attribute_accuracy"),
        row("colour accuracy", "colour_accuracy"),
        row("shape accuracy", "shape_accuracy"),
        row("count accuracy", "count_accuracy"),
        row("zero-shot VQA accuracy", "vqa_accuracy"),
        row("majority-answer baseline", "vqa_majority_accuracy"),
        "",
        f"Metrics that ran: {', '.join(t['caption_scores']['ran'])}; "
        f"tokenizer {t['caption_scores']['tokenizer']}.",
        "",
        "![loss](loss.png)",
        "",
        "![samples](samples.png)",
        "",
        "## Test examples",
        "",
    ]
    for ex in results["test"]["examples"][:8]:
        lines.append(f"- `{ex['image']}`: **{ex['caption']}** (reference: {ex['reference']})")
    lines += ["", "## Zero-shot questions", ""]
    for ex in results["test"]["vqa_examples"][:8]:
        lines.append(f"- {ex['question']} -> **{ex['answer']}** (expected {ex['expected']})")
    return "\n".join(lines) + "\n"
