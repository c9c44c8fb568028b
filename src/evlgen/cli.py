"""The `evlgen` command line: the only place that configures logging and seeds.

Subcommands:
  info PRESET [key=value ...] [--json]   token schedule, connector MACs, parameter counts (offline)
  presets                                list the shipped presets
  smoke [--out DIR]                      tiny end-to-end check: train, generate, save, reload
  train PRESET [key=value ...] --out DIR  train (torchrun for several processes); --resume auto
  data check PATH                        validate a dataset: counts, bad files, caption statistics
  cache-features PRESET --data P --out D  precompute the frozen tower's outputs for a dataset
  bench train|throughput|data PRESET     benchmarks (step breakdown, connectors side by side, data images/s)
  bench convergence                      connectors trained on the synthetic world: quality vs steps, seconds
  synth --out DIR                        generate the synthetic world
  demo [--out DIR]                       world -> backbones -> EVLGen training -> held-out evaluation
  eval CONFIG --checkpoint DIR           benchmark scores + official submission files (torchrun for ranks)
  caption --checkpoint DIR FILE...       captions for images or videos
  vqa --checkpoint DIR FILE... -q Q      answers to a question about images or videos
  convert lavis CKPT [k=v] --preset P --out D   the authors' (LAVIS) checkpoints -> evlgen folders
  push DIR OWNER/NAME                    upload a saved model to the Hugging Face Hub
  serve --checkpoint DIR                 web demo: caption an image or video, or ask a question
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from evlgen.config import ConfigError, list_presets, load_config


def _info(args: argparse.Namespace) -> int:
    from evlgen.model.build import describe

    cfg = load_config(args.config, args.overrides)
    info = describe(cfg)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    sched = info["token_schedule"]
    print(f"preset            {info['preset']}")
    print(f"visual tokens     {info['visual_tokens']} ({info['protected_tokens']} protected)")
    print(f"merge r per layer {info['merge_schedule']}")
    print(f"token schedule    {' -> '.join(map(str, sched))}  (LLM sees {sched[-1]})")
    print(f"connector         {info['connector_kind']}, objective {info['objective']}")
    print(f"connector MACs    {info['connector_macs'] / 1e9:.2f} G per image (linear layers)")
    if "qformer_macs" in info:
        q = info["qformer_macs"]
        parts = ", ".join(f"{k} {v / 1e9:.2f}" for k, v in q["stage1"].items() if k != "total")
        print(
            f"  Q-Former        stage 2 {q['stage2'] / 1e9:.2f} G; stage 1 {q['stage1']['total'] / 1e9:.2f} G"
        )
        print(f"  stage 1 parts   {parts} (G)")
    print(f"projection MACs   {info['projection_macs'] / 1e9:.3f} G per image")
    print(f"trainable params  {info['trainable_params']:,}")
    print(f"frozen params     {info['frozen_params']:,}")
    for name, part in info["parts"].items():
        print(f"  {name:<14}  trainable {part['trainable']:>14,}  frozen {part['frozen']:>16,}")
    return 0


def _presets(args: argparse.Namespace) -> int:
    print("\n".join(list_presets()))
    return 0


def _smoke(args: argparse.Namespace) -> int:
    from evlgen.smoke import run_smoke

    return run_smoke(args.out, steps=args.steps, preset=args.config, overrides=args.overrides)


def _train(args: argparse.Namespace) -> int:
    from evlgen.train import distributed
    from evlgen.train.loop import TrainingError, train

    cfg = load_config(args.config, args.overrides)
    dist = distributed.init(args.backend)
    if not dist.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    out = args.out or f"runs/{cfg.name}"
    try:
        logging.getLogger("evlgen").info("run directory %s", out)
        summary = train(cfg, out, dist=dist, resume=args.resume, cache_dir=args.cache_dir)
    except TrainingError as e:
        print(f"evlgen: training stopped: {e}", file=sys.stderr)
        return 3
    finally:
        distributed.shutdown()
    return 0 if summary["completed"] else 4


def _cache_features(args: argparse.Namespace) -> int:
    from evlgen.config import DatasetConfig
    from evlgen.data.features import cache_features

    cfg = load_config(args.config, args.overrides)
    ds = DatasetConfig(path=args.data, format=args.format, root=args.root, split=args.split)
    summary = cache_features(
        cfg,
        ds,
        args.out,
        views=args.views,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        dtype=args.dtype,
    )
    print(json.dumps(summary, indent=2))
    print(f"train from it with: data.train='[{{path: {args.out}, format: features}}]'")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from evlgen.bench import bench_data, bench_throughput, bench_train, format_report

    cfg = load_config(args.config, args.overrides)
    if args.bench in ("train", "throughput"):
        kwargs = dict(
            random_weights=args.random_weights,
            batch_size=args.batch_size,
            steps=args.steps,
            warmup=args.warmup,
            device=args.device,
            precision=args.precision,
            features=args.features,
        )
        if args.bench == "train":
            result = bench_train(cfg, **kwargs)
        else:
            variants = args.variants.split(",") if args.variants else None
            result = bench_throughput(cfg, variants=variants, rounds=args.rounds, **kwargs)
    else:
        workers = [int(w) for w in args.workers.split(",")]
        result = bench_data(cfg, workers=workers, batches=args.batches, batch_size=args.batch_size)
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    return 0


def _parse_target(text: str | None) -> tuple[str, float] | None:
    if not text:
        return None
    metric, _, value = text.partition("=")
    try:
        return (metric, float(value))
    except ValueError:
        raise ConfigError(f"--target must look like attribute_accuracy=0.5, got {text!r}") from None


def _bench_convergence(args: argparse.Namespace) -> int:
    from evlgen.convergence import run_convergence
    from evlgen.synth.backbones import Recipe, recipe_with

    target = _parse_target(args.target)
    results = run_convergence(
        args.out,
        names=args.connectors.split(","),
        seeds=[int(s) for s in args.seeds.split(",")],
        budgets=[int(b) for b in args.budgets.split(",")],
        stage1_steps=args.stage1_steps,
        eval_samples=args.eval_samples,
        target=target,
        overrides=args.overrides,
        cache_dir=args.cache_dir,
        sizes={"train": args.train_images} if args.train_images else None,
        recipe=recipe_with(Recipe(), args.backbones.split(",")) if args.backbones else None,
    )
    print(
        (Path(args.out) / "report.md").read_text()
        if not args.json
        else json.dumps(results["summary"], indent=2)
    )
    return 0


def _bench_compare(args: argparse.Namespace) -> int:
    from evlgen.convergence import compare

    print(compare(args.runs, _parse_target(args.target)))
    return 0


def _synth(args: argparse.Namespace) -> int:
    from evlgen.synth.world import DEFAULT_SIZES, write_world

    sizes = dict(DEFAULT_SIZES)
    for item in args.sizes or []:
        split, _, n = item.partition("=")
        if split not in sizes or not n.isdigit():
            raise ConfigError(f"--size {item!r}: expected SPLIT=N with SPLIT one of {', '.join(sizes)}")
        sizes[split] = int(n)
    result = write_world(
        args.out,
        seed=args.seed,
        sizes=sizes,
        image_size=args.image_size,
        videos=args.videos,
        shards=args.shards,
    )
    print(json.dumps(result, indent=2))
    return 0


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a share in [0, 1]")
    return value


def _demo(args: argparse.Namespace) -> int:
    if args.video and (args.backbones or args.canonical_share is not None):
        raise ConfigError(
            "--backbones and --canonical-share change the image demo; the video demo has its own recipe"
        )
    if args.video:
        from evlgen.synth.video_demo import VARIANTS, run_video_demo

        variants = list(VARIANTS) if args.video == "all" else args.video.split(",")
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [args.seed]
        run_video_demo(args.out, variants=variants, seeds=seeds, overrides=args.overrides)
        print((Path(args.out) / "report.md").read_text())
        return 0
    from evlgen.synth.backbones import Recipe, recipe_with
    from evlgen.synth.demo import run_demo

    recipe = recipe_with(Recipe(seed=args.seed), args.backbones.split(",")) if args.backbones else None
    share = {} if args.canonical_share is None else {"canonical_share": args.canonical_share}
    metrics = run_demo(args.out, seed=args.seed, overrides=args.overrides, recipe=recipe, **share)
    t, c = metrics["test"], metrics["comp"]
    print(
        f"test (unseen scenes):     CIDEr {t['cider']:.3f}  BLEU-4 {t['bleu4']:.3f}  "
        f"attributes {t['attribute_accuracy']:.3f}  VQA {t['vqa_accuracy']:.3f} "
        f"(majority {t['vqa_majority_accuracy']:.3f})  blind CIDEr {t['blind_cider']:.3f}"
    )
    print(
        f"compositional split:      CIDEr {c['cider']:.3f}  BLEU-4 {c['bleu4']:.3f}  "
        f"attributes {c['attribute_accuracy']:.3f}  VQA {c['vqa_accuracy']:.3f}"
    )
    print(f"trained in {metrics['train_seconds']} s; report: {args.out}/report.md")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from evlgen.eval.run import run_eval, table
    from evlgen.train import distributed

    cfg = load_config(args.config, args.overrides)
    dist = distributed.init(args.backend)
    try:
        out = args.out or str(Path(args.checkpoint) / f"eval-{cfg.name}")
        metrics = run_eval(cfg, args.checkpoint, out, task=args.task, dist=dist, cache_dir=args.cache_dir)
    finally:
        distributed.shutdown()
    if metrics:  # rank 0
        print(table(metrics, metrics.get("paper", {})))
        print(
            f"{metrics['samples']} samples ({metrics['bad_samples']} bad) at {metrics['samples_per_s']}/s; "
            f"predictions and metrics in {out}"
        )
    return 0


def _load_for_inference(checkpoint: str) -> Any:
    import torch

    import evlgen

    vlm = evlgen.load(checkpoint).eval()  # a folder or a hub repo id
    return vlm.to("cuda") if torch.cuda.is_available() else vlm


def _caption(args: argparse.Namespace) -> int:
    vlm = _load_for_inference(args.checkpoint)
    gen = {k: v for k, v in (("num_beams", args.beams), ("max_new_tokens", args.max_new_tokens)) if v}
    texts = vlm.caption(args.files, prompt=args.prompt, batch_size=args.batch_size, **gen)
    for path, text in zip(args.files, texts, strict=True):
        print(json.dumps({"file": path, "caption": text}) if args.json else f"{path}\t{text}")
    return 0


def _vqa(args: argparse.Namespace) -> int:
    vlm = _load_for_inference(args.checkpoint)
    files = args.files
    questions = args.question if len(args.question) == len(files) else args.question * len(files)
    if len(args.question) not in (1, len(files)):
        raise ConfigError(f"{len(files)} files but {len(args.question)} questions: give one, or one per file")
    gen = {"num_beams": args.beams} if args.beams else {}
    for path, q, a in zip(files, questions, vlm.answer(files, questions, **gen), strict=True):
        print(json.dumps({"file": path, "question": q, "answer": a}) if args.json else f"{path}\t{q}\t{a}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from evlgen.convert import ConversionError, convert_lavis

    cfg = load_config(args.preset, args.overrides)
    try:
        summary = convert_lavis(args.checkpoint, cfg, args.out)
    except ConversionError as e:
        print(f"evlgen: {e}", file=sys.stderr)
        return 2
    print(
        f"converted {summary['converted']} tensors ({summary['parameters']:,} parameters; "
        f"{len(summary['dropped'])} unused reference keys dropped) into {summary['out']}"
    )
    return 0


def _push(args: argparse.Namespace) -> int:
    from evlgen.hub import HubError, push_to_hub

    try:
        url = push_to_hub(args.checkpoint, args.repo_id, private=args.private, revision=args.revision)
    except HubError as e:
        print(f"evlgen: {e}", file=sys.stderr)
        return 2
    print(url)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from evlgen.serve import Limits, serve

    limits = Limits(
        max_bytes=int(args.max_upload_mb * 1e6),
        max_pixels=args.max_pixels,
        max_video_seconds=args.max_video_seconds,
        max_video_frames=args.max_video_frames,
        timeout_s=args.timeout,
    )
    serve(args.checkpoint, host=args.host, port=args.port, limits=limits, queue_size=args.queue_size)
    return 0


def _data_check(args: argparse.Namespace) -> int:
    from evlgen.data.check import main_check

    return main_check(
        args.path,
        format=args.format,
        root=args.root,
        split=args.split,
        as_json=args.json,
        limit=args.limit,
        annotations=args.annotations,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evlgen",
        description="Train visually conditioned language generation models the EVLGen way.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="token schedule, connector MACs and parameter counts (no download)")
    p.add_argument("config", help="preset name (see `evlgen presets`) or YAML path")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. connector.r=16")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_info)

    p = sub.add_parser("presets", help="list shipped presets")
    p.set_defaults(func=_presets)

    p = sub.add_parser("smoke", help="tiny end-to-end check on CPU: train, generate, save, reload")
    p.add_argument("config", nargs="?", default="tiny", help="preset (default: tiny)")
    p.add_argument("overrides", nargs="*", help="dotted overrides")
    p.add_argument("--out", default="runs/smoke", help="output directory")
    p.add_argument("--steps", type=int, default=30)
    p.set_defaults(func=_smoke)

    p = sub.add_parser(
        "train",
        help="train a model (single process, or `torchrun --nproc_per_node N -m evlgen train ...`)",
    )
    p.add_argument("config", help="preset name or YAML path")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=1000 data.num_workers=4")
    p.add_argument("--out", default=None, help="run directory (default: runs/<preset name>)")
    p.add_argument(
        "--resume",
        default=None,
        help="'auto' = the latest checkpoint in --out (a fresh start if none), or a checkpoint folder",
    )
    p.add_argument(
        "--backend", default="auto", choices=["auto", "nccl", "gloo"], help="torch.distributed backend"
    )
    p.add_argument(
        "--cache-dir", default=None, help="where annotation indexes are kept (default ~/.cache/evlgen)"
    )
    p.set_defaults(func=_train)

    p = sub.add_parser(
        "cache-features", help="run the frozen vision tower over a dataset once and store its outputs"
    )
    p.add_argument("config", help="preset name or YAML path (its vision tower is used)")
    p.add_argument("overrides", nargs="*", help="dotted overrides")
    p.add_argument("--data", required=True, help="dataset path (any format `data check` reads)")
    p.add_argument("--format", default="auto", choices=["auto", "jsonl", "coco", "webdataset"])
    p.add_argument("--root", default=None, help="folder relative image paths are under")
    p.add_argument("--split", default=None, help="COCO Karpathy split")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--views", type=int, default=0, help="0 = one un-augmented view; K = K augmented views")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shard-size", type=int, default=4096, help="samples per shard file")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.set_defaults(func=_cache_features)

    p = sub.add_parser("bench", help="benchmarks: training step breakdown, data pipeline throughput")
    bench_sub = p.add_subparsers(dest="bench", required=True)
    for name, help_ in (
        ("train", "images/s and per-stage time of a training step (synthetic input)"),
        ("throughput", "training step of each connector (TomeFormer, r=0, Q-Former, MLP) side by side"),
    ):
        p = bench_sub.add_parser(name, help=help_)
        p.add_argument("config", help="preset name or YAML path")
        p.add_argument("overrides", nargs="*", help="dotted overrides")
        p.add_argument(
            "--random-weights", action="store_true", help="build every part from `arch` (no download)"
        )
        p.add_argument(
            "--batch-size", type=int, default=None, help="default: train.batch_size (at most 8 on CPU)"
        )
        p.add_argument("--steps", type=int, default=10)
        p.add_argument("--warmup", type=int, default=3)
        p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
        p.add_argument("--precision", default=None, choices=["auto", "fp32", "bf16", "fp16"])
        p.add_argument(
            "--features", action="store_true", help="skip the tower, as when training from a feature cache"
        )
        if name == "throughput":
            p.add_argument("--variants", default=None, help="comma-separated; default: all four")
            p.add_argument("--rounds", type=int, default=3, help="interleaved repetitions (median kept)")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=_bench)
    p = bench_sub.add_parser(
        "data", help="images/s of the training data pipeline per DataLoader worker count"
    )
    p.add_argument("config", help="preset name or YAML path (its data.train is read)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.train='[{path: my.jsonl}]'")
    p.add_argument("--workers", default="0,1,2", help="comma-separated worker counts")
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_bench)
    p = bench_sub.add_parser(
        "convergence",
        help="connectors trained on the synthetic world under one budget, several seeds: quality vs steps/s",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        help="dotted overrides of the demo preset for every contender (train.lr=1e-3), or for one "
        "contender as NAME:key=value (qformer:connector.num_queries=8)",
    )
    p.add_argument("--out", default="runs/convergence", help="output folder (report.md, results.json, PNGs)")
    p.add_argument("--train-images", type=int, default=0, help="training scenes in the world (default 4000)")
    p.add_argument(
        "--backbones",
        default="",
        help="changes to the frozen backbones' recipe, e.g. lm_hidden=256,lm_layers=4 or "
        "shuffle_slots=true,lm_steps=2000,lm_ffn=256 (built once and cached like the demo's)",
    )
    p.add_argument(
        "--connectors",
        default="tomeformer,tomeformer-r0,qformer,qformer-2stage,mlp",
        help="comma-separated contenders",
    )
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--budgets", default="25,50,100,200,400", help="steps at which quality is measured")
    p.add_argument("--stage1-steps", type=int, default=400, help="stage-1 steps of the two-stage Q-Former")
    p.add_argument("--eval-samples", type=int, default=200, help="test scenes per evaluation")
    p.add_argument(
        "--target", default=None, help="e.g. attribute_accuracy=0.5 (default: 80%% of TomeFormer's final)"
    )
    p.add_argument("--cache-dir", default=None, help="backbones and index cache (default ~/.cache/evlgen)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_bench_convergence)
    p = bench_sub.add_parser(
        "compare", help="one table over several `bench convergence` runs (the points of a sweep)"
    )
    p.add_argument("runs", nargs="+", help="output folders of `evlgen bench convergence`")
    p.add_argument(
        "--target",
        default=None,
        help="e.g. attribute_accuracy=0.46 (default: 80%% of the first run's TomeFormer final)",
    )
    p.set_defaults(func=_bench_compare)

    p = sub.add_parser("synth", help="generate the synthetic world (images, captions, questions, videos)")
    p.add_argument("--out", default="data/synth", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--size", dest="sizes", action="append", help="SPLIT=N, e.g. --size train=10000 (repeatable)"
    )
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--videos", type=int, default=0, help="number of training clips (val/test get a quarter)")
    p.add_argument("--shards", action="store_true", help="also write the train split as WebDataset shards")
    p.set_defaults(func=_synth)

    p = sub.add_parser("demo", help="the whole method on the synthetic world, on a CPU in minutes")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the demo preset, e.g. train.steps=300")
    p.add_argument("--out", default="runs/demo", help="output folder (report.md, metrics.json, PNGs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--video",
        help="the synthetic-video benchmark instead: variants to compare (comma-separated: frame-mean, "
        "paper, time-embed, concat, time-embed+concat; or all), overrides of the demo-video preset",
    )
    p.add_argument("--seeds", help="--video: training seeds, comma-separated (default: --seed)")
    p.add_argument(
        "--backbones",
        default="",
        help="changes to the image demo's backbones recipe, e.g. shuffle_slots=true,lm_steps=2000,lm_ffn=256",
    )
    p.add_argument(
        "--canonical-share",
        type=_share,
        default=None,
        help="image demo: share of training samples on a scene's canonical caption, the rest on its "
        "paraphrases (default 0.95; 0.2 = each of the five references alike)",
    )
    p.set_defaults(func=_demo)

    p = sub.add_parser(
        "eval", help="score a checkpoint on a benchmark split and write the official submission files"
    )
    p.add_argument("config", help="eval preset (e.g. eval-coco-caption) or YAML path with an `eval:` section")
    p.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. eval.data.root=/data/coco eval.batch_size=32"
    )
    p.add_argument(
        "--checkpoint", required=True, help="a model directory (run/model or a checkpoint's model/)"
    )
    p.add_argument(
        "--task", default=None, choices=["caption", "vqa", "video-caption"], help="default: eval.task"
    )
    p.add_argument("--out", default=None, help="output folder (default: CHECKPOINT/eval-<config name>)")
    p.add_argument("--backend", default="auto", choices=["auto", "nccl", "gloo"])
    p.add_argument("--cache-dir", default=None, help="where annotation indexes are kept")
    p.set_defaults(func=_eval)

    p = sub.add_parser("caption", help="caption image or video files with a trained model")
    p.add_argument("files", nargs="+", help="images (jpg, png, ...) or short videos (mp4, avi, ...)")
    p.add_argument("--checkpoint", required=True, help="a model directory (save_pretrained)")
    p.add_argument("--prompt", default=None, help="default: the model's caption.prompt")
    p.add_argument("--beams", type=int, default=None, help="default: the model's caption.num_beams")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=_caption)

    p = sub.add_parser("vqa", help="answer a question about image or video files")
    p.add_argument("files", nargs="+", help="images or videos, then the question (one, or one per file)")
    p.add_argument("--question", "-q", action="append", required=True, help="repeatable: one per file")
    p.add_argument("--checkpoint", required=True, help="a model directory (save_pretrained)")
    p.add_argument("--beams", type=int, default=None, help="default: the model's vqa.num_beams")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=_vqa)

    p = sub.add_parser("convert", help="convert checkpoints from other code bases")
    convert_sub = p.add_subparsers(dest="convert_format", required=True)
    p = convert_sub.add_parser(
        "lavis", help="the authors' released EVLGen checkpoints (LAVIS .pth) -> an evlgen model folder"
    )
    p.add_argument("checkpoint", help="the LAVIS .pth (read with weights_only=True)")
    p.add_argument("--preset", required=True, help="the preset it was trained with, e.g. paper-opt2.7b")
    p.add_argument(
        "overrides", nargs="*", help="dotted overrides (right after CKPT), e.g. llm.name_or_path=/models/opt"
    )
    p.add_argument("--out", required=True, help="output model folder")
    p.set_defaults(func=_convert)

    p = sub.add_parser("push", help="upload a saved model folder to the Hugging Face Hub")
    p.add_argument("checkpoint", help="a model folder (save_pretrained / convert output)")
    p.add_argument("repo_id", help="owner/name (created if missing)")
    p.add_argument("--private", action="store_true")
    p.add_argument("--revision", default=None, help="branch to commit to (default: main)")
    p.set_defaults(func=_push)

    p = sub.add_parser("serve", help="web demo: upload an image or a short video, get a caption or an answer")
    p.add_argument("--checkpoint", required=True, help="a model folder or a hub repo id")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 exposes the demo to your network")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest accepted file")
    p.add_argument("--max-pixels", type=int, default=25_000_000, help="per image or video frame")
    p.add_argument("--max-video-seconds", type=float, default=60.0)
    p.add_argument("--max-video-frames", type=int, default=3000)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds one request may take")
    p.add_argument("--queue-size", type=int, default=16, help="waiting requests before 'busy' answers")
    p.set_defaults(func=_serve)

    p = sub.add_parser("data", help="dataset tools")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser(
        "check", help="validate a dataset and print counts, problems and caption statistics"
    )
    p.add_argument(
        "path", help="JSONL file, COCO JSON, benchmark file, WebDataset shards (file, folder, glob or {a..b})"
    )
    p.add_argument(
        "--format",
        default="auto",
        choices=["auto", "jsonl", "coco", "webdataset", "vqav2", "okvqa", "gqa", "msrvtt", "msvd"],
    )
    p.add_argument("--root", default=None, help="folder relative image paths are under")
    p.add_argument(
        "--split", default=None, help="COCO Karpathy split (train, val, test); MSR-VTT / MSVD split"
    )
    p.add_argument("--annotations", default=None, help="VQAv2 / OK-VQA annotations file for the questions")
    p.add_argument("--limit", type=int, default=None, help="check only the first N rows")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.set_defaults(func=_data_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # transformers' per-save progress bars would interleave with the training progress line.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"evlgen: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
