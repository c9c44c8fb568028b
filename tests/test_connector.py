"""TomeFormer against transformers' BertModel, an independent layer-by-layer reference, and the paper."""

import pytest
import torch
from transformers import BertConfig, BertModel

from evlgen.model.connector import BertShape, TomeFormer, check_state_dict, tomeformer_macs
from evlgen.model.merge import token_schedule
from test_merge import brute_force_merge


def tiny_bert(layers=3, hidden=32, heads=4, max_pos=64, seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=max_pos,
        vocab_size=50,
    )
    return BertModel(cfg, add_pooling_layer=False).eval()


def test_r0_equals_bert_inputs_embeds():
    bert = tiny_bert()
    tome = TomeFormer.from_bert(bert, r=0).eval()
    x = torch.randn(2, 17, 32)
    expected = bert(inputs_embeds=x).last_hidden_state
    torch.testing.assert_close(tome(x), expected, rtol=1e-5, atol=1e-5)


def test_merging_equals_layerwise_reference_built_from_bert_modules():
    # Reference: transformers' own BertLayer sub-blocks, with the brute-force merge between them.
    bert = tiny_bert(layers=3)
    rs = [4, 3, 2]
    tome = TomeFormer.from_bert(bert, r=rs).eval()
    x = torch.randn(2, 17, 32)
    with torch.no_grad():
        h = bert.embeddings(inputs_embeds=x)
        for layer, r in zip(bert.encoder.layer, rs, strict=True):
            attn = layer.attention(h)[0]
            b, n, d = h.shape
            keys = layer.attention.self.key(h).view(b, n, 4, d // 4).mean(2)
            attn, _ = brute_force_merge(keys, attn, r, protected=1)
            h = layer.output(layer.intermediate(attn), attn)
        got = tome(x)
    assert got.shape == (2, 17 - 9, 32)
    torch.testing.assert_close(got, h, rtol=1e-4, atol=1e-5)


def test_paper_schedule_and_shapes():
    tome = TomeFormer(
        BertShape(
            hidden_size=24,
            num_hidden_layers=12,
            num_attention_heads=2,
            intermediate_size=48,
            max_position_embeddings=512,
        ),
        r=19,
    ).eval()
    assert tome.token_schedule(257) == list(range(257, 28, -19))
    assert tome.token_schedule(257)[-1] == 29
    assert tome(torch.randn(1, 257, 24)).shape == (1, 29, 24)


@pytest.mark.parametrize("mode", ["mean", "weighted", "proportional"])
def test_padding_mask_is_carried_through_merges(mode):
    bert = tiny_bert(layers=2)
    tome = TomeFormer.from_bert(bert, r=[3, 2], merge_mode=mode).eval()
    x = torch.randn(2, 17, 32)
    mask = torch.ones(2, 17, dtype=torch.bool)
    # An all-real mask is the same as no mask.
    torch.testing.assert_close(tome(x, mask), tome(x))
    mask[1, 12:] = False
    out, state = tome.forward_with_state(x, mask)
    x2 = x.clone()
    x2[1, 12:] = 100.0  # padding content must not reach any real output
    out2, state2 = tome.forward_with_state(x2, mask)
    assert torch.equal(state.mask, state2.mask) and state.mask[0].all() and not state.mask[1].all()
    torch.testing.assert_close(out2[state.mask], out[state.mask])
    with pytest.raises(ValueError, match=r"samples \[1\] have no real visual tokens"):
        tome(x, torch.stack([mask[0], torch.zeros(17, dtype=torch.bool)]))
    # The unpadded sample is unaffected by its neighbour's padding.
    torch.testing.assert_close(out[0], tome(x[:1])[0], rtol=1e-5, atol=1e-5)


def test_proportional_attention_treats_a_merged_pair_like_two_copies():
    # Zero positions so two equal inputs stay equal; they are then the best match and get merged.
    bert = tiny_bert(layers=2)
    with torch.no_grad():
        bert.embeddings.position_embeddings.weight.zero_()
    x = torch.randn(1, 6, 32)
    x[:, 0] = x[:, 1]
    ref = TomeFormer.from_bert(bert, r=[0, 0], merge_mode="proportional", protected=0).eval()(x)
    order = [2, 4, 1, 3, 5]  # kept A tokens, then B (token 0 merged into token 1)
    prop = TomeFormer.from_bert(bert, r=[1, 0], merge_mode="proportional", protected=0).eval()(x)
    torch.testing.assert_close(prop[0], ref[0, order], rtol=1e-5, atol=1e-5)
    mean = TomeFormer.from_bert(bert, r=[1, 0], merge_mode="mean", protected=0).eval()(x)
    assert not torch.allclose(mean[0], ref[0, order], atol=1e-4)  # the plain mean lacks this property


def test_from_bert_extends_positions_and_keeps_first_layers():
    bert = tiny_bert(layers=3, max_pos=16)
    tome = TomeFormer.from_bert(bert, r=0, num_layers=2, max_positions=31)
    table, orig = tome.embeddings.position_embeddings.weight, bert.embeddings.position_embeddings.weight
    assert table.shape == (31, 32) and len(tome.encoder.layer) == 2
    torch.testing.assert_close(table[0], orig[0])
    torch.testing.assert_close(table[-1], orig[-1])
    torch.testing.assert_close(table[2], (orig[1]), rtol=1e-5, atol=1e-6)  # 31 -> 16: row 2 is row 1
    assert tome(torch.randn(1, 31, 32)).shape == (1, 31, 32)
    short = TomeFormer.from_bert(bert, r=0, max_positions=10)
    torch.testing.assert_close(short.embeddings.position_embeddings.weight, orig[:10])
    with pytest.raises(ValueError, match="position embeddings"):
        TomeFormer.from_bert(bert, r=0)(torch.randn(1, 17, 32))


def test_strict_loading_names_the_key():
    bert = tiny_bert(layers=2)
    tome = TomeFormer.from_bert(bert)
    state = dict(tome.state_dict())
    state.pop("encoder.layer.1.output.dense.bias")
    state["encoder.layer.0.attention.self.key.weight"] = torch.zeros(3, 3)
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyError) as err:
        check_state_dict(tome.state_dict(), state, "a checkpoint", "TomeFormer")
    msg = str(err.value)
    assert (
        "encoder.layer.1.output.dense.bias" in msg and "extra.weight" in msg and "key.weight: (3, 3)" in msg
    )


def test_rejects_non_bert_layouts():
    bert = tiny_bert()
    bert.config.hidden_act = "relu"
    with pytest.raises(ValueError, match="GELU"):
        TomeFormer.from_bert(bert)


def test_gradients_reach_inputs_and_every_parameter():
    tome = TomeFormer.from_bert(tiny_bert(layers=2), r=4).train()
    x = torch.randn(2, 17, 32, requires_grad=True)
    tome(x).pow(2).mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None for n, p in tome.named_parameters() if "token_type" not in n)


def test_paper_connector_macs():
    counts = token_schedule(257, [19] * 12, protected=1)
    macs = tomeformer_macs(counts, hidden=768, intermediate=3072)
    assert abs(macs - 11.88e9) / 11.88e9 < 0.01
    # Hand count of the first layer: q, k, v, out on 257 tokens, the FFN on 238.
    first = tomeformer_macs([257, 238], 768, 3072)
    assert first == 4 * 257 * 768 * 768 + 2 * 238 * 768 * 3072
