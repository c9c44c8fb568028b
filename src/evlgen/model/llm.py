"""Frozen causal LM wrapper: tokenisation, loss masking and generation for any HF causal LM.

The LM is conditioned on a soft visual prompt (prefix embeddings from the connector). Training runs
``[prefix ; prompt ids ; target ids + end]`` right padded and takes cross-entropy on the target only;
generation runs ``[pads ; prefix ; prompt ids]`` left padded. The wrapped model is composed, never
patched or subclassed, and is kept in eval mode; freezing its parameters is the factory's job.

Design decisions (see DESIGN.md section 2 for the reference-code traps they avoid):

- Prompt and target are tokenised separately and concatenated, so the loss mask never depends on how
  BPE merges across the prompt/target boundary.
- The shared tokenizer is never mutated (no ``padding_side``); padded tensors are built here from
  per-sample id lists.
- Masked prefix positions (``prefix_mask`` False) are moved out of the sequence into the padding, so
  every sample's real tokens are contiguous. Positions then agree between training (right padding,
  positions 0..n-1) and generation (left padding, transformers derives positions from the attention
  mask) for every model, whether it numbers positions by index (Llama) or by mask cumsum (OPT).
- Logits are computed only at positions whose next token is labelled: the vocab projection dominates
  small-model step time and the visual prefix needs none. This needs ``model.base_model`` to output the
  hidden states the LM head sees; it is probed once at construction and models that post-process
  logits (Granite's scaling, Gemma-2's soft-capping, ...) fall back to the full forward.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
# Text put before a space-led target to tokenise it as a word in running text (see _continuation_ids).
_ANCHOR = "a"


@dataclass(frozen=True)
class LMOutput:
    """Loss of one training forward: ``loss`` is the fp32 mean over ``num_tokens`` labelled tokens."""

    loss: Tensor
    num_tokens: int


class FrozenLM(nn.Module):
    """A frozen causal LM that scores and generates text after a soft visual prompt.

    Args:
        model: any transformers causal LM (``AutoModelForCausalLM``-style), already loaded and frozen.
        tokenizer: its tokenizer; read, never modified.
        end_token: end-of-caption marker appended to every target and used as the stop token ("\\n" for
            the OPT presets, as the reference); None = ``tokenizer.eos_token``. Must be one token.
        max_text_len: max target tokens including the end token.
        max_prompt_len: max prompt tokens including BOS; longer prompts lose their beginning (after BOS),
            because the end of a prompt ("... Short answer:") is what cues the answer.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        end_token: str | None = None,
        max_text_len: int = 32,
        max_prompt_len: int = 64,
    ) -> None:
        super().__init__()
        if max_text_len < 2:
            raise ValueError(
                f"max_text_len must be >= 2 (one text token + the end token), got {max_text_len}"
            )
        if max_prompt_len < 1:
            raise ValueError(f"max_prompt_len must be >= 1, got {max_prompt_len}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_text_len = max_text_len
        self.max_prompt_len = max_prompt_len

        token = end_token if end_token is not None else tokenizer.eos_token
        if token is None:
            raise ValueError(
                "end_token is None and the tokenizer has no eos_token: pass end_token explicitly"
            )
        ids = list(tokenizer(token, add_special_tokens=False)["input_ids"])
        if len(ids) != 1:
            raise ValueError(f"end_token {token!r} must encode to exactly one token id, got ids {ids}")
        self.end_token: str = token
        self.end_token_id: int = ids[0]

        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad_id is None:
            raise ValueError("the tokenizer has neither a pad_token nor an eos_token to pad with")
        self.pad_token_id: int = pad_id
        self.bos_token_id: int | None = tokenizer.bos_token_id
        self._anchor_ids = list(tokenizer(_ANCHOR, add_special_tokens=False)["input_ids"])

        self.hidden_size: int = model.get_input_embeddings().embedding_dim
        self.model.eval()
        # Decided on first use, not here: construction must stay free (meta-device builds, `info`).
        self._head_only_logits: bool | None = None

    # ------------------------------------------------------------------ mode and dtype

    def train(self, mode: bool = True) -> FrozenLM:
        """Set the wrapper's mode; the LM itself stays in eval mode (no dropout in a frozen model)."""
        super().train(mode)
        self.model.eval()
        return self

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the LM's input embeddings; the prefix is cast to it."""
        return self.model.get_input_embeddings().weight.dtype

    @property
    def device(self) -> torch.device:
        """Device of the LM's input embeddings; inputs are built there."""
        return self.model.get_input_embeddings().weight.device

    # ------------------------------------------------------------------ tokenisation

    def prompt_ids(self, prompt: str) -> list[int]:
        """Prompt ids with the tokenizer's special tokens (BOS where it adds one), at most max_prompt_len."""
        ids = list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        if len(ids) > self.max_prompt_len:
            head = ids[:1] if self.bos_token_id is not None and ids[0] == self.bos_token_id else []
            keep = self.max_prompt_len - len(head)
            ids = head + (ids[len(ids) - keep :] if keep > 0 else [])
        return ids

    def target_ids(self, prompt: str, target: str, index: int = 0) -> list[int]:
        """Target ids as they follow ``prompt`` in running text, truncated, plus the end token.

        ``index`` only names the sample in the error raised for an empty target.
        """
        if not target.strip():
            raise ValueError(f"target {index} is empty: {target!r}")
        if prompt and not prompt[-1].isspace() and not target[0].isspace():
            # "Short answer:" + "yes" must be read as "Short answer: yes", i.e. the word " yes".
            target = " " + target
        if prompt and target[0].isspace():
            ids = self._continuation_ids(target)
        else:
            ids = list(self.tokenizer(target, add_special_tokens=False)["input_ids"])
        return ids[: self.max_text_len - 1] + [self.end_token_id]

    def _continuation_ids(self, text: str) -> list[int]:
        """Ids of whitespace-led ``text`` as it is tokenised after a word.

        Tokenising " yes" alone is right for byte-level BPEs (GPT-2, OPT, Qwen, Llama-3) but SentencePiece
        tokenizers that prepend "▁" turn it into "▁▁yes"; tokenising "a yes" and dropping the ids of "a"
        gives the running-text ids for both families. Falls back to plain tokenisation if "a" merged.
        """
        ids = list(self.tokenizer(_ANCHOR + text, add_special_tokens=False)["input_ids"])
        n = len(self._anchor_ids)
        if n > 0 and ids[:n] == self._anchor_ids:
            return ids[n:]
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # ------------------------------------------------------------------ sequence assembly

    def _check_prefix(self, prefix: Tensor, prefix_mask: Tensor | None, batch: int) -> Tensor:
        """Validate shapes; return the prefix mask as bool on the LM device (all True when None)."""
        if prefix.dim() != 3 or prefix.shape[0] != batch or prefix.shape[2] != self.hidden_size:
            raise ValueError(
                f"prefix must be [B={batch}, P, D={self.hidden_size}], got {tuple(prefix.shape)}"
            )
        if prefix_mask is None:
            return torch.ones(prefix.shape[:2], dtype=torch.bool, device=self.device)  # [B, P]
        if tuple(prefix_mask.shape) != tuple(prefix.shape[:2]):
            raise ValueError(
                f"prefix_mask must be [B, P] = {tuple(prefix.shape[:2])}, got {tuple(prefix_mask.shape)}"
            )
        return prefix_mask.to(device=self.device, dtype=torch.bool)  # [B, P]

    def _assemble(
        self,
        prefix: Tensor,
        prefix_mask: Tensor,
        text_ids: list[list[int]],
        text_labels: list[list[int]] | None,
        left_pad: bool,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Join prefix and text into padded ``(inputs_embeds, attention_mask, labels)``.

        Real tokens (prefix positions with mask True, then the text ids) end up contiguous at the start
        (right padding) or at the end (left padding); pad positions hold zero embeddings.
        """
        device = self.device
        batch, num_prefix, dim = prefix.shape
        text_len = max(len(ids) for ids in text_ids)
        ids = torch.full((batch, text_len), self.pad_token_id, dtype=torch.long)  # [B, T]
        text_valid = torch.zeros(batch, text_len, dtype=torch.bool)  # [B, T]
        labels = torch.full((batch, text_len), IGNORE_INDEX, dtype=torch.long)  # [B, T]
        for i, row in enumerate(text_ids):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            text_valid[i, : len(row)] = True
            if text_labels is not None:
                labels[i, : len(row)] = torch.tensor(text_labels[i], dtype=torch.long)

        text_embeds = self.model.get_input_embeddings()(ids.to(device))  # [B, T, D]
        embeds = torch.cat(
            [prefix.to(device=device, dtype=text_embeds.dtype), text_embeds], dim=1
        )  # [B, S, D]
        valid = torch.cat([prefix_mask, text_valid.to(device)], dim=1)  # [B, S]
        all_labels = torch.cat(
            [torch.full((batch, num_prefix), IGNORE_INDEX, dtype=torch.long), labels], dim=1
        ).to(device)  # [B, S]

        # A stable sort on validity moves the real tokens together in their original order.
        key = valid.to(torch.int8) if left_pad else (~valid).to(torch.int8)  # [B, S]
        order = torch.sort(key, dim=1, stable=True).indices  # [B, S]
        counts = valid.sum(dim=1)  # [B]
        if int(counts.min()) == 0:
            raise ValueError(
                "a sample has no real tokens (empty prompt without BOS and a fully masked prefix)"
            )
        length = int(counts.max())
        order = order[:, -length:] if left_pad else order[:, :length]  # [B, L]

        attention_mask = valid.gather(1, order)  # [B, L]
        embeds = embeds.gather(1, order.unsqueeze(-1).expand(-1, -1, dim))  # [B, L, D]
        # Zero the pads so masked prefix values (even NaN) cannot leak through 0 * value in attention.
        embeds = embeds.masked_fill(~attention_mask.unsqueeze(-1), 0.0)  # [B, L, D]
        out_labels = all_labels.gather(1, order) if text_labels is not None else None  # [B, L]
        return embeds, attention_mask.long(), out_labels

    def prepare_training_inputs(
        self,
        prefix: Tensor,
        prompts: list[str],
        targets: list[str],
        prefix_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Right-padded ``(inputs_embeds [B, L, D], attention_mask [B, L], labels [B, L])`` for training.

        Labels are -100 on prefix, prompt and padding, the target ids + end token elsewhere (unshifted,
        as transformers' ``labels`` argument expects).
        """
        batch = len(prompts)
        if len(targets) != batch:
            raise ValueError(f"got {batch} prompts but {len(targets)} targets")
        mask = self._check_prefix(prefix, prefix_mask, batch)
        text_ids: list[list[int]] = []
        text_labels: list[list[int]] = []
        for i, (prompt, target) in enumerate(zip(prompts, targets, strict=True)):
            p_ids = self.prompt_ids(prompt)
            t_ids = self.target_ids(prompt, target, index=i)
            text_ids.append(p_ids + t_ids)
            text_labels.append([IGNORE_INDEX] * len(p_ids) + t_ids)
        embeds, attention_mask, labels = self._assemble(prefix, mask, text_ids, text_labels, left_pad=False)
        assert labels is not None
        return embeds, attention_mask, labels

    # ------------------------------------------------------------------ training

    def forward(
        self,
        prefix: Tensor,
        prompts: list[str],
        targets: list[str],
        prefix_mask: Tensor | None = None,
    ) -> LMOutput:
        """Mean next-token cross-entropy (fp32) of ``targets`` given ``[prefix ; prompts]``.

        prefix: [B, P, D] soft visual prompt (gradients flow back into it); prefix_mask: [B, P] bool,
        True = real token, None = all real.
        """
        embeds, attention_mask, labels = self.prepare_training_inputs(prefix, prompts, targets, prefix_mask)
        next_labels = labels[:, 1:]  # [B, L-1]: the label each position predicts
        selected = next_labels != IGNORE_INDEX  # [B, L-1]
        if self.head_only_logits:
            # Right padding with contiguous real tokens: default positions are already correct, so no
            # position_ids; use_cache=False avoids building a KV cache nobody reads.
            hidden = self.model.base_model(
                inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False
            ).last_hidden_state  # [B, L, D']
            logits = self.model.get_output_embeddings()(hidden[:, :-1][selected])  # [N, V]
        else:
            # The model post-processes its logits (scaling, soft-capping): take them from the full forward.
            full = self.model(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False).logits
            logits = full[:, :-1][selected]  # [N, V]
        target = next_labels[selected]  # [N]
        loss = F.cross_entropy(logits.float(), target)
        return LMOutput(loss=loss, num_tokens=int(target.numel()))

    @property
    def head_only_logits(self) -> bool:
        """Whether training may apply the LM head to selected hidden states only (checked once)."""
        if self._head_only_logits is None:
            self._head_only_logits = self._probe_head_only_logits()
            if not self._head_only_logits:
                logger.warning(
                    "%s: base_model hidden states + output embeddings do not reproduce the model's "
                    "logits; computing full logits in training (slower)",
                    type(self.model).__name__,
                )
        return self._head_only_logits

    @torch.no_grad()
    def _probe_head_only_logits(self) -> bool:
        """Whether ``output_embeddings(base_model(x).last_hidden_state)`` equals ``model(x).logits``."""
        base = self.model.base_model
        head = self.model.get_output_embeddings()
        if base is self.model or head is None:
            return False
        ids = torch.tensor([self.prompt_ids("a photo of a dog on the grass")], device=self.device)  # [1, T]
        embeds = self.model.get_input_embeddings()(ids)  # [1, T, D]
        full = self.model(inputs_embeds=embeds, use_cache=False).logits.float()  # [1, T, V]
        hidden = getattr(base(inputs_embeds=embeds, use_cache=False), "last_hidden_state", None)
        if hidden is None or hidden.shape[-1] != head.weight.shape[-1]:
            return False
        mine = head(hidden).float()  # [1, T, V]
        if mine.shape != full.shape:
            return False
        return bool((full - mine).abs().max() <= 1e-4 * (1.0 + full.abs().max()))

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(
        self,
        prefix: Tensor,
        prompts: list[str],
        prefix_mask: Tensor | None = None,
        *,
        num_beams: int = 5,
        max_new_tokens: int = 30,
        min_new_tokens: int = 0,
        length_penalty: float = 1.0,
        repetition_penalty: float = 1.0,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_time: float | None = None,
    ) -> list[str]:
        """Generate one text per sample after ``[prefix ; prompt]``, cut at the end token and stripped.

        max_time: stop generating after this many seconds (a served request's time limit).

        prefix: [B, P, D]; prefix_mask: [B, P] bool or None. Other parameters of
        ``model.generation_config`` (e.g. ``no_repeat_ngram_size``) still apply.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        mask = self._check_prefix(prefix, prefix_mask, len(prompts))
        text_ids = [self.prompt_ids(p) for p in prompts]
        embeds, attention_mask, _ = self._assemble(prefix, mask, text_ids, None, left_pad=True)

        options: dict[str, object] = {
            "max_new_tokens": max_new_tokens,
            "min_new_tokens": min_new_tokens,
            "num_beams": num_beams,
            "num_return_sequences": 1,
            "do_sample": do_sample,
            "repetition_penalty": repetition_penalty,
            "eos_token_id": self.end_token_id,
            "pad_token_id": self.pad_token_id,
            "return_dict_in_generate": False,
        }
        # Passed only where they act, so transformers does not warn about unused flags.
        if num_beams > 1:
            options["length_penalty"] = length_penalty
        if max_time is not None:
            options["max_time"] = max_time
        if do_sample:
            options["temperature"] = temperature
            options["top_p"] = top_p
        # transformers derives position ids from the attention mask (cumsum - 1), so left padding does
        # not shift positions; with inputs_embeds only the new tokens are returned.
        new_tokens = self.model.generate(
            inputs_embeds=embeds, attention_mask=attention_mask, **options
        )  # [B, <= max_new_tokens]

        texts = []
        for row in new_tokens.tolist():
            if self.end_token_id in row:
                row = row[: row.index(self.end_token_id)]
            texts.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        return texts
