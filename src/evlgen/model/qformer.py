"""BLIP-2's Q-Former as a connector baseline: the part that survives into generative training.

`QFormer` (stage 2, or one-stage training): learned queries [1, Q, H] that run through post-LN BERT
layers, attending to each other in every layer and cross-attending to the visual tokens (ln_vision's
output, read at the tower width: BLIP-2's `encoder_width`) in layers 0, f, 2f, ... (`cross_attention_freq`
f = 2). Queries have their own feed-forward sub-block (`intermediate_query` / `output_query`), as in
BLIP-2. Its stage-1 objective (ITC + ITM + ITG) is in `qformer_stage1.py`, which calls this module's
layers with the text path's own feed-forward sub-blocks.

Parameter names follow LAVIS's Q-Former (`encoder.layer.0.crossattention.self.key.weight`,
`query_tokens`), so a BLIP-2 checkpoint maps onto them key by key.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evlgen.model.connector import (
    BertShape,
    TokenState,
    _AddNorm,
    _Intermediate,
    bert_init,
    bert_shape,
    check_state_dict,
)

log = logging.getLogger(__name__)


class _Heads(nn.Module):
    """BERT multi-head attention projections; keys and values may read another width (cross-attention)."""

    def __init__(self, s: BertShape, kv_width: int) -> None:
        super().__init__()
        if s.hidden_size % s.num_attention_heads:
            raise ValueError(f"hidden_size {s.hidden_size} is not divisible by {s.num_attention_heads} heads")
        self.heads = s.num_attention_heads
        self.query = nn.Linear(s.hidden_size, s.hidden_size)
        self.key = nn.Linear(kv_width, s.hidden_size)
        self.value = nn.Linear(kv_width, s.hidden_size)
        self.dropout_p = s.attention_probs_dropout_prob

    def forward(
        self, x: Tensor, context: Tensor, allowed: Tensor | None, past: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x [B, S, H] attends to context [B, C, W] (after `past` keys/values [B, h, P, Dh], if given).

        allowed: bool [B, 1, S, P + C] (True = may attend) or None. Returns the context vectors
        [B, S, H] and this call's own keys/values (without `past`), for reuse by a later pass.
        """
        b, s, d = x.shape

        def heads(t: Tensor) -> Tensor:
            return t.view(b, t.shape[1], self.heads, d // self.heads).transpose(1, 2)  # [B, h, *, Dh]

        q, k, v = heads(self.query(x)), heads(self.key(context)), heads(self.value(context))
        kk, vv = (k, v) if past is None else (torch.cat([past[0], k], 2), torch.cat([past[1], v], 2))
        p = self.dropout_p if self.training else 0.0
        ctx = F.scaled_dot_product_attention(q, kk, vv, attn_mask=allowed, dropout_p=p)  # [B, h, S, Dh]
        return ctx.transpose(1, 2).reshape(b, s, d), (k, v)  # [B, S, H]


class _Attention(nn.Module):
    def __init__(self, s: BertShape, kv_width: int) -> None:
        super().__init__()
        self.self = _Heads(s, kv_width)
        self.output = _AddNorm(s.hidden_size, s)


class _FeedForward(nn.Module):
    """BERT's intermediate + output sub-blocks under the names LAVIS gives them."""

    def __init__(self, s: BertShape) -> None:
        super().__init__()
        self.intermediate = _Intermediate(s)
        self.output = _AddNorm(s.intermediate_size, s)

    def forward(self, x: Tensor) -> Tensor:
        return self.output(self.intermediate(x), x)


class _Layer(nn.Module):
    def __init__(self, s: BertShape, encoder_width: int, cross: bool) -> None:
        super().__init__()
        self.attention = _Attention(s, s.hidden_size)
        self.has_cross_attention = cross
        if cross:
            self.crossattention = _Attention(s, encoder_width)
        self.intermediate_query = _Intermediate(s)
        self.output_query = _AddNorm(s.intermediate_size, s)


class _Encoder(nn.Module):
    def __init__(self, s: BertShape, encoder_width: int, cross_attention_freq: int) -> None:
        super().__init__()
        self.layer = nn.ModuleList(
            _Layer(s, encoder_width, i % cross_attention_freq == 0) for i in range(s.num_hidden_layers)
        )


class _QueryEmbeddings(nn.Module):
    """The LayerNorm + dropout BLIP-2 applies to every input of the layers (queries and text alike)."""

    def __init__(self, s: BertShape) -> None:
        super().__init__()
        self.LayerNorm = nn.LayerNorm(s.hidden_size, eps=s.layer_norm_eps)
        self.dropout = nn.Dropout(s.hidden_dropout_prob)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.LayerNorm(x))


class QFormer(nn.Module):
    """BLIP-2's Q-Former: learned queries that read the visual tokens by cross-attention.

    Call `forward_with_state(image [B, N, encoder_width], mask [B, N] | None)` -> ([B, Q, H], state).
    The VLM feeds it ln_vision's output directly (no vl_proj) and maps its output to the LM with
    llm_proj.
    """

    # VLM glue: reads the tower width itself (BLIP-2's encoder_width), writes its own hidden size.
    reads_tower_width = True
    writes_llm_width = False

    def __init__(
        self,
        shape: BertShape,
        num_queries: int = 32,
        encoder_width: int = 1408,
        cross_attention_freq: int = 2,
    ) -> None:
        super().__init__()
        if num_queries < 1 or cross_attention_freq < 1:
            raise ValueError(
                f"need num_queries >= 1 and cross_attention_freq >= 1, "
                f"got {num_queries} and {cross_attention_freq}"
            )
        self.shape = shape
        self.num_queries = num_queries
        self.encoder_width = encoder_width
        self.cross_attention_freq = cross_attention_freq
        self.query_tokens = nn.Parameter(torch.zeros(1, num_queries, shape.hidden_size))
        self.embeddings = _QueryEmbeddings(shape)
        self.encoder = _Encoder(shape, encoder_width, cross_attention_freq)
        self.apply(bert_init)
        nn.init.normal_(self.query_tokens, std=0.02)  # BLIP-2: normal(0, initializer_range)

    @property
    def hidden_size(self) -> int:
        return self.shape.hidden_size

    @property
    def input_size(self) -> int:
        return self.encoder_width

    def queries(self, batch: int) -> Tensor:
        """The embedded queries [B, Q, H] (LayerNorm + dropout of the learned query tokens)."""
        return self.embeddings(self.query_tokens.expand(batch, -1, -1))

    def forward(self, image: Tensor, mask: Tensor | None = None) -> Tensor:
        """image [B, N, encoder_width], mask [B, N] bool or None -> query outputs [B, Q, H]."""
        return self.forward_with_state(image, mask)[0]

    def forward_with_state(self, image: Tensor, mask: Tensor | None = None) -> tuple[Tensor, TokenState]:
        """Like forward; the state's mask is None because every query output is real."""
        out = self.run(self.queries(image.shape[0]), self.num_queries, image=image, image_mask=mask)
        return out, TokenState()

    def run(
        self,
        x: Tensor,
        num_queries: int,
        *,
        image: Tensor | None = None,
        image_mask: Tensor | None = None,
        allowed: Tensor | None = None,
        past: Sequence[tuple[Tensor, Tensor]] | None = None,
        text_ffn: Sequence[_FeedForward] | None = None,
        record: list[tuple[Tensor, Tensor]] | None = None,
    ) -> Tensor:
        """Run the layers on embedded tokens x [B, S, H]: `num_queries` queries first, then text.

        image: [B, N, encoder_width], needed when queries are present (they cross-attend to it);
        image_mask: [B, N] bool (True = real). allowed: the self-attention mask, bool [B, 1, S, P + S]
        or None (all visible), where P is the length of `past`: per layer, keys/values [B, h, P, Dh] of
        an earlier pass that x also attends to (ITG reads the query pass this way). text_ffn: the
        stage-1 text feed-forward sub-blocks, one per layer, needed when text is present. record:
        if given, receives every layer's self-attention keys/values of x.
        """
        if num_queries and image is None:
            raise ValueError("queries cross-attend to the image: pass image")
        if x.shape[1] > num_queries and text_ffn is None:
            raise ValueError("text tokens need the stage-1 text feed-forward blocks (text_ffn)")
        cross_allowed = None if image_mask is None else image_mask[:, None, None, :].bool()  # [B, 1, 1, N]
        for i, layer in enumerate(self.encoder.layer):
            ctx, kv = layer.attention.self(x, x, allowed, None if past is None else past[i])
            if record is not None:
                record.append(kv)
            h = layer.attention.output(ctx, x)  # [B, S, H]
            parts = []
            if num_queries:
                hq = h[:, :num_queries]  # [B, Q, H]
                if layer.has_cross_attention:
                    ctx, _ = layer.crossattention.self(hq, image, cross_allowed)
                    hq = layer.crossattention.output(ctx, hq)
                parts.append(layer.output_query(layer.intermediate_query(hq), hq))
            if h.shape[1] > num_queries:
                parts.append(text_ffn[i](h[:, num_queries:]))  # [B, L, H]
            x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # [B, S, H]
        return x

    @classmethod
    def from_bert(
        cls,
        bert: nn.Module,
        num_queries: int = 32,
        encoder_width: int = 1408,
        cross_attention_freq: int = 2,
        num_layers: int | None = None,
    ) -> QFormer:
        """Initialise from a transformers `BertModel` as BLIP-2 does, checking every key and shape.

        Self-attention and the embedding LayerNorm come from BERT, each layer's query feed-forward
        from BERT's feed-forward; cross-attention and the queries stay freshly initialised.
        """
        cfg = bert.config
        if cfg.hidden_act not in ("gelu", "gelu_python"):
            raise ValueError(
                f"the Q-Former uses exact GELU like BERT; the checkpoint uses {cfg.hidden_act!r}"
            )
        layers = cfg.num_hidden_layers if num_layers is None else num_layers
        if not 1 <= layers <= cfg.num_hidden_layers:
            raise ValueError(f"num_layers must be in [1, {cfg.num_hidden_layers}], got {num_layers}")
        shape = bert_shape(cfg, layers)
        module = cls(shape, num_queries, encoder_width, cross_attention_freq)
        src = bert.state_dict()
        state = {
            k: v for k, v in module.state_dict().items() if k == "query_tokens" or ".crossattention." in k
        }
        state["embeddings.LayerNorm.weight"] = src["embeddings.LayerNorm.weight"]
        state["embeddings.LayerNorm.bias"] = src["embeddings.LayerNorm.bias"]
        for i in range(layers):
            for key, value in src.items():
                prefix = f"encoder.layer.{i}."
                if not key.startswith(prefix):
                    continue
                rest = key[len(prefix) :]
                if rest.startswith("attention."):
                    state[key] = value
                elif rest.startswith(("intermediate.", "output.")):
                    head, tail = rest.split(".", 1)
                    state[f"{prefix}{head}_query.{tail}"] = value
        check_state_dict(module.state_dict(), state, "BertModel", "QFormer")
        module.load_state_dict(state, strict=True)
        return module


# -------------------------------------------------------------------------------------------------
# Cost


def qformer_macs(
    num_queries: int,
    num_tokens: int,
    encoder_width: int,
    shape: BertShape,
    cross_attention_freq: int = 2,
    text_tokens: int = 0,
) -> int:
    """Linear-layer multiply-accumulates of one Q-Former pass over one image (attention products excluded).

    Every layer: q/k/v/out and the feed-forward on the Q queries and T text tokens (text_tokens); every
    cross-attention layer: q/out on the queries, k/v from the N visual tokens of width encoder_width.
    """
    h, f, n_layers = shape.hidden_size, shape.intermediate_size, shape.num_hidden_layers
    tokens = num_queries + text_tokens
    per_layer = tokens * (4 * h * h + 2 * h * f)
    cross_layers = len(range(0, n_layers, cross_attention_freq))
    cross = num_queries * 2 * h * h + num_tokens * 2 * encoder_width * h
    return n_layers * per_layer + cross_layers * cross
