"""Frozen vision towers: run a pretrained HF ViT (CLIP, SigLIP, BLIP-2 EVA ViT-g) up to a chosen block.

`VisionTower` composes the HF model's own submodules instead of calling its `forward`, so that it can
stop early (EVLGen drops trailing blocks), skip `post_layernorm` (EVLGen applies its own trainable
`ln_vision`), and later run per-block adapters (temporal attention for video) between a block's
attention residual and its MLP. Output convention: `[B, T, N, D]`, images are T=1.

The factories load or build the wrapped HF model; `VisionTower.__init__` never loads weights, so tests
inject tiny random models.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from safetensors import safe_open
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    Blip2Config,
    Blip2VisionConfig,
    Blip2VisionModel,
    CLIPConfig,
    CLIPVisionConfig,
    CLIPVisionModel,
    PreTrainedConfig,
    PreTrainedModel,
    SiglipConfig,
    SiglipVisionConfig,
    SiglipVisionModel,
)

__all__ = ["FAMILIES", "VisionTower", "load_vision_model", "random_vision_model"]


@dataclass(frozen=True)
class _Family:
    model_cls: type[PreTrainedModel]
    config_cls: type[PreTrainedConfig]
    composite_config_cls: type[PreTrainedConfig]
    has_cls_token: bool
    # CLIP normalises the embeddings before the first block; the others do not.
    has_pre_norm: bool
    # transformers 5 maps `vision_model.*` of the composite checkpoint onto the vision model for CLIP
    # (a PrefixChange conversion rule) and SigLIP (base_model_prefix "vision_model"), but not for
    # BLIP-2, whose vision model then silently stays randomly initialised.
    from_pretrained_reads_composite: bool


_FAMILIES: dict[str, _Family] = {
    "clip": _Family(CLIPVisionModel, CLIPVisionConfig, CLIPConfig, True, True, True),
    "siglip": _Family(SiglipVisionModel, SiglipVisionConfig, SiglipConfig, False, False, True),
    "blip2": _Family(Blip2VisionModel, Blip2VisionConfig, Blip2Config, True, False, False),
}
FAMILIES: tuple[str, ...] = tuple(_FAMILIES)

# Key prefix of the vision tower inside every supported composite checkpoint.
_COMPOSITE_PREFIX = "vision_model."
_SAFETENSORS_FILE = "model.safetensors"
_SAFETENSORS_INDEX = "model.safetensors.index.json"


def _family(family: str) -> _Family:
    if family not in _FAMILIES:
        raise ValueError(f"unknown vision tower family {family!r}; expected one of {list(FAMILIES)}")
    return _FAMILIES[family]


class VisionTower(nn.Module):
    """A frozen HF vision transformer run up to block `layer`, without its final `post_layernorm`.

    `layer` indexes like HF `hidden_states`: 0 = embeddings output, k = output of block k, -1 = last
    block, -2 = penultimate block (the CLIP ViT-L/14 preset). Trailing blocks stay in `model` (so it
    remains `save_pretrained`-compatible) but are never run.

    The wrapped model is frozen here (requires_grad=False, always in eval mode): a vision tower is
    frozen by definition, and trainable parts belong in `block_adapters`.
    """

    def __init__(self, model: PreTrainedModel, family: str, layer: int = -1) -> None:
        super().__init__()
        spec = _family(family)
        if not isinstance(model, spec.model_cls):
            raise ValueError(
                f"family {family!r} expects a {spec.model_cls.__name__}, got {type(model).__name__}"
            )
        config = model.config
        num_layers = len(model.encoder.layers)
        if (
            isinstance(layer, bool)
            or not isinstance(layer, int)
            or not -(num_layers + 1) <= layer <= num_layers
        ):
            raise ValueError(
                f"layer must be an int in [{-(num_layers + 1)}, {num_layers}] for a tower with "
                f"{num_layers} blocks (0 = embeddings, -1 = last block), got {layer!r}"
            )

        self.model = model.requires_grad_(False).eval()
        self.family = family
        self.layer = layer
        # Blocks actually run: hidden_states[layer] is the output after this many blocks.
        self.num_blocks = layer if layer >= 0 else num_layers + 1 + layer
        self.hidden_size: int = config.hidden_size
        self.image_size: int = config.image_size
        self.num_channels: int = model.embeddings.patch_embedding.in_channels
        num_patches = (config.image_size // config.patch_size) ** 2
        self.num_protected = 1 if spec.has_cls_token else 0
        self.num_tokens = num_patches + self.num_protected
        self._has_pre_norm = spec.has_pre_norm
        # Hook point for per-block modules (temporal attention for video): None, or one module per run
        # block, each mapping [B, T, N, D] -> [B, T, N, D]; see set_block_adapters.
        self.block_adapters: nn.ModuleList | None = None

    @property
    def dtype(self) -> torch.dtype:
        """Parameter dtype of the wrapped tower (pixels are cast to it)."""
        return self.model.embeddings.patch_embedding.weight.dtype

    def set_block_adapters(self, adapters: Sequence[nn.Module] | None) -> None:
        """Install one module per run block, applied between the attention residual and the MLP.

        Each adapter is called as `adapter(h)` with `h` of shape `[B, T, N, D]` and must return the same
        shape. `None` removes them.
        """
        if adapters is None:
            self.block_adapters = None
            return
        adapters = nn.ModuleList(adapters)
        if len(adapters) != self.num_blocks:
            raise ValueError(
                f"expected {self.num_blocks} block adapters (one per run block), got {len(adapters)}"
            )
        adapters.train(self.training)
        self.block_adapters = adapters

    def train(self, mode: bool = True) -> VisionTower:
        """Set adapters to `mode`; the wrapped HF model stays in eval mode (frozen, dropout off)."""
        super().train(mode)
        self.model.eval()
        return self

    def forward(self, pixels: Tensor) -> Tensor:
        """Encode `[B, T, C, H, W]` pixels into `[B, T, N, D]` tokens (output of block `num_blocks`)."""
        expected = f"[B, T, {self.num_channels}, {self.image_size}, {self.image_size}]"
        if pixels.dim() != 5 or tuple(pixels.shape[2:]) != (
            self.num_channels,
            self.image_size,
            self.image_size,
        ):
            raise ValueError(f"expected pixels of shape {expected}, got {list(pixels.shape)}")
        b, t = pixels.shape[:2]
        # Building an autograd graph through a frozen 1B-parameter tower wastes memory; only do it
        # when something in here (e.g. a temporal adapter) is trainable.
        track = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        with torch.set_grad_enabled(track):
            x = pixels.to(self.dtype).flatten(0, 1)  # [B*T, C, H, W]
            h = self.model.embeddings(x)  # [B*T, N, D]
            if self._has_pre_norm:
                h = self.model.pre_layrnorm(h)  # [B*T, N, D]
            for i, block in enumerate(self.model.encoder.layers[: self.num_blocks]):
                h = h + block.self_attn(hidden_states=block.layer_norm1(h))[0]  # [B*T, N, D]
                if self.block_adapters is not None:
                    frames = self.block_adapters[i](h.unflatten(0, (b, t)))  # [B, T, N, D]
                    h = frames.flatten(0, 1)  # [B*T, N, D]
                h = h + block.mlp(block.layer_norm2(h))  # [B*T, N, D]
            return h.unflatten(0, (b, t))  # [B, T, N, D]


def random_vision_model(family: str, arch: dict[str, Any]) -> PreTrainedModel:
    """Build a randomly initialised vision model of `family` from config keyword arguments `arch`.

    BLIP-2's vision config defaults to initializer_range=1e-10 (it expects pretrained weights), which
    would make a random tower output almost constant features, so 0.02 is used unless `arch` says
    otherwise.
    """
    spec = _family(family)
    if family == "blip2":
        arch = {"initializer_range": 0.02, **arch}
    return spec.model_cls(spec.config_cls(**arch)).eval()


def load_vision_model(
    family: str,
    name_or_path: str,
    revision: str | None = None,
    dtype: torch.dtype | None = None,
) -> PreTrainedModel:
    """Load a pretrained vision model of `family` from a hub id or local directory, strictly.

    Accepts vision-only checkpoints and the composite ones users have (`CLIPModel`, `SiglipModel`,
    `Blip2ForConditionalGeneration` / `Blip2Model`); of a composite only the vision config and the
    `vision_model.*` tensors are read. `dtype=None` keeps the checkpoint's dtype (transformers' "auto").
    Raises RuntimeError naming any missing, unexpected or wrongly shaped vision tensor.
    """
    spec = _family(family)
    config = AutoConfig.from_pretrained(name_or_path, revision=revision)
    if isinstance(config, spec.composite_config_cls):
        vision_config, composite = config.vision_config, True
    elif isinstance(config, spec.config_cls):
        vision_config, composite = config, False
    else:
        raise ValueError(
            f"{name_or_path!r} holds a {type(config).__name__} (model_type {config.model_type!r}); "
            f"family {family!r} needs a {spec.config_cls.__name__} or "
            f"{spec.composite_config_cls.__name__} checkpoint"
        )

    if composite and not spec.from_pretrained_reads_composite:
        model = _load_composite_vision(spec, name_or_path, revision, config, dtype)
    else:
        model, info = spec.model_cls.from_pretrained(
            name_or_path,
            config=vision_config,
            revision=revision,
            dtype=dtype,
            weights_only=True,
            output_loading_info=True,
            # Mismatches are reported by _raise_on_mismatch below, with the tensor names.
            ignore_mismatched_sizes=True,
        )
        tower_roots = {name for name, _ in model.named_children()}
        unexpected = [k for k in info["unexpected_keys"] if _is_tower_key(k, tower_roots)]
        wrong_shape = [f"{k} (checkpoint {list(a)}, model {list(b)})" for k, a, b in info["mismatched_keys"]]
        _raise_on_mismatch(
            name_or_path, sorted(info["missing_keys"]), sorted(unexpected), sorted(wrong_shape)
        )
    return model.eval()


def _is_tower_key(key: str, tower_roots: set[str]) -> bool:
    """Whether a checkpoint key names a tensor of the vision tower itself (not a text tower or head)."""
    key = key.removeprefix(_COMPOSITE_PREFIX)
    return key.split(".", 1)[0] in tower_roots


def _raise_on_mismatch(
    source: str, missing: list[str], unexpected: list[str], wrong_shape: list[str]
) -> None:
    problems = [
        f"{what}: {keys}"
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape))
        if keys
    ]
    if problems:
        raise RuntimeError(f"vision weights in {source!r} do not match the model; " + "; ".join(problems))


def _load_composite_vision(
    spec: _Family,
    name_or_path: str,
    revision: str | None,
    config: PreTrainedConfig,
    dtype: torch.dtype | None,
) -> PreTrainedModel:
    """Build the vision model from a composite checkpoint's `vision_model.*` tensors only."""
    state = _read_prefixed_tensors(name_or_path, revision, _COMPOSITE_PREFIX)
    if dtype is None and isinstance(config.dtype, torch.dtype):
        dtype = config.dtype
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}

    # On the meta device, construction skips allocating and randomly initialising weights that are
    # about to be replaced (about 1B parameters for EVA ViT-g).
    with torch.device("meta"):
        model = spec.model_cls(config.vision_config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(_COMPOSITE_PREFIX + k for k in set(state) - set(expected))
    wrong_shape = sorted(
        f"{k} (checkpoint {list(state[k].shape)}, model {list(v.shape)})"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    )
    _raise_on_mismatch(name_or_path, missing, unexpected, wrong_shape)
    model.load_state_dict(state, strict=True, assign=True)
    left_on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left_on_meta:
        # Non-persistent buffers are not in checkpoints; this model class now has some, so it cannot
        # be built on the meta device any more.
        raise RuntimeError(
            f"{spec.model_cls.__name__} tensors not restored from the checkpoint: {left_on_meta}"
        )
    return model


def _resolve_file(name_or_path: str, filename: str, revision: str | None) -> str | None:
    """Local path of `filename` in a local directory or hub repo, or None when it is not there."""
    if os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, filename)
        return path if os.path.isfile(path) else None
    try:
        return hf_hub_download(name_or_path, filename, revision=revision)
    except EntryNotFoundError:  # also raised offline for a file not in the cache
        return None


def _read_prefixed_tensors(name_or_path: str, revision: str | None, prefix: str) -> dict[str, Tensor]:
    """Tensors whose key starts with `prefix` (prefix stripped), reading only the shards that hold them."""
    index_path = _resolve_file(name_or_path, _SAFETENSORS_INDEX, revision)
    if index_path is not None:
        with open(index_path, encoding="utf-8") as f:
            weight_map: dict[str, str] = json.load(f)["weight_map"]
        shards = sorted({shard for key, shard in weight_map.items() if key.startswith(prefix)})
    elif _resolve_file(name_or_path, _SAFETENSORS_FILE, revision) is not None:
        shards = [_SAFETENSORS_FILE]
    else:
        raise FileNotFoundError(
            f"no {_SAFETENSORS_FILE} or {_SAFETENSORS_INDEX} in {name_or_path!r} (revision {revision}); "
            "only safetensors checkpoints are supported here (offline, the files must be in the HF cache)"
        )

    state: dict[str, Tensor] = {}
    for shard in shards:
        path = _resolve_file(name_or_path, shard, revision)
        if path is None:
            raise FileNotFoundError(
                f"shard {shard!r} listed in {_SAFETENSORS_INDEX} is missing from {name_or_path!r}"
            )
        # safe_open memory-maps the file, so tensors of the (multi-GB) language model are never read.
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                if key.startswith(prefix):
                    state[key[len(prefix) :]] = f.get_tensor(key)
    return state
