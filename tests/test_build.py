"""Factories on the pretrained path: local directories stand in for hub ids (nothing downloads)."""

import pytest
import torch
from transformers import BertConfig, BertModel, OPTConfig, OPTForCausalLM

import evlgen
from evlgen.config import ConfigError, load_config
from evlgen.model.build import build_connector, build_llm, build_vlm, plan
from evlgen.model.connector import TomeFormer
from evlgen.model.tokenizer import byte_tokenizer


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    torch.manual_seed(0)
    bert = BertModel(
        BertConfig(
            hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, vocab_size=40
        ),
        add_pooling_layer=False,
    )
    path = tmp_path_factory.mktemp("bert")
    bert.save_pretrained(path)
    return path, bert.eval()


@pytest.fixture(scope="module")
def opt_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = OPTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        ffn_dim=64,
        num_attention_heads=2,
        vocab_size=259,
        max_position_embeddings=128,
        word_embed_proj_dim=32,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
    )
    path = tmp_path_factory.mktemp("opt")
    OPTForCausalLM(cfg).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def test_connector_from_local_bert_keeps_first_layers(bert_dir):
    path, bert = bert_dir
    cfg = load_config(
        "tiny", [f"connector.init={path}", "connector.arch.num_hidden_layers=2", "connector.r=0"]
    )
    tome = build_connector(cfg.connector, plan(cfg), random_weights=False).eval()
    assert isinstance(tome, TomeFormer) and len(tome.encoder.layer) == 2
    torch.testing.assert_close(
        tome.encoder.layer[1].output.dense.weight, bert.encoder.layer[1].output.dense.weight
    )
    table = tome.embeddings.position_embeddings.weight
    assert table.shape == (64, 32)  # the size the config states (tiny: 64), not BERT's 512
    torch.testing.assert_close(table, bert.embeddings.position_embeddings.weight[:64])


def test_connector_arch_mismatch_names_the_field(bert_dir):
    path, _ = bert_dir
    cfg = load_config("tiny", [f"connector.init={path}", "connector.arch.intermediate_size=128"])
    with pytest.raises(
        ConfigError, match="connector.arch disagrees .*intermediate_size: preset 128 vs checkpoint 64"
    ):
        build_connector(cfg.connector, plan(cfg))


def preset_with_local_llm(tmp_path, opt_dir, arch):
    # A child preset replaces the parent's `arch` whole (a CLI override would merge into it).
    path = tmp_path / "local.yaml"
    path.write_text(f"base: tiny\nllm: {{name_or_path: '{opt_dir}', tokenizer: null, arch: {arch}}}\n")
    return str(path)


def test_llm_from_local_dir_and_arch_check(opt_dir, tmp_path):
    llm = build_llm(load_config(preset_with_local_llm(tmp_path, opt_dir, "{model_type: opt}")).llm)
    assert llm.end_token_id == 13 and llm.hidden_size == 32
    bad = load_config("tiny", [f"llm.name_or_path={opt_dir}", "llm.tokenizer=null"])  # preset says 128 wide
    with pytest.raises(ConfigError, match="llm.arch disagrees .*hidden_size: preset 128 vs checkpoint 32"):
        build_llm(bad.llm)


def test_whole_model_from_local_parts_saves_references_not_copies(opt_dir, bert_dir, tmp_path):
    bert_path, _ = bert_dir
    preset = preset_with_local_llm(tmp_path, opt_dir, "{model_type: opt, hidden_size: 32}")
    cfg = load_config(preset, [f"connector.init={bert_path}", "connector.arch.num_hidden_layers=2"])
    vlm = build_vlm(cfg)
    assert not any(p.requires_grad for p in vlm.llm.parameters())
    out = vlm.save_pretrained(tmp_path / "ckpt")
    assert not (out / "llm").exists() and (out / "vision").is_dir()  # only the sourceless tower is copied
    again = evlgen.load(str(out))
    pixels = torch.randn(2, 1, 3, 32, 32)
    assert torch.equal(again(pixels, ["", ""], ["a b", "c"]).loss, vlm(pixels, ["", ""], ["a b", "c"]).loss)


def test_plan_rejects_sequences_longer_than_the_lm_positions():
    with pytest.raises(ConfigError, match=r"llm.arch.max_position_embeddings=100 is shorter than .* 106"):
        plan(load_config("tiny", ["llm.arch.max_position_embeddings=100"]))
    plan(load_config("tiny", ["llm.arch.max_position_embeddings=106"]))
