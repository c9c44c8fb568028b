"""Factories: turn a Config into built parts, check shapes before building, save and load models.

Pretrained weights are loaded here and only here, so tests can hand VLM tiny random modules. A part
whose `name_or_path` is None gets random weights from its `arch` (the tiny preset, benchmarks with
`random_weights=True`, and `evlgen info` on the meta device, which downloads nothing).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from evlgen.config import Config, ConfigError, ConnectorConfig, LLMConfig, VisionConfig, dump_yaml, from_dict
from evlgen.fsutil import fsync_tree
from evlgen.model.connector import TomeFormer, check_state_dict, tomeformer_macs
from evlgen.model.llm import FrozenLM
from evlgen.model.merge import merge_schedule, token_schedule
from evlgen.model.mlp import MLPProjector, mlp_macs
from evlgen.model.qformer import QFormer, qformer_macs
from evlgen.model.qformer_stage1 import (
    STAGE1_OBJECTIVE,
    QFormerStage1,
    QFormerText,
    handover_state,
    qformer_stage1_macs,
)
from evlgen.model.temporal import FrameTokens, concat_merge_schedule, temporal_modules
from evlgen.model.tokenizer import byte_tokenizer
from evlgen.model.vision import VisionTower, load_vision_model, random_vision_model
from evlgen.model.vlm import VLM, Connector

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
# Trainable weights a video model may have that an image checkpoint lacks (`train.init_from`).
VIDEO_KEYS = ("vision.block_adapters.", "frame_tokens.")
CONFIG_FILE = "config.yaml"
CARD_FILE = "README.md"
# Marks a frozen part saved inside the checkpoint directory (random or locally trained weights).
LOCAL_PREFIX = "./"


@dataclass(frozen=True)
class Plan:
    """What a config implies, computed from numbers alone (no weights)."""

    num_tokens: int  # visual tokens per frame out of the tower
    protected: int  # tokens the connector never merges: the CLS (one per frame with concat frames)
    rs: list[int]  # tokens merged at each connector layer (TomeFormer; empty for the other kinds)
    # Tokens entering each layer (T x N with concat frames), then the output count (other kinds: in, out).
    token_schedule: list[int]


def plan(cfg: Config) -> Plan:
    """Check the config's shapes and merge schedule before anything is built."""
    arch = cfg.vision.arch
    for key in ("image_size", "patch_size"):
        if not isinstance(arch.get(key), int):
            raise ConfigError(
                f"vision.arch.{key} must be set (an integer) so the token count is known offline"
            )
    if arch["image_size"] % arch["patch_size"]:
        raise ConfigError(f"vision.arch.image_size {arch['image_size']} is not a multiple of patch_size")
    protected = 0 if cfg.vision.family == "siglip" else 1
    num_tokens = (arch["image_size"] // arch["patch_size"]) ** 2 + protected
    c = cfg.connector
    _check_connector_keys(cfg)
    _check_video(cfg)
    if c.kind == "tomeformer":
        try:
            rs = merge_schedule(c.arch.num_hidden_layers, c.r, c.r_inflection)
            counts = token_schedule(num_tokens, rs, protected)
        except ValueError as e:
            raise ConfigError(f"connector.r: {e}") from None
        if c.max_positions is not None and c.max_positions < num_tokens:
            raise ConfigError(f"connector.max_positions={c.max_positions} < {num_tokens} visual tokens")
    else:
        rs, counts = [], [num_tokens, c.num_queries if c.kind == "qformer" else num_tokens]
    frames = cfg.data.frames
    if cfg.video.frames_to_connector == "concat":
        # Every frame's tokens enter the connector; its CLS tokens stay, so the output has T - 1 more.
        final = counts[-1] + (frames - 1) * protected
        num_in, protected = frames * num_tokens, frames * protected
        try:
            if cfg.video.r is None:
                rs = concat_merge_schedule(num_in, c.arch.num_hidden_layers, final, protected)
            else:
                rs = merge_schedule(c.arch.num_hidden_layers, cfg.video.r)
            counts = token_schedule(num_in, rs, protected)
        except ValueError as e:
            raise ConfigError(f"video.r ({frames} frames x {num_tokens} tokens): {e}") from None
    if cfg.train.objective == STAGE1_OBJECTIVE:  # no LM is built, so its sequence limits do not apply
        return Plan(num_tokens=num_tokens, protected=protected, rs=rs, token_schedule=counts)
    # Visual prefix + prompt + target + end token must fit the LM's position table (OPT's is learned).
    longest = counts[-1] + cfg.llm.max_prompt_len + cfg.llm.max_text_len + 1
    limit = cfg.llm.arch.get("max_position_embeddings")
    if isinstance(limit, int) and longest > limit:
        raise ConfigError(
            f"llm.arch.max_position_embeddings={limit} is shorter than the longest sequence {longest} "
            f"({counts[-1]} visual tokens + llm.max_prompt_len {cfg.llm.max_prompt_len} + "
            f"llm.max_text_len {cfg.llm.max_text_len} + end token): merge more (connector.r) or shorten"
        )
    return Plan(num_tokens=num_tokens, protected=protected, rs=rs, token_schedule=counts)


def _check_connector_keys(cfg: Config) -> None:
    """Keys that do not apply to the chosen connector kind or objective fail rather than being ignored."""
    c = cfg.connector
    if c.kind != "tomeformer" and any(merge_schedule(c.arch.num_hidden_layers, c.r, c.r_inflection)):
        raise ConfigError(f"connector.r merges tokens in the TomeFormer only; set connector.r=0 for {c.kind}")
    if c.kind == "mlp" and c.init is not None:
        raise ConfigError("connector.init names a BERT; the mlp connector has none: set connector.init=null")
    if c.init_from is not None and c.kind != "qformer":
        raise ConfigError(
            f"connector.init_from hands a Q-Former stage-1 model over; connector.kind is {c.kind}"
        )
    if c.kind == "qformer" and (c.num_queries < 1 or c.cross_attention_freq < 1):
        raise ConfigError("connector.num_queries and connector.cross_attention_freq must be >= 1")
    if cfg.train.objective == STAGE1_OBJECTIVE:
        if c.kind != "qformer":
            raise ConfigError(
                f"train.objective={STAGE1_OBJECTIVE} trains a Q-Former; connector.kind is {c.kind}"
            )
        if c.init_from is not None:
            raise ConfigError("connector.init_from starts stage 2 from stage 1; stage 1 itself cannot use it")
        if not 3 <= c.text_max_len <= c.arch.max_position_embeddings:
            raise ConfigError(
                f"connector.text_max_len={c.text_max_len} must be in [3, "
                f"connector.arch.max_position_embeddings={c.arch.max_position_embeddings}]"
            )


def _check_video(cfg: Config) -> None:
    v, frames = cfg.video, cfg.data.frames
    if v.frames_to_connector == "concat" and cfg.connector.kind != "tomeformer":
        raise ConfigError(
            f"video.frames_to_connector=concat merges frames in the TomeFormer; connector.kind is "
            f"{cfg.connector.kind}"
        )
    if frames < 1:
        raise ConfigError(f"data.frames must be at least 1, got {frames}")
    if v.r is not None and v.frames_to_connector != "concat":
        raise ConfigError("video.r sets the merge schedule of frames_to_connector=concat; it is mean here")
    if v.temporal != "none":
        width = cfg.vision.arch.get("hidden_size")
        if v.temporal_heads < 1 or v.temporal_dim % v.temporal_heads:
            raise ConfigError(
                f"video.temporal_dim {v.temporal_dim} must be a multiple of video.temporal_heads "
                f"{v.temporal_heads}"
            )
        if isinstance(width, int) and width % v.temporal_heads:
            raise ConfigError(
                f"video.temporal_heads {v.temporal_heads} must divide the tower width "
                f"vision.arch.hidden_size {width} (the values are the tower's own features, split by head)"
            )


def resolve_dtype(name: str) -> torch.dtype:
    """'auto' = bfloat16 on a CUDA machine (OPT overflows in fp16), float32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, name)


def _check_arch(loaded: Any, arch: dict[str, Any], where: str) -> None:
    # A preset states the architecture for offline use; the real checkpoint must agree with it.
    wrong = {
        k: (v, getattr(loaded, k)) for k, v in arch.items() if hasattr(loaded, k) and getattr(loaded, k) != v
    }
    wrong.pop("model_type", None)
    if wrong:
        detail = ", ".join(f"{k}: preset {a!r} vs checkpoint {b!r}" for k, (a, b) in wrong.items())
        raise ConfigError(f"{where} disagrees with the loaded checkpoint ({detail})")


def build_vision(cfg: VisionConfig, *, random_weights: bool = False) -> VisionTower:
    dtype = resolve_dtype(cfg.dtype)
    if cfg.name_or_path is None or random_weights:
        model = random_vision_model(cfg.family, cfg.arch).to(dtype)
    else:
        model = load_vision_model(cfg.family, cfg.name_or_path, cfg.revision, dtype=dtype)
        _check_arch(model.config, cfg.arch, "vision.arch")
    return VisionTower(model, cfg.family, cfg.layer)


def load_bert(cfg: ConnectorConfig, *, with_head: bool = False) -> tuple[Any, Any]:
    """(BertModel, its MLM head or None) from `connector.init`, checked against `connector.arch`."""
    from transformers import BertForMaskedLM, BertModel

    if with_head:  # the Q-Former's ITG head starts from BERT's MLM head transform, as in BLIP-2
        mlm = BertForMaskedLM.from_pretrained(cfg.init, revision=cfg.revision)
        bert, head = mlm.bert, mlm.cls
    else:
        bert, head = BertModel.from_pretrained(cfg.init, revision=cfg.revision, add_pooling_layer=False), None
    arch = dataclasses.asdict(cfg.arch)
    arch.pop("num_hidden_layers")  # the connector may keep only the first k layers
    arch.pop("max_position_embeddings")  # may be extended by interpolation
    _check_arch(bert.config, arch, "connector.arch")
    return bert, head


def build_connector(
    cfg: ConnectorConfig,
    p: Plan,
    *,
    random_weights: bool = False,
    encoder_width: int | None = None,
    llm_width: int | None = None,
    bert: Any = None,
) -> Connector:
    """The connector of `cfg.kind`. encoder_width: the tower's width (Q-Former, MLP); llm_width: the
    LM's (MLP); bert: an already loaded BertModel to start from (else `cfg.init` is loaded)."""
    if cfg.kind == "mlp":
        if encoder_width is None or llm_width is None:
            raise ValueError("the mlp connector needs encoder_width and llm_width")
        return MLPProjector(encoder_width, llm_width)
    if cfg.kind == "qformer":
        if encoder_width is None:
            raise ValueError("the Q-Former needs encoder_width (the tower's width)")
        if cfg.init is None or random_weights:
            return QFormer(cfg.arch, cfg.num_queries, encoder_width, cfg.cross_attention_freq)
        bert = bert if bert is not None else load_bert(cfg)[0]
        return QFormer.from_bert(
            bert,
            cfg.num_queries,
            encoder_width,
            cfg.cross_attention_freq,
            num_layers=cfg.arch.num_hidden_layers,
        )
    max_pos = cfg.max_positions or max(cfg.arch.max_position_embeddings, p.num_tokens)
    if cfg.init is None or random_weights:
        shape = dataclasses.replace(cfg.arch, max_position_embeddings=max_pos)
        return TomeFormer(shape, r=p.rs, merge_mode=cfg.merge_mode, protected=p.protected)
    bert = bert if bert is not None else load_bert(cfg)[0]
    return TomeFormer.from_bert(
        bert,
        r=p.rs,
        merge_mode=cfg.merge_mode,
        num_layers=cfg.arch.num_hidden_layers,
        max_positions=max_pos,
        protected=p.protected,
    )


def build_llm(cfg: LLMConfig, *, random_weights: bool = False) -> FrozenLM:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dtype = resolve_dtype(cfg.dtype)
    if cfg.name_or_path is None or random_weights:
        arch = dict(cfg.arch)
        if "model_type" not in arch:
            raise ConfigError("llm.arch.model_type must be set to build a random LM (e.g. opt, llama)")
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**arch), dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, revision=cfg.revision, dtype=dtype)
        _check_arch(model.config, cfg.arch, "llm.arch")
    source = cfg.tokenizer or cfg.name_or_path
    if source == "byte" or source is None:
        tokenizer = byte_tokenizer()
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, revision=cfg.revision)
        except OSError:
            if not random_weights:
                raise
            # A random-weights run (benchmarks, `info`) must work offline: any tokenizer will do.
            log.warning("tokenizer %s not available offline; using the byte tokenizer", source)
            tokenizer = byte_tokenizer()
    return FrozenLM(
        model,
        tokenizer,
        end_token=cfg.end_token,
        max_text_len=cfg.max_text_len,
        max_prompt_len=cfg.max_prompt_len,
    )


def build_text_tokenizer(cfg: Config, *, random_weights: bool = False) -> Any:
    """The Q-Former text path's tokenizer: `connector.text_tokenizer`, else the LM's tokenizer."""
    from transformers import AutoTokenizer

    source, revision = cfg.connector.text_tokenizer, None
    if source is None:
        source, revision = cfg.llm.tokenizer or cfg.llm.name_or_path, cfg.llm.revision
    if source is None or source == "byte":
        return byte_tokenizer()
    try:
        return AutoTokenizer.from_pretrained(source, revision=revision)
    except (OSError, ValueError):
        if not random_weights:
            raise
        log.warning("Q-Former text tokenizer %s not available offline; using the byte tokenizer", source)
        return byte_tokenizer()


def build_vlm(
    cfg: Config, *, random_weights: bool = False, connector_init: bool = True, log_table: bool = True
) -> VLM:
    """Build, compose, freeze; returned in eval mode.

    connector_init=False skips the connector's starting weights (the BERT download, a stage-1 model
    named by connector.init_from): from_pretrained loads its own right after.
    """
    p = plan(cfg)
    c = cfg.connector
    stage1 = cfg.train.objective == STAGE1_OBJECTIVE
    fresh = random_weights or not connector_init
    vision = build_vision(cfg.vision, random_weights=random_weights)
    v = cfg.video
    vision.set_block_adapters(
        temporal_modules(
            v.temporal,
            vision.hidden_size,
            vision.num_blocks,
            dim=v.temporal_dim,
            heads=v.temporal_heads,
            frames=cfg.data.frames,
        )
    )
    # The MLP ends at the LM's width, so its LM is built first; the other kinds keep the seed order
    # tower -> connector -> LM.
    llm = build_llm(cfg.llm, random_weights=random_weights) if c.kind == "mlp" else None
    bert, head = (None, None)
    if c.kind != "mlp" and c.init is not None and not fresh and c.init_from is None:
        bert, head = load_bert(c, with_head=stage1)
    connector = build_connector(
        c,
        p,
        random_weights=fresh or c.init_from is not None,
        encoder_width=vision.hidden_size,
        llm_width=None if llm is None else llm.hidden_size,
        bert=bert,
    )
    heads = None
    if stage1:
        text = QFormerText(build_text_tokenizer(cfg, random_weights=random_weights), c.text_max_len)
        heads = QFormerStage1(connector, text, c.arch.max_position_embeddings, c.embed_dim)
        if bert is not None:
            heads.load_bert(bert, head)
    elif llm is None:
        llm = build_llm(cfg.llm, random_weights=random_weights)
    frame_tokens = None
    if v.frames_to_connector == "concat":
        frame_tokens = FrameTokens(connector.hidden_size, cfg.data.frames, vision.num_protected)
    vlm = VLM(vision, connector, llm, stage1=heads, frame_tokens=frame_tokens)
    vlm.config = cfg
    if c.init_from is not None and not fresh:
        init_from_stage1(vlm, c.init_from)
    vlm.freeze(log_table=log_table)
    return vlm.eval()  # like transformers' from_pretrained; training code calls .train()


def stage1_model_dir(path: str | Path) -> Path:
    """The model directory of a stage-1 run: the path itself, or its `model/` (a run or checkpoint)."""
    path = Path(path)
    for candidate in (path, path / "model"):
        if (candidate / WEIGHTS_FILE).is_file() and (candidate / CONFIG_FILE).is_file():
            return candidate
    raise FileNotFoundError(
        f"connector.init_from={path}: no {WEIGHTS_FILE} + {CONFIG_FILE} there or in its model/ folder"
    )


def init_from_stage1(vlm: VLM, path: str | Path) -> None:
    """Start a Q-Former stage-2 VLM from a stage-1 model: ln_vision and the Q-Former, strictly.

    Every stage-1 key is loaded or on qformer.STAGE1_ONLY; every stage-2 key is loaded or on
    qformer.STAGE2_ONLY (llm_proj); a missing, unexpected or mis-shaped key fails naming it.
    """
    directory = stage1_model_dir(path)
    saved = load_checkpoint_config(directory)
    if saved.train.objective != STAGE1_OBJECTIVE or saved.connector.kind != "qformer":
        raise ConfigError(
            f"connector.init_from={path} is not a Q-Former stage-1 model (train.objective "
            f"{saved.train.objective!r}, connector.kind {saved.connector.kind!r})"
        )
    cfg: Config = vlm.config
    for key in ("family", "layer", "arch"):
        if getattr(saved.vision, key) != getattr(cfg.vision, key):
            raise ConfigError(
                f"connector.init_from={path} was trained on another tower: vision.{key} "
                f"{getattr(saved.vision, key)!r} there, {getattr(cfg.vision, key)!r} here"
            )
    weights = directory / WEIGHTS_FILE
    state = handover_state(load_file(str(weights)), vlm.trainable_state_dict(), source=str(weights))
    vlm.load_state_dict(state, strict=False)  # handover_state made the key set exact
    log.info("stage 2 starts from the stage-1 Q-Former in %s (%d tensors)", directory, len(state))


def meta_vlm(cfg: Config) -> VLM:
    """The model on the meta device: every name and shape, no memory, nothing downloaded."""
    counting = _counting_config(cfg)
    with torch.device("meta"):
        return build_vlm(counting, random_weights=True, log_table=False)


def _counting_config(cfg: Config) -> Config:
    """`cfg` for counting shapes: no LM vocabulary is needed, so the byte tokenizer spares a tokenizer
    download. The Q-Former's text path keeps its own (its word embeddings and ITG head are trainable),
    when available offline."""
    text = cfg.connector.text_tokenizer or cfg.llm.tokenizer or cfg.llm.name_or_path or "byte"
    return dataclasses.replace(
        cfg,
        llm=dataclasses.replace(cfg.llm, tokenizer="byte"),
        connector=dataclasses.replace(cfg.connector, text_tokenizer=text),
    )


def describe(cfg: Config) -> dict[str, Any]:
    """Token schedule, connector MACs and parameter counts, from shapes alone (meta device)."""
    p = plan(cfg)
    vlm = meta_vlm(cfg)
    counting = _counting_config(cfg)
    trainable = sum(t.numel() for _, t in vlm.trainable_named_parameters())
    total = sum(t.numel() for t in vlm.parameters())
    return {
        "preset": cfg.name,
        "connector_kind": cfg.connector.kind,
        "objective": cfg.train.objective,
        "visual_tokens": p.num_tokens,
        "protected_tokens": p.protected,
        "merge_schedule": p.rs,
        "token_schedule": p.token_schedule,
        "llm_visual_tokens": p.token_schedule[-1],
        **connector_costs(counting, p, vlm),
        "trainable_params": trainable,
        "frozen_params": total - trainable,
        "parts": {
            name: {
                "trainable": sum(t.numel() for t in m.parameters() if t.requires_grad),
                "frozen": sum(t.numel() for t in m.parameters() if not t.requires_grad),
            }
            for name, m in vlm.named_children()
        },
    }


def connector_costs(cfg: Config, p: Plan, vlm: VLM) -> dict[str, Any]:
    """Linear-layer MACs per image: `connector_macs` (what this config trains: the Q-Former's stage-1
    objective counts its text passes too), `projection_macs` (vl_proj + llm_proj) and, for the
    Q-Former, both stages apart (`qformer_macs`)."""
    c, a = cfg.connector, cfg.connector.arch
    dv, n = vlm.vision.hidden_size, p.num_tokens
    dl = None if vlm.llm is None else vlm.llm.hidden_size
    if c.kind == "mlp":
        return {"connector_macs": mlp_macs(n, dv, dl), "projection_macs": 0}
    if c.kind == "tomeformer":
        dc = a.hidden_size
        return {
            "connector_macs": tomeformer_macs(p.token_schedule, a.hidden_size, a.intermediate_size),
            # vl_proj reads every token entering the connector (T x N with concat frames).
            "projection_macs": p.token_schedule[0] * dv * dc + p.token_schedule[-1] * dc * dl,
        }
    stage2 = qformer_macs(c.num_queries, n, dv, a, c.cross_attention_freq)
    stage1 = qformer_stage1_macs(
        c.num_queries,
        n,
        dv,
        a,
        c.cross_attention_freq,
        c.text_max_len,
        _text_vocab_size(cfg, vlm),
        c.embed_dim,
    )
    trains_stage1 = vlm.llm is None
    return {
        "connector_macs": stage1["total"] if trains_stage1 else stage2,
        "projection_macs": 0 if trains_stage1 else c.num_queries * a.hidden_size * dl,
        "qformer_macs": {"stage1": stage1, "stage2": stage2},
    }


def _text_vocab_size(cfg: Config, vlm: VLM) -> int:
    # The ITG head's cost depends on the text vocabulary (BLIP-2: bert-base-uncased + [DEC] = 30523).
    if vlm.llm is None:
        return vlm.stage1.text.vocab_size
    return QFormerText(build_text_tokenizer(cfg, random_weights=True), cfg.connector.text_max_len).vocab_size


# -------------------------------------------------------------------------------------------------
# Save / load


def save_pretrained(vlm: VLM, directory: str | Path, *, card_notes: Sequence[str] = ()) -> Path:
    """Write trainable weights (safetensors) + resolved config + a model card, atomically.

    Frozen parts are referenced by hub id or path. A frozen part with no source (random or built
    locally) is saved inside the directory in transformers format, so the checkpoint stays loadable.
    """
    if vlm.config is None:
        raise ValueError("this VLM has no config attached; build it with build_vlm or set vlm.config")

    def embed(tmp: Path, cfg: Config) -> Config:
        if _embedded(cfg.vision.name_or_path):
            vlm.vision.model.save_pretrained(tmp / "vision")
            cfg = dataclasses.replace(
                cfg, vision=dataclasses.replace(cfg.vision, name_or_path=LOCAL_PREFIX + "vision")
            )
        if vlm.llm is not None and _embedded(cfg.llm.name_or_path):  # Q-Former stage 1 has no LM
            vlm.llm.model.save_pretrained(tmp / "llm")
            vlm.llm.tokenizer.save_pretrained(tmp / "llm")
            cfg = dataclasses.replace(
                cfg, llm=dataclasses.replace(cfg.llm, name_or_path=LOCAL_PREFIX + "llm", tokenizer=None)
            )
        return cfg

    return write_checkpoint(
        directory, vlm.trainable_state_dict(), vlm.config, embed=embed, card_notes=card_notes
    )


def write_checkpoint(
    directory: str | Path,
    state: dict[str, torch.Tensor],
    cfg: Config,
    *,
    embed: Callable[[Path, Config], Config] | None = None,
    card_notes: Sequence[str] = (),
) -> Path:
    """Atomically write a checkpoint folder: `state` as safetensors, the config, a README.md model card.

    `embed(tmp, cfg)` may write frozen parts into the folder and returns the config that refers to them.
    """
    from evlgen.hub import model_card

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    if embed is not None:
        cfg = embed(tmp, cfg)
    dump_yaml(cfg, tmp / CONFIG_FILE)
    (tmp / CARD_FILE).write_text(model_card(cfg, state, card_notes))
    fsync_tree(tmp)
    if directory.exists():
        old = directory.parent / f".{directory.name}.old-{os.getpid()}"
        directory.rename(old)
        tmp.rename(directory)
        shutil.rmtree(old)
    else:
        tmp.rename(directory)
    return directory


def _embedded(name_or_path: str | None) -> bool:
    # Parts with no source, or loaded from inside another checkpoint, travel with the checkpoint.
    return name_or_path is None or name_or_path.startswith(LOCAL_PREFIX)


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over a state dict's names and raw bytes, in name order (identity of a set of weights)."""
    h = hashlib.sha256()
    for name, t in sorted(state.items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # 0-d too
    return h.hexdigest()


def _localise(value: str | None, directory: Path) -> str | None:
    if value is not None and value.startswith(LOCAL_PREFIX):
        return str(directory / value[len(LOCAL_PREFIX) :])
    return value


def read_config(directory: str | Path) -> Config:
    """The checkpoint's config as saved (in-directory parts still named `./...`)."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not an evlgen checkpoint: {CONFIG_FILE} is missing")
    return from_dict(Config, yaml.safe_load(path.read_text()))


def load_checkpoint_config(directory: str | Path) -> Config:
    """The checkpoint's config with its in-directory parts resolved to absolute paths."""
    directory = Path(directory)
    cfg = read_config(directory)
    vision = dataclasses.replace(cfg.vision, name_or_path=_localise(cfg.vision.name_or_path, directory))
    llm = dataclasses.replace(
        cfg.llm,
        name_or_path=_localise(cfg.llm.name_or_path, directory),
        tokenizer=_localise(cfg.llm.tokenizer, directory),
    )
    return dataclasses.replace(cfg, vision=vision, llm=llm)


def from_pretrained(directory: str | Path) -> VLM:
    """Rebuild from a save_pretrained directory and load the trainable weights strictly."""
    directory = Path(directory)
    cfg = load_checkpoint_config(directory)
    vlm = build_vlm(cfg, connector_init=False)
    weights = directory / WEIGHTS_FILE
    vlm.load_trainable_state_dict(load_file(str(weights)), source=str(weights))
    # Keep the config as saved (with ./ references) so a re-save copies those parts along.
    vlm.config = read_config(directory)
    return vlm


def init_from_pretrained(vlm: VLM, directory: str | Path) -> list[str]:
    """Start `vlm` from a saved model's trainable weights (`train.init_from`), e.g. video fine-tuning
    from an image checkpoint. Every saved tensor must match by name and shape; of `vlm`'s own trainable
    weights only the video modules may be absent (they keep their fresh init). Returns their names."""
    directory = Path(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise ConfigError(
            f"train.init_from: {directory} is not a saved evlgen model ({WEIGHTS_FILE} missing)"
        )
    state = load_file(str(weights))
    own = vlm.trainable_state_dict()
    fresh = sorted(k for k in own if k not in state and k.startswith(VIDEO_KEYS))
    expected = {k: v for k, v in own.items() if k not in fresh}
    check_state_dict(expected, state, str(weights), "the trainable parts of this run's model")
    vlm.load_state_dict(state, strict=False)
    saved = load_checkpoint_config(directory)
    cfg = vlm.config
    if cfg is not None:
        for part in ("vision", "llm"):
            a, b = getattr(saved, part).name_or_path, getattr(cfg, part).name_or_path
            if a != b:
                log.warning(
                    "train.init_from: %s was trained with %s = %s, this run uses %s", directory, part, a, b
                )
    log.info("initialised from %s; fresh: %d video tensors", directory, len(fresh))
    return fresh
