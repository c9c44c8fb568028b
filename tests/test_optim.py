"""Optimizer groups, the learning-rate schedule, precision choice and the CLI around the trainer."""

import json
import math

import pytest
import torch

from evlgen.cli import main
from evlgen.config import ConfigError, TrainConfig, load_config
from evlgen.model.build import build_vlm
from evlgen.train.optim import build_optimizer, lr_at, param_groups
from evlgen.train.precision import resolve_precision
from sample_data import caption_dataset


def test_schedule_hand_values():
    cfg = TrainConfig(steps=110, lr=1e-4, warmup_steps=10, warmup_start_lr=1e-6, min_lr=1e-5)
    assert lr_at(0, cfg) == pytest.approx(1e-6)
    assert lr_at(5, cfg) == pytest.approx(1e-6 + 0.5 * (1e-4 - 1e-6))
    assert lr_at(10, cfg) == pytest.approx(1e-4)  # peak right after warm-up
    assert lr_at(60, cfg) == pytest.approx(1e-5 + 0.5 * 9e-5)  # half way down the cosine
    assert lr_at(110, cfg) == pytest.approx(1e-5)
    assert lr_at(500, cfg) == pytest.approx(1e-5)  # past the end: stays at the floor
    no_warmup = TrainConfig(steps=4, lr=2.0, warmup_steps=0, min_lr=0.0)
    assert [lr_at(s, no_warmup) for s in range(4)] == pytest.approx(
        [1 + math.cos(math.pi * s / 4) for s in range(4)]
    )


def test_no_decay_on_biases_norms_and_vectors():
    vlm = build_vlm(load_config("tiny"), log_table=False)
    decay, no_decay = param_groups(vlm.trainable_named_parameters(), 0.05)
    names = {id(p): n for n, p in vlm.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert "vl_proj.weight" in decayed and "connector.embeddings.position_embeddings.weight" in decayed
    assert {"vl_proj.bias", "ln_vision.weight", "ln_vision.bias"} <= skipped
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    frozen = {n for n, p in vlm.named_parameters() if not p.requires_grad}
    assert not (decayed | skipped) & frozen and len(decayed | skipped) == sum(
        1 for _, p in vlm.named_parameters() if p.requires_grad
    )
    opt = build_optimizer(vlm.trainable_named_parameters(), TrainConfig(betas=(0.8, 0.9)))
    assert opt.param_groups[0]["betas"] == (0.8, 0.9)


def test_precision_on_cpu():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu).autocast is None
    assert resolve_precision("bf16", cpu).autocast is torch.bfloat16
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        resolve_precision("fp16", cpu)


def test_cli_data_check_train_and_cache(tmp_path, capsys):
    data = caption_dataset(tmp_path / "data", 16, missing=1)
    assert main(["data", "check", str(data)]) == 1
    assert "missing" in capsys.readouterr().out.lower()
    out = tmp_path / "run"
    overrides = [f"data.train=[{{path: {data}}}]", "train.steps=4", "data.max_bad_fraction=0.5"]
    assert main(["train", "tiny", *overrides, "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["bad_samples"] > 0
    assert main(["train", "tiny", *overrides, "--out", str(out)]) == 2  # refuses to overwrite
    assert main(["train", "tiny", *overrides, "train.steps=6", "--out", str(out), "--resume", "auto"]) == 0
    strict = [
        f"data.train=[{{path: {data}}}]",
        "train.steps=40",
        "data.bad_grace=8",
        "data.max_bad_fraction=0.01",
    ]
    assert main(["train", "tiny", *strict, "--out", str(tmp_path / "strict")]) == 3
    assert main(["cache-features", "tiny", "--data", str(data), "--out", str(tmp_path / "feats")]) == 0
    assert (
        main(
            [
                "train",
                "tiny",
                "train.steps=3",
                f"data.train=[{{path: {tmp_path / 'feats'}}}]",
                "--out",
                str(tmp_path / "cached"),
            ]
        )
        == 0
    )
