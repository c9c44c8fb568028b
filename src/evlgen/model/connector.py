"""TomeFormer: the trainable connector that shrinks the visual token set layer by layer.

A post-LN BERT encoder without word embeddings, pooler or cross-attention. Each layer runs
self-attention on t tokens, merges r of them by bipartite soft matching on the attention keys
(averaged over heads), then runs the feed-forward sub-block on t - r tokens.

Parameter names mirror transformers' `BertModel` (`embeddings.position_embeddings.weight`,
`encoder.layer.3.attention.self.key.bias`, ...), so loading `bert-base-uncased`, or the reference
checkpoints' `VLconnector.*` entries, is a strict one-to-one key match.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evlgen.model.merge import (
    MERGE_MODES,
    bipartite_soft_matching,
    merge_masked_mean,
    merge_schedule,
    merge_wavg,
    token_schedule,
)


@dataclass(frozen=True)
class BertShape:
    """The architecture numbers of a BERT-layout encoder (no weights)."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1


class _Embeddings(nn.Module):
    def __init__(self, s: BertShape) -> None:
        super().__init__()
        self.position_embeddings = nn.Embedding(s.max_position_embeddings, s.hidden_size)
        self.token_type_embeddings = nn.Embedding(2, s.hidden_size)
        self.LayerNorm = nn.LayerNorm(s.hidden_size, eps=s.layer_norm_eps)
        self.dropout = nn.Dropout(s.hidden_dropout_prob)

    def forward(self, x: Tensor, positions: Tensor | None = None) -> Tensor:
        n = x.shape[1] if positions is None else int(positions.max()) + 1
        if n > self.position_embeddings.num_embeddings:
            raise ValueError(
                f"TomeFormer got {n} tokens but has {self.position_embeddings.num_embeddings} position "
                "embeddings; build it with max_positions >= the tower's token count"
            )
        pos = (
            self.position_embeddings.weight[:n] if positions is None else self.position_embeddings(positions)
        )
        x = x + pos + self.token_type_embeddings.weight[0]  # [B, N, D]
        return self.dropout(self.LayerNorm(x))


class _SelfAttention(nn.Module):
    def __init__(self, s: BertShape) -> None:
        super().__init__()
        if s.hidden_size % s.num_attention_heads:
            raise ValueError(f"hidden_size {s.hidden_size} is not divisible by {s.num_attention_heads} heads")
        self.heads = s.num_attention_heads
        self.query = nn.Linear(s.hidden_size, s.hidden_size)
        self.key = nn.Linear(s.hidden_size, s.hidden_size)
        self.value = nn.Linear(s.hidden_size, s.hidden_size)
        self.dropout_p = s.attention_probs_dropout_prob

    def forward(self, x: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
        """x [B, N, D], additive logit bias [B, 1, 1, N] -> (context [B, N, D], keys [B, H, N, Dh])."""
        b, n, d = x.shape

        def heads(t: Tensor) -> Tensor:
            return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)  # [B, H, N, Dh]

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        p = self.dropout_p if self.training else 0.0
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)  # [B, H, N, Dh]
        return ctx.transpose(1, 2).reshape(b, n, d), k  # [B, N, D]


class _AddNorm(nn.Module):
    """Dense projection, dropout, residual, LayerNorm: BERT's SelfOutput and Output sub-blocks."""

    def __init__(self, d_in: int, s: BertShape) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, s.hidden_size)
        self.LayerNorm = nn.LayerNorm(s.hidden_size, eps=s.layer_norm_eps)
        self.dropout = nn.Dropout(s.hidden_dropout_prob)

    def forward(self, h: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class _Attention(nn.Module):
    def __init__(self, s: BertShape) -> None:
        super().__init__()
        self.self = _SelfAttention(s)
        self.output = _AddNorm(s.hidden_size, s)


class _Intermediate(nn.Module):
    def __init__(self, s: BertShape) -> None:
        super().__init__()
        self.dense = nn.Linear(s.hidden_size, s.intermediate_size)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.dense(x))


class _Layer(nn.Module):
    def __init__(self, s: BertShape) -> None:
        super().__init__()
        self.attention = _Attention(s)
        self.intermediate = _Intermediate(s)
        self.output = _AddNorm(s.intermediate_size, s)


class _Encoder(nn.Module):
    def __init__(self, s: BertShape) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_Layer(s) for _ in range(s.num_hidden_layers))


def bert_shape(cfg: Any, layers: int | None = None, max_positions: int | None = None) -> BertShape:
    """The BertShape of a transformers BertConfig, optionally keeping the first `layers` layers and
    with another position-table size."""
    return BertShape(
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers if layers is None else layers,
        num_attention_heads=cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=max_positions or cfg.max_position_embeddings,
        layer_norm_eps=cfg.layer_norm_eps,
        hidden_dropout_prob=cfg.hidden_dropout_prob,
        attention_probs_dropout_prob=cfg.attention_probs_dropout_prob,
    )


def bert_init(m: nn.Module) -> None:
    """BERT's initialisation (`module.apply(bert_init)`), for connectors built without a pretrained BERT."""
    if isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, std=0.02)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


@dataclass
class TokenState:
    """What travels with the tokens between layers.

    mask: [B, N] bool, True = real token (None: all real).
    size: [B, N, 1] tokens each one stands for (tracked by the weighted modes only).
    """

    mask: Tensor | None = None
    size: Tensor | None = None


class TomeFormer(nn.Module):
    """BERT-layout encoder with ToMe merging between attention and feed-forward in every layer.

    Call on x [B, N, hidden] (plus an optional [B, N] bool mask) -> [B, N - sum(r), hidden].
    merge_mode: "mean" (the paper: plain mean of a destination and its sources, no size tracking),
    "weighted" (size-weighted mean, sizes tracked), "proportional" (weighted + log(size) added to the
    attention logits, as in ToMe).
    """

    # VLM glue: vl_proj maps the tower to the hidden size, llm_proj maps the hidden size to the LM.
    reads_tower_width = False
    writes_llm_width = False

    def __init__(
        self,
        shape: BertShape,
        r: int | Sequence[int] = 0,
        r_inflection: float = 0.0,
        merge_mode: str = "mean",
        protected: int = 1,
    ) -> None:
        super().__init__()
        if merge_mode not in MERGE_MODES:
            raise ValueError(f"merge_mode must be one of {MERGE_MODES}, got {merge_mode!r}")
        self.shape = shape
        self.rs = merge_schedule(shape.num_hidden_layers, r, r_inflection)
        self.merge_mode = merge_mode
        self.protected = protected
        self.embeddings = _Embeddings(shape)
        self.encoder = _Encoder(shape)
        self.apply(bert_init)

    @property
    def hidden_size(self) -> int:
        return self.shape.hidden_size

    def token_schedule(self, num_tokens: int) -> list[int]:
        """Token counts entering each layer, then the output count; raises on an impossible r."""
        return token_schedule(num_tokens, self.rs, self.protected)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x [B, N, D], mask [B, N] bool or None -> [B, N', D]. Use `forward_with_state` for the mask."""
        return self.forward_with_state(x, mask)[0]

    def forward_with_state(
        self, x: Tensor, mask: Tensor | None = None, positions: Tensor | None = None
    ) -> tuple[Tensor, TokenState]:
        """Like forward, but also returns the merged mask and sizes (which output tokens are real).

        positions: [N] position ids of the tokens (default 0..N-1; video frames side by side repeat them).
        """
        self.token_schedule(x.shape[1])
        if positions is not None and positions.shape != x.shape[1:2]:
            raise ValueError(f"positions must be [N] = [{x.shape[1]}], got {list(positions.shape)}")
        if mask is not None:
            if mask.shape != x.shape[:2]:
                raise ValueError(f"mask must be [B, N] = {list(x.shape[:2])}, got {list(mask.shape)}")
            empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
            if empty:
                raise ValueError(f"samples {empty} have no real visual tokens (mask is all False)")
            if bool(mask.all()):
                mask = None
        state = TokenState(mask=mask)
        if self.merge_mode != "mean":
            size = torch.ones(*x.shape[:2], 1, device=x.device, dtype=x.dtype)  # [B, N, 1]
            state.size = size if mask is None else size * mask[..., None]
        x = self.embeddings(x, positions)  # [B, N, D]
        for layer, r in zip(self.encoder.layer, self.rs, strict=True):
            x, state = self._layer(layer, x, r, state)
        return x, state

    def _attention_bias(self, state: TokenState, dtype: torch.dtype) -> Tensor | None:
        bias = None
        if self.merge_mode == "proportional" and state.size is not None:
            # log(0) = -inf also masks padding, which weighted modes carry as size 0.
            bias = state.size[..., 0].log()[:, None, None, :]  # [B, 1, 1, N]
        elif state.mask is not None:
            bias = torch.zeros(state.mask.shape, dtype=dtype, device=state.mask.device)
            bias = bias.masked_fill(~state.mask, -math.inf)[:, None, None, :]  # [B, 1, 1, N]
        return None if bias is None else bias.to(dtype)

    def _layer(self, layer: _Layer, x: Tensor, r: int, state: TokenState) -> tuple[Tensor, TokenState]:
        ctx, keys = layer.attention.self(x, self._attention_bias(state, x.dtype))
        x = layer.attention.output(ctx, x)  # [B, t, D]
        if r > 0:
            merge, _ = bipartite_soft_matching(keys.mean(dim=1), r, self.protected, state.mask)
            if self.merge_mode == "mean":
                if state.mask is None:
                    x = merge(x, mode="mean")  # [B, t - r, D]
                else:
                    x, state.mask = merge_masked_mean(merge, x, state.mask)
            else:
                x, state.size = merge_wavg(merge, x, state.size)  # [B, t - r, D], [B, t - r, 1]
                if state.mask is not None:
                    state.mask = state.size[..., 0] > 0
        x = layer.output(layer.intermediate(x), x)  # [B, t - r, D]
        return x, state

    @classmethod
    def from_bert(
        cls,
        bert: nn.Module,
        r: int | Sequence[int] = 0,
        merge_mode: str = "mean",
        *,
        r_inflection: float = 0.0,
        num_layers: int | None = None,
        max_positions: int | None = None,
        protected: int = 1,
    ) -> TomeFormer:
        """Build from a transformers `BertModel`, checking every key and shape.

        Word embeddings and pooler are not used. `num_layers` keeps the first k layers (the rest are
        deliberately dropped). `max_positions` sets the position-table size exactly: a larger table
        is linearly interpolated from BERT's (the 729 tokens of SigLIP-so400m at 384 px need more
        than 512), a smaller one keeps the first rows, so the size depends on the config alone.
        """
        cfg = bert.config
        if getattr(cfg, "position_embedding_type", "absolute") != "absolute":
            raise ValueError(
                f"TomeFormer needs absolute position embeddings, got {cfg.position_embedding_type}"
            )
        if cfg.hidden_act not in ("gelu", "gelu_python"):
            raise ValueError(f"TomeFormer uses exact GELU like BERT; the checkpoint uses {cfg.hidden_act!r}")
        layers = cfg.num_hidden_layers if num_layers is None else num_layers
        if not 1 <= layers <= cfg.num_hidden_layers:
            raise ValueError(f"num_layers must be in [1, {cfg.num_hidden_layers}], got {num_layers}")
        shape = bert_shape(cfg, layers, max_positions)
        module = cls(shape, r=r, r_inflection=r_inflection, merge_mode=merge_mode, protected=protected)
        state = {}
        for key, value in split_bert_state(bert.state_dict())[0].items():
            if key.startswith("encoder.layer.") and int(key.split(".")[2]) >= layers:
                continue
            state[key] = value
        pos = "embeddings.position_embeddings.weight"
        if pos in state and state[pos].shape[0] < shape.max_position_embeddings:
            state[pos] = interpolate_positions(state[pos], shape.max_position_embeddings)
        elif pos in state:
            state[pos] = state[pos][: shape.max_position_embeddings]
        check_state_dict(module.state_dict(), state, "BertModel", "TomeFormer")
        module.load_state_dict(state, strict=True)
        return module


# Entries of a transformers `BertModel` state dict that TomeFormer has no counterpart for: word embeddings
# (its inputs are visual tokens), the pooler (never used), and the id buffers some versions save.
BERT_UNUSED_PREFIXES = ("pooler.", "embeddings.word_embeddings.")
BERT_ID_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")


def split_bert_state(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Split a BertModel state dict into (TomeFormer's entries, the entries it has no use for)."""
    kept: dict[str, Tensor] = {}
    unused: dict[str, Tensor] = {}
    for key, value in state.items():
        target = unused if key.startswith(BERT_UNUSED_PREFIXES) or key in BERT_ID_BUFFERS else kept
        target[key] = value
    return kept, unused


def interpolate_positions(table: Tensor, n: int) -> Tensor:
    """Stretch a [P, D] absolute position table to [n, D] by linear interpolation."""
    stretched = F.interpolate(table.T[None].float(), size=n, mode="linear", align_corners=True)  # [1, D, n]
    return stretched[0].T.to(table.dtype).contiguous()  # [n, D]


def check_state_dict(expected: dict[str, Tensor], state: dict[str, Tensor], source: str, target: str) -> None:
    """Raise KeyError naming every missing, unexpected and mis-shaped key of `state`."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        lines = [f"cannot load {source} into {target}:"]
        if missing:
            lines.append(f"  missing keys: {missing}")
        if unexpected:
            lines.append(f"  unexpected keys: {unexpected}")
        if shapes:
            lines.append(f"  shape mismatches: {shapes}")
        raise KeyError("\n".join(lines))


def tomeformer_macs(counts: Sequence[int], hidden: int, intermediate: int) -> int:
    """Multiply-accumulates of the connector's linear layers for one image.

    counts: token_schedule output ([t0, t1, ..., tL]); layer i runs q/k/v/out on t_i tokens and the
    feed-forward on t_{i+1}. Attention score products are not counted (the paper counts linear layers).
    """
    attn = sum(4 * t * hidden * hidden for t in counts[:-1])
    ffn = sum(2 * t * hidden * intermediate for t in counts[1:])
    return attn + ffn
