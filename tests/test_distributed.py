"""Two-process gloo training under torchrun: clean exits, ranks in sync, same losses as one process."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from evlgen.train import checkpoint as ckpt_io
from sample_data import caption_dataset
from test_train import losses

pytestmark = pytest.mark.slow

NO_DROPOUT = ["connector.arch.hidden_dropout_prob=0", "connector.arch.attention_probs_dropout_prob=0"]
COMMON = [
    "train.steps=8",
    "train.warmup_steps=2",
    "train.log_every=1",
    "train.val_every=4",
    "train.sample_every=4",
    "train.ckpt_every=4",
    *NO_DROPOUT,
]


def run(args, nproc, command="train"):
    """`evlgen COMMAND tiny ARGS` in one process, or under torchrun with `nproc` gloo processes."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [*(launcher if nproc > 1 else [sys.executable]), "-m", "evlgen", command, "tiny", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_torchrun_two_processes_repeatedly(tmp_path):
    data = caption_dataset(tmp_path / "data", 32)
    train_data = f"data.train=[{{path: {data}}}]"
    single = run([train_data, "train.batch_size=8", *COMMON, "--out", str(tmp_path / "single")], 1)
    assert single.returncode == 0, single.stderr[-3000:]
    reference = losses(tmp_path / "single")
    for attempt in range(10):
        out = tmp_path / f"ddp{attempt}"
        proc = run([train_data, "train.batch_size=4", "data.num_workers=1", *COMMON, "--out", str(out)], 2)
        assert proc.returncode == 0, f"attempt {attempt}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
        summary = json.loads((out / "summary.json").read_text())
        assert summary["completed"] and summary["world_size"] == 2
        digests = summary["rank_weight_digests"]
        assert len(digests) == 2 and digests[0] == digests[1]
        got = losses(out)
        assert got.keys() == reference.keys()
        # Same global batch and augmentation; only the loss averaging (per rank, then mean) differs.
        for step in got:
            assert abs(got[step] - reference[step]) < 0.02 * reference[step], (
                step,
                got[step],
                reference[step],
            )
    # Resuming a two-process run from its checkpoint also exits cleanly.
    proc = run(
        [train_data, "train.batch_size=4", *COMMON, "train.steps=10", "--out", str(out), "--resume", "auto"],
        2,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert max(losses(out)) == 10


def test_sigterm_to_torchrun_checkpoints_every_rank(tmp_path):
    data = caption_dataset(tmp_path / "data", 32)
    out = tmp_path / "run"
    args = [
        f"data.train=[{{path: {data}}}]",
        "train.batch_size=4",
        *COMMON,
        "train.steps=100000",
        "train.ckpt_every=100000",
        "train.val_every=0",
        "train.sample_every=0",
        "--out",
        str(out),
    ]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.Popen(
        [*launcher, "-m", "evlgen", "train", "tiny", *args],
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0  # torchrun reports the interrupted job as failed
    summary = json.loads((out / "summary.json").read_text())
    assert not summary["completed"], log[-3000:]
    ckpt = ckpt_io.find_checkpoint(out)
    assert ckpt is not None and ckpt_io.load_state(ckpt)["step"] == summary["steps"]
    assert sorted(p.name for p in ckpt.glob("rng-rank*.pt")) == ["rng-rank00000.pt", "rng-rank00001.pt"]
    done = run([*args[:-2], f"train.steps={summary['steps'] + 2}", "--out", str(out), "--resume", "auto"], 2)
    assert done.returncode == 0, done.stderr[-3000:]
