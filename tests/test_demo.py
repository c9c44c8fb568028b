"""A fast, miniature `evlgen demo`: every stage runs, every output is written, results are deterministic."""

import json
from collections import Counter

import pytest
from PIL import Image

from evlgen.config import load_config
from evlgen.eval.run import run_eval
from evlgen.synth.backbones import Recipe
from evlgen.synth.demo import CANONICAL_SHARE, run_demo, weight_first_caption

TINY = Recipe(clip_steps=3, clip_batch=8, lm_steps=3, lm_batch=8, corpus_scenes=30)
SIZES = {"train": 48, "val": 8, "test": 12, "comp": 8}
FAST = [
    "train.steps=3",
    "train.batch_size=8",
    "train.warmup_steps=1",
    "train.val_every=0",
    "train.sample_every=0",
    "data.num_workers=0",
    "caption.num_beams=1",
    "caption.max_new_tokens=6",
    "vqa.num_beams=1",
]


def test_demo_smoke_writes_everything_and_is_deterministic(tmp_path):
    cache = tmp_path / "cache"
    first = run_demo(tmp_path / "a", sizes=SIZES, recipe=TINY, cache_dir=cache, overrides=FAST)
    out = tmp_path / "a"
    for name in ("report.md", "metrics.json", "loss.png", "samples.png"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    for split in ("test", "comp"):
        for key in ("cider", "bleu4", "attribute_accuracy", "vqa_accuracy", "blind_cider"):
            assert isinstance(saved[split][key], float), (split, key)
            assert saved[split][key] >= 0.0
    assert saved["train_seconds"] > 0 and saved["train_steps"] == 3
    assert saved["test"]["images"] == 12 and saved["comp"]["images"] == 8
    Image.open(out / "loss.png").verify()
    Image.open(out / "samples.png").verify()
    assert "| CIDEr |" in (out / "report.md").read_text()
    # Training read the caption-weighted rows (19 canonical draws in 20), not the world's own file.
    assert saved["canonical_share"] == 0.95
    assert "canonical caption in 95% of samples" in (out / "report.md").read_text()
    trained = [json.loads(line) for line in (out / "train-captions.jsonl").read_text().splitlines()]
    world_rows = [json.loads(line) for line in (out / "world" / "train.jsonl").read_text().splitlines()]
    assert [r["id"] for r in trained] == [r["id"] for r in world_rows]
    assert all(set(t["captions"]) == set(w["captions"]) for t, w in zip(trained, world_rows, strict=True))
    features = (out / "features" / "train").rglob("meta-*.jsonl")
    cached = [json.loads(line) for f in features for line in f.read_text().splitlines()]
    assert cached and all(len(r["captions"]) == 20 * (len(set(r["captions"])) - 1) for r in cached)

    # `evlgen eval eval-demo` on the saved model reproduces the demo's own test scores.
    decoding = [o for o in FAST if o.startswith(("caption.", "vqa."))]
    cfg = load_config("eval-demo", [f"eval.data.path={out / 'world' / 'test.jsonl'}", *decoding])
    again = run_eval(cfg, out / "run" / "model", tmp_path / "eval", cache_dir=str(cache))
    assert again["scores"]["cider"] == saved["test"]["cider"]
    assert again["scores"]["bleu4"] == saved["test"]["bleu4"]
    assert "meteor" in again["ran"]  # the eval config adds METEOR, which the demo skips for time

    backbones = next((cache / "synth-backbones").iterdir())
    stamp = (backbones / "recipe.json").stat().st_mtime_ns
    second = run_demo(tmp_path / "b", sizes=SIZES, recipe=TINY, cache_dir=cache, overrides=FAST)
    assert (backbones / "recipe.json").stat().st_mtime_ns == stamp  # backbones came from the cache
    for split in ("test", "comp"):
        for key, value in first[split].items():
            if key != "caption_scores":
                assert second[split][key] == value, (split, key)


def test_demo_and_convergence_name_a_bad_backbones_change_before_any_work(tmp_path, capsys):
    from evlgen.cli import main

    assert main(["demo", "--out", str(tmp_path / "d"), "--backbones", "lm_stepz=5"]) == 2
    assert "lm_stepz" in capsys.readouterr().err
    assert main(["bench", "convergence", "--out", str(tmp_path / "c"), "--backbones", "lm_steps=many"]) == 2
    assert "lm_steps: 'many' is not a valid int" in capsys.readouterr().err
    assert main(["demo", "--video", "paper", "--backbones", "lm_steps=5"]) == 2
    assert "video demo has its own recipe" in capsys.readouterr().err
    assert not (tmp_path / "d").exists() and not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    ("share", "first", "each_other"),
    [(0.75, 3 * 4, 1), (0.5, 4, 1), (0.2, 4, 4), (1.0, 4, 0), (0.0, 0, 1)],
)
def test_weight_first_caption_gives_the_first_caption_its_share_of_uniform_draws(share, first, each_other):
    row = {"id": "a", "captions": ["c0", "c1", "c2", "c3", "c4"], "scene": {}}
    [out] = weight_first_caption([row], share)
    counts = Counter(out["captions"])
    assert counts["c0"] == first and all(counts[c] == each_other for c in ("c1", "c2", "c3", "c4"))
    assert counts["c0"] / len(out["captions"]) == pytest.approx(share)
    assert row["captions"] == ["c0", "c1", "c2", "c3", "c4"] and out["id"] == "a"  # input untouched
    [alone] = weight_first_caption([{"captions": ["only"]}], share)
    assert alone["captions"] == ["only"]


def test_weight_first_caption_and_the_cli_refuse_a_share_outside_0_1(tmp_path, capsys):
    from evlgen.cli import main

    with pytest.raises(ValueError, match="share must be in"):
        weight_first_caption([{"captions": ["a", "b"]}], 1.5)
    with pytest.raises(SystemExit):
        main(["demo", "--out", str(tmp_path / "d"), "--canonical-share", "most"])
    assert "'most' is not a share in [0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert f"(default {CANONICAL_SHARE};" in " ".join(capsys.readouterr().out.split())  # help tells the truth
    assert main(["demo", "--video", "paper", "--canonical-share", "0.5"]) == 2
    assert "video demo has its own recipe" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
