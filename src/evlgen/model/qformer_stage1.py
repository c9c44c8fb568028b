"""BLIP-2's stage-1 objective for the Q-Former baseline: image-text contrastive (ITC), matching (ITM)
and image-grounded generation (ITG) through the Q-Former's text path.

`QFormerStage1` holds what only stage 1 needs: the text path's word and position embeddings, the
text feed-forward sub-blocks (`intermediate` / `output` of each layer; the text shares the layers'
self-attention with the queries), the ITC projections and temperature, the ITM head and the ITG
language-model head. It is called with the QFormer and never owns it, so a stage-1 checkpoint is
`connector.*` (handed over to stage 2) plus `stage1.*` (left behind; `STAGE1_ONLY` lists it).

Attention masks of the three losses (True = may attend), as in BLIP-2:
- ITC: unimodal. Queries see queries and the image; text (behind a leading [CLS]) sees text only.
- ITM: bidirectional. Queries and text see each other; queries also cross-attend to the image.
- ITG: queries see queries and the image (so they are the ITC query pass, whose keys/values are
  reused, as LAVIS does with `past_key_values`); text (behind [DEC]) sees every query and the text
  before it (causal).

The ITG head is tied: its output matrix is the text word-embedding table (BERT's MLM head layout,
`cls.predictions.{transform, bias}`), as BLIP-2's BertLMHeadModel.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evlgen.model.connector import BertShape, bert_init, check_state_dict
from evlgen.model.qformer import QFormer, _FeedForward, qformer_macs

log = logging.getLogger(__name__)

# Keys of a stage-1 checkpoint that stage 2 deliberately does not load (everything else must load).
STAGE1_ONLY = (
    "stage1.embeddings.",  # text word + position embeddings
    "stage1.encoder.",  # text feed-forward sub-blocks
    "stage1.cls.",  # ITG language-model head (its output matrix is tied to the word embeddings)
    "stage1.vision_proj.",  # ITC projections
    "stage1.text_proj.",
    "stage1.itm_head.",  # ITM classifier
    "stage1.temp",  # ITC temperature
)
# Keys of a stage-2 model that a stage-1 checkpoint cannot provide: the projection into the LLM.
STAGE2_ONLY = ("llm_proj.",)
STAGE1_OBJECTIVE = "qformer-stage1"  # the train.objective value of stage 1
LABEL_SMOOTHING = 0.1  # BLIP-2 smooths both the ITC and the ITG targets


class QFormerText:
    """Turns captions into the Q-Former text path's ids: [CLS] text [SEP], right padded.

    Any tokenizer works: [CLS] is its cls token (else BOS), [SEP] its sep token (else EOS), pad its
    pad token (else EOS). [DEC], which replaces [CLS] for ITG, is one extra id appended after the
    tokenizer's vocabulary, as LAVIS adds it to bert-base-uncased (so vocab_size = len(tokenizer) + 1).
    """

    def __init__(self, tokenizer: object, max_len: int = 32) -> None:
        if max_len < 3:
            raise ValueError(f"the Q-Former text length must be >= 3 ([CLS] word [SEP]), got {max_len}")
        self.tokenizer = tokenizer
        self.max_len = max_len

        def pick(*names: str) -> int:
            for name in names:
                value = getattr(tokenizer, name, None)
                if value is not None:
                    return int(value)
            raise ValueError(f"the Q-Former text tokenizer has none of {names}")

        self.cls_id = pick("cls_token_id", "bos_token_id")
        self.sep_id = pick("sep_token_id", "eos_token_id")
        self.pad_id = pick("pad_token_id", "eos_token_id")
        self.dec_id = len(tokenizer)
        self.vocab_size = len(tokenizer) + 1

    def __call__(self, texts: Sequence[str], device: torch.device | None = None) -> tuple[Tensor, Tensor]:
        """-> (ids [B, L] long, mask [B, L] bool), L = the longest row (at most max_len)."""
        rows = []
        for text in texts:
            ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            rows.append([self.cls_id, *ids[: self.max_len - 2], self.sep_id])
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)  # [B, L]
        mask = torch.zeros(len(rows), width, dtype=torch.bool)  # [B, L]
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = True
        return ids.to(device), mask.to(device)


class _TextEmbeddings(nn.Module):
    def __init__(self, vocab_size: int, max_positions: int, hidden: int) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, hidden)
        self.position_embeddings = nn.Embedding(max_positions, hidden)

    def forward(self, ids: Tensor) -> Tensor:
        n = ids.shape[1]
        if n > self.position_embeddings.num_embeddings:
            raise ValueError(f"{n} text tokens > {self.position_embeddings.num_embeddings} positions")
        return self.word_embeddings(ids) + self.position_embeddings.weight[:n]  # [B, L, H]


class _TextLayers(nn.Module):
    def __init__(self, s: BertShape) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_FeedForward(s) for _ in range(s.num_hidden_layers))


class _Transform(nn.Module):
    def __init__(self, s: BertShape) -> None:
        super().__init__()
        self.dense = nn.Linear(s.hidden_size, s.hidden_size)
        self.LayerNorm = nn.LayerNorm(s.hidden_size, eps=s.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


class _Predictions(nn.Module):
    def __init__(self, s: BertShape, vocab_size: int) -> None:
        super().__init__()
        self.transform = _Transform(s)
        self.bias = nn.Parameter(torch.zeros(vocab_size))


class _LMHead(nn.Module):
    """BERT's MLM head layout; the output matrix is passed in (tied to the word embeddings)."""

    def __init__(self, s: BertShape, vocab_size: int) -> None:
        super().__init__()
        self.predictions = _Predictions(s, vocab_size)

    def forward(self, x: Tensor, embedding: Tensor) -> Tensor:
        return F.linear(self.predictions.transform(x), embedding, self.predictions.bias)  # [*, V]


@dataclass(frozen=True)
class Stage1Output:
    """One stage-1 forward: `loss` = itc + itm + itg (BLIP-2 weighs them equally), averaged per sample.

    num_tokens is the batch size, so the trainer's token-weighted validation mean is a per-sample mean.
    """

    loss: Tensor
    num_tokens: int
    parts: dict[str, Tensor] = field(default_factory=dict)


def key_mask(valid: Tensor, queries: int = 0) -> Tensor:
    """Bidirectional attention over [queries ; tokens] with padding hidden: bool [B, 1, 1, Q + L]."""
    b = valid.shape[0]
    full = torch.cat([valid.new_ones(b, queries), valid.bool()], dim=1)  # [B, Q + L]
    return full[:, None, None, :]


def itg_mask(valid: Tensor, queries: int) -> Tensor:
    """Text rows of the ITG mask: every query, then causal over real text. bool [B, 1, L, Q + L]."""
    b, n = valid.shape
    causal = torch.ones(n, n, dtype=torch.bool, device=valid.device).tril()  # [L, L]
    text = causal[None] & valid.bool()[:, None, :]  # [B, L, L]
    return torch.cat([valid.new_ones(b, n, queries).bool(), text], dim=2)[:, None]  # [B, 1, L, Q + L]


def hard_negatives(sim_i2t: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """BLIP-2's ITM negatives: for each text an image, for each image a text, drawn with probability
    softmax(similarity) over the other samples of the batch (harder negatives more often).

    sim_i2t: [B, B] image-to-text ITC logits. Returns (image index per text [B], text index per
    image [B]). With B = 1 there is no other sample and the sample itself is returned.
    """
    b = sim_i2t.shape[0]
    if b == 1:
        zero = torch.zeros(1, dtype=torch.long, device=sim_i2t.device)
        return zero, zero
    with torch.no_grad():
        eye = torch.eye(b, dtype=torch.bool, device=sim_i2t.device)
        sim = sim_i2t.float().masked_fill(eye, -math.inf)  # [B, B], a sample is never its own negative
        image_for_text = torch.multinomial(sim.t().softmax(dim=1), 1, generator=generator)[:, 0]  # [B]
        text_for_image = torch.multinomial(sim.softmax(dim=1), 1, generator=generator)[:, 0]  # [B]
    return image_for_text, text_for_image


class QFormerStage1(nn.Module):
    """BLIP-2 stage 1 (representation learning): ITC + ITM + ITG through the Q-Former's text path.

    Call `forward(qformer, image [B, N, Dv], texts)` with the QFormer it trains (not owned here).
    """

    def __init__(self, qformer: QFormer, text: QFormerText, max_positions: int = 512, embed_dim: int = 256):
        super().__init__()
        s = qformer.shape
        if text.max_len > max_positions:
            raise ValueError(f"text length {text.max_len} > {max_positions} text position embeddings")
        self.text = text
        self.num_queries = qformer.num_queries
        self.embeddings = _TextEmbeddings(text.vocab_size, max_positions, s.hidden_size)
        self.encoder = _TextLayers(s)
        self.cls = _LMHead(s, text.vocab_size)
        self.vision_proj = nn.Linear(s.hidden_size, embed_dim)
        self.text_proj = nn.Linear(s.hidden_size, embed_dim)
        self.itm_head = nn.Linear(s.hidden_size, 2)
        self.apply(bert_init)
        self.temp = nn.Parameter(torch.tensor(0.07))  # BLIP-2's initial ITC temperature

    def load_bert(self, bert: nn.Module, head: nn.Module | None = None) -> None:
        """Initialise the text path from a transformers BertModel (and its MLM head `cls`), as BLIP-2.

        Word embeddings are copied only when the text tokenizer is BERT's own (same vocabulary size,
        [DEC] then stays fresh); another tokenizer keeps fresh word embeddings.
        """
        src = bert.state_dict()
        own = self.state_dict()
        state = {}
        for i in range(len(self.encoder.layer)):
            for part in ("intermediate", "output"):
                for key, value in src.items():
                    if key.startswith(f"encoder.layer.{i}.{part}."):
                        state[key] = value
        pos = src["embeddings.position_embeddings.weight"]
        n = own["embeddings.position_embeddings.weight"].shape[0]
        if pos.shape[0] < n:
            raise ValueError(f"BERT has {pos.shape[0]} positions, the text path needs {n}")
        state["embeddings.position_embeddings.weight"] = pos[:n]
        words = own["embeddings.word_embeddings.weight"].clone()
        bert_words = src["embeddings.word_embeddings.weight"]
        if bert_words.shape[0] == self.text.vocab_size - 1:
            words[: bert_words.shape[0]] = bert_words
        else:
            log.warning(
                "Q-Former text tokenizer (%d ids) is not BERT's (%d): word embeddings start fresh",
                self.text.vocab_size - 1,
                bert_words.shape[0],
            )
        state["embeddings.word_embeddings.weight"] = words
        if head is not None:
            for key, value in head.state_dict().items():
                if key.startswith("predictions.transform."):
                    state[f"cls.{key}"] = value
        keep = {k: v for k, v in own.items() if k not in state}
        check_state_dict(own, {**keep, **state}, "BertModel", "QFormerStage1")
        self.load_state_dict({**keep, **state}, strict=True)

    def forward(
        self, qformer: QFormer, image: Tensor, texts: Sequence[str], image_mask: Tensor | None = None
    ) -> Stage1Output:
        """image [B, N, Dv] (ln_vision's output), one caption per image -> the three losses."""
        b = image.shape[0]
        ids, valid = self.text(texts, image.device)  # [B, L], [B, L]
        query_out, cache = self.query_pass(qformer, image, image_mask)  # [B, Q, H]
        text_out = self.text_pass(qformer, ids, valid)  # [B, L, H]
        sim_i2t = self.similarity(query_out, text_out)  # [B, B]
        target = torch.arange(b, device=image.device)
        itc = (
            F.cross_entropy(sim_i2t, target, label_smoothing=LABEL_SMOOTHING)
            + F.cross_entropy(sim_i2t.t(), target, label_smoothing=LABEL_SMOOTHING)
        ) / 2

        # ITM: positives, (text, hard negative image), (image, hard negative text).
        neg_image, neg_text = hard_negatives(sim_i2t.detach())
        mask_all = None if image_mask is None else torch.cat([image_mask, image_mask[neg_image], image_mask])
        itm_logits = self.itm_logits(
            qformer,
            torch.cat([image, image[neg_image], image]),  # [3B, N, Dv]
            torch.cat([ids, ids, ids[neg_text]]),  # [3B, L]
            torch.cat([valid, valid, valid[neg_text]]),
            mask_all,
        )  # [3B, 2]
        itm_labels = torch.cat([target.new_ones(b), target.new_zeros(2 * b)])
        itm = F.cross_entropy(itm_logits, itm_labels)
        if b == 1:
            itm = itm * 0.0  # no other sample to be a negative; kept in the graph so every weight takes part

        logits = self.itg_logits(qformer, ids, valid, cache)  # [B, L, V]
        labels = ids.masked_fill(~valid, -100)[:, 1:]  # [B, L-1]: position t predicts token t+1
        keep = labels != -100
        itg = F.cross_entropy(logits[:, :-1][keep].float(), labels[keep], label_smoothing=LABEL_SMOOTHING)

        parts = {"itc": itc.detach(), "itm": itm.detach(), "itg": itg.detach()}
        return Stage1Output(loss=itc + itm + itg, num_tokens=b, parts=parts)

    def query_pass(
        self, qformer: QFormer, image: Tensor, image_mask: Tensor | None = None
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """ITC's image side: queries alone -> (outputs [B, Q, H], every layer's keys/values for ITG)."""
        cache: list[tuple[Tensor, Tensor]] = []
        q = qformer.queries(image.shape[0])  # [B, Q, H]
        out = qformer.run(q, qformer.num_queries, image=image, image_mask=image_mask, record=cache)
        return out, cache

    def text_pass(self, qformer: QFormer, ids: Tensor, valid: Tensor) -> Tensor:
        """ITC's text side: text alone, bidirectional over its real tokens -> [B, L, H]."""
        x = qformer.embeddings(self.embeddings(ids))  # [B, L, H]
        return qformer.run(x, 0, allowed=key_mask(valid), text_ffn=self.encoder.layer)

    def similarity(self, query_out: Tensor, text_out: Tensor) -> Tensor:
        """ITC logits [B_image, B_text]: the best query-[CLS] cosine similarity over temperature."""
        image_feats = F.normalize(self.vision_proj(query_out), dim=-1)  # [B, Q, E]
        text_feat = F.normalize(self.text_proj(text_out[:, 0]), dim=-1)  # [B, E], the [CLS] token
        temp = self.temp.clamp(0.001, 0.5)  # BLIP-2's bounds
        return torch.einsum("iqe,te->itq", image_feats, text_feat).amax(dim=-1).float() / temp  # [B, B]

    def itm_logits(
        self, qformer: QFormer, image: Tensor, ids: Tensor, valid: Tensor, image_mask: Tensor | None = None
    ) -> Tensor:
        """Match / no-match logits [B, 2]: queries and text attend to each other, queries to the image."""
        q = qformer.num_queries
        x = torch.cat([qformer.queries(ids.shape[0]), qformer.embeddings(self.embeddings(ids))], dim=1)
        out = qformer.run(
            x, q, image=image, image_mask=image_mask, allowed=key_mask(valid, q), text_ffn=self.encoder.layer
        )  # [B, Q + L, H]
        return self.itm_head(out[:, :q]).mean(dim=1).float()  # [B, 2], averaged over the queries

    def itg_logits(
        self, qformer: QFormer, ids: Tensor, valid: Tensor, cache: list[tuple[Tensor, Tensor]]
    ) -> Tensor:
        """Next-token logits [B, L, V] of [DEC] + text, reading the query pass's keys/values (`cache`)."""
        dec = ids.clone()
        dec[:, 0] = self.text.dec_id  # [DEC] replaces [CLS], as in BLIP-2
        x = qformer.embeddings(self.embeddings(dec))  # [B, L, H]
        allowed = itg_mask(valid, qformer.num_queries)  # [B, 1, L, Q + L]
        hidden = qformer.run(x, 0, allowed=allowed, past=cache, text_ffn=self.encoder.layer)  # [B, L, H]
        return self.cls(hidden, self.embeddings.word_embeddings.weight)  # [B, L, V]


def handover_state(stage1: dict[str, Tensor], expected: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """The part of a stage-1 state dict that initialises stage 2 (`expected`: stage 2's trainable state).

    Keys on STAGE1_ONLY are dropped, keys of `expected` on STAGE2_ONLY are not asked for; everything
    else must match one to one in name and shape, or a KeyError names each offending key.
    """
    given = {k: v for k, v in stage1.items() if not k.startswith(STAGE1_ONLY)}
    wanted = {k: v for k, v in expected.items() if not k.startswith(STAGE2_ONLY)}
    check_state_dict(wanted, given, f"stage-1 model {source}", "the stage-2 VLM")
    return given


# -------------------------------------------------------------------------------------------------
# Cost


def qformer_stage1_macs(
    num_queries: int,
    num_tokens: int,
    encoder_width: int,
    shape: BertShape,
    cross_attention_freq: int,
    text_tokens: int,
    vocab_size: int,
    embed_dim: int = 256,
) -> dict[str, int]:
    """Linear-layer MACs of one stage-1 sample, per pass (BLIP-2 pads text to its max length, T).

    ITC: a query pass and a text pass; ITM: three joint passes (positive, negative image, negative
    text); ITG: a text pass that reuses the query pass's keys/values, plus the LM head on T positions;
    the ITC projections and the ITM head. Returns the parts and their "total".
    """
    q, h = num_queries, shape.hidden_size
    query = qformer_macs(q, num_tokens, encoder_width, shape, cross_attention_freq)
    text = qformer_macs(0, 0, encoder_width, shape, cross_attention_freq, text_tokens)
    joint = qformer_macs(q, num_tokens, encoder_width, shape, cross_attention_freq, text_tokens)
    parts = {
        "itc_query_pass": query,
        "itc_text_pass": text,
        "itm_joint_passes": 3 * joint,
        "itg_text_pass": text,
        "itg_head": text_tokens * (h * h + h * vocab_size),
        "heads": q * h * embed_dim + h * embed_dim + 3 * q * h * 2,
    }
    parts["total"] = sum(parts.values())
    return parts
