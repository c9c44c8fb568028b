"""The connector baselines wired into the whole system on tiny models: Q-Former (one- and two-stage),
MLP projector, TomeFormer r=0. Build, keys, save/load, the stage-1 -> stage-2 hand-over, the training
loop, `info`, smoke and bench."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertForMaskedLM

from evlgen.bench import bench_train
from evlgen.cli import main
from evlgen.config import ConfigError, load_config
from evlgen.model.build import WEIGHTS_FILE, build_vlm, describe
from evlgen.model.qformer_stage1 import STAGE1_ONLY, STAGE2_ONLY
from evlgen.model.tokenizer import train_wordpiece_tokenizer
from evlgen.model.vlm import VLM
from evlgen.smoke import fixed_batch, run_smoke
from evlgen.train.loop import train
from sample_data import caption_dataset

KINDS = {
    "tiny": {"ln_vision", "vl_proj", "connector", "llm_proj"},
    "tiny-qformer": {"ln_vision", "connector", "llm_proj"},
    "tiny-mlp": {"ln_vision", "connector"},
    "tiny-qformer-stage1": {"ln_vision", "connector", "stage1"},
}


def build(preset, *overrides, seed=0):
    torch.manual_seed(seed)
    return build_vlm(load_config(preset, list(overrides)), log_table=False)


@pytest.mark.parametrize("preset", sorted(KINDS))
def test_trainable_parts_shapes_and_costs(preset):
    vlm = build(preset)
    assert {k.split(".")[0] for k in vlm.trainable_state_dict()} == KINDS[preset]
    info = describe(vlm.config)
    assert info["trainable_params"] == sum(p.numel() for _, p in vlm.trainable_named_parameters())
    if preset == "tiny-qformer-stage1":
        assert vlm.llm is None and info["connector_macs"] == info["qformer_macs"]["stage1"]["total"]
        with pytest.raises(ValueError, match="no LM to generate"):
            vlm.generate(*fixed_batch(vlm)[:2])
        return
    prefix, mask = vlm.encode(fixed_batch(vlm)[0])
    assert prefix.shape == (4, info["llm_visual_tokens"], 128) and mask is None
    assert info["llm_visual_tokens"] == {"tiny": 9, "tiny-qformer": 8, "tiny-mlp": 17}[preset]


def test_mlp_is_llava_mlp2x_gelu_over_every_token():
    vlm = build("tiny-mlp")
    state = vlm.trainable_state_dict()
    assert state["connector.0.weight"].shape == (128, 32) and state["connector.2.weight"].shape == (128, 128)
    x = torch.randn(2, 17, 32)
    c = vlm.connector
    expected = torch.nn.functional.gelu(x @ c[0].weight.T + c[0].bias) @ c[2].weight.T + c[2].bias
    torch.testing.assert_close(c(x), expected)
    assert describe(vlm.config)["connector_macs"] == 17 * (32 * 128 + 128 * 128)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["connector.kind=mlp", "connector.r=0", "connector.init=bert-base-uncased"], "names a BERT"),
        (["connector.kind=qformer"], "connector.r merges tokens in the TomeFormer only"),
        (["train.objective=qformer-stage1"], "trains a Q-Former; connector.kind is tomeformer"),
        (["connector.init_from=x"], "connector.init_from hands a Q-Former"),
    ],
)
def test_settings_of_another_kind_fail_by_name(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build("tiny", *overrides)


@pytest.mark.parametrize("preset", sorted(KINDS))
def test_save_load_identical(preset, tmp_path):
    vlm = build(preset)
    pixels, prompts, targets = fixed_batch(vlm)
    with torch.no_grad():
        torch.manual_seed(3)  # stage 1 draws its ITM negatives
        loss = vlm(pixels, prompts, targets).loss
    again = VLM.from_pretrained(vlm.save_pretrained(tmp_path / "m"))
    with torch.no_grad():
        torch.manual_seed(3)
        assert torch.equal(again(pixels, prompts, targets).loss, loss)
    for k, v in vlm.trainable_state_dict().items():
        assert torch.equal(again.trainable_state_dict()[k], v)
    if vlm.llm is not None:
        gen = {"num_beams": 2, "max_new_tokens": 6}
        assert again.generate(pixels, prompts, **gen) == vlm.generate(pixels, prompts, **gen)


# -------------------------------------------------------------------------------------------------
# Stage 1 -> stage 2


@pytest.fixture
def stage1_dir(tmp_path):
    vlm = build("tiny-qformer-stage1", seed=1)
    return vlm, vlm.save_pretrained(tmp_path / "stage1-run" / "model")


def test_every_key_is_handed_over_or_listed():
    s1, s2 = build("tiny-qformer-stage1").trainable_state_dict(), build("tiny-qformer").trainable_state_dict()
    left = {k for k in s1 if not k.startswith(STAGE1_ONLY)}
    fresh = {k for k in s2 if k.startswith(STAGE2_ONLY)}
    assert left == set(s2) - fresh and fresh == {"llm_proj.weight", "llm_proj.bias"}
    assert {k.split(".")[1] for k in s1 if k.startswith("stage1.")} == {
        "embeddings", "encoder", "cls", "vision_proj", "text_proj", "itm_head", "temp",
    }  # fmt: skip


def test_stage2_starts_from_stage1(stage1_dir):
    s1, directory = stage1_dir
    s2 = build("tiny-qformer", f"connector.init_from={directory.parent}", seed=2)  # the run dir's model/
    for k, v in s2.trainable_state_dict().items():
        if not k.startswith(STAGE2_ONLY):
            assert torch.equal(v, s1.trainable_state_dict()[k]), k
    fresh = build("tiny-qformer", seed=2)
    assert torch.equal(s2.llm_proj.weight, fresh.llm_proj.weight)  # fresh, from the same seed
    # A stage-2 checkpoint of that run reloads from its own weights, without the stage-1 model.
    vlm_dir = s2.save_pretrained(directory.parent.parent / "stage2")
    (directory / WEIGHTS_FILE).unlink()
    again = VLM.from_pretrained(vlm_dir)
    assert torch.equal(again.connector.query_tokens, s1.connector.query_tokens)


@pytest.mark.parametrize("damage", ["missing", "unexpected", "shape", "stage1_unknown"])
def test_handover_names_every_bad_key(stage1_dir, damage):
    _, directory = stage1_dir
    state = load_file(directory / WEIGHTS_FILE)
    key = {
        "missing": "connector.encoder.layer.1.output_query.dense.bias",
        "unexpected": "connector.extra.weight",
        "shape": "connector.query_tokens",
        "stage1_unknown": "stage1.new_head.weight",
    }[damage]
    if damage == "missing":
        del state[key]
    elif damage == "shape":
        state[key] = torch.zeros(1, 3, 32)
    else:
        state[key] = torch.zeros(2)
    save_file(state, directory / WEIGHTS_FILE)
    with pytest.raises(KeyError, match=key.replace(".", r"\.")):
        build("tiny-qformer", f"connector.init_from={directory}")


def test_handover_refuses_other_objectives_and_towers(stage1_dir, tmp_path):
    _, directory = stage1_dir
    with pytest.raises(ConfigError, match="trained on another tower: vision.arch"):
        build("tiny-qformer", f"connector.init_from={directory}", "vision.arch.num_hidden_layers=1")
    one_stage = build("tiny-qformer").save_pretrained(tmp_path / "one")
    with pytest.raises(ConfigError, match="not a Q-Former stage-1 model"):
        build("tiny-qformer", f"connector.init_from={one_stage}")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        build("tiny-qformer", f"connector.init_from={tmp_path / 'nowhere'}")


# -------------------------------------------------------------------------------------------------
# Through the training loop, smoke and bench

LOOP = [
    "train.batch_size=8",
    "train.warmup_steps=2",
    "train.log_every=1",
    "train.val_every=4",
    "train.sample_every=4",
    "train.ckpt_every=4",
    "train.keep_last=5",
    "data.val_samples=8",
]


def rows(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_stage_training_through_the_loop(tmp_path):
    data = caption_dataset(tmp_path / "data", 32)
    common = [f"data.train=[{{path: {data}}}]", *LOOP]
    s1 = train(
        load_config("tiny-qformer-stage1", [*common, "train.steps=16", "train.lr=3e-3"]), tmp_path / "s1"
    )
    assert s1["completed"] and s1["val_loss"] is not None
    logged = rows(tmp_path / "s1")
    train_rows = [r for r in logged if r["kind"] == "train"]
    assert {"loss_itc", "loss_itm", "loss_itg"} <= set(train_rows[0])
    assert train_rows[-1]["loss_itg"] < train_rows[0]["loss_itg"]
    assert not any(r["kind"] == "samples" for r in logged)  # no LM to caption with
    # Stage 1 resumes exactly (ITM draws its negatives from the restored RNG): kill it after step 8.
    shutil.copytree(tmp_path / "s1", tmp_path / "s1b")
    for name in ("step-00000012", "step-00000016", "latest"):
        path = tmp_path / "s1b" / "checkpoints" / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    train(
        load_config("tiny-qformer-stage1", [*common, "train.steps=16", "train.lr=3e-3"]),
        tmp_path / "s1b",
        resume="auto",
    )
    first = {r["step"]: r["loss"] for r in train_rows}
    assert {r["step"]: r["loss"] for r in rows(tmp_path / "s1b") if r["kind"] == "train"} == first
    a, b = (load_file(tmp_path / d / "model" / WEIGHTS_FILE) for d in ("s1", "s1b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    s2 = train(
        load_config("tiny-qformer", [*common, "train.steps=12", f"connector.init_from={tmp_path / 's1'}"]),
        tmp_path / "s2",
    )
    assert s2["completed"]
    losses = [r["loss"] for r in rows(tmp_path / "s2") if r["kind"] == "train"]
    assert losses[-1] < losses[0]
    model = VLM.from_pretrained(tmp_path / "s2" / "model")
    assert len(model.generate(fixed_batch(model)[0], [""] * 4, num_beams=2, max_new_tokens=4)) == 4


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny-qformer", "tiny-mlp"])
def test_one_stage_training_through_the_loop(tmp_path, preset):
    data = caption_dataset(tmp_path / "data", 32)
    summary = train(
        load_config(preset, [f"data.train=[{{path: {data}}}]", *LOOP, "train.steps=12"]), tmp_path / "run"
    )
    losses = [r["loss"] for r in rows(tmp_path / "run") if r["kind"] == "train"]
    assert summary["completed"] and losses[-1] < 0.9 * losses[0]
    assert any(r["kind"] == "samples" for r in rows(tmp_path / "run"))


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny-qformer", "tiny-mlp"])
def test_smoke_every_kind(tmp_path, preset):
    assert run_smoke(tmp_path, steps=30, preset=preset) == 0


@pytest.mark.parametrize("preset", ["tiny-qformer", "tiny-mlp", "tiny-qformer-stage1"])
def test_bench_train_every_kind(preset):
    result = bench_train(
        load_config(preset), random_weights=True, batch_size=2, steps=1, warmup=0, device="cpu"
    )
    assert set(result["stages_ms"]) == {"vision", "connector", "llm_forward", "backward", "optimizer"}
    assert result["flop_counts"]["connector_macs"] == sum(
        describe(load_config(preset))[k] for k in ("connector_macs", "projection_macs")
    )
    assert (result["flop_counts"]["llm_params"] == 0) == (preset == "tiny-qformer-stage1")


@pytest.mark.slow
def test_stage1_under_torchrun_two_processes(tmp_path):
    # DDP needs every trainable weight in each step's graph (ITC, ITM and ITG together use them all).
    data = caption_dataset(tmp_path / "data", 32)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    args = [
        f"data.train=[{{path: {data}}}]",
        *LOOP,
        "train.batch_size=4",
        "train.steps=4",
        "data.num_workers=0",
    ]
    cmd = [*launcher, "-m", "evlgen", "train", "tiny-qformer-stage1", *args, "--out", str(tmp_path / "run")]
    proc = subprocess.run(
        cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["completed"] and summary["world_size"] == 2
    assert len(set(summary["rank_weight_digests"])) == 1


def test_info_prints_both_qformer_stages(capsys):
    assert main(["info", "tiny-qformer"]) == 0
    out = capsys.readouterr().out
    info = describe(load_config("tiny-qformer"))
    stage1 = info["qformer_macs"]["stage1"]["total"]
    assert f"stage 2 {info['connector_macs'] / 1e9:.2f} G; stage 1 {stage1 / 1e9:.2f} G" in out
    assert "connector         qformer, objective lm" in out


def test_qformer_from_a_local_bert_and_wordpiece_tokenizer(tmp_path):
    # bert-base-uncased cannot be downloaded here: a tiny BERT (with its MLM head) and a WordPiece
    # tokenizer trained on the spot stand in, through the same factory path as the paper preset.
    wordpiece = train_wordpiece_tokenizer(["a red square", "two blue circles on the left"] * 5, 60)
    wordpiece.save_pretrained(tmp_path / "wp")
    torch.manual_seed(0)
    bert_cfg = BertConfig(
        vocab_size=len(wordpiece),
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    mlm = BertForMaskedLM(bert_cfg)
    mlm.save_pretrained(tmp_path / "bert")
    init = [f"connector.init={tmp_path / 'bert'}", f"connector.text_tokenizer={tmp_path / 'wp'}"]
    s1 = build("tiny-qformer-stage1", *init)
    layer = s1.connector.encoder.layer[1]
    assert torch.equal(
        layer.attention.self.query.weight, mlm.bert.encoder.layer[1].attention.self.query.weight
    )
    assert torch.equal(
        layer.intermediate_query.dense.weight, mlm.bert.encoder.layer[1].intermediate.dense.weight
    )
    words = s1.stage1.embeddings.word_embeddings.weight
    assert words.shape[0] == len(wordpiece) + 1 and torch.equal(
        words[:-1], mlm.bert.embeddings.word_embeddings.weight
    )
    assert s1.stage1.text.cls_id == wordpiece.cls_token_id
    head = s1.stage1.cls.predictions.transform.dense.weight
    assert torch.equal(head, mlm.cls.predictions.transform.dense.weight)
    one_stage = build("tiny-qformer", init[0])  # stage 2 / one-stage: the layers only
    assert torch.equal(one_stage.connector.embeddings.LayerNorm.weight, mlm.bert.embeddings.LayerNorm.weight)
