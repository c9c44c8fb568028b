"""The Q-Former against transformers' Blip2QFormerModel and BertModel, brute-force attention masks,
BLIP-2's stage-1 losses, BERT initialisation and the paper-shape MAC counts."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForMaskedLM, Blip2QFormerConfig, Blip2QFormerModel

from evlgen.model.connector import BertShape
from evlgen.model.qformer import QFormer, qformer_macs
from evlgen.model.qformer_stage1 import (
    QFormerStage1,
    QFormerText,
    hard_negatives,
    itg_mask,
    key_mask,
    qformer_stage1_macs,
)
from evlgen.model.tokenizer import byte_tokenizer, train_wordpiece_tokenizer

SHAPE = BertShape(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64)
CAPTIONS = ["a red square on the left", "two blue circles", "a green star", "three small yellow shapes"]


def build(queries=5, width=24, freq=2, shape=SHAPE, seed=0):
    torch.manual_seed(seed)
    qf = QFormer(shape, num_queries=queries, encoder_width=width, cross_attention_freq=freq).eval()
    heads = QFormerStage1(qf, QFormerText(byte_tokenizer(), max_len=16), max_positions=64, embed_dim=8).eval()
    return qf, heads


def reference_model(qf, heads):
    """transformers' Blip2QFormerModel with our weights (LAVIS names -> transformers names)."""
    cfg = Blip2QFormerConfig(
        hidden_size=SHAPE.hidden_size,
        num_hidden_layers=SHAPE.num_hidden_layers,
        num_attention_heads=SHAPE.num_attention_heads,
        intermediate_size=SHAPE.intermediate_size,
        cross_attention_frequency=qf.cross_attention_freq,
        encoder_hidden_size=qf.encoder_width,
        use_qformer_text_input=True,
    )
    ref = Blip2QFormerModel(cfg).eval()
    state = {}
    for k, v in qf.state_dict().items():
        if k == "query_tokens":
            continue
        k = k.replace("embeddings.LayerNorm", "layernorm")
        k = k.replace(".attention.self.", ".attention.attention.").replace(
            ".crossattention.self.", ".crossattention.attention."
        )
        state[k] = v
    for k, v in heads.encoder.state_dict().items():
        state["encoder." + k] = v  # layer.i.intermediate / layer.i.output: the text feed-forward
    ref.load_state_dict(state, strict=True)
    return ref


def text_embeds(heads, ids):
    return heads.embeddings(ids)  # word + position, before the shared LayerNorm


def test_query_text_and_joint_passes_equal_transformers_blip2_qformer():
    qf, heads = build()
    ref = reference_model(qf, heads)
    image = torch.randn(2, 7, 24)
    image_mask = torch.tensor([[True] * 7, [True] * 5 + [False] * 2])
    ids, valid = heads.text(CAPTIONS[:2])
    with torch.no_grad():
        mine, _ = heads.query_pass(qf, image, image_mask)
        theirs = ref(
            query_embeds=qf.query_tokens.expand(2, -1, -1),
            encoder_hidden_states=image,
            encoder_attention_mask=image_mask.long(),
        ).last_hidden_state
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
        # The padded visual tokens do not reach the queries.
        changed = image.clone()
        changed[1, 5:] = 50.0
        torch.testing.assert_close(heads.query_pass(qf, changed, image_mask)[0], mine)

        mine = heads.text_pass(qf, ids, valid)
        theirs = ref(
            query_embeds=text_embeds(heads, ids), query_length=0, attention_mask=valid.long()
        ).last_hidden_state
        torch.testing.assert_close(mine[valid], theirs[valid], rtol=1e-5, atol=1e-5)

        q = qf.num_queries
        joint = torch.cat([qf.query_tokens.expand(2, -1, -1), text_embeds(heads, ids)], dim=1)
        # (transformers mis-shapes an image mask when text rides along, so every visual token is real here)
        theirs = ref(
            query_embeds=joint,
            query_length=q,
            attention_mask=torch.cat([torch.ones(2, q, dtype=torch.long), valid.long()], dim=1),
            encoder_hidden_states=image,
        ).last_hidden_state
        x = torch.cat([qf.queries(2), qf.embeddings(text_embeds(heads, ids))], dim=1)
        mine = qf.run(x, q, image=image, allowed=key_mask(valid, q), text_ffn=heads.encoder.layer)
        real = torch.cat([torch.ones(2, q, dtype=torch.bool), valid], dim=1)
        torch.testing.assert_close(mine[real], theirs[real], rtol=1e-5, atol=1e-5)


def brute_itg_mask(valid, q):
    """ITG's full mask over [queries ; text], one entry at a time: queries see queries; text position
    i sees every query and the real text positions j <= i."""
    b, n = valid.shape
    m = torch.zeros(b, 1, q + n, q + n, dtype=torch.bool)
    for s in range(b):
        for i in range(q + n):
            for j in range(q + n):
                if i < q:
                    m[s, 0, i, j] = j < q
                else:
                    m[s, 0, i, j] = j < q or (j <= i and bool(valid[s, j - q]))
    return m


def test_itg_with_cached_queries_equals_a_joint_pass_under_the_brute_force_mask():
    qf, heads = build()
    image = torch.randn(3, 7, 24)
    ids, valid = heads.text(CAPTIONS[:3])
    with torch.no_grad():
        _, cache = heads.query_pass(qf, image)
        logits = heads.itg_logits(qf, ids, valid, cache)  # [B, L, V]
        q = qf.num_queries
        dec = ids.clone()
        dec[:, 0] = heads.text.dec_id
        x = torch.cat([qf.queries(3), qf.embeddings(heads.embeddings(dec))], dim=1)
        hidden = qf.run(x, q, image=image, allowed=brute_itg_mask(valid, q), text_ffn=heads.encoder.layer)
        joint = heads.cls(hidden[:, q:], heads.embeddings.word_embeddings.weight)
    torch.testing.assert_close(logits[valid], joint[valid], rtol=1e-5, atol=1e-5)
    assert torch.equal(itg_mask(valid, q), brute_itg_mask(valid, q)[:, :, q:])


def test_itg_is_causal_and_ignores_padding():
    qf, heads = build()
    image = torch.randn(2, 7, 24)
    ids, valid = heads.text(CAPTIONS[:2])
    with torch.no_grad():
        _, cache = heads.query_pass(qf, image)
        base = heads.itg_logits(qf, ids, valid, cache)
        later = ids.clone()
        later[0, 6] = (later[0, 6] + 7) % 200 + 3  # change text token 6 of sample 0
        changed = heads.itg_logits(qf, later, valid, cache)
        torch.testing.assert_close(changed[0, :6], base[0, :6])
        assert not torch.allclose(changed[0, 6:][valid[0, 6:]], base[0, 6:][valid[0, 6:]])
        padded = ids.clone()
        padded[1, ~valid[1]] = 42  # the padding's ids
        torch.testing.assert_close(heads.itg_logits(qf, padded, valid, cache)[1][valid[1]], base[1][valid[1]])
        # ... and ITG depends on the image only through the queries.
        _, other = heads.query_pass(qf, torch.randn(2, 7, 24))
        assert not torch.allclose(heads.itg_logits(qf, ids, valid, other), base)


def test_itc_passes_are_unimodal_and_itm_is_not():
    qf, heads = build()
    image = torch.randn(2, 7, 24)
    ids, valid = heads.text(CAPTIONS[:2])
    other_ids, other_valid = heads.text(CAPTIONS[2:])
    with torch.no_grad():
        # The ITC query pass never sees text; the text pass never sees the image or the queries.
        text_a = heads.text_pass(qf, ids, valid)
        with torch.no_grad():
            qf.query_tokens.add_(1.0)
        torch.testing.assert_close(heads.text_pass(qf, ids, valid), text_a)
        qf.query_tokens.sub_(1.0)
        # ITM: queries read the text (and the image), so the match logits change with either.
        itm = heads.itm_logits(qf, image, ids, valid)
        assert not torch.allclose(heads.itm_logits(qf, image, other_ids, other_valid), itm)
        assert not torch.allclose(heads.itm_logits(qf, torch.randn(2, 7, 24), ids, valid), itm)


def test_itc_loss_matches_a_loop_over_query_text_pairs():
    qf, heads = build()
    image = torch.randn(4, 7, 24)
    ids, valid = heads.text(CAPTIONS)
    torch.manual_seed(1)
    with torch.no_grad():
        out = heads(qf, image, CAPTIONS)
        qo, _ = heads.query_pass(qf, image)
        to = heads.text_pass(qf, ids, valid)
    b, temp = 4, 0.07
    sims = torch.zeros(b, b)
    torch.set_grad_enabled(False)
    for i in range(b):
        for t in range(b):
            best = -math.inf
            for k in range(qf.num_queries):
                u = F.normalize(heads.vision_proj(qo[i, k]), dim=0)
                v = F.normalize(heads.text_proj(to[t, 0]), dim=0)
                best = max(best, float(u @ v))
            sims[i, t] = best / temp
    torch.set_grad_enabled(True)

    def smoothed_ce(logits):
        total = 0.0
        for row in range(b):
            logp = logits[row].log_softmax(0)
            total += -(0.9 * logp[row] + 0.1 * logp.mean())
        return total / b

    expected = (smoothed_ce(sims) + smoothed_ce(sims.t())) / 2
    assert abs(float(out.parts["itc"]) - float(expected)) < 1e-4
    assert torch.isclose(out.loss, out.parts["itc"] + out.parts["itm"] + out.parts["itg"])


def test_hard_negatives_never_pick_the_positive_and_follow_similarity():
    g = torch.Generator().manual_seed(0)
    sim = torch.zeros(4, 4)
    sim[0, 3] = 20.0  # image 0 resembles text 3 far more than any other text
    picks = [hard_negatives(sim, g) for _ in range(100)]
    image_for_text = torch.stack([p[0] for p in picks])  # [100, B]
    text_for_image = torch.stack([p[1] for p in picks])
    assert (image_for_text != torch.arange(4)).all() and (text_for_image != torch.arange(4)).all()
    assert (text_for_image[:, 0] == 3).all()  # the hardest negative text of image 0
    assert (image_for_text[:, 3] == 0).all()  # ... and the hardest negative image of text 3
    assert set(text_for_image[:, 1].tolist()) == {0, 2, 3}  # ties: every other sample occurs
    one = hard_negatives(torch.zeros(1, 1))
    assert one[0].tolist() == [0] and one[1].tolist() == [0]


def test_every_stage1_weight_gets_a_gradient():
    qf, heads = build(queries=4)
    qf.train()
    heads.train()
    torch.manual_seed(0)
    heads(qf, torch.randn(4, 7, 24), CAPTIONS).loss.backward()
    named = [*qf.named_parameters(), *(("stage1." + n, p) for n, p in heads.named_parameters())]
    missing = [n for n, p in named if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing  # DDP needs every trainable weight in the graph
    out = heads(qf, torch.randn(1, 7, 24), CAPTIONS[:1])  # a batch of one has no negative
    assert float(out.parts["itm"]) == 0.0 and torch.isfinite(out.loss)


@pytest.mark.slow
def test_stage1_losses_fall():
    qf, heads = build(queries=4)
    qf.train()
    heads.train()
    image = torch.randn(4, 7, 24)
    opt = torch.optim.AdamW([*qf.parameters(), *heads.parameters()], lr=5e-3)
    torch.manual_seed(0)
    seen = []
    for _ in range(15):
        out = heads(qf, image, CAPTIONS)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        seen.append({k: float(v) for k, v in out.parts.items()})
    assert seen[-1]["itc"] < seen[0]["itc"] and seen[-1]["itg"] < 0.7 * seen[0]["itg"], seen


def test_stage2_query_outputs_shapes_and_gradients():
    qf, _ = build(queries=6, freq=2)
    assert [layer.has_cross_attention for layer in qf.encoder.layer] == [True, False, True]
    qf.train()
    image = torch.randn(3, 9, 24, requires_grad=True)
    out, state = qf.forward_with_state(image)
    assert out.shape == (3, 6, 32) and state.mask is None
    out.pow(2).mean().backward()
    assert image.grad is not None and image.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in qf.parameters())


def test_text_tokenizer_ids():
    wp = train_wordpiece_tokenizer(CAPTIONS * 5, vocab_size=80)
    text = QFormerText(wp, max_len=5)
    assert (text.cls_id, text.sep_id, text.pad_id, text.dec_id, text.vocab_size) == (2, 3, 0, 80, 81)
    ids, valid = text(["a green star", "a"])
    assert ids[0].tolist() == [2, *wp("a green star", add_special_tokens=False)["input_ids"][:3], 3]
    assert ids[1].tolist()[:3] == [2, wp("a", add_special_tokens=False)["input_ids"][0], 3]
    assert valid.tolist() == [[True] * 5, [True] * 3 + [False] * 2] and ids[1, 3:].tolist() == [0, 0]
    byte = QFormerText(byte_tokenizer(), max_len=8)  # OPT conventions: </s> starts and ends, <pad> pads
    assert (byte.cls_id, byte.sep_id, byte.pad_id, byte.vocab_size) == (1, 1, 0, 260)


def test_bert_init_text_pass_equals_bert_and_copies_as_blip2():
    wp = train_wordpiece_tokenizer(CAPTIONS * 5, vocab_size=80)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=80, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64
    )
    mlm = BertForMaskedLM(cfg).eval()
    with torch.no_grad():
        mlm.bert.embeddings.token_type_embeddings.weight.zero_()  # the Q-Former has no token types
    torch.manual_seed(1)
    qf = QFormer.from_bert(mlm.bert, num_queries=4, encoder_width=24).eval()
    heads = QFormerStage1(qf, QFormerText(wp, 16), max_positions=64, embed_dim=8).eval()
    heads.load_bert(mlm.bert, mlm.cls)
    ids, valid = heads.text(CAPTIONS)
    with torch.no_grad():
        mine = heads.text_pass(qf, ids, valid)
        theirs = mlm.bert(input_ids=ids, attention_mask=valid.long()).last_hidden_state
    torch.testing.assert_close(mine[valid], theirs[valid], rtol=1e-5, atol=1e-5)
    layer, src = qf.encoder.layer[1], mlm.bert.encoder.layer[1]
    assert torch.equal(layer.intermediate_query.dense.weight, src.intermediate.dense.weight)
    assert torch.equal(layer.output_query.LayerNorm.weight, src.output.LayerNorm.weight)
    assert torch.equal(
        heads.cls.predictions.transform.dense.weight, mlm.cls.predictions.transform.dense.weight
    )
    # Fresh as in BLIP-2: cross-attention, queries and the appended [DEC] row.
    torch.manual_seed(1)
    fresh = QFormer(qf.shape, 4, 24)
    assert torch.equal(
        qf.encoder.layer[0].crossattention.self.key.weight,
        fresh.encoder.layer[0].crossattention.self.key.weight,
    )
    words = heads.embeddings.word_embeddings.weight
    assert torch.equal(words[:80], mlm.bert.embeddings.word_embeddings.weight) and words.shape[0] == 81
    with pytest.raises(ValueError, match="GELU"):
        mlm.bert.config.hidden_act = "relu"
        QFormer.from_bert(mlm.bert)


def test_paper_shape_macs_by_hand():
    bert_base = BertShape()  # 768 wide, 12 layers, FFN 3072
    stage2 = qformer_macs(32, 257, 1408, bert_base, cross_attention_freq=2)
    # Per layer on 32 queries: q/k/v/out 4*32*768^2 and the FFN 2*32*768*3072; six cross-attention
    # layers: q/out on the queries 2*32*768^2, k/v from 257 tokens of width 1408: 2*257*1408*768.
    by_hand = 12 * (4 * 32 * 768**2 + 2 * 32 * 768 * 3072) + 6 * (2 * 32 * 768**2 + 2 * 257 * 1408 * 768)
    assert stage2 == by_hand == 6_279_266_304  # DESIGN.md: 6.3 G
    parts = qformer_stage1_macs(32, 257, 1408, bert_base, 2, text_tokens=32, vocab_size=30523)
    text = 12 * 32 * (4 * 768**2 + 2 * 768 * 3072)  # one pass of 32 text tokens
    assert parts["itc_query_pass"] == stage2 and parts["itc_text_pass"] == parts["itg_text_pass"] == text
    assert parts["itm_joint_passes"] == 3 * (stage2 + text)
    assert parts["itg_head"] == 32 * (768 * 768 + 768 * 30523)
    assert parts["total"] == sum(v for k, v in parts.items() if k != "total")
    assert abs(parts["total"] - 39.49e9) < 0.01e9
