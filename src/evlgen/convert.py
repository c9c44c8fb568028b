"""Interop: turn the authors' released EVLGen checkpoints (LAVIS format) into evlgen checkpoints.

The reference code (LAVIS models `liptome_opt` / `liptome_vicuna`) saves
`{"model": state_dict, "optimizer": ..., "config": ..., "scaler": ..., "epoch": ...}`, where the state
dict keeps every parameter that required grad and *every buffer* of the model. The mapping is one to
one, and strict:

    ln_vision.{weight,bias}                    -> ln_vision.*
    VL_proj.{weight,bias}                      -> vl_proj.*
    opt_proj.* (OPT) or llm_proj.* (Vicuna)    -> llm_proj.*
    VLconnector.<BertModel key>                -> connector.<same key> (TomeFormer keeps BERT's names)

Keys dropped on purpose (`DROPPED`, each checked where it could change the output); anything else that
is unmapped, missing or mis-shaped is an error naming the key, the expected and the found shape:

    VLconnector.pooler.*, VLconnector.embeddings.word_embeddings.*   not in the reference's BertModel
        (no pooler, no word embeddings); a stock BertModel has them, and they never reach the output
    VLconnector.embeddings.position_ids / token_type_ids             id buffers of some transformers
        versions; must hold the defaults (0..N-1 and zeros), which is what TomeFormer uses
    temp, vision_proj.*, text_proj.*                                 the optional SimCSE contrastive
        head (`beta > 0` in the reference config): a training loss, unused by generation
    visual_encoder.* / opt_model.* / llm_model.* buffers             LAVIS saves the frozen parts'
        buffers (e.g. rotary `inv_freq`, `relative_position_index`); recomputed by the frozen parts

A trained tensor inside a frozen part (e.g. the video model's `temporal_merge` modules in the ViT) is an
error: evlgen would silently run without it. The checkpoint is read with `weights_only=True`, so no
arbitrary object is ever unpickled.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from evlgen.config import Config, ConfigError
from evlgen.model.build import meta_vlm, write_checkpoint
from evlgen.model.connector import BERT_ID_BUFFERS, split_bert_state

log = logging.getLogger(__name__)

CONNECTOR = "VLconnector."
# evlgen prefix -> LAVIS prefix, apart from the LM projection whose LAVIS name depends on the LM.
PREFIXES = {"ln_vision.": "ln_vision.", "vl_proj.": "VL_proj.", "connector.": CONNECTOR}
CONTRASTIVE = ("vision_proj.", "text_proj.")
FROZEN_PREFIXES = ("visual_encoder.", "opt_model.", "llm_model.")
# Buffer names (last path component) that frozen parts recompute from their config.
FROZEN_BUFFERS = ("inv_freq", "relative_position_index", "position_ids", "token_type_ids", "masked_bias")

DROPPED = {
    "VLconnector.pooler.*": "not in the reference BertModel; never reaches the output",
    "VLconnector.embeddings.word_embeddings.*": "inputs are visual tokens; never reaches the output",
    "VLconnector.embeddings.position_ids": "id buffer; must be 0..N-1 (checked)",
    "VLconnector.embeddings.token_type_ids": "id buffer; must be all zeros (checked)",
    "temp, vision_proj.*, text_proj.*": "SimCSE contrastive head (beta > 0): a training loss only",
    "visual_encoder.* / opt_model.* / llm_model.* buffers": "recomputed by the frozen parts",
}


class ConversionError(ValueError):
    """The checkpoint does not fit the chosen preset, or is not a LAVIS EVLGen checkpoint."""


def read_lavis_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(the `model` state dict, the reference `config` dict or {}) of a LAVIS `.pth`, tensors only."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is long; its one informative line follows "WeightsUnpickler error:".
        detail = str(e).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
        raise ConversionError(
            f"{path}: refusing to load it ({detail}): either it is not a PyTorch checkpoint, or it holds "
            "objects other than tensors and plain containers, and unpickling those could run arbitrary code"
        ) from e
    except Exception as e:
        raise ConversionError(f"{path}: not a readable PyTorch checkpoint: {type(e).__name__}: {e}") from e
    if not isinstance(obj, dict):
        raise ConversionError(f"{path}: expected a dict with a 'model' entry, got {type(obj).__name__}")
    state = obj.get("model")
    if not isinstance(state, dict):
        raise ConversionError(
            f"{path}: no 'model' state dict in it (top-level keys: {sorted(map(str, obj))[:10]}); "
            "LAVIS checkpoints store the weights under 'model'"
        )
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise ConversionError(f"{path}: 'model' has non-tensor entries: {bad[:5]}")
    config = obj.get("config")
    return state, config if isinstance(config, dict) else {}


def llm_proj_name(cfg: Config) -> str:
    """The reference's name for the LM projection: `opt_proj` for OPT, `llm_proj` for the rest."""
    return "opt_proj." if cfg.llm.arch.get("model_type") == "opt" else "llm_proj."


def _to_lavis(key: str, proj: str) -> str:
    if key.startswith("llm_proj."):
        return proj + key[len("llm_proj.") :]
    for ours, theirs in PREFIXES.items():
        if key.startswith(ours):
            return theirs + key[len(ours) :]
    raise AssertionError(f"unmapped trainable key {key}")  # VLM gained a trainable part: map it here


def _check_dropped_connector_entry(key: str, value: Tensor) -> None:
    # A non-default id buffer would mean the reference ran with other positions or token types.
    name = key[len(CONNECTOR) :]
    if name not in BERT_ID_BUFFERS:
        return
    ids = value.reshape(-1)
    default = torch.arange(ids.numel()) if name.endswith("position_ids") else torch.zeros(ids.numel())
    if not torch.equal(ids.to(torch.int64), default.to(torch.int64)):
        raise ConversionError(
            f"{key} holds non-default ids; the reference forward would differ from evlgen's"
        )


def _is_frozen_buffer(key: str) -> bool:
    return key.startswith(FROZEN_PREFIXES) and key.rsplit(".", 1)[-1] in FROZEN_BUFFERS


def lavis_to_evlgen(
    lavis: dict[str, Tensor], expected: dict[str, Tensor], proj: str = "opt_proj."
) -> tuple[dict[str, Tensor], list[str]]:
    """Map a LAVIS EVLGen state dict onto evlgen's trainable names; returns (state, dropped LAVIS keys).

    `expected` is the target model's `trainable_state_dict()` (meta tensors suffice). Every expected key
    must be present with the expected shape; every LAVIS key must be mapped or in `DROPPED`.
    """
    wanted = {_to_lavis(k, proj): k for k in expected}
    connector = {k[len(CONNECTOR) :]: v for k, v in lavis.items() if k.startswith(CONNECTOR)}
    unused_connector = {CONNECTOR + k for k in split_bert_state(connector)[1]}
    other_proj = "llm_proj." if proj == "opt_proj." else "opt_proj."
    dropped, unexpected, frozen_weights = [], [], []
    for key, value in lavis.items():
        if key in wanted:
            continue
        if key in unused_connector:
            _check_dropped_connector_entry(key, value)
            dropped.append(key)
        elif key == "temp" or key.startswith(CONTRASTIVE):
            dropped.append(key)
        elif _is_frozen_buffer(key):
            dropped.append(key)
        elif key.startswith(FROZEN_PREFIXES):
            frozen_weights.append(key)
        else:
            unexpected.append(key)
    problems = []
    if frozen_weights:
        video = any(".temporal_merge." in k for k in frozen_weights)
        problems.append(
            f"trained weights inside parts evlgen keeps frozen ({len(frozen_weights)} keys, e.g. "
            f"{frozen_weights[:3]})"
            + (
                "; this is a video checkpoint (temporal_merge modules), which this converter does not take"
                if video
                else ""
            )
        )
    if any(k.startswith(other_proj) for k in unexpected):
        problems.append(
            f"the checkpoint's LM projection is {other_proj.rstrip('.')}, but the preset's LM wants "
            f"{proj.rstrip('.')} (an OPT preset for opt_proj, a Vicuna/LLaMA one for llm_proj)"
        )
    if unexpected:
        problems.append(f"unexpected keys: {sorted(unexpected)[:20]}")
    missing = sorted(k for k in wanted if k not in lavis)
    if missing:
        problems.append(
            f"missing keys: {missing[:20]}" + (f" (+{len(missing) - 20} more)" if len(missing) > 20 else "")
        )
    state: dict[str, Tensor] = {}
    for theirs, ours in wanted.items():
        if theirs not in lavis:
            continue
        found, want = lavis[theirs], expected[ours]
        if tuple(found.shape) != tuple(want.shape):
            problems.append(
                f"{theirs}: expected shape {tuple(want.shape)} (evlgen {ours}), found {tuple(found.shape)}"
            )
        elif not found.is_floating_point():
            problems.append(f"{theirs}: expected floating-point weights, found {found.dtype}")
        else:
            state[ours] = found.to(want.dtype)
    if problems:
        raise ConversionError("cannot convert this checkpoint:\n  " + "\n  ".join(problems))
    return state, sorted(dropped)


def _check_reference_config(ref: dict[str, Any], cfg: Config) -> list[str]:
    """Compare the reference run's own config (if saved) with the preset; returns notes for the card."""
    model = ref.get("model") if isinstance(ref.get("model"), dict) else {}
    notes = []
    arch = model.get("arch")
    if isinstance(arch, str):
        if "video" in arch:
            raise ConversionError(
                f"the checkpoint is a video model ({arch}); this converter takes image models"
            )
        notes.append(f"reference model: `{arch}` ({model.get('model_type', '?')})")
    r = model.get("tome_r")
    if r is not None and cfg.connector.r != r:
        raise ConversionError(
            f"the checkpoint was trained with tome_r={r} but the preset merges "
            f"connector.r={cfg.connector.r}; pass connector.r={r} to reproduce it"
        )
    for key in ("opt_model", "llm_model"):
        source = model.get(key)
        if isinstance(source, str) and source and source != cfg.llm.name_or_path:
            log.warning(
                "the checkpoint was trained with LM %s; the preset uses %s (fine if it is a copy of the same "
                "weights)",
                source,
                cfg.llm.name_or_path,
            )
            notes.append(f"trained with LM `{source}`")
    return notes


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def convert_lavis(checkpoint: str | Path, cfg: Config, out: str | Path) -> dict[str, Any]:
    """Convert a LAVIS EVLGen `.pth` into an evlgen checkpoint folder for the preset `cfg`.

    Nothing is downloaded: shapes come from the preset (meta device). The frozen parts are named by the
    preset's sources and loaded from them by `evlgen.load`; they must be the ones the reference used.
    """
    checkpoint = Path(checkpoint)
    random_parts = [
        f"{where}.name_or_path"
        for where, part in (("vision", cfg.vision), ("llm", cfg.llm))
        if part.name_or_path is None
    ]
    if random_parts:
        raise ConfigError(
            f"preset {cfg.name!r} has random frozen parts ({', '.join(random_parts)} is null): a converted "
            "checkpoint needs the pretrained parts the reference was trained with"
        )
    lavis, ref_config = read_lavis_checkpoint(checkpoint)
    notes = _check_reference_config(ref_config, cfg)
    expected = meta_vlm(cfg).trainable_state_dict()
    state, dropped = lavis_to_evlgen(lavis, expected, llm_proj_name(cfg))
    digest = _sha256(checkpoint)
    notes = [
        f"converted by `evlgen convert lavis` from the reference (LAVIS) checkpoint `{checkpoint.name}` "
        f"(sha256 `{digest}`)",
        *notes,
    ]
    if dropped:
        notes.append(
            f"{len(dropped)} reference keys dropped on purpose (unused by generation): {dropped[:8]}"
        )
    write_checkpoint(out, state, cfg, card_notes=notes)
    return {
        "out": str(out),
        "converted": len(state),
        "dropped": dropped,
        "parameters": sum(t.numel() for t in state.values()),
        "sha256": digest,
    }
