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
from evlgen.model.connector import TomeFormer, tomeformer_macs
from evlgen.model.llm import FrozenLM
from evlgen.model.merge import merge_schedule, token_schedule
from evlgen.model.tokenizer import byte_tokenizer
from evlgen.model.vision import VisionTower, load_vision_model, random_vision_model
from evlgen.model.vlm import VLM

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
CARD_FILE = "README.md"
# Marks a frozen part saved inside the checkpoint directory (random or locally trained weights).
LOCAL_PREFIX = "./"


@dataclass(frozen=True)
class Plan:
    """What a config implies, computed from numbers alone (no weights)."""

    num_tokens: int  # visual tokens per frame out of the tower
    protected: int  # 1 when the tower has a CLS token
    rs: list[int]  # tokens merged at each connector layer
    token_schedule: list[int]  # tokens entering each layer, then the output count


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
    try:
        rs = merge_schedule(c.arch.num_hidden_layers, c.r, c.r_inflection)
        counts = token_schedule(num_tokens, rs, protected)
    except ValueError as e:
        raise ConfigError(f"connector.r: {e}") from None
    if c.max_positions is not None and c.max_positions < num_tokens:
        raise ConfigError(f"connector.max_positions={c.max_positions} < {num_tokens} visual tokens")
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


def build_connector(cfg: ConnectorConfig, p: Plan, *, random_weights: bool = False) -> TomeFormer:
    max_pos = cfg.max_positions or max(cfg.arch.max_position_embeddings, p.num_tokens)
    if cfg.init is None or random_weights:
        shape = dataclasses.replace(cfg.arch, max_position_embeddings=max_pos)
        return TomeFormer(shape, r=p.rs, merge_mode=cfg.merge_mode, protected=p.protected)
    from transformers import BertModel

    bert = BertModel.from_pretrained(cfg.init, revision=cfg.revision, add_pooling_layer=False)
    arch = dataclasses.asdict(cfg.arch)
    arch.pop("num_hidden_layers")  # the connector may keep only the first k layers
    arch.pop("max_position_embeddings")  # may be extended by interpolation
    _check_arch(bert.config, arch, "connector.arch")
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


def build_vlm(
    cfg: Config, *, random_weights: bool = False, connector_init: bool = True, log_table: bool = True
) -> VLM:
    """Build, compose, freeze; returned in eval mode. connector_init=False skips the BERT download."""
    p = plan(cfg)
    vision = build_vision(cfg.vision, random_weights=random_weights)
    connector = build_connector(cfg.connector, p, random_weights=random_weights or not connector_init)
    llm = build_llm(cfg.llm, random_weights=random_weights)
    vlm = VLM(vision, connector, llm)
    vlm.config = cfg
    vlm.freeze(log_table=log_table)
    return vlm.eval()  # like transformers' from_pretrained; training code calls .train()


def meta_vlm(cfg: Config) -> VLM:
    """The model on the meta device: every name and shape, no memory, nothing downloaded."""
    # Shapes need no vocabulary: the byte tokenizer spares a tokenizer download.
    counting = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, tokenizer="byte"))
    with torch.device("meta"):
        return build_vlm(counting, random_weights=True, log_table=False)


def describe(cfg: Config) -> dict[str, Any]:
    """Token schedule, connector MACs and parameter counts, from shapes alone (meta device)."""
    p = plan(cfg)
    vlm = meta_vlm(cfg)
    a = cfg.connector.arch
    trainable = sum(t.numel() for _, t in vlm.trainable_named_parameters())
    total = sum(t.numel() for t in vlm.parameters())
    dv, dc, dl = vlm.vl_proj.in_features, vlm.vl_proj.out_features, vlm.llm_proj.out_features
    return {
        "preset": cfg.name,
        "visual_tokens": p.num_tokens,
        "protected_tokens": p.protected,
        "merge_schedule": p.rs,
        "token_schedule": p.token_schedule,
        "llm_visual_tokens": p.token_schedule[-1],
        "connector_macs": tomeformer_macs(p.token_schedule, a.hidden_size, a.intermediate_size),
        "projection_macs": p.num_tokens * dv * dc + p.token_schedule[-1] * dc * dl,
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
        if _embedded(cfg.llm.name_or_path):
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
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
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
