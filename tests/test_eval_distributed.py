"""`evlgen eval` under torchrun (two gloo processes): the same predictions and scores as one process."""

import json

import pytest
import torch

from evlgen.config import load_config
from evlgen.model.build import build_vlm
from sample_data import caption_dataset
from test_distributed import run

pytestmark = pytest.mark.slow


def test_two_ranks_give_the_single_process_results(tmp_path):
    torch.manual_seed(0)
    model = build_vlm(load_config("tiny"), log_table=False).save_pretrained(tmp_path / "model")
    data = caption_dataset(tmp_path / "data", 11)  # odd: the ranks get 6 and 5 samples
    args = [
        f"eval.data={{path: {data}}}",
        "eval.metrics=[bleu, cider]",
        "eval.batch_size=4",
        "caption.num_beams=2",
        "caption.max_new_tokens=5",
        "caption.min_new_tokens=1",
        "--checkpoint",
        str(model),
    ]
    outputs = {}
    for nproc in (1, 2):
        proc = run([*args, "--out", str(tmp_path / f"n{nproc}")], nproc, command="eval")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count("samples (0 bad)") == 1  # only rank 0 reports
        rows = (tmp_path / f"n{nproc}" / "predictions.jsonl").read_text().splitlines()
        outputs[nproc] = (
            {r["key"]: r["prediction"] for r in map(json.loads, rows)},
            json.loads((tmp_path / f"n{nproc}" / "metrics.json").read_text()),
        )
    (one, m1), (two, m2) = outputs[1], outputs[2]
    assert len(one) == 11 and two == one
    assert m2["world_size"] == 2 and m2["scores"] == m1["scores"]
