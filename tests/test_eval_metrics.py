"""Caption metrics and VQA accuracy against hand-computed values (not against the scorers themselves).

Java-dependent checks (PTB tokenizer, METEOR) skip cleanly when no working `java` is installed. The real
METEOR JVM starts once (module fixture) and those tests are marked slow: loading its paraphrase table takes
~9 s on two cores. The timeout / kill / reap logic around it is also tested with a fake, in the fast set.
"""

import importlib.util
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from evlgen.eval import captions
from evlgen.eval.captions import CaptionScores, caption_scores, find_java, ptb_tokenize, simple_tokenize
from evlgen.eval.vqa import majority_baseline, normalize_answer, vqa_accuracy, vqa_scores

JAVA, _JAVA_REASON = find_java()
needs_java = pytest.mark.skipif(JAVA is None, reason=f"needs java: {_JAVA_REASON}")
needs_coco = pytest.mark.skipif(
    importlib.util.find_spec("pycocoevalcap") is None, reason="pycocoevalcap not installed"
)

# ---------------------------------------------------------------------------------------------------------
# Caption fixtures
# ---------------------------------------------------------------------------------------------------------

# Two images for hand-computed corpus BLEU and ROUGE-L. Capitals and the final period check tokenisation.
HAND_PRED = {"a": "A big red square on the left.", "b": "Two green circles"}
HAND_REFS = {
    "a": ["a big red square is on the left", "a red square at the left side"],
    "b": ["two blue circles here", "there are two small blue circles"],
}
# Image a: hyp "a big red square on the left" (7 words).
#   1-grams: all 7 occur in ref1                                                     -> 7/7
#   2-grams: a big, big red, red square, on the, the left in ref1; square on nowhere  -> 5/6
#   3-grams: a big red, big red square, on the left; red square on, square on the not -> 3/5
#   4-grams: a big red square only                                                   -> 1/4
#   closest reference length: 7 (ref2) rather than 8 (ref1).
# Image b: hyp "two green circles" (3 words).
#   1-grams: two, circles                                                            -> 2/3
#   2-grams: two green, green circles                                                -> 0/2
#   3-grams: two green circles                                                       -> 0/1
#   4-grams: none possible                                                           -> 0/0
#   closest reference length: 4 (|4-3| = 1 beats |6-3| = 3).
# Corpus: matches [9, 5, 3, 1] over [10, 8, 6, 4]; hypothesis length 10 < reference length 11, so the
# brevity penalty is exp(1 - 11/10) = exp(-0.1) = 0.904837418.
#   BLEU-1 = 9/10 * BP                                   = 0.814353676
#   BLEU-2 = (9/10 * 5/8) ** (1/2) * BP = 0.75 * BP      = 0.678628064
#   BLEU-3 = (9/10 * 5/8 * 3/6) ** (1/3) * BP            = 0.592836219
#   BLEU-4 = (9/10 * 5/8 * 3/6 * 1/4) ** (1/4) * BP      = 0.465938596
BP = math.exp(-0.1)
HAND_BLEU = {
    "bleu1": 0.9 * BP,
    "bleu2": (0.9 * 0.625) ** 0.5 * BP,
    "bleu3": (0.9 * 0.625 * 0.5) ** (1 / 3) * BP,
    "bleu4": (0.9 * 0.625 * 0.5 * 0.25) ** 0.25 * BP,
}
# ROUGE-L (coco-caption: best precision and best recall over the references, F with beta = 1.2):
#   a: LCS with ref1 = 7 (P 7/7, R 7/8), with ref2 = 5 ("a red square the left": P 5/7, R 5/7)
#      -> P = 1, R = 0.875: F = 2.44 * 1 * 0.875 / (0.875 + 1.44 * 1) = 2.135 / 2.315 = 0.922246220
#   b: LCS 2 ("two ... circles") with either ref -> P = 2/3, R = max(2/4, 2/6) = 1/2
#      -> F = 2.44 * (2/3) * (1/2) / (1/2 + 1.44 * 2/3) = 0.813333 / 1.46 = 0.557077626
#   mean = 0.739661923
HAND_ROUGE = (2.44 * 0.875 / 2.315 + (2.44 / 3) / 1.46) / 2

# Three images, three references each, for orderings: identical > paraphrase > unrelated.
REFS3 = {
    "1": [
        "a red square on the left",
        "a small red square at the left side",
        "the left half holds a red square",
    ],
    "2": [
        "two blue circles near each other",
        "a pair of blue circles close together",
        "two small blue circles",
    ],
    "3": ["a green triangle at the top", "one green triangle near the top edge", "a green triangle up high"],
}
SAME3 = {k: v[0] for k, v in REFS3.items()}
PARA3 = {
    "1": "on the left there is a red block",
    "2": "a couple of blue rings next to one another",
    "3": "at the top is a triangle that is green",
}
WRONG3 = {
    "1": "people eating pizza indoors",
    "2": "people eating pizza indoors",
    "3": "people eating pizza indoors",
}


def _child_processes() -> set[int]:
    """Live or zombie children of this process, from /proc (Linux)."""
    children = set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            after_name = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(after_name[1]) == os.getpid():
            children.add(int(d.name))
    return children


# ---------------------------------------------------------------------------------------------------------
# Captions: pure-Python parts and hand-computed values
# ---------------------------------------------------------------------------------------------------------


@needs_coco
def test_ptb_punctuation_list_is_coco_captions():
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

    assert captions.PTB_PUNCTUATION == frozenset(PUNCTUATIONS)


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("A man (in red) riding a horse.", "a man -lrb- in red -rrb- riding a horse"),
        ("Don't stop: it's the dog's ball!", "do n't stop it 's the dog 's ball"),
        (
            "A black-and-white photo -- of 1,000 cats, 3.5 m tall...",
            "a black-and-white photo of 1,000 cats 3.5 m tall",
        ),
        ("'single' quotes and dogs' toys", "single quotes and dogs toys"),
        ("At 10:30 a.m. the U.S. team won", "at 10:30 a.m. the u.s. team won"),
        ("50% off $5", "50 % off $ 5"),
        ("they cannot; wouldn't've", "they can not would n't 've"),
        ("Hello?! bye.", "hello ?! bye"),
        ("", ""),
    ],
)
def test_simple_tokenize(text, tokens):
    assert simple_tokenize(text) == tokens


@needs_coco
def test_bleu_and_rouge_match_hand_computation():
    out = caption_scores(HAND_PRED, HAND_REFS, metrics=("bleu", "rouge_l"))
    assert out.ran == ["bleu", "rouge_l"]
    for key, value in HAND_BLEU.items():
        # coco-caption adds 1e-15 / 1e-9 to the n-gram fractions: relative error ~1e-10.
        assert out.scores[key] == pytest.approx(value, rel=1e-7), key
    assert out.scores["rouge_l"] == pytest.approx(HAND_ROUGE, rel=1e-9)
    assert out.scores["bleu1"] == pytest.approx(0.814353676, abs=1e-9)
    assert out.scores["bleu4"] == pytest.approx(0.465938596, abs=1e-9)


@pytest.fixture
def no_java(monkeypatch, tmp_path):
    """Hide java: the pure-Python tokenizer is enough for metric arithmetic and saves a JVM start per call."""
    monkeypatch.setenv("PATH", str(tmp_path))


@needs_coco
def test_perfect_match_and_unrelated_captions(no_java):
    # Two images, one reference each, no word shared between the images. Every n-gram then occurs in one of
    # the N = 2 reference sets: idf = log(2) - log(1) > 0 for all, so the candidate's tf-idf vector equals
    # the reference's, the cosine is 1 for n = 1..4, the length penalty exp(0) = 1, and
    # CIDEr-D = 10 * mean_n(1) / (1 reference) = 10 exactly.
    refs = {"1": ["a red square on the left"], "2": ["two blue circles near each other"]}
    same = caption_scores(
        {"1": "a red square on the left", "2": "two blue circles near each other"},
        refs,
        metrics=("bleu", "rouge_l", "cider"),
    )
    assert same.scores["bleu4"] == pytest.approx(1.0, abs=1e-9)
    assert same.scores["rouge_l"] == pytest.approx(1.0)
    assert same.scores["cider"] == pytest.approx(10.0)
    # Swapped captions share no n-gram with their references: every clipped overlap is 0.
    swapped = caption_scores(
        {"1": "two blue circles near each other", "2": "a red square on the left"},
        refs,
        metrics=("bleu", "rouge_l", "cider"),
    )
    assert swapped.scores["cider"] == 0.0
    assert swapped.scores["rouge_l"] == 0.0
    assert swapped.scores["bleu1"] < 1e-9


@needs_coco
def test_cider_orders_identical_paraphrase_unrelated_and_uses_the_scored_set_for_idf(no_java):
    # Same references in all three runs, so the IDF table is the same and the scores are comparable.
    same = caption_scores(SAME3, REFS3, metrics=("cider",)).scores["cider"]
    para = caption_scores(PARA3, REFS3, metrics=("cider",)).scores["cider"]
    wrong = caption_scores(WRONG3, REFS3, metrics=("cider",)).scores["cider"]
    assert same > para > wrong == 0.0
    # One image alone: N = 1, idf = log(1) - log(df = 1) = 0 for every n-gram, so CIDEr is 0 by construction.
    single = caption_scores({"1": SAME3["1"]}, {"1": REFS3["1"]}, metrics=("cider",))
    assert single.scores["cider"] == 0.0


def test_input_validation_names_ids():
    with pytest.raises(ValueError, match=r"'c'"):
        caption_scores({"a": "x", "c": "y"}, {"a": ["x"]})
    with pytest.raises(ValueError, match=r"no prediction.*'b'"):
        caption_scores({"a": "x"}, {"a": ["x"], "b": ["y"]})
    with pytest.raises(ValueError, match=r"at least one reference.*'a'"):
        caption_scores({"a": "x"}, {"a": []})
    with pytest.raises(TypeError, match="lists of strings"):
        caption_scores({"a": "x"}, {"a": "x"})
    with pytest.raises(ValueError, match="no predictions"):
        caption_scores({}, {})
    with pytest.raises(ValueError, match="unknown caption metric"):
        caption_scores({"a": "x"}, {"a": ["x"]}, metrics=("bleu", "cidr"))


@needs_coco
def test_without_java_falls_back_and_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no java on PATH
    out = caption_scores(HAND_PRED, HAND_REFS, metrics=("bleu", "meteor", "rouge_l"), spice=True)
    assert out.tokenizer == "simple"
    assert out.ran == ["bleu", "rouge_l"]
    assert out.skipped["meteor"] == "java not found"
    assert out.skipped["spice"] == "java not found"
    assert "java not found" in out.skipped["ptb_tokenizer"]
    assert out.scores["bleu4"] == pytest.approx(HAND_BLEU["bleu4"], rel=1e-7)
    assert set(out.to_dict()) == {"scores", "ran", "skipped", "tokenizer"}
    assert out.to_dict(per_image=True)["per_image"]["a"]["rouge_l"] == pytest.approx(2.44 * 0.875 / 2.315)


# ---------------------------------------------------------------------------------------------------------
# Captions: SPICE never downloads; Java steps time out and leave no process behind (faked, no Java needed)
# ---------------------------------------------------------------------------------------------------------


@needs_coco
def test_spice_without_models_is_skipped_and_never_downloads(monkeypatch, tmp_path):
    import urllib.request

    def no_download(*args, **kwargs):
        raise AssertionError("SPICE tried to download")

    monkeypatch.setattr(urllib.request, "urlretrieve", no_download)
    monkeypatch.setattr(captions, "_spice_dir", lambda: tmp_path)  # an empty folder: no jars, no models
    monkeypatch.setattr(captions, "find_java", lambda timeout_s=30.0: (sys.executable, ""))
    out = caption_scores(HAND_PRED, HAND_REFS, metrics=("bleu",), spice=True)
    assert out.ran == ["bleu"]
    assert "stanford-corenlp-3.6.0" in out.skipped["spice"] and "never" in out.skipped["spice"]
    # The stand-in "java" cannot run the PTB jar: the tokenizer falls back and says why.
    assert out.tokenizer == "simple" and "exit code" in out.skipped["ptb_tokenizer"]


_FAKE_SPICE = """
import json, sys, time
items = json.load(open(sys.argv[1]))
if sys.argv[3] == "sleep":
    time.sleep(30)
json.dump([{"image_id": it["image_id"], "scores": {"All": {"f": 1.0 if it["test"] in it["refs"] else 0.25}}}
           for it in items], open(sys.argv[2], "w"))
"""


@needs_coco
@pytest.mark.parametrize("mode", ["run", "sleep"])
def test_spice_runner_reads_results_and_times_out(monkeypatch, tmp_path, mode):
    for rel in captions._SPICE_FILES:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    monkeypatch.setattr(captions, "_spice_dir", lambda: tmp_path)
    monkeypatch.setattr(captions, "find_java", lambda timeout_s=30.0: (sys.executable, ""))
    monkeypatch.setattr(
        captions,
        "_spice_command",
        lambda java, spice_dir, i, o: [sys.executable, "-c", _FAKE_SPICE, str(i), str(o), mode],
    )
    pred = {"x": "two blue circles", "y": "a cat"}
    refs = {"x": ["two blue circles", "blue circles"], "y": ["a dog"]}
    out = caption_scores(pred, refs, metrics=(), spice=True, timeout_s=1)
    if mode == "run":
        assert out.ran == ["spice"]
        assert out.scores["spice"] == pytest.approx((1.0 + 0.25) / 2)
        assert out.per_image["y"]["spice"] == 0.25
    else:
        assert out.ran == [] and "timed out" in out.skipped["spice"]


class _HangingMeteor:
    """Stands in for pycocoevalcap's Meteor: a child that never answers, read while holding the lock."""

    instances: list["_HangingMeteor"] = []

    def __init__(self):
        cmd = [sys.executable, "-c", "import time; time.sleep(60)"]
        pipe = subprocess.PIPE
        self.meteor_p = subprocess.Popen(cmd, stdin=pipe, stdout=pipe, stderr=pipe)
        self.lock = threading.Lock()
        _HangingMeteor.instances.append(self)

    def compute_score(self, gts, res):
        self.lock.acquire()  # like the real wrapper, which never releases it when reading fails
        return float(self.meteor_p.stdout.readline())


@needs_coco
def test_meteor_timeout_kills_and_reaps_its_process(monkeypatch):
    import pycocoevalcap.meteor.meteor as meteor_module

    monkeypatch.setattr(meteor_module, "Meteor", _HangingMeteor)
    monkeypatch.setattr(captions, "find_java", lambda timeout_s=30.0: (sys.executable, ""))
    out = caption_scores({"a": "x y"}, {"a": ["x y"]}, metrics=("meteor",), timeout_s=1)
    assert "timed out after 1 s" in out.skipped["meteor"]
    fake = _HangingMeteor.instances[-1]
    assert fake.meteor_p.returncode is not None  # killed and waited for: no zombie
    assert not fake.lock.locked()  # so the real wrapper's __del__ could not deadlock


# ---------------------------------------------------------------------------------------------------------
# Captions with Java: PTB tokenizer parity and the real METEOR (one JVM start for the module)
# ---------------------------------------------------------------------------------------------------------

TOKENIZER_SAMPLES = [
    "A man (in red) riding a horse.",
    "Don't stop: it's the dog's ball!",
    "A black-and-white photo -- of 1,000 cats, 3.5 m tall...",
    "\"Quoted\" words 'single' and U.S.A. e.g. Mr. Smith",
    "50% off $5 & more / less",
    "They're we'll can't cannot gonna I'm",
    "A DOG IS RUNNING ON THE BEACH.",
    "a cat sitting on a couch , next to a remote .",
    "At 10:30 a.m. the dog ate.",
    "The train's engine isn't running; a bus... parked!!",
    "an 8-year-old boy with a bat- ready",
]


@needs_java
@needs_coco
def test_ptb_tokenize_matches_pycocoevalcap_and_the_fallback():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    mine = ptb_tokenize(TOKENIZER_SAMPLES, java=JAVA)
    try:
        theirs = PTBTokenizer().tokenize({str(k): [{"caption": s}] for k, s in enumerate(TOKENIZER_SAMPLES)})
    except OSError as exc:  # it writes its temporary file into site-packages
        pytest.skip(f"pycocoevalcap's tokenizer cannot write its temp file: {exc}")
    assert mine == [theirs[str(k)][0] for k in range(len(TOKENIZER_SAMPLES))]
    assert [simple_tokenize(s) for s in TOKENIZER_SAMPLES] == mine


@pytest.fixture(scope="module")
def java_run():
    if JAVA is None:
        pytest.skip(f"needs java: {_JAVA_REASON}")
    pytest.importorskip("pycocoevalcap")
    before = _child_processes()
    pred = {"1": SAME3["1"], "2": PARA3["2"], "3": WRONG3["3"]}
    out = caption_scores(pred, REFS3)
    return out, _child_processes() - before


@pytest.mark.slow  # the real METEOR JVM: ~9 s to load its paraphrase table
def test_java_run_reports_ptb_and_all_default_metrics(java_run):
    out, _ = java_run
    assert isinstance(out, CaptionScores)
    assert out.tokenizer == "ptb" and out.skipped == {}
    assert out.ran == ["bleu", "meteor", "rouge_l", "cider"]
    assert set(out.scores) == {"bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider"}


@pytest.mark.slow  # the real METEOR JVM: ~9 s to load its paraphrase table
def test_meteor_orders_identical_paraphrase_unrelated(java_run):
    out, _ = java_run
    meteor = {k: v["meteor"] for k, v in out.per_image.items()}
    assert meteor["1"] > 0.95  # identical to a reference (METEOR's fragmentation penalty stays tiny)
    assert meteor["1"] > meteor["2"] > meteor["3"]
    assert meteor["3"] == 0.0  # no unigram in common
    cider = {k: v["cider"] for k, v in out.per_image.items()}
    assert cider["1"] > cider["2"] > cider["3"] == 0.0


@pytest.mark.slow  # the real METEOR JVM: ~9 s to load its paraphrase table
def test_meteor_leaves_no_java_process(java_run):
    _, new_children = java_run
    assert new_children == set()


# ---------------------------------------------------------------------------------------------------------
# VQA: normalisation
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("Two dogs.", "2 dogs"),  # number word, final period
        ("the U.S.", "us"),  # periods not followed by a digit go; article goes
        ("3.5", "3.5"),  # decimal point stays
        ("2.", "2"),
        (".5 inch", ".5 inch"),  # a period followed by a digit stays even without one before it
        ("1,000", "1000"),  # digit-comma-digit: the comma is deleted
        ("1,000-ish", "1000ish"),  # ... and then every punctuation mark is deleted, not spaced
        ("1000-ish", "1000 ish"),  # without it, a hyphen between letters becomes a space
        ("black-and-white", "black and white"),
        ("t - shirt", "t shirt"),  # a mark touching a space is deleted
        ("red, white, and blue", "red white and blue"),
        ("red,white", "red white"),
        ("a/b", "b"),  # "/" -> space, then "a" is an article
        ("Yes!", "yes"),
        ("An apple", "apple"),
        ("A", ""),
        ("none", "0"),  # the official map sends "none" to "0"
        ("Zero", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),  # only zero..ten are mapped
        ("dont", "don't"),
        ("Isnt it", "isn't it"),
        ("Don't", "don't"),  # apostrophes survive punctuation processing
        ("youre", "you're"),
        ("Im", "im"),  # the official table's capitalised keys never match lower-cased words
        ("its", "its"),  # real words are not contractions
        ("  several   spaces\tand\ttabs\n", "several spaces and tabs"),
        ("hello@world", "hello world"),
        ("(left)", "left"),
    ],
)
def test_normalize_answer(raw, normalized):
    assert normalize_answer(raw) == normalized


# ---------------------------------------------------------------------------------------------------------
# VQA: accuracy
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("matches", "expected"),
    # 10 humans, m of them say the predicted answer. Leave-one-out: the m subsets without a matching human
    # see m - 1 matches, the 10 - m others see m; each scores min(matches / 3, 1):
    #   m = 1: (1 * 0 + 9 * 1/3) / 10 = 0.3
    #   m = 2: (2 * 1/3 + 8 * 2/3) / 10 = 0.6
    #   m = 3: (3 * 2/3 + 7 * 1) / 10 = 0.9
    #   m = 4: (4 * 1 + 6 * 1) / 10 = 1.0
    [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)],
)
def test_vqa_accuracy_partial_agreement(matches, expected):
    answers = ["2"] * matches + ["3"] * (10 - matches)
    assert vqa_accuracy("two", answers) == pytest.approx(expected)


def test_vqa_accuracy_normalises_both_sides_by_default():
    answers = ["Two"] * 3 + ["three."] * 7
    assert vqa_accuracy("2", answers) == pytest.approx(0.9)
    assert vqa_accuracy("The three", answers) == pytest.approx(1.0)


def test_vqa_accuracy_official_treatment_of_annotation_answers():
    # references_normalized=True reproduces the official script on annotation files: unanimous answers are
    # compared as they are, so an unnormalised "two" never equals the (normalised) prediction "2" ...
    assert vqa_accuracy("two", ["two"] * 10, references_normalized=True) == 0.0
    assert vqa_accuracy("two", ["two"] * 10) == 1.0
    # ... while disagreeing answers get the punctuation step: "2." -> "2" makes three matches (0.9).
    answers = ["2"] * 2 + ["2."] + ["3"] * 7
    assert vqa_accuracy("2", answers, references_normalized=True) == pytest.approx(0.9)
    # The punctuation step replaces "!" by a space and does not strip: "yes " != "yes" (as official).
    assert vqa_accuracy("yes", ["yes!"] * 5 + ["no"] * 5, references_normalized=True) == 0.0


def test_vqa_accuracy_exact_match_with_few_answers():
    assert vqa_accuracy("Blue.", ["blue"]) == 1.0  # GQA: one answer
    assert vqa_accuracy("green", ["blue"]) == 0.0
    assert vqa_accuracy("the red one", ["blue", "red 1"]) == 1.0  # any answer, after normalisation
    with pytest.raises(ValueError):
        vqa_accuracy("x", [])
    with pytest.raises(ValueError):
        vqa_accuracy("x", "x")


def test_vqa_accuracy_lemmatize_hook():
    def singular(text):
        return " ".join(w.removesuffix("s") for w in text.split())

    assert vqa_accuracy("dogs", ["dog"] * 10) == 0.0
    assert vqa_accuracy("dogs", ["dog"] * 10, lemmatize=singular) == 1.0
    assert vqa_accuracy("Dogs.", ["dogs"], lemmatize=singular) == 1.0


def test_vqa_scores_overall_and_per_type():
    predictions = {"q1": "two", "q2": "no", "q3": "red", "q4": "Yes"}
    answers = {
        "q1": ["2"] * 10,  # 1.0
        "q2": ["yes"] * 9 + ["no"],  # 1 match: 0.3
        "q3": ["red"] * 2 + ["blue"] * 8,  # 2 matches: 0.6
        "q4": ["yes"] * 10,  # 1.0
    }
    types = {"q1": "number", "q2": "yes/no", "q3": "other", "q4": "yes/no"}
    out = vqa_scores(predictions, answers, question_types=types)
    assert out["accuracy"] == pytest.approx((1.0 + 0.3 + 0.6 + 1.0) / 4)
    assert out["count"] == 4
    assert out["per_type"]["yes/no"] == {"accuracy": pytest.approx(0.65), "count": 2}
    assert out["per_type"]["number"]["accuracy"] == pytest.approx(1.0)
    assert out["per_type"]["other"]["accuracy"] == pytest.approx(0.6)
    assert "per_type" not in vqa_scores(predictions, answers)
    with pytest.raises(ValueError, match=r"'q9'"):
        vqa_scores({**predictions, "q9": "x"}, answers)
    with pytest.raises(ValueError, match=r"no prediction.*'q4'"):
        vqa_scores({k: v for k, v in predictions.items() if k != "q4"}, answers)
    with pytest.raises(ValueError, match=r"question_types lacks.*'q4'"):
        vqa_scores(predictions, answers, question_types={k: v for k, v in types.items() if k != "q4"})


def test_majority_baseline():
    train = ["yes", "Yes.", "no", "2", "YES", "two"]  # normalised: yes x3, 2 x2, no x1
    evaluation = {"a": ["yes"] * 10, "b": ["no"] * 10, "c": ["yes"] * 3 + ["no"] * 7}
    assert majority_baseline(train, evaluation) == pytest.approx((1.0 + 0.0 + 0.9) / 3)
    # Ties go to the alphabetically first answer whatever the order: "no" < "yes".
    assert majority_baseline(["yes", "no"], {"a": ["no"]}) == 1.0
    assert majority_baseline(["no", "yes"], {"a": ["no"]}) == 1.0
    with pytest.raises(ValueError):
        majority_baseline([], {"a": ["no"]})
