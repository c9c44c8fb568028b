"""The training loop on the tiny preset: bad data, non-finite guard, resume (incl. SIGKILL), checkpoints."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from evlgen.config import ConfigError, load_config
from evlgen.model.vlm import VLM
from evlgen.train import checkpoint as ckpt_io
from evlgen.train.loop import TrainingError, train
from sample_data import caption_dataset

# Small and fast: 12 steps of 8 samples on the tiny random model.
BASE = [
    "train.steps=12",
    "train.batch_size=8",
    "train.warmup_steps=3",
    "train.log_every=1",
    "train.val_every=6",
    "train.sample_every=6",
    "train.ckpt_every=6",
    "train.keep_last=5",
    "data.val_samples=8",
]


def cfg_for(data: Path, *extra: str):
    return load_config("tiny", [f"data.train=[{{path: {data}}}]", *BASE, *extra])


def losses(run: Path, kind: str = "train") -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == kind}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return caption_dataset(tmp_path_factory.mktemp("data"), 32)


def test_train_completes_learns_and_saves(tmp_path, data):
    summary = train(cfg_for(data, "train.steps=30", "train.ckpt_every=10", "train.keep_last=2"), tmp_path)
    assert summary["completed"] and summary["steps"] == 30
    assert summary["bad_samples"] == 0 and summary["samples"] == 30 * 8
    seen = losses(tmp_path)
    assert sorted(seen) == list(range(1, 31))
    assert seen[30] < 0.8 * seen[1]  # the connector learns through the frozen LM
    assert [p.name for p in ckpt_io.list_checkpoints(tmp_path)] == ["step-00000020", "step-00000030"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-00000030"
    model = VLM.from_pretrained(tmp_path / "model")
    final = load_file(tmp_path / "checkpoints" / "step-00000030" / "model" / "model.safetensors")
    for k, v in model.trainable_state_dict().items():
        assert torch.equal(v, final[k])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "images_per_s"} <= set(rows[0])
    assert any(r["kind"] == "samples" and len(r["lines"]) == 8 for r in rows)
    assert len(losses(tmp_path, "val")) == 5
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_bad_images_are_skipped_and_counted(tmp_path):
    data = caption_dataset(tmp_path / "data", 32, corrupt=1, truncated=1, missing=1, empty=1)
    cfg = cfg_for(data, "train.steps=8", "data.max_bad_fraction=0.2")
    summary = train(cfg, tmp_path / "run")
    # 8 steps x 8 = two epochs of 32 rows, each with the 4 bad rows.
    assert summary["completed"] and summary["samples"] == 64 and summary["bad_samples"] == 8
    reasons = dict(summary["bad_examples"])
    assert set(reasons) == {f"{data}:{i}" for i in (1, 2, 3, 4)}
    assert "empty caption" in reasons[f"{data}:4"]
    assert "No such file" in reasons[f"{data}:3"]
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["bad_samples"] == 8


def test_too_many_bad_samples_stop_with_examples(tmp_path):
    data = caption_dataset(tmp_path / "data", 32, corrupt=8)
    cfg = cfg_for(data, "data.max_bad_fraction=0.1", "data.bad_grace=16")
    with pytest.raises(TrainingError, match=r"samples were bad .*train.jsonl:\d+: UnidentifiedImageError"):
        train(cfg, tmp_path / "run")


def test_nonfinite_losses_are_skipped_then_abort(tmp_path, data, monkeypatch):
    real = VLM.forward
    calls = {"n": 0}

    def sometimes_nan(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] in (3, 4):
            out = dataclasses.replace(out, loss=out.loss * float("nan"))
        return out

    monkeypatch.setattr(VLM, "forward", sometimes_nan)
    summary = train(cfg_for(data, "train.val_every=0", "train.sample_every=0"), tmp_path / "a")
    assert summary["nonfinite_steps"] == 2 and summary["completed"]
    weights = load_file(tmp_path / "a" / "model" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())

    def always_nan(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        return dataclasses.replace(out, loss=out.loss * float("nan"))

    monkeypatch.setattr(VLM, "forward", always_nan)
    with pytest.raises(TrainingError, match="3 non-finite steps in a row at step 3"):
        train(cfg_for(data, "train.max_nonfinite=3", "train.val_every=0"), tmp_path / "b")


def test_resume_in_process_matches_uninterrupted(tmp_path, data):
    full = cfg_for(data, "train.grad_accum=2")
    train(full, tmp_path / "full")
    train(cfg_for(data, "train.grad_accum=2"), tmp_path / "part")
    # Drop the last checkpoint, as if the run had died after step 6.
    ckpts = ckpt_io.list_checkpoints(tmp_path / "part")
    for c in ckpts[1:]:
        import shutil

        shutil.rmtree(c)
    (tmp_path / "part" / "checkpoints" / "latest").unlink()
    summary = train(full, tmp_path / "part", resume="auto")
    assert summary["completed"]
    assert losses(tmp_path / "part") == losses(tmp_path / "full")
    a = load_file(tmp_path / "full" / "model" / "model.safetensors")
    b = load_file(tmp_path / "part" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fresh_run_refuses_a_directory_with_checkpoints(tmp_path, data):
    train(cfg_for(data, "train.steps=6"), tmp_path)
    with pytest.raises(ConfigError, match="--resume auto"):
        train(cfg_for(data, "train.steps=6"), tmp_path)


def test_resume_with_a_different_model_names_the_key(tmp_path, data):
    train(cfg_for(data, "train.steps=6"), tmp_path)
    with pytest.raises(ConfigError, match=r"connector.r: 4 -> 2"):
        train(cfg_for(data, "train.steps=12", "connector.r=2"), tmp_path, resume="auto")
    # Changing only the length of the run is allowed.
    assert train(cfg_for(data, "train.steps=8"), tmp_path, resume="auto")["steps"] == 8


def test_resume_a_run_saved_before_a_config_key_existed(tmp_path, data):
    train(cfg_for(data, "train.steps=6"), tmp_path)
    saved = tmp_path / "config.yaml"
    old = yaml.safe_load(saved.read_text())
    for ds in old["data"]["train"]:
        del ds["annotations"]  # a key added later, at its default
    saved.write_text(yaml.safe_dump(old))
    assert train(cfg_for(data, "train.steps=8"), tmp_path, resume="auto")["steps"] == 8


def test_sigterm_checkpoints_and_stops(tmp_path, data, monkeypatch):
    from evlgen.train import logger as logger_mod

    real = logger_mod.RunLogger.log

    def log_then_signal(self, step, metrics, *, kind="train"):
        real(self, step, metrics, kind=kind)
        if step == 4 and kind == "train":
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(logger_mod.RunLogger, "log", log_then_signal)
    summary = train(cfg_for(data), tmp_path)
    # The flag is agreed by all ranks in the next step's reduction, so the run stops after step 5.
    assert summary["steps"] == 5 and not summary["completed"]
    assert ckpt_io.find_checkpoint(tmp_path).name == "step-00000005"
    assert train(cfg_for(data), tmp_path, resume="auto")["completed"]


# -------------------------------------------------------------------------------------------------
# Real process kills (subprocesses): the guarantees that matter when a node dies.

KILL_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from evlgen.config import load_config
from evlgen.train import checkpoint, logger
from evlgen.train.loop import train

mode, at = sys.argv[1], int(sys.argv[2])
if mode == "after-log":
    real = logger.RunLogger.log
    def log(self, step, metrics, *, kind="train"):
        real(self, step, metrics, kind=kind)
        if step == at and kind == "train":
            os.kill(os.getpid(), signal.SIGKILL)
    logger.RunLogger.log = log
else:  # kill halfway through writing the train state of checkpoint `at`
    real = checkpoint._save_file
    def save(obj, path):
        if path.name == checkpoint.STATE and "step-%08d" % at in str(path):
            with open(path, "wb") as f:
                f.write(b"half a checkpoint")
                f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        real(obj, path)
    checkpoint._save_file = save
cfg = load_config("tiny", sys.argv[4:])
train(cfg, sys.argv[3])
"""


def run_killed(tmp_path, mode, at, run, overrides):
    script = tmp_path / "kill.py"
    script.write_text(textwrap.dedent(KILL_SCRIPT.format(tests=str(Path(__file__).parent))))
    env = dict(os.environ, PYTHONHASHSEED="0")
    proc = subprocess.run(
        [sys.executable, str(script), mode, str(at), str(run), *overrides],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]


def test_sigkill_then_resume_is_exact(tmp_path, data):
    overrides = [f"data.train=[{{path: {data}}}]", *BASE, "data.num_workers=2"]
    cfg = load_config("tiny", overrides)
    train(cfg, tmp_path / "full")
    # Killed two steps after checkpoint 6: metrics for steps 7-8 exist and must be replaced.
    run_killed(tmp_path, "after-log", 8, tmp_path / "killed", overrides)
    assert max(losses(tmp_path / "killed")) == 8
    summary = train(cfg, tmp_path / "killed", resume="auto")
    assert summary["completed"]
    assert losses(tmp_path / "killed") == losses(tmp_path / "full")
    a = load_file(tmp_path / "full" / "model" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, data):
    overrides = [f"data.train=[{{path: {data}}}]", *BASE]
    run_killed(tmp_path, "in-save", 12, tmp_path / "run", overrides)
    found = ckpt_io.find_checkpoint(tmp_path / "run")
    assert found.name == "step-00000006"
    assert ckpt_io.load_state(found)["step"] == 6
    VLM.from_pretrained(found / "model")  # loads strictly
    assert list((tmp_path / "run" / "checkpoints").glob(".step-00000012.tmp"))
    summary = train(load_config("tiny", overrides), tmp_path / "run", resume="auto")
    assert summary["completed"] and summary["steps"] == 12
    assert not list((tmp_path / "run" / "checkpoints").glob(".*.tmp"))


def test_init_from_starts_the_run_at_a_saved_model(tmp_path, data):
    first = train(cfg_for(data), tmp_path / "a")
    frozen_lr = ["train.lr=0", "train.min_lr=0", "train.warmup_start_lr=0", "train.weight_decay=0"]
    fresh = train(cfg_for(data, "train.steps=2", "seed=1", *frozen_lr), tmp_path / "fresh")
    started = train(
        cfg_for(data, "train.steps=2", "seed=1", *frozen_lr, f"train.init_from={first['model']}"),
        tmp_path / "b",
    )
    saved = load_file(str(Path(first["model"]) / "model.safetensors"))
    after = load_file(str(Path(started["model"]) / "model.safetensors"))
    untouched = load_file(str(Path(fresh["model"]) / "model.safetensors"))
    assert saved.keys() == after.keys()
    assert all(torch.equal(saved[k], after[k]) for k in saved)  # LR 0: the run holds what it loaded
    assert not all(torch.equal(saved[k], untouched[k]) for k in saved)  # ... which is not a fresh init
    with pytest.raises(ConfigError, match="not a saved evlgen model"):
        train(cfg_for(data, f"train.init_from={tmp_path / 'nowhere'}"), tmp_path / "c")
    assert not (tmp_path / "c").exists()
