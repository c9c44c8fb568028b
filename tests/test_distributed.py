"""Two-process gloo training under torchrun: clean exits, ranks in sync, same losses as one process."""

import json
import os
import subprocess
import sys

import pytest

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


def run(args, nproc):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [*(launcher if nproc > 1 else [sys.executable]), "-m", "evlgen", "train", "tiny", *args]
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
