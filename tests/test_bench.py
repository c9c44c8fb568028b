"""Benchmarks on the tiny preset: stage timings add up, the staged forward is the real loss, FLOPs by hand."""

import math

import pytest
import torch

from evlgen.bench import (
    STAGES,
    bench_data,
    bench_throughput,
    bench_train,
    format_report,
    peak_flops,
    run,
    staged_forward,
    synthetic_batch,
    train_flops_per_image,
)
from evlgen.config import load_config
from evlgen.model.build import build_vlm
from sample_data import caption_dataset

NO_DROPOUT = ["connector.arch.hidden_dropout_prob=0", "connector.arch.attention_probs_dropout_prob=0"]


def test_bench_train_stages_and_throughput_are_consistent():
    cfg = load_config("tiny")
    r = bench_train(cfg, random_weights=True, batch_size=4, steps=2, warmup=1, device="cpu")
    assert tuple(r["stages_ms"]) == STAGES
    assert all(v > 0 for v in r["stages_ms"].values()), r["stages_ms"]
    assert math.isclose(sum(r["stages_pct"].values()), 100.0)
    # Same work, only the synchronisation differs (none on CPU): the two totals agree within noise.
    assert r["step_ms"] / 5 < r["staged_ms"] < 5 * r["step_ms"]
    assert math.isclose(r["images_per_s"], 4 / (r["step_ms"] / 1e3), rel_tol=1e-9)
    assert r["precision"] == "fp32" and r["device"].startswith("cpu") and r["batch_size"] == 4
    assert r["trainable_params"] > 0 and r["frozen_params"] > 0 and math.isfinite(r["loss"])
    assert r["flops_per_image"] == train_flops_per_image(**r["flop_counts"]) > 0
    # Captions fill max_text_len: prefix 9 + BOS 1 + 32 target tokens (end included).
    assert r["flop_counts"]["head_tokens"] == 32 and r["flop_counts"]["llm_tokens"] == 9 + 1 + 32
    assert "mfu" not in r and "peak_memory_gib" not in r
    text = format_report(r)
    assert "llm_forward" in text and "images/s" in text


def test_bench_throughput_runs_each_variant_on_the_same_preset():
    cfg = load_config("tiny")
    r = bench_throughput(
        cfg,
        variants=["tomeformer", "tomeformer-r0"],
        rounds=2,
        random_weights=True,
        batch_size=2,
        steps=1,
        warmup=0,
        device="cpu",
    )
    tome, r0 = r["variants"]["tomeformer"], r["variants"]["tomeformer-r0"]
    assert r["reference"] == "tomeformer" and tome["step_ratio"] == 1.0
    assert r0["step_ratio"] == r0["step_ms"] / tome["step_ms"]
    # tiny: 17 tokens merged 4 per layer over 2 layers -> 9 given to the LLM; r=0 passes all 17.
    assert (tome["llm_visual_tokens"], r0["llm_visual_tokens"]) == (9, 17)
    assert r0["connector_macs"] > tome["connector_macs"] > 0
    assert len(tome["round_step_ms"]) == 2 and tome["step_ms"] in tome["round_step_ms"]
    # Everything but the connector is the same model.
    assert tome["frozen_params"] == r0["frozen_params"] and tome["batch_size"] == r0["batch_size"] == 2
    assert "tomeformer-r0" in format_report(r)
    with pytest.raises(ValueError, match="unknown connector variants"):
        bench_throughput(cfg, variants=["perceiver"])


def test_bench_train_on_features_skips_the_tower_and_caps_the_cpu_batch():
    cfg = load_config("tiny", ["train.batch_size=16"])
    r = run(
        "train", cfg, random_weights=True, batch_size=None, steps=1, warmup=0, device="cpu", features=True
    )
    assert "vision" not in r["stages_ms"] and tuple(r["stages_ms"]) == STAGES[1:]
    assert r["batch_size"] == 8 and any("capped" in n for n in r["notes"])
    assert r["flop_counts"]["vision_params"] == 0
    assert "cached features" in format_report(r)


def test_staged_forward_reproduces_the_training_loss():
    torch.manual_seed(0)
    cfg = load_config("tiny", NO_DROPOUT)
    vlm = build_vlm(cfg, log_table=False).train()
    pixels, prompts, targets = synthetic_batch(vlm, cfg, 3, torch.device("cpu"))
    assert pixels.shape == (3, 1, 3, 32, 32)
    expected = vlm(pixels, prompts, targets).loss
    assert torch.equal(staged_forward(vlm, pixels, prompts, targets).loss, expected)
    # The tower's frame-mean output fed as cached features gives the same loss without the tower.
    feats = vlm.vision(pixels)[:, 0]  # [B, N, D]
    assert torch.equal(staged_forward(vlm, feats, prompts, targets, features=True).loss, expected)


def test_train_flops_by_hand():
    # vision 2*10*5 = 100; connector 6*7 = 42; llm (2+2)*3*4 = 48; head (2+2)*2*3 = 24
    flops = train_flops_per_image(
        vision_params=10,
        visual_tokens=5,
        connector_macs=7,
        llm_params=3,
        llm_tokens=4,
        head_params=2,
        head_tokens=3,
    )
    assert flops == 214.0
    # The paper preset's order of magnitude: EVA ViT-g (~1.0e9 params, 257 tokens) + OPT-2.7B on 62 tokens.
    paper = train_flops_per_image(
        vision_params=985_000_000,
        visual_tokens=257,
        connector_macs=12_000_000_000,
        llm_params=2_520_000_000,
        llm_tokens=62,
    )
    assert paper == 2 * 985e6 * 257 + 6 * 12e9 + 4 * 2.52e9 * 62
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("Tesla T4") is None


def test_bench_data_reports_each_worker_count(tmp_path):
    path = caption_dataset(tmp_path / "data", 16)
    cfg = load_config("tiny", [f"data.train=[{{path: {path}}}]"])
    r = bench_data(cfg, workers=[0, 1], batches=3, warmup=1, batch_size=4)
    assert r["kind"] == "data" and r["batch_size"] == 4 and r["cpu_count"] >= 1
    assert [x["workers"] for x in r["runs"]] == [0, 1]
    for x in r["runs"]:
        assert set(x) == {
            "workers",
            "startup_s",
            "images",
            "bad_samples",
            "seconds",
            "images_per_s",
            "images_per_s_per_worker",
        }
        assert x["images"] == 12 and x["bad_samples"] == 0
        assert x["images_per_s"] > 0 and x["startup_s"] > 0
        assert x["images_per_s_per_worker"] == x["images_per_s"] / max(x["workers"], 1)
    assert "per worker" in format_report(r)


def test_run_rejects_an_unknown_benchmark():
    with pytest.raises(ValueError, match="unknown benchmark"):
        run("gpu", load_config("tiny"))
