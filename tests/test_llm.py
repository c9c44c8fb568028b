"""FrozenLM and byte_tokenizer on tiny random causal LMs (OPT, Llama, Qwen2, Granite), offline on CPU."""

from __future__ import annotations

import pytest
import torch
from tokenizers import AddedToken, Tokenizer, models, normalizers
from torch import nn
from transformers import (
    AutoTokenizer,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from evlgen.model.llm import IGNORE_INDEX, FrozenLM, LMOutput
from evlgen.model.tokenizer import byte_tokenizer

VOCAB = 259
NL_ID = 13  # "\n" = byte 10 + 3 special tokens
BOS_ID = 1
VQA_PROMPT = "Question: what? Short answer:"


def byte_ids(text: str) -> list[int]:
    """Hand tokenisation for the byte tokenizer: one id per UTF-8 byte."""
    return [3 + b for b in text.encode("utf-8")]


def tiny_lm(kind: str, seed: int = 0, **overrides: object) -> nn.Module:
    torch.manual_seed(seed)
    ids = dict(vocab_size=VOCAB, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=1)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    if kind == "opt":
        cfg = OPTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            ffn_dim=64,
            num_attention_heads=2,
            word_embed_proj_dim=32,
            **ids,
        )
        cfg.update(overrides)
        model = OPTForCausalLM(cfg)
    elif kind == "opt_proj":  # input embeddings (16) narrower than the hidden size (32)
        cfg = OPTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            ffn_dim=64,
            num_attention_heads=2,
            word_embed_proj_dim=16,
            **ids,
        )
        model = OPTForCausalLM(cfg)
    elif kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, num_key_value_heads=2, **ids))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, num_key_value_heads=2, **ids))
    elif kind == "granite":  # divides its logits by logits_scaling: base_model + lm_head is not enough
        model = GraniteForCausalLM(GraniteConfig(**common, num_key_value_heads=2, logits_scaling=4.0, **ids))
    else:
        raise ValueError(kind)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def wrap(kind: str = "opt", seed: int = 0, **kwargs: object) -> FrozenLM:
    kwargs.setdefault("end_token", "\n")
    return FrozenLM(tiny_lm(kind, seed), byte_tokenizer(), **kwargs)


def make_prefix(lm: FrozenLM, batch: int, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, lm.hidden_size, generator=g)


def reference(model: nn.Module, prefix: torch.Tensor, prompts: list[str], targets: list[str]):
    """Independent construction of the training batch and HF's own loss on it."""
    emb = model.get_input_embeddings()
    rows, labels = [], []
    for i, (prompt, target) in enumerate(zip(prompts, targets, strict=True)):
        p_ids = [BOS_ID] + byte_ids(prompt)
        t_ids = byte_ids((" " if prompt else "") + target) + [NL_ID]
        rows.append(torch.cat([prefix[i], emb(torch.tensor(p_ids + t_ids))]))
        labels.append([IGNORE_INDEX] * (prefix.shape[1] + len(p_ids)) + t_ids)
    length = max(len(r) for r in rows)
    embeds = torch.zeros(len(rows), length, prefix.shape[2])
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    lab = torch.full((len(rows), length), IGNORE_INDEX)
    for i, r in enumerate(rows):
        embeds[i, : len(r)] = r
        mask[i, : len(r)] = 1
        lab[i, : len(r)] = torch.tensor(labels[i])
    loss = model(inputs_embeds=embeds, attention_mask=mask, labels=lab).loss
    return loss, embeds, mask, lab


# ---------------------------------------------------------------------------------------- tokenizer


def test_byte_tokenizer_conventions_and_roundtrip(tmp_path):
    tok = byte_tokenizer()
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("</s>", "</s>", "<pad>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, len(tok)) == (1, 1, 0, VOCAB)
    assert tok("\n", add_special_tokens=False)["input_ids"] == [NL_ID]
    assert tok("a b", add_special_tokens=True)["input_ids"] == [BOS_ID] + byte_ids("a b")
    text = "Héllo wörld\n2 dogs!"
    assert tok(text, add_special_tokens=False)["input_ids"] == byte_ids(text)
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text

    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for s in [text, VQA_PROMPT, "\n", " yes", ""]:
        for special in (True, False):
            assert (
                loaded(s, add_special_tokens=special)["input_ids"]
                == tok(s, add_special_tokens=special)["input_ids"]
            )
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id, len(loaded)) == (1, 1, 0, VOCAB)
    assert loaded.decode(byte_ids(text)) == text


# ---------------------------------------------------------------------------------------- tokenisation


def test_labels_hand_checked():
    lm = wrap("opt")
    prefix = make_prefix(lm, 2, 3)
    _, mask, labels = lm.prepare_training_inputs(prefix, [VQA_PROMPT, ""], ["yes", "a cat"])
    p_len = 1 + len(VQA_PROMPT.encode())
    want0 = byte_ids(" yes") + [NL_ID]  # the joining space belongs to the target, as in running text
    assert labels[0, : 3 + p_len].eq(IGNORE_INDEX).all()
    assert labels[0, 3 + p_len :].tolist() == want0
    want1 = byte_ids("a cat") + [NL_ID]  # empty prompt: no space added
    n1 = 3 + 1 + len(want1)
    assert labels[1, : 3 + 1].eq(IGNORE_INDEX).all()
    assert labels[1, 4:n1].tolist() == want1
    assert labels[1, n1:].eq(IGNORE_INDEX).all() and mask[1, n1:].eq(0).all() and mask[1, :n1].eq(1).all()


def test_prompt_and_target_truncation():
    lm = wrap("opt", max_text_len=4, max_prompt_len=6)
    assert lm.target_ids("Q:", "yes please") == byte_ids(" ye") + [NL_ID]
    # The end of a prompt cues the answer, so truncation drops its beginning but keeps BOS.
    assert lm.prompt_ids("Question: x Short answer:") == [BOS_ID] + byte_ids("swer:")
    assert lm.prompt_ids("abc") == [BOS_ID] + byte_ids("abc")
    assert lm.target_ids("Q: ", "no") == byte_ids("no") + [NL_ID]  # prompt ends with a space
    assert lm.target_ids("Q:", " no") == byte_ids(" no") + [NL_ID]  # target already starts with one


def test_target_tokenised_as_running_text_with_sentencepiece_style_tokenizer():
    # Llama-2-style normalizer (prepend "▁", spaces -> "▁"): " yes" alone becomes "▁▁yes" = ["▁", "▁yes"].
    vocab = {"<unk>": 0, "</s>": 1, "▁": 2, "Q": 3, ":": 4, "a": 5, "y": 6, "e": 7, "s": 8}
    merges = [("▁", "y"), ("▁y", "e"), ("▁ye", "s"), ("▁", "a"), ("▁", "Q")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    sp = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    sp.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    sp.add_special_tokens([AddedToken("</s>", special=True, normalized=False)])
    tok = PreTrainedTokenizerFast(tokenizer_object=sp, eos_token="</s>", unk_token="<unk>")
    assert tok(" yes", add_special_tokens=False)["input_ids"] == [vocab["▁"], vocab["▁yes"]]  # the trap

    lm = FrozenLM(tiny_lm("opt"), tok)  # end token = eos "</s>"; no pad token -> pad with eos
    assert (lm.end_token_id, lm.pad_token_id) == (1, 1)
    assert lm.target_ids("Q:", "yes") == [vocab["▁yes"], 1]
    assert lm.target_ids("", "yes") == [vocab["▁yes"], 1]


def test_end_token_must_be_one_token():
    with pytest.raises(ValueError, match=r"'ab'.*\[100, 101\]"):
        wrap("opt", end_token="ab")
    with pytest.raises(ValueError, match="exactly one"):
        wrap("opt", end_token="")
    assert wrap("opt", end_token=None).end_token_id == 1  # default: the tokenizer's eos
    assert wrap("opt").end_token_id == NL_ID


def test_empty_target_raises_with_index():
    lm = wrap("opt")
    with pytest.raises(ValueError, match="target 1"):
        lm(make_prefix(lm, 2, 2), ["q", "q"], ["fine", "  \n"])


# ---------------------------------------------------------------------------------------- loss


@pytest.mark.parametrize(
    ("kind", "head_only"),
    [("opt", True), ("opt_proj", True), ("llama", True), ("qwen2", True), ("granite", False)],
)
def test_loss_matches_hf_reference(kind, head_only):
    lm = wrap(kind)
    assert lm.head_only_logits is head_only
    prompts = [VQA_PROMPT, "", "a photo of"]
    targets = ["yes", "two red cubes", "a dog"]
    prefix = make_prefix(lm, 3, 4)
    out = lm(prefix, prompts, targets)
    assert isinstance(out, LMOutput) and out.loss.dtype == torch.float32 and out.loss.dim() == 0

    ref_loss, ref_embeds, ref_mask, ref_labels = reference(lm.model, prefix, prompts, targets)
    embeds, mask, labels = lm.prepare_training_inputs(prefix, prompts, targets)
    assert torch.equal(labels, ref_labels) and torch.equal(mask, ref_mask)
    assert torch.allclose(embeds, ref_embeds)
    assert out.num_tokens == int((ref_labels != IGNORE_INDEX).sum())
    assert abs(out.loss.item() - ref_loss.item()) < 1e-5


def test_gradients_reach_prefix_only_and_lm_is_untouched():
    lm = wrap("opt")
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    prefix = make_prefix(lm, 2, 3).requires_grad_(True)
    out = lm(prefix, ["q:", "longer prompt:"], ["yes", "no"])
    out.loss.backward()
    assert prefix.grad is not None and (prefix.grad.abs().sum(dim=-1) > 0).all()
    assert all(p.grad is None for p in lm.model.parameters())
    lm.generate(prefix.detach(), ["q:"] * 2, num_beams=2, max_new_tokens=3)
    after = lm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_wrapped_model_stays_in_eval_mode():
    torch.manual_seed(0)
    lm = FrozenLM(tiny_lm("opt", dropout=0.5, attention_dropout=0.5), byte_tokenizer(), end_token="\n")
    parent = nn.ModuleDict({"lm": lm, "proj": nn.Linear(2, 2)})
    parent.train()
    assert lm.training and parent["proj"].training and not lm.model.training
    assert not any(m.training for m in lm.model.modules())
    prefix = make_prefix(lm, 1, 2)
    assert torch.equal(lm(prefix, ["q"], ["a"]).loss, lm(prefix, ["q"], ["a"]).loss)  # no dropout


@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_masked_prefix_positions_do_not_matter(kind):
    lm = wrap(kind)
    prefix = make_prefix(lm, 2, 5)
    mask = torch.tensor([[True, False, True, False, True], [True, True, True, True, True]])
    prompts, targets = ["q:", "a longer q:"], ["yes", "no way"]
    loss = lm(prefix, prompts, targets, prefix_mask=mask).loss

    changed = prefix.clone()
    changed[~mask] = float("nan")  # even garbage in masked slots must not leak
    assert torch.equal(lm(changed, prompts, targets, prefix_mask=mask).loss, loss)
    # Holes behave exactly like absent tokens (same positions too), compared per sample.
    kept0 = lm(prefix[:1, mask[0]], prompts[:1], targets[:1]).loss
    alone = lm(prefix[:1], prompts[:1], targets[:1], prefix_mask=mask[:1]).loss
    assert abs(kept0.item() - alone.item()) < 1e-5
    assert abs(lm(prefix, prompts, targets).loss.item() - loss.item()) > 1e-6  # the mask does act


# ---------------------------------------------------------------------------------------- generation


def spy_generate(monkeypatch, lm: FrozenLM) -> list[tuple[dict, torch.Tensor]]:
    calls: list[tuple[dict, torch.Tensor]] = []
    original = lm.model.generate

    def spy(**kwargs):
        out = original(**kwargs)
        calls.append((kwargs, out))
        return out

    monkeypatch.setattr(lm.model, "generate", spy)
    return calls


def end_biased(lm: FrozenLM, end_bias: float) -> FrozenLM:
    """Give the LM head a bias that makes the end token overwhelmingly likely."""
    old = lm.model.get_output_embeddings()
    head = nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[lm.end_token_id] = end_bias
    head.requires_grad_(False)
    lm.model.set_output_embeddings(head)
    return lm


def test_generate_uses_max_new_tokens_and_bounds_length(monkeypatch):
    lm = wrap("opt")
    calls = spy_generate(monkeypatch, lm)
    texts = lm.generate(make_prefix(lm, 2, 3), ["q:", ""], num_beams=1, max_new_tokens=4)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    kwargs, out = calls[0]
    assert kwargs["max_new_tokens"] == 4 and "max_length" not in kwargs
    assert kwargs["eos_token_id"] == NL_ID and "inputs_embeds" in kwargs
    assert out.shape[1] <= 4  # only new tokens come back with inputs_embeds


def test_generate_stops_at_end_token_and_honours_min_new_tokens(monkeypatch):
    lm = end_biased(wrap("opt"), end_bias=50.0)
    calls = spy_generate(monkeypatch, lm)
    prefix = make_prefix(lm, 2, 3)
    assert lm.generate(prefix, ["q:", "another q:"], num_beams=1, max_new_tokens=5) == ["", ""]
    assert calls[-1][1].shape[1] == 1

    for beams in (1, 3):
        texts = lm.generate(prefix, ["q:", "another q:"], num_beams=beams, max_new_tokens=8, min_new_tokens=3)
        out = calls[-1][1]
        assert out.shape[1] == 4  # exactly 3 forced tokens, then the end token
        assert (out[:, :3] != NL_ID).all() and (out[:, 3] == NL_ID).all()
        want = [lm.tokenizer.decode(row[:3], skip_special_tokens=True).strip() for row in out.tolist()]
        assert texts == want


@pytest.mark.parametrize("kind", ["opt", "llama"])
@pytest.mark.parametrize("beams", [1, 3])
def test_batched_left_padded_generation_equals_one_by_one(kind, beams):
    lm = wrap(kind, seed=3)
    lm.tokenizer.padding_side = "right"
    prompts = ["Question: is it red? Short answer:", "", "a photo of"]
    prefix = make_prefix(lm, 3, 4, seed=5)
    mask = torch.tensor([[True] * 4, [True, True, False, False], [True, False, True, True]])
    batched = lm.generate(prefix, prompts, mask, num_beams=beams, max_new_tokens=8, min_new_tokens=2)
    # One by one, with the masked prefix positions removed: no padding and no holes at all.
    single = [
        lm.generate(
            prefix[i : i + 1, mask[i]],
            prompts[i : i + 1],
            num_beams=beams,
            max_new_tokens=8,
            min_new_tokens=2,
        )[0]
        for i in range(3)
    ]
    assert batched == single
    assert any(len(t) > 0 for t in batched)
    assert lm.tokenizer.padding_side == "right"  # never mutated


def test_generate_decodes_only_up_to_the_first_end_token(monkeypatch):
    lm = wrap("opt")
    rows = [byte_ids(" ab") + [NL_ID] + byte_ids("cd"), byte_ids("xy ") + [0, 0, 0]]
    monkeypatch.setattr(lm.model, "generate", lambda **kwargs: torch.tensor(rows))
    assert lm.generate(make_prefix(lm, 2, 1), ["q", "q"]) == ["ab", "xy"]
