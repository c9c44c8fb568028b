"""`evlgen bench convergence`: curve arithmetic by hand, the tower probe against towers whose content is
known, and a miniature end-to-end run."""

import json
import random
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from evlgen.config import ConfigError
from evlgen.convergence import (
    compare,
    contenders,
    crossing,
    run_convergence,
    seconds_at,
    split_scoped,
    step_seconds,
    summarise,
)
from evlgen.model.tokenizer import byte_tokenizer
from evlgen.synth import world
from evlgen.synth.probe import lm_ceiling, tower_ceiling

sys.path.insert(0, str(Path(__file__).parent))
from test_demo import SIZES, TINY  # noqa: E402


def test_crossing_interpolates_between_budgets():
    pts = [(10, 0.1), (20, 0.3), (40, 0.7)]
    assert crossing(pts, 0.5) == pytest.approx(30.0)  # halfway between 20 (0.3) and 40 (0.7)
    assert crossing(pts, 0.3) == 20
    assert crossing(pts, 0.05) == 10  # already there at the first budget
    assert crossing(pts, 0.8) is None
    assert crossing([(10, 0.6), (20, 0.2), (30, 0.6)], 0.5) == 10  # the first time counts


def test_step_seconds_charges_the_first_window_at_the_steady_rate(tmp_path):
    rows = [
        {"step": 10, "kind": "train", "images_per_s": 1.0},  # slow start: workers spinning up
        {"step": 15, "kind": "val", "loss": 1.0},
        {"step": 20, "kind": "train", "images_per_s": 40.0},
        {"step": 30, "kind": "train", "images_per_s": 20.0},
        {"step": 40, "kind": "train", "images_per_s": 80.0},
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    curve = step_seconds(path, batch_size=8)
    # 80 images per window; the first at the median later rate (40/s) = 2 s, then 2 s, 4 s, 1 s.
    assert curve == [(10, 2.0), (20, 4.0), (30, 8.0), (40, 9.0)]
    assert seconds_at(curve, 25) == 8.0
    with pytest.raises(ValueError, match="never logged"):
        seconds_at(curve, 50)


def _entry(curves):
    return {"runs": {str(i): {"points": pts} for i, pts in enumerate(curves)}}


def _pt(step, acc, seconds, stage1=0):
    return {
        "step": step,
        "total_steps": step + stage1,
        "seconds": seconds,
        "attribute_accuracy": acc,
        "cider": acc,
    }


def test_summary_ratios_against_tomeformer():
    results = {
        "contenders": {
            "tomeformer": _entry([[_pt(10, 0.2, 1), _pt(20, 0.5, 2)], [_pt(10, 0.5, 1), _pt(20, 0.5, 2)]]),
            # reaches 0.4 at step 40 in both seeds, twice as slow per step
            "slow": _entry([[_pt(20, 0.2, 4), _pt(40, 0.4, 8)]] * 2),
            "two-stage": _entry([[_pt(10, 0.6, 11, stage1=30), _pt(20, 0.6, 12, stage1=30)]] * 2),
            "never": _entry([[_pt(10, 0.1, 1), _pt(20, 0.1, 2)]] * 2),
        }
    }
    s = summarise(results, None)
    assert s["target"] == {"metric": "attribute_accuracy", "value": 0.4}  # 80% of the mean final 0.5
    tome = s["contenders"]["tomeformer"]
    # seed 0 crosses 0.4 at 10 + 10 * (0.4 - 0.2) / 0.3 = 16.67 steps; seed 1 at step 10.
    assert tome["steps_to_target"] == pytest.approx((10 + 20 / 3 + 10) / 2)
    assert s["contenders"]["slow"]["steps_ratio"] == pytest.approx(40 / tome["steps_to_target"])
    assert s["contenders"]["two-stage"]["steps_to_target"] == 40  # stage 1 counts
    assert s["contenders"]["two-stage"]["seconds_to_target"] == 11
    never = s["contenders"]["never"]
    assert (
        never["steps_to_target"] is None
        and never["steps_ratio"] is None
        and never["steps_seeds_reached"] == 0
    )


def _results(contenders, budgets=(10, 20), base=(), sizes=None):
    return {
        "budgets": list(budgets),
        "base_overrides": list(base),
        "world_sizes": sizes or {},
        "backbones": "v3-x",
        "tower_ceiling": {"scene_accuracy": 0.95},
        "contenders": {n: {**e, "overrides": o} for n, (e, o) in contenders.items()},
    }


def test_compare_puts_sweep_points_on_one_target(tmp_path):
    main = _results(
        {
            "tomeformer": (_entry([[_pt(10, 0.2, 1), _pt(20, 0.5, 2)]] * 2), []),
            "qformer": (
                _entry([[_pt(10, 0.1, 1), _pt(20, 0.3, 2)], [_pt(10, 0.1, 1), _pt(20, 0.5, 2)]]),
                ["q"],
            ),
        }
    )
    point = _results(
        {
            "qformer": (
                _entry([[_pt(10, 0.4, 1), _pt(40, 0.6, 4)]]),
                ["connector.num_queries=32", "connector.num_queries=8"],
            )
        },
        budgets=(10, 40),
        base=["train.lr=1e-3"],
        sizes={"train": 1000},
    )
    main["lm_ceiling"] = {"scenes": 10, "in_order": 0.98, "shuffled": 0.5}  # `point` predates the LM ceiling
    for name, r in (("main", main), ("q8", point)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(r))
    table = compare([tmp_path / "main", tmp_path / "q8"])
    assert "Steps to attribute_accuracy >= 0.4" in table  # 80% of main's TomeFormer final 0.5
    rows = [line for line in table.splitlines() if line.startswith("|")]
    assert len(rows) == 5 and len({row.count("|") for row in rows}) == 1  # header, rule, three rows
    assert (
        "| run | connector | settings | backbones | tower | LM | 10 | 20 | 40 | steps to target | seeds |"
        in table
    )
    # TomeFormer crosses 0.4 at 10 + 10 * 0.2 / 0.3 steps in both seeds; one Q-Former seed never does.
    assert "| main | tomeformer | - | v3-x | 0.950 | 0.980 | 0.200 | 0.500 | - | 17 | 2/2 |" in table
    assert "| main | qformer | q | v3-x | 0.950 | 0.980 | 0.100 | 0.400 | - | - | 1/2 |" in table
    assert (
        "| q8 | qformer | train.lr=1e-3, connector.num_queries=8, world {'train': 1000} | v3-x | 0.950 | - |"
        in table
    )
    assert table.rstrip().endswith("| 0.400 | - | 0.600 | 10 | 1/1 |")
    explicit = compare([tmp_path / "q8"], ("attribute_accuracy", 0.5))
    assert ">= 0.5 " in explicit and explicit.rstrip().endswith("| 25 | 1/1 |")  # 10 + 30 * 0.1 / 0.2
    with pytest.raises(ConfigError, match="no tomeformer run"):
        compare([tmp_path / "q8"])
    with pytest.raises(ConfigError, match="no results.json"):
        compare([tmp_path])


class _PixelTower(torch.nn.Module):
    """A 'tower' whose tokens are the raw pixels of each 8x8 patch: colour is linearly readable from
    them; with `blank`, every token is the same and nothing is."""

    def __init__(self, blank: bool = False):
        super().__init__()
        self.image_size, self.num_protected, self.blank = 64, 0, blank
        self.model = SimpleNamespace(config=SimpleNamespace(patch_size=8))

    def forward(self, pixels):
        b, t = pixels.shape[:2]
        x = pixels.flatten(0, 1)  # [B*T, 3, 64, 64]
        patches = torch.nn.functional.unfold(x, kernel_size=8, stride=8).transpose(1, 2)  # [B*T, 64, 192]
        if self.blank:
            patches = torch.ones_like(patches)
        return patches.unflatten(0, (b, t))  # [B, T, 64, 192]


def test_tower_ceiling_reads_what_the_tokens_hold():
    seeing = tower_ceiling(_PixelTower(), train_scenes=120, test_scenes=50)
    assert seeing["colour_accuracy"] >= 0.95
    assert seeing["objects"] >= 50 and seeing["scenes"] == 50
    blind = tower_ceiling(_PixelTower(blank=True), train_scenes=120, test_scenes=50)
    # Identical tokens: the probe can only predict the commonest class (6 colours, 4 shapes).
    assert blind["colour_accuracy"] < 0.35 and blind["shape_accuracy"] < 0.45
    assert blind["scene_accuracy"] < seeing["scene_accuracy"]


def _miniature(out, names, seeds, tmp_path, extra=()):
    return run_convergence(
        out,
        names=names,
        seeds=seeds,
        budgets=[4, 2],
        eval_samples=6,
        overrides=[
            "train.batch_size=8",
            "data.num_workers=0",
            "caption.num_beams=1",
            "caption.max_new_tokens=6",
            *extra,
        ],
        sizes=SIZES,
        recipe=TINY,
        cache_dir=str(tmp_path / "cache"),
        probe_scenes=(40, 20),
        lm_scenes=3,
    )


def test_convergence_miniature_end_to_end(tmp_path):
    out = tmp_path / "conv"
    results = _miniature(out, ["tomeformer", "tomeformer-r0"], [0, 1], tmp_path)
    assert results["budgets"] == [2, 4]
    for name in ("tomeformer", "tomeformer-r0"):
        for seed in ("0", "1"):
            points = results["contenders"][name]["runs"][seed]["points"]
            assert [p["step"] for p in points] == [2, 4]
            assert (
                0.0 <= points[-1]["attribute_accuracy"] <= 1.0
                and points[-1]["seconds"] > points[0]["seconds"]
            )
    assert json.loads((out / "results.json").read_text())["summary"] == results["summary"]
    for png in ("attribute_accuracy_vs_steps", "attribute_accuracy_vs_seconds", "cider_vs_steps"):
        Image.open(out / f"{png}.png").verify()
    report = (out / "report.md").read_text()
    assert "| tomeformer-r0 |" in report and "Tower ceiling" in report and "LM ceiling" in report
    assert results["lm_ceiling"]["scenes"] == 3 and 0 <= results["lm_ceiling"]["shuffled"] <= 1

    # Run again: every (contender, seed) is read back from its result.json instead of retrained.
    stamp = (out / "runs" / "tomeformer-seed0" / "result.json").stat().st_mtime_ns
    again = _miniature(out, ["tomeformer"], [0], tmp_path)
    assert (out / "runs" / "tomeformer-seed0" / "result.json").stat().st_mtime_ns == stamp
    assert again["contenders"]["tomeformer"]["runs"]["0"] == results["contenders"]["tomeformer"]["runs"]["0"]

    # An override for one contender retrains that one only, and the report names it.
    r0 = out / "runs" / "tomeformer-r0-seed0" / "result.json"
    stamp_r0 = r0.stat().st_mtime_ns
    scoped = _miniature(out, ["tomeformer", "tomeformer-r0"], [0], tmp_path, ["tomeformer-r0:train.lr=1e-4"])
    assert (out / "runs" / "tomeformer-seed0" / "result.json").stat().st_mtime_ns == stamp
    assert r0.stat().st_mtime_ns != stamp_r0
    assert scoped["contenders"]["tomeformer-r0"]["overrides"] == ["connector.r=0", "train.lr=1e-4"]
    assert scoped["contenders"]["tomeformer"]["overrides"] == []
    assert "tomeformer-r0: ['connector.r=0', 'train.lr=1e-4']" in (out / "report.md").read_text()

    with pytest.raises(ConfigError, match="unknown contenders"):
        run_convergence(tmp_path / "x", names=["resnet"])


def test_scoped_overrides_reach_both_stages_of_their_contender_only():
    known = contenders(10)
    shared, scoped = split_scoped(
        ["train.lr=1e-3", "qformer-2stage:connector.num_queries=8", "data.val={path: /a:b}"], known
    )
    assert shared == ["train.lr=1e-3", "data.val={path: /a:b}"]  # a colon in the value is not a scope
    assert scoped == {"qformer-2stage": ["connector.num_queries=8"]}
    with pytest.raises(ConfigError, match="unknown contender 'qformr'"):
        split_scoped(["qformr:connector.num_queries=8"], known)


class _ReadingLM:
    """Writes the canonical caption of whatever slot description its prompt holds (or, `blind`, always
    the same caption); checks the prompt's layout on the way."""

    def __init__(self, tokenizer, blind=False):
        self.tok, self.blind = tokenizer, blind

    def generate(self, prompt, **kwargs):
        ids = prompt[0].tolist()
        eos = self.tok.eos_token_id
        assert ids[0] == eos and ids.count(eos) == 2, "</s> description </s> caption:"
        text = self.tok.decode(ids, skip_special_tokens=True)
        assert text.endswith("caption:")
        slots = re.findall(r"(left|middle|right): a (\w+) (\w+) (\w+)\.", text)
        caption = (
            "a large red circle on the left"
            if self.blind
            else " and ".join(
                f"a {size} {colour} {shape} {world.AT[pos]}" for pos, size, colour, shape in slots
            )
        )
        new = self.tok(" " + caption, add_special_tokens=False)["input_ids"] + [eos]
        return torch.tensor([ids + new])


def test_lm_ceiling_scores_captions_from_the_true_description():
    tok = byte_tokenizer()
    reading = lm_ceiling(_ReadingLM(tok), tok, scenes=30, seed=3)
    assert reading == {"scenes": 30, "in_order": 1.0, "shuffled": 1.0}
    blind = lm_ceiling(_ReadingLM(tok, blind=True), tok, scenes=30, seed=3)
    rng = random.Random("lm-ceiling-3")  # the same scenes, drawn here independently
    scenes = [world.sample_scene(rng) for _ in range(30)]
    lone_red_circles = sum([(o.colour, o.shape) for o in s.objects] == [("red", "circle")] for s in scenes)
    assert blind["in_order"] == blind["shuffled"] == lone_red_circles / 30 < 0.2
