"""VQA answer normalisation and accuracy: the official VQAv2 rule in pure Python (VQAv2, OK-VQA, GQA).

Implements the published VQAv2 evaluation (GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py):

* answer normalisation (`normalize_answer`): punctuation, periods, the digit-comma rule, number words to
  digits, articles dropped, common contractions restored, lower case, whitespace collapsed;
* accuracy with 10 human answers: min(#humans agreeing / 3, 1), averaged over the 10 leave-one-out subsets
  of 9 humans (so 1 agreeing human -> 0.3, 2 -> 0.6, 3 -> 0.9, 4 or more -> 1.0);
* with fewer than 10 reference answers (GQA, synthetic data): exact match after normalisation.

OK-VQA uses the same rule on its 10 (5 distinct, each repeated) answers; the paper's setting lemmatises
predicted answers first, which the optional `lemmatize` hook supports without adding a dependency here.
All accuracies are fractions in [0, 1]; the official script prints them x100.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

# Replaced by a space, or deleted outright when it touches a space or the text has a digit-comma-digit
# ("1,000"); apostrophes are absent on purpose so that contractions survive. Periods are handled apart.
_PUNCT = ';/[]"{}()=+\\_-><@`,?!'  # one character each, in the official order
_DIGIT_COMMA = re.compile(r"\d,\d")
# A period not followed by a digit is deleted: "3.5" survives, "u.s." becomes "us", "2." becomes "2".
# (The official pattern reads like "not between digits", but its look-behind is mistyped as a look-ahead,
# so only the following character counts; this is what it actually does.)
_PERIOD = re.compile(r"\.(?!\d)")
_NUMBER_WORDS: dict[str, str] = {
    "none": "0",  # sic: the official map sends "none" to "0" (how many ...? none)
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})


def _contractions() -> dict[str, str]:
    """Apostrophe-less spellings -> contractions: a subset of the official table (which has ~170 entries).

    Kept: every single contraction of the official table written without its apostrophe (dont -> don't,
    youre -> you're, ...), which is how annotators and models actually drop them. Left out: the double
    forms (couldnt've), the "'ow's'at" oddities, the capitalised keys (Im, Ive: never matched, because
    the text is lower-cased first) and the entry that maps the wrong way (somebody'd -> somebodyd).
    Real words are never in the table (well, were, shed, its, ill, id, hell), as in the official one.
    """
    groups = {
        "n't": "ai are ca could did does do had has have is might must need ought sha should was were wo "
        "would",
        "'ve": "could might must should would not they we what where who you",
        "'ll": "how it somebody someone something they what who why you",
        "'s": "he how somebody someone that there what when where who why",
        "'d": "he how it someone something there they where who you",
        "'re": "there they what why you",
    }
    table = {
        stem + suffix.replace("'", ""): stem + suffix
        for suffix, stems in groups.items()
        for stem in stems.split()
    }
    table.update({"maam": "ma'am", "oclock": "o'clock", "twas": "'twas", "yall": "y'all"})
    return table


_CONTRACTIONS: dict[str, str] = _contractions()


def _process_punctuation(text: str) -> str:
    """The official punctuation step (before lower-casing, as there)."""
    delete_all = _DIGIT_COMMA.search(text) is not None
    out = text
    for p in _PUNCT:
        # Decided on the input text, not on the partly cleaned one, exactly as the official loop does.
        if delete_all or (p + " ") in text or (" " + p) in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # The official call passes re.UNICODE where re.sub takes `count`, capping this at 32 periods; no real
    # answer has that many, so the cap is not reproduced.
    return _PERIOD.sub("", out)


def _process_digit_article(text: str) -> str:
    """The official word step: lower-case, number words -> digits, drop articles, restore contractions."""
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_answer(text: str) -> str:
    """Normalise an answer as the official VQAv2 evaluation does.

    In order: tabs and newlines become spaces, outer whitespace is stripped; each of ; / [ ] " { } ( ) = +
    \\ _ - > < @ ` , ? ! is deleted if it touches a space anywhere in the answer (or if the answer holds a
    digit-comma-digit such as "1,000", then all of them are deleted), otherwise replaced by a space; a period
    not followed by a digit is deleted; then lower-case, split on whitespace, number words zero..ten (and
    "none") become digits, the articles a/an/the are dropped, apostrophe-less contractions are restored
    (see `_contractions`), and the words are joined with single spaces.

    >>> normalize_answer("Two dogs.")
    '2 dogs'
    >>> normalize_answer("the U.S.")
    'us'
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def vqa_accuracy(
    prediction: str,
    answers: Sequence[str],
    *,
    lemmatize: Callable[[str], str] | None = None,
    references_normalized: bool = False,
) -> float:
    """Accuracy of one predicted answer against the human answers of one question, in [0, 1].

    With 10 or more answers (VQAv2, OK-VQA): the official rule, min(#other humans agreeing / 3, 1) averaged
    over the leave-one-out subsets (for 10 answers: 1 match -> 0.3, 2 -> 0.6, 3 -> 0.9, 4+ -> 1.0).
    With fewer answers (1 for GQA or synthetic data, or any partial set): plain exact match after
    normalisation -- 1.0 if the prediction equals any answer, else 0.0 -- because the 3-of-9 rule cannot
    reach 1.0 with fewer than 4 other humans.

    The prediction is always normalised with `normalize_answer`. References are normalised the same way,
    unless `references_normalized=True`: then they are treated exactly as the official script treats the
    (already normalised) VQAv2 / OK-VQA annotation files -- left as they are when all humans agree,
    punctuation-processed only when they disagree. Use it to reproduce official numbers bit for bit.
    `lemmatize`, if given, is applied after normalisation to the prediction and (unless
    `references_normalized`) to each reference, e.g. a spaCy lemmatiser for OK-VQA.
    """
    if isinstance(answers, str) or not answers:
        raise ValueError("answers must be a non-empty list of strings (the human answers of one question)")
    pred = _normalized(prediction, lemmatize)
    return _accuracy(pred, _references(answers, lemmatize, references_normalized))


def vqa_scores(
    predictions: Mapping[str, str],
    answers: Mapping[str, Sequence[str]],
    *,
    question_types: Mapping[str, str] | None = None,
    lemmatize: Callable[[str], str] | None = None,
    references_normalized: bool = False,
) -> dict[str, Any]:
    """Accuracy over a question set: {"accuracy", "count"} plus "per_type" when `question_types` is given.

    predictions: question id -> predicted answer; answers: question id -> human answers. Both must cover
    the same ids (ValueError otherwise, naming a few). question_types: question id -> any grouping (answer
    type such as "yes/no" / "number" / "other", or question type); it must cover every id. per_type maps
    each type to {"accuracy", "count"}. Accuracies are fractions in [0, 1] (the official script prints x100).
    See `vqa_accuracy` for the rule and the keyword arguments.
    """
    ids = matching_ids(predictions, answers, "answers", "question")
    if question_types is not None:
        untyped = [i for i in ids if i not in question_types]
        if untyped:
            raise ValueError(f"question_types lacks {len(untyped)} question id(s), e.g. {few(untyped)}")
    accs = {
        i: _accuracy(
            _normalized(predictions[i], lemmatize), _references(answers[i], lemmatize, references_normalized)
        )
        for i in ids
    }
    out: dict[str, Any] = {"accuracy": sum(accs.values()) / len(accs), "count": len(accs)}
    if question_types is not None:
        groups: dict[str, list[float]] = {}
        for i in ids:
            groups.setdefault(question_types[i], []).append(accs[i])
        out["per_type"] = {
            t: {"accuracy": sum(v) / len(v), "count": len(v)} for t, v in sorted(groups.items())
        }
    return out


def majority_baseline(
    answers_train: Sequence[str],
    answers_eval: Mapping[str, Sequence[str]],
    *,
    lemmatize: Callable[[str], str] | None = None,
    references_normalized: bool = False,
) -> float:
    """Accuracy of always answering the most common (normalised) training answer, in [0, 1].

    answers_train: one answer per training question (e.g. each question's most frequent human answer);
    ties between equally common answers go to the alphabetically first, so the result does not depend on
    the order of the list. answers_eval: question id -> human answers, scored with `vqa_accuracy`'s rule.
    """
    if isinstance(answers_train, str) or not answers_train:
        raise ValueError("answers_train must be a non-empty list of answers")
    if not answers_eval:
        raise ValueError("answers_eval is empty")
    counts = Counter(_normalized(a, lemmatize) for a in answers_train)
    majority = min(counts, key=lambda a: (-counts[a], a))
    accs = [
        _accuracy(majority, _references(refs, lemmatize, references_normalized))
        for refs in answers_eval.values()
    ]
    return sum(accs) / len(accs)


def _normalized(text: str, lemmatize: Callable[[str], str] | None) -> str:
    if not isinstance(text, str):
        raise TypeError(f"answers must be strings, got {type(text).__name__}")
    out = normalize_answer(text)
    return lemmatize(out) if lemmatize is not None else out


def _references(
    answers: Sequence[str], lemmatize: Callable[[str], str] | None, already_normalized: bool
) -> list[str]:
    if isinstance(answers, str) or not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError("each question needs a non-empty list of answer strings")
    if not already_normalized:
        return [_normalized(a, lemmatize) for a in answers]
    # The official script: annotation answers were normalised when the dataset was built, so they are used
    # as they are, except that punctuation is processed when the humans disagree.
    return [_process_punctuation(a) for a in answers] if len(set(answers)) > 1 else list(answers)


def _accuracy(pred: str, refs: Sequence[str]) -> float:
    if len(refs) < 10:
        return float(pred in refs)
    matches = sum(r == pred for r in refs)
    # Leaving out a human who gave `pred` leaves matches - 1 agreeing; leaving out anyone else, matches.
    total = sum(min(1.0, (matches - (r == pred)) / 3) for r in refs)
    return total / len(refs)


def matching_ids(
    predictions: Mapping[str, object], truth: Mapping[str, object], truth_name: str, truth_id: str
) -> list[str]:
    """Prediction ids in their given order, after checking `predictions` and `truth` cover the same ids.

    Shared by the caption and VQA scorers; `truth_name` ("references", "answers") and `truth_id`
    ("reference", "question") only word the errors.
    """
    if not isinstance(predictions, Mapping) or not isinstance(truth, Mapping):
        raise TypeError(f"predictions and {truth_name} must be mappings from id")
    if not predictions:
        raise ValueError("no predictions to score")
    problems = []
    no_truth = [i for i in predictions if i not in truth]
    if no_truth:
        problems.append(f"{len(no_truth)} prediction id(s) have no {truth_name}, e.g. {few(no_truth)}")
    no_pred = [i for i in truth if i not in predictions]
    if no_pred:
        problems.append(f"{len(no_pred)} {truth_id} id(s) have no prediction, e.g. {few(no_pred)}")
    if problems:
        raise ValueError(f"prediction and {truth_id} ids differ: " + "; ".join(problems))
    return list(predictions)


def few(ids: Sequence[object], k: int = 5) -> str:
    shown = ", ".join(repr(i) for i in ids[:k])
    return shown + (f" (and {len(ids) - k} more)" if len(ids) > k else "")
