"""`evlgen convert lavis`: a LAVIS EVLGen checkpoint, built here with the reference code's exact key names
and shapes, converts strictly, and the converted model's visual prefix equals an independent reference
forward (transformers' own BertLayer sub-modules + the ToMe merge by hand, as in the reference code)."""

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertModel

import evlgen
from evlgen.cli import main
from evlgen.config import ConfigError, load_config
from evlgen.convert import ConversionError, convert_lavis, lavis_to_evlgen, read_lavis_checkpoint
from evlgen.model.build import build_vlm, meta_vlm, read_config
from test_merge import brute_force_merge


def lavis_state(bert_config, vision_width, llm_width, proj="opt_proj", seed=0):
    """The `model` entry a LAVIS liptome_opt / liptome_vicuna checkpoint holds (trainable parts only).

    The reference VLconnector is LAVIS's modeling_bert.BertModel: no word embeddings, no pooler, id
    buffers not persistent. Values are random (LayerNorm weights too) so every tensor matters.
    """
    g = torch.Generator().manual_seed(seed)
    bert = BertModel(bert_config, add_pooling_layer=False)
    state = {}
    for key, value in bert.state_dict().items():
        if key.startswith("embeddings.word_embeddings.") or key in ("embeddings.position_ids",):
            continue
        state["VLconnector." + key] = value
    hidden = bert_config.hidden_size
    state["VL_proj.weight"] = torch.empty(hidden, vision_width)
    state["VL_proj.bias"] = torch.empty(hidden)
    state["ln_vision.weight"] = torch.empty(vision_width)
    state["ln_vision.bias"] = torch.empty(vision_width)
    state[f"{proj}.weight"] = torch.empty(llm_width, hidden)
    state[f"{proj}.bias"] = torch.empty(llm_width)
    if bert_config.hidden_size > 100:  # paper shapes: the tests only need names and shapes
        return state
    for key, t in state.items():
        if "LayerNorm.weight" in key or key == "ln_vision.weight":
            state[key] = 1 + 0.3 * torch.randn(t.shape, generator=g)
        else:
            state[key] = 0.2 * torch.randn(t.shape, generator=g)
    return state


def tiny_bert_config():
    return BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        vocab_size=30522,
    )


def reference_prefix(lavis, feats, bert_config, rs, proj="opt_proj"):
    """The reference forward on tower features: ln_vision -> VL_proj -> VLconnector (merge after each
    layer's attention) -> opt_proj, with transformers' BertModel modules holding the LAVIS weights."""
    x = F.layer_norm(feats, feats.shape[-1:], lavis["ln_vision.weight"], lavis["ln_vision.bias"], eps=1e-5)
    x = F.linear(x, lavis["VL_proj.weight"], lavis["VL_proj.bias"])
    bert = BertModel(bert_config, add_pooling_layer=False).eval()
    connector = {k[len("VLconnector.") :]: v for k, v in lavis.items() if k.startswith("VLconnector.")}
    missing, unexpected = bert.load_state_dict(connector, strict=False)
    # The id buffers are not persistent in transformers' BertModel: its own defaults (0..N-1) apply.
    assert missing == ["embeddings.word_embeddings.weight"] and set(unexpected) <= {"embeddings.position_ids"}
    heads = bert_config.num_attention_heads
    with torch.no_grad():
        h = bert.embeddings(inputs_embeds=x)
        for layer, r in zip(bert.encoder.layer, rs, strict=True):
            attn = layer.attention(h)[0]
            b, n, d = h.shape
            keys = layer.attention.self.key(h).view(b, n, heads, d // heads).mean(2)  # key_layer.mean(1)
            attn, _ = brute_force_merge(keys, attn, r, protected=1)
            h = layer.output(layer.intermediate(attn), attn)
        return F.linear(h, lavis[f"{proj}.weight"], lavis[f"{proj}.bias"])


@pytest.fixture(scope="module")
def frozen_parts(tmp_path_factory):
    """The tiny preset's frozen tower and LM saved as local folders (standing in for hub ids)."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("frozen")
    vlm = build_vlm(load_config("tiny"), log_table=False)
    vlm.vision.model.save_pretrained(root / "vision")
    vlm.llm.model.save_pretrained(root / "llm")
    return root


def tiny_cfg(frozen_parts, *more):
    return load_config(
        "tiny",
        [f"vision.name_or_path={frozen_parts / 'vision'}", f"llm.name_or_path={frozen_parts / 'llm'}", *more],
    )


def save_pth(path, state, config=None, **extra):
    # What LAVIS' runner writes: model, optimizer, config (a plain dict), scaler, epoch.
    obj = {
        "model": state,
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
        "config": config or {"model": {"arch": "liptome_opt", "model_type": "pretrain_opt2.7b", "tome_r": 4}},
        "scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 10},
        "epoch": 3,
        **extra,
    }
    torch.save(obj, path)
    return path


def test_converted_model_matches_the_reference_forward(frozen_parts, tmp_path):
    bert_config = tiny_bert_config()
    lavis = lavis_state(bert_config, vision_width=32, llm_width=128)
    # Buffers LAVIS also saves (it drops only parameters without grad) are dropped on purpose.
    lavis["visual_encoder.blocks.0.attn.relative_position_index"] = torch.zeros(5, 5, dtype=torch.long)
    lavis["VLconnector.embeddings.position_ids"] = torch.arange(64)[None]
    ckpt = save_pth(tmp_path / "checkpoint_best.pth", lavis)

    cfg = tiny_cfg(frozen_parts)
    summary = convert_lavis(ckpt, cfg, tmp_path / "converted")
    assert summary["dropped"] == [
        "VLconnector.embeddings.position_ids",
        "visual_encoder.blocks.0.attn.relative_position_index",
    ]
    card = (tmp_path / "converted" / "README.md").read_text()
    assert "checkpoint_best.pth" in card and summary["sha256"] in card

    vlm = evlgen.load(tmp_path / "converted")
    assert vlm.connector.rs == [4, 4]
    torch.manual_seed(1)
    pixels = torch.randn(3, 1, 3, 32, 32)  # [B, T, C, H, W]
    with torch.no_grad():
        feats = vlm.tower_features(pixels)  # [B, 17, 32]; the frozen tower is the same on both sides
        prefix, mask = vlm.encode(pixels)
        expected = reference_prefix(lavis, feats, bert_config, [4, 4])
    assert mask is None and prefix.shape == (3, 17 - 8, 128)
    torch.testing.assert_close(prefix, expected, rtol=1e-5, atol=1e-5)
    assert len(vlm.generate(pixels, ["", "", ""], num_beams=1, max_new_tokens=3)) == 3

    # Round trip: the converted model saves and reloads to the same weights and outputs.
    vlm.save_pretrained(tmp_path / "again")
    again = evlgen.load(tmp_path / "again")
    for key, value in vlm.trainable_state_dict().items():
        assert torch.equal(again.trainable_state_dict()[key], value), key
    with torch.no_grad():
        torch.testing.assert_close(again.encode(pixels)[0], prefix, rtol=0, atol=0)


def test_converter_refuses_checkpoints_that_do_not_fit(frozen_parts, tmp_path):
    cfg = tiny_cfg(frozen_parts)
    expected = meta_vlm(cfg).trainable_state_dict()
    good = lavis_state(tiny_bert_config(), vision_width=32, llm_width=128)
    state, dropped = lavis_to_evlgen(good, expected)
    assert set(state) == set(expected) and not dropped

    wrong = dict(good, **{"VL_proj.weight": torch.zeros(32, 24)})
    with pytest.raises(
        ConversionError, match=r"VL_proj\.weight: expected shape \(32, 32\) .*found \(32, 24\)"
    ):
        lavis_to_evlgen(wrong, expected)
    missing = {k: v for k, v in good.items() if k != "VLconnector.encoder.layer.1.output.dense.bias"}
    with pytest.raises(
        ConversionError, match=r"missing keys: \['VLconnector\.encoder\.layer\.1\.output\.dense\.bias'\]"
    ):
        lavis_to_evlgen(missing, expected)
    with pytest.raises(ConversionError, match=r"unexpected keys: \['Qformer\.bert\.x'\]"):
        lavis_to_evlgen(dict(good, **{"Qformer.bert.x": torch.zeros(1)}), expected)
    # A third connector layer is not silently dropped (from_bert's trimming is for BERT init only).
    deeper = lavis_state(BertConfig(**{**tiny_bert_config().to_dict(), "num_hidden_layers": 3}), 32, 128)
    with pytest.raises(ConversionError, match=r"VLconnector\.encoder\.layer\.2\."):
        lavis_to_evlgen(deeper, expected)
    video = dict(good, **{"visual_encoder.blocks.0.temporal_merge.alpha": torch.zeros(())})
    with pytest.raises(ConversionError, match="video checkpoint"):
        lavis_to_evlgen(video, expected)
    shifted = dict(good, **{"VLconnector.embeddings.position_ids": torch.arange(1, 65)[None]})
    with pytest.raises(ConversionError, match="position_ids holds non-default ids"):
        lavis_to_evlgen(shifted, expected)
    vicuna = {k.replace("opt_proj.", "llm_proj."): v for k, v in good.items()}
    with pytest.raises(ConversionError, match="LM projection is llm_proj"):
        lavis_to_evlgen(vicuna, expected, "opt_proj.")
    # The optional contrastive head (beta > 0) is a training loss only.
    itc = dict(good, temp=torch.tensor(0.07), **{"vision_proj.weight": torch.zeros(8, 32)})
    assert lavis_to_evlgen(itc, expected)[1] == ["temp", "vision_proj.weight"]

    # The reference run's own config must agree with the preset's merge schedule.
    ckpt = save_pth(tmp_path / "r.pth", good, {"model": {"arch": "liptome_opt", "tome_r": 19}})
    with pytest.raises(ConversionError, match="tome_r=19 .* connector.r=4"):
        convert_lavis(ckpt, cfg, tmp_path / "out")
    video_ckpt = save_pth(tmp_path / "v.pth", good, {"model": {"arch": "liptome_video_opt"}})
    with pytest.raises(ConversionError, match="video model"):
        convert_lavis(video_ckpt, cfg, tmp_path / "out")
    with pytest.raises(ConfigError, match="random frozen parts"):
        convert_lavis(ckpt, load_config("tiny"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


class Payload:
    def __reduce__(self):
        return (print, ("this would have run",))


def test_reader_never_unpickles_objects(tmp_path, capsys):
    torch.save({"model": {}, "x": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ConversionError, match="refusing to load it .*print was not an allowed global"):
        read_lavis_checkpoint(tmp_path / "evil.pth")
    assert "this would have run" not in capsys.readouterr().out
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ConversionError, match="refusing to load it"):
        read_lavis_checkpoint(tmp_path / "junk.pth")
    torch.save({"weights": {"a": torch.zeros(1)}}, tmp_path / "plain.pth")
    with pytest.raises(ConversionError, match="no 'model' state dict"):
        read_lavis_checkpoint(tmp_path / "plain.pth")
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        read_lavis_checkpoint(tmp_path / "absent.pth")


@pytest.mark.parametrize(
    ("preset", "vision_width", "llm_width", "proj"),
    [
        ("paper-opt2.7b", 1408, 2560, "opt_proj"),
        ("paper-vicuna7b", 1024, 4096, "llm_proj"),
    ],
)
def test_paper_presets_take_the_reference_shapes(preset, vision_width, llm_width, proj):
    # bert-base-uncased's shapes (BertConfig's defaults), on the meta device: names and shapes only.
    cfg = load_config(preset)
    with torch.device("meta"):
        lavis = lavis_state(BertConfig(), vision_width, llm_width, proj)
    expected = meta_vlm(cfg).trainable_state_dict()
    state, _ = lavis_to_evlgen(lavis, expected, "opt_proj." if proj == "opt_proj" else "llm_proj.")
    assert set(state) == set(expected)
    assert state["connector.embeddings.position_embeddings.weight"].shape == (512, 768)
    assert state["llm_proj.weight"].shape == (llm_width, 768)
    # The other paper tower does not fit: the error names the key and both shapes.
    with torch.device("meta"):
        other = lavis_state(BertConfig(), 1024 if vision_width == 1408 else 1408, llm_width, proj)
    with pytest.raises(ConversionError, match=r"ln_vision\.weight: expected shape \((1408|1024),\)"):
        lavis_to_evlgen(other, expected, proj + ".")


def test_cli_converts_and_reports_errors(frozen_parts, tmp_path, capsys):
    lavis = lavis_state(tiny_bert_config(), vision_width=32, llm_width=128)
    ckpt = save_pth(tmp_path / "c.pth", lavis)
    sources = [f"vision.name_or_path={frozen_parts / 'vision'}", f"llm.name_or_path={frozen_parts / 'llm'}"]
    args = ["convert", "lavis", str(ckpt), *sources, "--preset", "tiny"]
    assert main([*args, "--out", str(tmp_path / "m")]) == 0
    assert f"converted {len(lavis)} tensors" in capsys.readouterr().out
    saved = read_config(tmp_path / "m")
    assert saved.vision.name_or_path == str(frozen_parts / "vision")  # referenced, not copied
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "README.md",
        "config.yaml",
        "model.safetensors",
    ]

    bad = save_pth(tmp_path / "bad.pth", dict(lavis, **{"VL_proj.weight": torch.zeros(32, 24)}))
    assert (
        main(["convert", "lavis", str(bad), *sources, "--preset", "tiny", "--out", str(tmp_path / "b")]) == 2
    )
    assert "VL_proj.weight: expected shape (32, 32)" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
