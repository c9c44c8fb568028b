"""`evlgen eval` on a tiny saved model: rank sharding, official files, scoring, reference-free splits."""

import json

import pytest
import torch

from evlgen.cli import main
from evlgen.config import ConfigError, load_config
from evlgen.eval.captions import caption_scores
from evlgen.eval.run import eval_config, gather, predict, run_eval
from evlgen.eval.vqa import vqa_scores
from evlgen.model.build import build_vlm
from sample_data import caption_dataset, make_image


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    vlm = build_vlm(load_config("tiny"), log_table=False)
    return vlm.save_pretrained(tmp_path_factory.mktemp("ckpt") / "model")


@pytest.fixture(scope="module")
def captions(tmp_path_factory):
    path = caption_dataset(tmp_path_factory.mktemp("captions"), 10)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for i, r in enumerate(rows):
        r["id"] = str(1000 + i)
        r["captions"] = [r.pop("caption"), f"picture number {i}"]
    rows.append(dict(rows[3]))  # the same image listed twice: predicted and scored once
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def eval_cfg(data, *extra):
    return load_config(
        "tiny",
        [
            f"eval.data={{path: {data}}}",
            "eval.batch_size=3",
            "eval.metrics=[bleu, rouge_l, cider]",
            "caption.num_beams=2",
            "caption.max_new_tokens=5",
            "caption.min_new_tokens=1",
            *extra,
        ],
    )


class FakeDist:
    """Ranks simulated in one process: all_gather_str records what this rank sends and returns
    `blobs` (every rank's message, in rank order) or, when none are given, just its own."""

    enabled = True

    def __init__(self, blobs=None):
        self.blobs, self.sent = blobs, None

    def all_gather_str(self, value):
        self.sent = value
        return self.blobs if self.blobs is not None else [value]


def test_two_ranks_gathered_equal_one_rank_and_keys_are_unique(checkpoint, captions):
    from evlgen.model.vlm import VLM

    vlm = VLM.from_pretrained(checkpoint).eval()
    run_cfg = eval_config(vlm.config, eval_cfg(captions))
    single = predict(vlm, run_cfg)
    assert sorted(single.texts) == [str(1000 + i) for i in range(10)]  # the duplicate row counted once
    parts = [predict(vlm, run_cfg, rank=r, world=2) for r in (0, 1)]
    assert not set(parts[0].texts) & set(parts[1].texts) - {"1003"}  # disjoint apart from the duplicate
    blobs = []
    for p in parts:  # what each rank sends
        rank = FakeDist()
        gather(p, rank)
        blobs.append(rank.sent)
    merged = gather(parts[0], FakeDist(blobs))
    assert merged.texts == {k: single.texts[k] for k in merged.texts}
    assert sorted(merged.texts) == sorted(single.texts)
    assert merged.records["1004"].captions == single.records["1004"].captions


def test_caption_eval_writes_coco_results_and_scores_like_pycocoevalcap(checkpoint, captions, tmp_path):
    metrics = run_eval(eval_cfg(captions), checkpoint, tmp_path)
    results = json.loads((tmp_path / "captions_results.json").read_text())
    assert sorted(r["image_id"] for r in results) == list(range(1000, 1010))  # integer ids, COCO format
    preds = {str(r["image_id"]): r["caption"] for r in results}
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    refs = {r["key"]: r["references"] for r in rows}
    direct = caption_scores(preds, refs, metrics=("bleu", "rouge_l", "cider"))
    assert metrics["scores"] == pytest.approx(direct.scores)
    assert metrics["samples"] == 10 and metrics["bad_samples"] == 0
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["scores"] == metrics["scores"] and saved["generation"]["num_beams"] == 2


def test_vqa_eval_official_format_and_accuracy(checkpoint, tmp_path):
    root = tmp_path / "vqa"
    root.mkdir()
    make_image("red", "left").save(root / "a.png")
    answers = ["yes"] * 3 + ["no"] * 7
    rows = [
        {"image": "a.png", "question": "is it red?", "answers": answers, "question_id": 7, "id": "q7"},
        {"image": "a.png", "question": "what colour?", "answers": ["red"] * 10, "question_id": 8, "id": "q8"},
        {"image": "missing.png", "question": "gone?", "answers": ["no"] * 10, "question_id": 9, "id": "q9"},
    ]
    data = root / "vqa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config("tiny", [f"eval.data={{path: {data}}}", "eval.task=vqa", "vqa.num_beams=1"])
    metrics = run_eval(cfg, checkpoint, tmp_path / "out")
    results = json.loads((tmp_path / "out" / "vqa_results.json").read_text())
    assert sorted(r["question_id"] for r in results) == [7, 8]  # EvalAI wants the integer question ids
    preds = {f"q{r['question_id']}": r["answer"] for r in results}
    expected = vqa_scores(preds, {"q7": answers, "q8": ["red"] * 10})["accuracy"]
    assert metrics["scores"]["accuracy"] == pytest.approx(expected)
    assert metrics["rule"].startswith("vqav2")
    assert metrics["bad_samples"] == 1
    where, why = metrics["bad_examples"][0]
    assert where.endswith("vqa.jsonl:3") and "missing.png" in why


def test_split_without_references_is_predicted_not_scored(checkpoint, tmp_path):
    root = tmp_path / "test"
    root.mkdir()
    make_image("blue", "right").save(root / "b.png")
    data = root / "test.jsonl"
    data.write_text(json.dumps({"image": "b.png", "id": "42"}) + "\n")
    metrics = run_eval(eval_cfg(data), checkpoint, tmp_path / "out")
    assert metrics["scores"] == {} and "not scored" in metrics["notes"][0]
    assert json.loads((tmp_path / "out" / "captions_results.json").read_text())[0]["image_id"] == 42


def test_task_mismatch_and_missing_data_are_config_errors(checkpoint, captions, tmp_path):
    with pytest.raises(ConfigError, match="eval.data is not set"):
        run_eval(load_config("tiny"), checkpoint, tmp_path)
    with pytest.raises(ConfigError, match="eval.task is vqa but .* has no question"):
        run_eval(eval_cfg(captions, "eval.task=vqa"), checkpoint, tmp_path)


def test_cli_eval_prints_a_table(checkpoint, captions, tmp_path, capsys):
    code = main(
        [
            "eval",
            "tiny",
            f"eval.data={{path: {captions}}}",
            "eval.metrics=[cider]",
            "eval.max_samples=4",
            "caption.num_beams=1",
            "caption.max_new_tokens=4",
            "--checkpoint",
            str(checkpoint),
            "--out",
            str(tmp_path / "cli"),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "cider" in out and "4 samples" in out
    assert json.loads((tmp_path / "cli" / "metrics.json").read_text())["samples"] == 4
