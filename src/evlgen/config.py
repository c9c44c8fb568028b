"""Typed, frozen run configuration: dataclasses, YAML presets and dotted command-line overrides.

A config is built from a preset (a name under `configs/` or a YAML path), then `key.sub=value`
overrides, and checked against the dataclass types: an unknown key or a wrong type fails with the
key's dotted path and the valid keys at that level. `arch` mappings are passed to transformers'
config classes as they are (they describe the frozen parts so shapes and costs work offline).
A preset may start from another with `base: NAME`.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from evlgen.data.transforms import DEFAULT_MAX_PIXELS
from evlgen.model.connector import BertShape

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key."""


@dataclass(frozen=True)
class VisionConfig:
    """The frozen vision tower. `name_or_path` None builds random weights from `arch`."""

    family: Literal["clip", "siglip", "blip2"] = "clip"
    name_or_path: str | None = None
    revision: str | None = None
    # Index into the tower's hidden states: -1 = last block (before any final norm), -2 = penultimate.
    layer: int = -1
    # transformers vision-config fields (image_size, patch_size, hidden_size, ...).
    arch: dict[str, Any] = field(default_factory=dict)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD


@dataclass(frozen=True)
class ConnectorConfig:
    """The trainable connector. `init` names the BERT it starts from (None: random init).

    kind: `tomeformer` (EVLGen), `qformer` (BLIP-2's Q-Former) or `mlp` (LLaVA-1.5's 2-layer MLP over
    every visual token; no BERT, so `init` must be null). `r`, `r_inflection`, `merge_mode` and
    `max_positions` apply to the TomeFormer only; the `num_queries` ... `init_from` keys to the Q-Former.
    """

    kind: Literal["tomeformer", "qformer", "mlp"] = "tomeformer"
    init: str | None = "bert-base-uncased"
    revision: str | None = None
    arch: BertShape = field(default_factory=BertShape)
    # Tokens merged per layer: one int for every layer, or an explicit per-layer list.
    r: int | list[int] = 0
    # With an int r: ramp from r*(1-x) at the first layer to r*(1+x) at the last.
    r_inflection: float = 0.0
    merge_mode: Literal["mean", "weighted", "proportional"] = "mean"
    # Position-table size; None = enough for the tower's token count (interpolated beyond BERT's 512).
    max_positions: int | None = None
    # Q-Former: learned queries, and cross-attention to the visual tokens in layers 0, f, 2f, ...
    num_queries: int = 32
    cross_attention_freq: int = 2
    # Q-Former stage 1 (train.objective=qformer-stage1): the text path's tokenizer (hub id or path;
    # null = the LM's tokenizer, `byte` = the built-in byte tokenizer), its max length (with [CLS] and
    # [SEP]) and the ITC embedding width.
    text_tokenizer: str | None = None
    text_max_len: int = 32
    embed_dim: int = 256
    # Q-Former stage 2: a stage-1 model directory (a run's `model/`, a checkpoint, or the run directory)
    # whose ln_vision, queries and Q-Former layers start this run (strict; replaces `init`).
    init_from: str | None = None


@dataclass(frozen=True)
class VideoConfig:
    """How clips are encoded (model/temporal.py). The paper: `temporal: paper`, `frames_to_connector: mean`.

    `none` + `mean` is the image model run on each frame, frame features averaged.
    """

    # Attention across frames inside every run block of the frozen tower (trainable, gate starts at 0):
    # none; paper (per spatial position, query/key projections, values = the input; blind to frame
    # order); time-embed (the same with a learned time embedding added to its queries and keys).
    temporal: Literal["none", "paper", "time-embed"] = "none"
    temporal_dim: int = 256
    temporal_heads: int = 8
    # How frame tokens reach the connector: mean (the paper: averaged over frames) or concat (all
    # T x N tokens, marked by a learned time embedding per frame, every frame's CLS protected, merged
    # across frames by TomeFormer with `r` below).
    frames_to_connector: Literal["mean", "concat"] = "mean"
    # concat only: tokens merged per connector layer (an int for every layer, or a per-layer list);
    # null = a geometric schedule from T x N tokens to the frame-mean path's output count (+ T - 1 CLS).
    r: int | list[int] | None = None


@dataclass(frozen=True)
class LLMConfig:
    """The frozen causal LM. `name_or_path` None builds random weights from `arch`."""

    name_or_path: str | None = None
    revision: str | None = None
    # Tokenizer source: None = same as name_or_path; "byte" = the built-in byte-level tokenizer.
    tokenizer: str | None = None
    # transformers config fields, including model_type (e.g. opt, llama, qwen2).
    arch: dict[str, Any] = field(default_factory=dict)
    # End-of-caption token appended to every target; None = the tokenizer's EOS.
    end_token: str | None = None
    max_text_len: int = 32
    max_prompt_len: int = 64
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


@dataclass(frozen=True)
class GenerateConfig:
    """Decoding settings for one task."""

    prompt: str = ""
    num_beams: int = 5
    max_new_tokens: int = 30
    min_new_tokens: int = 8
    length_penalty: float = 1.0
    repetition_penalty: float = 1.0


@dataclass(frozen=True)
class DatasetConfig:
    """One dataset: where its annotations are and how much of the mix it gets.

    Formats: `jsonl` (one JSON object per line, paths relative to `root`), `coco` (a Karpathy split
    file `dataset_coco.json` or an official `captions_*.json`; images under `root`), `webdataset`
    (tar shards in the img2dataset layout: a file, a folder, a glob or a `{000..099}` brace range),
    `features` (a cache written by `evlgen cache-features`). Benchmark files (docs/data.md): `vqav2`
    (`okvqa` is the same reader) with an optional `annotations` file, `gqa`, `msrvtt`, `msvd`. `auto`
    decides from the path and, for `.json`/`.txt`, the file's first bytes.
    """

    path: str
    format: Literal[
        "auto", "jsonl", "coco", "webdataset", "features", "vqav2", "okvqa", "gqa", "msrvtt", "msvd"
    ] = "auto"
    # Folder that relative image/video paths are resolved against (default: the annotation file's folder).
    root: str | None = None
    # coco: Karpathy split, train (includes restval), val or test. msrvtt: the videos' split (train,
    # validate or its alias val, test). msvd: train, val, test, or a text file of video names.
    # None = every row in the file.
    split: str | None = None
    # vqav2/okvqa: the official annotations file (answers) paired with the questions file in `path`;
    # None = questions only (test-dev), usable for prediction but not for training or scoring.
    annotations: str | None = None
    # Mixing ratio among the training datasets (normalised; the paper mixes 15:4:1).
    weight: float = 1.0
    name: str | None = None


@dataclass(frozen=True)
class DataConfig:
    """Datasets and the image pipeline. Each micro-batch is drawn from one dataset, as the reference."""

    train: list[DatasetConfig] = field(default_factory=list)
    val: DatasetConfig | None = None
    # Validation loss and sample captions use the first `val_samples` rows of `val`.
    val_samples: int = 64
    num_workers: int = 2
    # Train augmentation: RandomResizedCrop scale range; horizontal flip is off by default because it
    # contradicts captions that say "left" or "right".
    crop_scale: tuple[float, float] = (0.5, 1.0)
    hflip: bool = False
    eval_resize: Literal["squash", "center_crop"] = "squash"
    max_pixels: int = DEFAULT_MAX_PIXELS
    # Frames sampled per video clip (also the length of the video model's time embeddings).
    frames: int = 4
    # Training-time frame choice: `segments` = one random frame in each of `frames` equal segments
    # (random offset, TSN); `head-tail` = half the frames at random from the clip's first half, the
    # rest from its second half (LAVIS). Evaluation always takes the segment centres.
    frame_sampling: Literal["segments", "head-tail"] = "segments"
    # Stop with an error once more than this fraction of samples (after the first `bad_grace`) is bad.
    max_bad_fraction: float = 0.05
    bad_grace: int = 200


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation recipe. Defaults are the paper's (AdamW, warm-up + cosine), scaled by presets."""

    # lm: next-token loss through the frozen LM (EVLGen, one-stage baselines, BLIP-2 stage 2);
    # qformer-stage1: BLIP-2's ITC + ITM + ITG on the Q-Former alone (no LM is built).
    objective: Literal["lm", "qformer-stage1"] = "lm"
    steps: int = 250_000
    # Per process and micro-step; the global batch is batch_size * grad_accum * world size.
    batch_size: int = 200
    grad_accum: int = 1
    lr: float = 1e-4
    warmup_steps: int = 5000
    warmup_start_lr: float = 1e-6
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    # Gradient-norm clipping; null = none (the reference does not clip).
    clip_grad: float | None = None
    # auto: bf16 autocast on a GPU that supports it, else fp16 with a grad scaler; fp32 on CPU.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    log_every: int = 50
    # 0 disables the periodic validation loss / sample captions.
    val_every: int = 5000
    sample_every: int = 5000
    ckpt_every: int = 5000
    keep_last: int = 3
    # Non-finite losses are skipped; this many in a row abort the run.
    max_nonfinite: int = 10
    tensorboard: bool = True
    # Weights & Biases project; logging to W&B happens only when set (and wandb is installed).
    wandb_project: str | None = None
    # A saved model (a `model/` folder) whose trainable weights start this run, e.g. an image
    # checkpoint fine-tuned on video: its weights must match by name and shape; parts it lacks (the
    # video modules) keep their fresh initialisation. Ignored when resuming.
    init_from: str | None = None


@dataclass(frozen=True)
class EvalConfig:
    """What `evlgen eval` scores: one benchmark split, its task and the scorer's options."""

    # caption: the `caption` decoding settings; vqa: the `vqa` ones; video-caption: captions of clips.
    task: Literal["caption", "vqa", "video-caption"] = "caption"
    data: DatasetConfig | None = None
    batch_size: int = 16
    # Caption metrics (pycocoevalcap); SPICE runs only when its models are installed (never downloads).
    metrics: tuple[str, ...] = ("bleu", "meteor", "rouge_l", "cider", "spice")
    # Score only the first N samples (a quick check); null = the whole split.
    max_samples: int | None = None
    # OK-VQA as in the paper's setup: lemmatise predicted answers (needs spaCy's en_core_web_sm; the
    # report says so when it is not installed, and scores without).
    lemmatize: bool = False
    # The paper's figure for this benchmark (fractions, e.g. {cider: 1.45}), printed beside ours.
    reference: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Config:
    """A whole run: model parts, how it decodes, what it trains on and how."""

    name: str = "custom"
    seed: int = 0
    vision: VisionConfig = field(default_factory=VisionConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    caption: GenerateConfig = field(default_factory=GenerateConfig)
    vqa: GenerateConfig = field(
        default_factory=lambda: GenerateConfig(
            prompt="Question: {} Short answer:", num_beams=5, max_new_tokens=10, min_new_tokens=1
        )
    )
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ---------------------------------------------------------------------------------------------
# Building from plain data


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass `cls` from nested dicts, checking every key and type."""
    if not isinstance(data, dict):
        where = path[:-1] if path else "config"
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        where = f"{path}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{where}'; valid keys{_at(path)}: {', '.join(names)}")
        kwargs[key] = _coerce(hints[key], value, where)
    required = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [k for k in required if k not in kwargs]
    if missing:
        raise ConfigError(
            f"missing config key '{path}{missing[0]}'{_at(path)}; required: {', '.join(required)}"
        )
    return cls(**kwargs)


def _at(path: str) -> str:
    return f" under '{path[:-1]}'" if path else ""


_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
_SCALARS: dict[type, tuple[str, tuple[type, ...]]] = {
    bool: ("true or false", (bool,)),
    int: ("an integer", (int,)),
    float: ("a number", (int, float)),
    str: ("a string", (str,)),
}


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where + ".")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"config key '{where}' must be one of {list(args)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return _coerce(option, value, where)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{where}' must be {_name(tp)}, got {value!r} ({type(value).__name__})")
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"config key '{where}' must be null, got {value!r}")
        return None
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"config key '{where}' must be a list ({_name(tp)}), got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"config key '{where}' needs {len(args)} values, got {len(value)}")
            return tuple(
                _coerce(t, v, f"{where}[{i}]") for i, (t, v) in enumerate(zip(args, value, strict=True))
            )
        item = args[0] if args else Any
        items = [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{where}' must be a mapping, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, str) and _EXPONENT.fullmatch(value.strip()):
        # YAML 1.1 reads `4e-3` (no dot in the mantissa) as a string; it is plainly meant as a number.
        return float(value)
    if tp in _SCALARS:
        what, kinds = _SCALARS[tp]
        # bool is an int subclass in Python; `seed: true` must still be an error.
        if not isinstance(value, kinds) or (tp is not bool and isinstance(value, bool)):
            raise ConfigError(f"config key '{where}' must be {what}, got {value!r}")
        return float(value) if tp is float else value
    raise TypeError(f"unsupported config type {tp} at '{where}'")


def _name(tp: Any) -> str:
    return str(tp).replace("typing.", "").replace("NoneType", "null")


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dicts/lists, ready for YAML or JSON."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, list | tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def dump_yaml(cfg: Config, path: str | Path) -> None:
    """Write the resolved config; loading it back gives an equal Config."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ---------------------------------------------------------------------------------------------
# Presets and overrides


def preset_dirs() -> list[Path]:
    """Where preset names are looked up: the installed package data, then the source checkout."""
    dirs = [Path(str(resources.files("evlgen") / "configs"))]
    dirs.append(Path(__file__).resolve().parents[2] / "configs")
    return [d for d in dirs if d.is_dir()]


def list_presets() -> list[str]:
    return sorted({p.stem for d in preset_dirs() for p in d.glob("*.yaml")})


def _preset_file(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        return path
    for d in preset_dirs():
        candidate = d / f"{name_or_path}.yaml"
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"unknown preset '{name_or_path}'; presets: {', '.join(list_presets())} (or a YAML path)"
    )


def _load_raw(name_or_path: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    path = _preset_file(name_or_path)
    if str(path) in seen:
        raise ConfigError(f"preset inheritance loops through {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping")
    base = data.pop("base", None)
    if base is None:
        return data
    parent = _load_raw(base, seen + (str(path),))
    # An `arch` map describes one specific model: a child preset's replaces its parent's whole,
    # while a command-line override like vision.arch.image_size=384 edits one field.
    return _deep_merge(parent, data, replace=("arch",))


def _deep_merge(base: dict[str, Any], over: dict[str, Any], replace: tuple[str, ...] = ()) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in replace:
            out[k] = _deep_merge(out[k], v, replace)
        else:
            out[k] = v
    return out


def apply_override(data: dict[str, Any], override: str) -> dict[str, Any]:
    """Apply one `a.b.c=value` (value parsed as YAML) to nested dicts, returning a new dict."""
    if "=" not in override:
        raise ConfigError(f"override '{override}' must look like key.sub=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override '{override}' has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{override}': the value is not valid YAML ({e.problem})") from None
    nested: Any = value
    for p in reversed(parts):
        nested = {p: nested}
    return _deep_merge(data, nested)


def load_config(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Preset name or YAML path, then dotted overrides -> a checked, frozen Config."""
    data = _load_raw(name_or_path)
    for o in overrides:
        data = apply_override(data, o)
    return from_dict(Config, data)


def with_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """`cfg` with dotted overrides applied, checked like a freshly loaded config."""
    data = to_dict(cfg)
    for o in overrides:
        data = apply_override(data, o)
    return from_dict(Config, data)
