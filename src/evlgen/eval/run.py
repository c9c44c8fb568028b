"""`evlgen eval`: generate over one benchmark split, score it, and write the official submission files.

The model comes from a checkpoint (`save_pretrained` directory, which records how it was built and
trained); the benchmark, its task, its decoding settings and the scorer's options come from an eval
config (`eval:`, `caption:` / `vqa:` sections; shipped under configs/eval-*.yaml with the paper's
settings). Samples are split over ranks by index, generated in batches with beam search, gathered on
rank 0 and de-duplicated by key (a sample never counts twice, whatever the world size).

Outputs in the run folder:

    predictions.jsonl     one row per sample: key, prediction, references, metadata
    captions_results.json COCO caption results [{"image_id", "caption"}] (caption tasks)
    vqa_results.json      VQAv2 / EvalAI results [{"question_id", "answer"}] (VQA)
    metrics.json          scores, what ran and what did not (and why), bad samples, timing

A split without references (VQAv2 test-dev, NoCaps test) is predicted and written, not scored.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from evlgen.config import Config, ConfigError, GenerateConfig
from evlgen.data.pipeline import SampleError, SampleMaker, format_prompt, make_sample_maker
from evlgen.data.records import Record, RecordError
from evlgen.data.sources import is_streaming, open_source
from evlgen.data.transforms import ImageLoadError
from evlgen.fsutil import atomic_write_bytes

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (samples done on this rank, samples for this rank)


@dataclasses.dataclass
class Predictions:
    """What one split produced: key -> generated text, key -> record, and the samples that failed."""

    texts: dict[str, str]
    records: dict[str, Record]
    bad: list[tuple[str, str]]
    num_bad: int


def eval_config(checkpoint_cfg: Config, eval_cfg: Config, task: str | None = None) -> Config:
    """The checkpoint's model and data transforms with the eval config's task, benchmark and decoding."""
    e = eval_cfg.eval if task is None else dataclasses.replace(eval_cfg.eval, task=task)  # type: ignore[arg-type]
    if e.data is None:
        raise ConfigError(
            "eval.data is not set: name the benchmark split to evaluate (see docs/evaluation.md)"
        )
    return dataclasses.replace(checkpoint_cfg, caption=eval_cfg.caption, vqa=eval_cfg.vqa, eval=e)


def generation_kwargs(g: GenerateConfig) -> dict[str, Any]:
    return {
        "num_beams": g.num_beams,
        "max_new_tokens": g.max_new_tokens,
        "min_new_tokens": g.min_new_tokens,
        "length_penalty": g.length_penalty,
        "repetition_penalty": g.repetition_penalty,
    }


def _prompt(maker: SampleMaker, rec: Record, task: str) -> str:
    if task == "vqa":
        if rec.question is None:
            raise SampleError("a VQA sample needs a question")
        return format_prompt(maker.vqa_prompt, rec.question)
    return maker.caption_prompt


def _rank_records(source: Any, rank: int, world: int, limit: int | None) -> Iterator[Record | RecordError]:
    """This rank's share: rows rank, rank + world, ... of the first `limit` rows."""
    if is_streaming(source):
        seen = 0
        for shard in source.shards:
            for rec in source.iter_shard(shard):
                if limit is not None and seen >= limit:
                    return
                if seen % world == rank:
                    yield rec
                seen += 1
        return
    n = len(source) if limit is None else min(limit, len(source))
    for i in range(rank, n, world):
        try:
            yield source.get(i)
        except RecordError as e:
            yield e


def predict(
    vlm: Any,
    cfg: Config,
    *,
    rank: int = 0,
    world: int = 1,
    device: torch.device | None = None,
    progress: Progress | None = None,
    cache_dir: str | None = None,
) -> Predictions:
    """Generate for this rank's share of `cfg.eval.data` (no gathering; see `gather`)."""
    e = cfg.eval
    assert e.data is not None
    task = e.task
    source = open_source(e.data, cache_dir, require_references=False)
    maker = make_sample_maker(cfg, vlm.vision.image_size, train=False)
    gen = generation_kwargs(cfg.vqa if task == "vqa" else cfg.caption)
    device = device or next(vlm.parameters()).device
    total = len(source) if not is_streaming(source) else None
    if total is not None and e.max_samples is not None:
        total = min(total, e.max_samples)
    mine = None if total is None else len(range(rank, total, world))

    texts: dict[str, str] = {}
    records: dict[str, Record] = {}
    bad: list[tuple[str, str]] = []
    num_bad = 0
    pending: list[tuple[Tensor, str, Record]] = []

    def flush() -> None:
        if not pending:
            return
        t = max(p[0].shape[0] for p in pending)  # images among videos repeat to T frames
        pixels = torch.stack([p[0].expand(t, -1, -1, -1) for p in pending]).to(device)  # [B, T, 3, H, W]
        with torch.no_grad():
            out = vlm.generate(pixels, [p[1] for p in pending], **gen)
        for (_, _, rec), text in zip(pending, out, strict=True):
            texts[rec.key] = text.strip()
            records[rec.key] = rec
        pending.clear()
        if progress is not None:
            progress(len(texts) + num_bad, mine or 0)

    for rec in _rank_records(source, rank, world, e.max_samples):
        if isinstance(rec, RecordError):
            num_bad += 1
            bad.append((getattr(rec, "location", "?"), str(rec)))
            continue
        if task == "vqa" and rec.question is None:
            raise ConfigError(f"eval.task is vqa but {rec.location} has no question (a caption dataset?)")
        if task != "vqa" and rec.question is not None:
            raise ConfigError(f"eval.task is {task} but {rec.location} is a question (use --task vqa)")
        if rec.key in records or any(p[2].key == rec.key for p in pending):
            continue  # the same key twice in one file: predicted once
        try:
            pending.append((maker.pixels(rec, None), _prompt(maker, rec, task), rec))
        except (ImageLoadError, SampleError, OSError, ValueError) as exc:
            num_bad += 1
            bad.append((rec.location, f"{type(exc).__name__}: {exc}"))
            continue
        if len(pending) >= e.batch_size:
            flush()
    flush()
    return Predictions(texts, records, bad[:20], num_bad)


def _record_json(rec: Record) -> dict[str, Any]:
    return {
        "key": rec.key,
        "location": rec.location,
        "image": rec.image if isinstance(rec.image, str) else None,  # shard bytes are not sent
        "video": rec.video if isinstance(rec.video, str) else None,  # shard bytes are not sent
        "captions": list(rec.captions),
        "question": rec.question,
        "answers": list(rec.answers),
        "meta": dict(rec.meta),
    }


def _record_from_json(row: dict[str, Any]) -> Record:
    return Record(
        location=row["location"],
        key=row["key"],
        image=row["image"],
        video=row["video"],
        captions=tuple(row["captions"]),
        question=row["question"],
        answers=tuple(row["answers"]),
        meta=row["meta"],
    )


def gather(pred: Predictions, dist: Any) -> Predictions:
    """All ranks' predictions on every rank, first occurrence of each key kept (ranks in order)."""
    if dist is None or not getattr(dist, "enabled", False):
        return pred
    mine = json.dumps(
        {
            "texts": pred.texts,
            "records": [_record_json(r) for r in pred.records.values()],
            "bad": pred.bad,
            "num_bad": pred.num_bad,
        }
    )
    texts: dict[str, str] = {}
    records: dict[str, Record] = {}
    bad: list[tuple[str, str]] = []
    num_bad = 0
    for blob in dist.all_gather_str(mine):
        part = json.loads(blob)
        for row in part["records"]:
            if row["key"] not in texts:
                texts[row["key"]] = part["texts"][row["key"]]
                records[row["key"]] = _record_from_json(row)
        bad += [tuple(b) for b in part["bad"]]
        num_bad += part["num_bad"]
    return Predictions(texts, records, bad[:20], num_bad)


# -------------------------------------------------------------------------------------------------
# Scoring


def _lemmatizer() -> tuple[Callable[[str], str] | None, str | None]:
    """spaCy's lemmatiser as LAVIS applies it to OK-VQA answers, or (None, why it is unavailable)."""
    try:
        import spacy  # type: ignore[import-not-found]

        nlp = spacy.load("en_core_web_sm", disable=["parser", "ner"])
    except Exception as exc:  # ImportError, or OSError for a missing model: say which
        return None, f"spaCy en_core_web_sm unavailable ({type(exc).__name__}: {exc}); answers not lemmatised"

    def lemmatize(text: str) -> str:
        return " ".join(t.lemma_ if t.pos_ in ("NOUN", "VERB") else t.text for t in nlp(text))

    return lemmatize, None


def _with_references(
    pred: Predictions, notes: list[str], has: Callable[[Record], bool], what: str
) -> list[str]:
    """Keys of the samples that can be scored; a note for those that cannot (test splits)."""
    scored = [k for k, rec in pred.records.items() if has(rec)]
    if not scored:
        notes.append(f"no {what} in this split: predictions written (for the official server), not scored")
    elif len(scored) < len(pred.records):
        notes.append(f"{len(pred.records) - len(scored)} samples without {what} were not scored")
    return scored


def score(pred: Predictions, cfg: Config) -> dict[str, Any]:
    """Metrics for the predictions (empty `scores` with a note when the split has no references)."""
    e = cfg.eval
    notes: list[str] = []
    out: dict[str, Any] = {"task": e.task, "samples": len(pred.texts), "scores": {}, "notes": notes}
    if e.task == "vqa":
        from evlgen.eval.vqa import vqa_scores

        scored = _with_references(pred, notes, lambda r: bool(r.answers), "answers")
        if not scored:
            return out
        lemmatize = None
        if e.lemmatize:
            lemmatize, why = _lemmatizer()
            if why:
                notes.append(why)
        types = {k: str(pred.records[k].meta.get("answer_type", "all")) for k in scored}
        result = vqa_scores(
            {k: pred.texts[k] for k in scored},
            {k: pred.records[k].answers for k in scored},
            question_types=types if len(set(types.values())) > 1 else None,
            lemmatize=lemmatize,
        )
        ten = sum(len(pred.records[k].answers) >= 10 for k in scored)
        out["rule"] = "vqav2 (10 human answers)" if ten == len(scored) else "exact match after normalisation"
        out["scores"] = {"accuracy": result["accuracy"]}
        if "per_type" in result:
            out["per_type"] = result["per_type"]
        out["scored"] = result["count"]
        return out

    from evlgen.eval.captions import caption_scores

    scored = _with_references(pred, notes, lambda r: bool(r.captions), "reference captions")
    if not scored:
        return out
    refs = {k: list(pred.records[k].captions) for k in scored}
    result = caption_scores({k: pred.texts[k] for k in scored}, refs, metrics=tuple(e.metrics))
    out["scores"] = dict(result.scores)
    out["ran"], out["skipped"], out["tokenizer"] = result.ran, result.skipped, result.tokenizer
    out["scored"] = len(scored)
    domains = {k: pred.records[k].meta.get("domain") for k in scored}
    if len({d for d in domains.values() if d is not None}) > 1:  # NoCaps: CIDEr per domain, as reported
        per = {}
        for d in sorted({str(d) for d in domains.values() if d is not None}):
            ks = [k for k in scored if str(domains[k]) == d]
            r = caption_scores({k: pred.texts[k] for k in ks}, {k: refs[k] for k in ks}, metrics=("cider",))
            per[d] = {"cider": r.scores.get("cider"), "count": len(ks)}
        out["per_domain"] = per
    return out


# -------------------------------------------------------------------------------------------------
# Writing


def _official_id(value: Any, fallback: str) -> int | str:
    # The official formats use integer ids; keys are strings here.
    if isinstance(value, int):
        return value
    try:
        return int(fallback)
    except ValueError:
        return fallback


def write_outputs(out: Path, pred: Predictions, metrics: dict[str, Any], task: str) -> dict[str, str]:
    """predictions.jsonl, the official results file and metrics.json (with `files` added), each
    written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for k, text in pred.texts.items():
        rec = pred.records[k]
        ref = {"answers": list(rec.answers)} if task == "vqa" else {"references": list(rec.captions)}
        rows.append({"key": k, "prediction": text, **ref, **({"meta": rec.meta} if rec.meta else {})})
    files = {"predictions": str(out / "predictions.jsonl")}
    atomic_write_bytes(out / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    if task == "vqa":
        results = [
            {"question_id": _official_id(pred.records[k].meta.get("question_id"), k), "answer": t}
            for k, t in pred.texts.items()
        ]
        name = "vqa_results.json"
    else:
        results = [
            {"image_id": _official_id(pred.records[k].meta.get("image_id"), k), "caption": t}
            for k, t in pred.texts.items()
        ]
        name = "captions_results.json"
    atomic_write_bytes(out / name, json.dumps(results).encode())
    files["results"] = str(out / name)
    files["metrics"] = str(out / "metrics.json")
    metrics["files"] = files
    atomic_write_bytes(out / "metrics.json", json.dumps(metrics, indent=2).encode())
    return files


def table(metrics: dict[str, Any], reference: dict[str, float]) -> str:
    """A short plain-text table: each score, and the paper's figure beside it when the config has one."""
    lines = [f"{'metric':<10} {'ours':>8} {'paper':>8}"]
    for name, value in metrics["scores"].items():
        paper = reference.get(name)
        lines.append(f"{name:<10} {value:>8.4f} {'' if paper is None else f'{paper:>8.4f}'}")
    for name, part in metrics.get("per_domain", {}).items():
        lines.append(f"cider[{name}] {part['cider']:>8.4f}   ({part['count']} images)")
    for name, part in metrics.get("per_type", {}).items():
        lines.append(f"acc[{name}] {part['accuracy']:>8.4f}   ({part['count']} questions)")
    lines += [f"note: {n}" for n in metrics["notes"]]
    for name, why in metrics.get("skipped", {}).items():
        lines.append(f"skipped {name}: {why}")
    return "\n".join(lines)


def run_eval(
    cfg: Config,
    checkpoint: str | Path,
    out: str | Path,
    *,
    task: str | None = None,
    dist: Any = None,
    cache_dir: str | None = None,
    progress: Progress | None = None,
    vlm: Any = None,
) -> dict[str, Any]:
    """Evaluate a checkpoint on `cfg.eval.data`; rank 0 scores and writes. Returns the metrics."""
    from evlgen.model.vlm import VLM

    if vlm is None:
        vlm = VLM.from_pretrained(checkpoint)
    device = dist.device if dist is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vlm = vlm.to(device).eval()
    run_cfg = eval_config(vlm.config, cfg, task)
    t0 = time.perf_counter()  # reading, transforms and generation; not the model load
    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    pred = predict(
        vlm, run_cfg, rank=rank, world=world, device=device, progress=progress, cache_dir=cache_dir
    )
    pred = gather(pred, dist)
    if rank != 0:
        return {}
    if not pred.texts:
        raise RuntimeError(
            f"no usable samples in {run_cfg.eval.data}: {pred.num_bad} bad, e.g. {pred.bad[:3]}"
        )
    seconds = time.perf_counter() - t0
    metrics = score(pred, run_cfg)
    metrics.update(
        checkpoint=str(checkpoint),
        data=dataclasses.asdict(run_cfg.eval.data),  # type: ignore[arg-type]
        generation=dataclasses.asdict(run_cfg.vqa if run_cfg.eval.task == "vqa" else run_cfg.caption),
        bad_samples=pred.num_bad,
        bad_examples=pred.bad,
        generate_seconds=round(seconds, 2),
        samples_per_s=round(len(pred.texts) / max(seconds, 1e-9), 2),
        world_size=world,
    )
    if run_cfg.eval.reference:
        metrics["paper"] = dict(run_cfg.eval.reference)
    write_outputs(Path(out), pred, metrics, run_cfg.eval.task)
    return metrics
