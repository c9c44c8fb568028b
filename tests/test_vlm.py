"""The composed model on the tiny preset: what trains, what stays frozen, save/load, and `info`."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from evlgen.cli import main
from evlgen.config import load_config
from evlgen.model.build import build_vlm, describe
from evlgen.model.vlm import VLM
from evlgen.smoke import fit, fixed_batch

TRAINABLE_PARTS = {"ln_vision", "vl_proj", "connector", "llm_proj"}


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return build_vlm(load_config("tiny"))


def test_shapes_and_trainable_parts(tiny):
    pixels, prompts, targets = fixed_batch(tiny)
    prefix, mask = tiny.encode(pixels)
    assert prefix.shape == (4, 9, 128) and mask is None  # 17 -> 13 -> 9 tokens
    parts = {n.split(".")[0] for n, _ in tiny.trainable_named_parameters()}
    assert parts == TRAINABLE_PARTS
    table = tiny.freeze()
    assert "vision" in table and "total" in table


def test_thirty_steps_halve_the_loss_and_only_trainable_parts_change(tiny):
    frozen = {k: v.clone() for k, v in tiny.state_dict().items() if k.split(".")[0] in ("vision", "llm")}
    before = {k: v.clone() for k, v in tiny.trainable_state_dict().items()}
    pixels, prompts, targets = fixed_batch(tiny)

    tiny.train()
    tiny.zero_grad()
    tiny(pixels, prompts, targets).loss.backward()
    got_grad = {
        n.split(".")[0] for n, p in tiny.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0
    }
    assert got_grad <= TRAINABLE_PARTS and {"ln_vision", "vl_proj", "llm_proj", "connector"} <= got_grad
    assert not tiny.vision.training and not tiny.llm.training and tiny.connector.training

    losses = fit(tiny, pixels, prompts, targets, steps=30, lr=1e-2)
    assert losses[-1] <= 0.5 * losses[0], losses
    for k, v in tiny.state_dict().items():
        if k in frozen:
            assert torch.equal(v, frozen[k]), f"frozen tensor {k} changed"
    assert any(not torch.equal(before[k], v) for k, v in tiny.trainable_state_dict().items())


def test_save_load_round_trip_identical(tiny, tmp_path):
    pixels, prompts, targets = fixed_batch(tiny)
    fit(tiny, pixels, prompts, targets, steps=5, lr=3e-3)
    tiny.eval()
    loss = tiny(pixels, prompts, targets).loss
    gen = tiny.generate(pixels, prompts, num_beams=2, max_new_tokens=8)
    path = tiny.save_pretrained(tmp_path / "ckpt")

    saved = load_file(str(path / "model.safetensors"))
    assert {k.split(".")[0] for k in saved} == TRAINABLE_PARTS  # only trainable weights in the main file
    assert (path / "config.yaml").is_file() and (path / "vision").is_dir() and (path / "llm").is_dir()

    again = VLM.from_pretrained(path).eval()
    assert torch.equal(again(pixels, prompts, targets).loss, loss)
    assert again.generate(pixels, prompts, num_beams=2, max_new_tokens=8) == gen
    # Re-saving a loaded checkpoint elsewhere stays self-contained.
    again.save_pretrained(tmp_path / "copy")
    third = VLM.from_pretrained(tmp_path / "copy").eval()
    assert torch.equal(third(pixels, prompts, targets).loss, loss)
    # Overwriting an existing checkpoint replaces it whole.
    tiny.save_pretrained(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "copy"]


def test_strict_load_errors_name_the_key(tiny, tmp_path):
    path = tiny.save_pretrained(tmp_path / "ckpt")
    weights = load_file(str(path / "model.safetensors"))
    weights.pop("llm_proj.bias")
    weights["connector.extra"] = torch.zeros(1)
    save_file(weights, str(path / "model.safetensors"))
    with pytest.raises(KeyError) as err:
        VLM.from_pretrained(path)
    assert "llm_proj.bias" in str(err.value) and "connector.extra" in str(err.value)
    weights = load_file(str(path / "model.safetensors"))
    weights.pop("connector.extra")
    weights["llm_proj.bias"] = torch.zeros(128)
    weights["vl_proj.weight"] = torch.zeros(5, 5)
    save_file(weights, str(path / "model.safetensors"))
    with pytest.raises(KeyError, match=r"vl_proj.weight: \(5, 5\) != \(32, 32\)"):
        VLM.from_pretrained(path)
    with pytest.raises(FileNotFoundError, match="config.yaml is missing"):
        VLM.from_pretrained(tmp_path)


def test_video_frames_are_averaged_after_the_tower(tiny):
    pixels, _, _ = fixed_batch(tiny)
    video = pixels.repeat(1, 3, 1, 1, 1)  # [B, 3, C, H, W], three identical frames
    torch.testing.assert_close(tiny.encode(video)[0], tiny.encode(pixels)[0], rtol=1e-5, atol=1e-6)


def bert_base_connector_params(layers=12, d=768, ffn=3072, positions=512):
    per_layer = 4 * (d * d + d) + 2 * d + (d * ffn + ffn) + (ffn * d + d) + 2 * d
    return positions * d + 2 * d + 2 * d + layers * per_layer


def test_info_paper_preset_offline():
    info = describe(load_config("paper-opt2.7b"))
    assert info["token_schedule"][0] == 257 and info["token_schedule"][-1] == 29
    assert info["token_schedule"] == [257 - 19 * i for i in range(13)]
    assert abs(info["connector_macs"] - 11.88e9) / 11.88e9 < 0.01
    glue = 2 * 1408 + (1408 * 768 + 768) + (768 * 2560 + 2560)
    assert info["trainable_params"] == bert_base_connector_params() + glue
    # EVA ViT-g (39 blocks) is about 0.99B parameters and OPT-2.7B about 2.65B.
    assert 0.95e9 < info["parts"]["vision"]["frozen"] < 1.02e9
    assert 2.6e9 < info["parts"]["llm"]["frozen"] < 2.7e9
    assert info["frozen_params"] == info["parts"]["vision"]["frozen"] + info["parts"]["llm"]["frozen"]


def test_cli_info_json(capsys):
    assert main(["info", "paper-opt2.7b", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info) >= {"token_schedule", "connector_macs", "trainable_params", "frozen_params"}
    assert main(["info", "tiny", "connector.r=9"]) == 2  # impossible schedule: a config error, exit 2
    assert "connector.r" in capsys.readouterr().err


def test_smoke_run_writes_resolved_config_and_passes(tmp_path):
    from evlgen.smoke import run_smoke

    assert run_smoke(tmp_path / "run", steps=30) == 0
    assert load_config(str(tmp_path / "run" / "config.yaml")) == load_config("tiny")
    assert json.loads((tmp_path / "run" / "smoke.json").read_text())["reload_identical"] is True
