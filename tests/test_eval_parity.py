"""Parity with pycocoevalcap's own pipeline (PTBTokenizer, then Bleu / Rouge / Cider as COCOEvalCap runs
them) on a fixed prediction / reference set, and the VQAv2 rule on hand-made tricky cases."""

import shutil

import pytest

from evlgen.eval.captions import caption_scores
from evlgen.eval.vqa import vqa_accuracy

pytest.importorskip("pycocoevalcap")

REFS = {
    "1": ["A man riding a horse on a beach.", "a person rides a brown horse along the shore"],
    "2": ["Two dogs play with a frisbee in the park.", "two dogs are playing in the grass", "dogs, frisbee!"],
    "3": ["a plate of food with broccoli and rice", "A dinner plate holding rice & vegetables."],
    "4": ["a red stop sign on a street corner", "the stop sign is red."],
    "5": ["a cat sleeping on a laptop keyboard", "A cat's nap on a computer."],
}
PREDS = {
    "1": "a man riding a horse on the beach",
    "2": "two dogs playing with a frisbee",
    "3": "a plate of food with rice and broccoli",
    "4": "a stop sign on the side of a road",
    "5": "a dog sitting on a couch",
}


@pytest.mark.skipif(shutil.which("java") is None, reason="the PTB tokenizer needs Java")
def test_caption_metrics_equal_pycocoevalcap_scorers():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in REFS.items()})
    res = tok.tokenize({k: [{"caption": PREDS[k]}] for k in REFS})
    bleu, _ = Bleu(4).compute_score(gts, res)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    ours = caption_scores(PREDS, REFS, metrics=("bleu", "rouge_l", "cider"))
    assert ours.tokenizer == "ptb"
    expected = {f"bleu{i + 1}": b for i, b in enumerate(bleu)} | {"rouge_l": rouge, "cider": cider}
    assert ours.scores == pytest.approx(expected, abs=1e-12)
    assert 0 < cider < 10 and bleu[3] > 0  # a non-degenerate set


@pytest.mark.parametrize(
    ("pred", "answers", "expected"),
    [
        ("two", ["2"] * 3 + ["3"] * 7, 0.9),  # number word -> digit; 3 of 10 agree
        ("a dog", ["dog"] * 2 + ["cat"] * 8, 0.6),  # article dropped
        ("Yes.", ["yes"] * 10, 1.0),  # case, final period
        ("isnt", ["isn't"] * 4 + ["no"] * 6, 1.0),  # contraction restored, 4 agree
        ("1,000", ["1000"] * 10, 1.0),  # digit comma
        ("red", ["red"] + ["blue"] * 9, 0.3),  # one human agrees
        ("green", ["red"] * 10, 0.0),
    ],
)
def test_vqa_rule_on_tricky_cases(pred, answers, expected):
    assert vqa_accuracy(pred, answers) == pytest.approx(expected)
