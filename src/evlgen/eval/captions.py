"""Caption metrics: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D and optionally SPICE, scored the coco-caption way.

The numbers come from pycocoevalcap's own scorers, so they are comparable with published COCO results.
What this module adds around them:

* tokenisation with the Stanford PTB tokenizer that coco-caption uses (Java), run under a timeout, and
  without a working `java` a documented pure-Python approximation (`simple_tokenize`) instead;
* a report of which metrics ran and why any did not (no Java, SPICE models not installed, a timeout);
* strict input checks, so a partial prediction file cannot silently score a subset;
* no stray Java processes: METEOR's long-lived JVM is always killed and reaped, SPICE never downloads.

Scores are on pycocoevalcap's scale: fractions in [0, 1], CIDEr in [0, 10]. Papers print them x100
(CIDEr 1.391 is the "139.1" of a results table).

pycocoevalcap is an optional dependency (`pip install evlgen[eval]`); it is imported only when scoring.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evlgen.eval.vqa import few, matching_ids

# Metric families, in report order. "bleu" yields bleu1..bleu4.
METRICS: tuple[str, ...] = ("bleu", "meteor", "rouge_l", "cider", "spice")
DEFAULT_METRICS: tuple[str, ...] = ("bleu", "meteor", "rouge_l", "cider")

# The tokens coco-caption deletes after PTB tokenisation (pycocoevalcap's PUNCTUATIONS, checked equal in the
# tests). The bracket names are upper case here while the tokenizer runs with -lowerCase, so coco-caption
# never actually removes "-lrb-" and friends; both tokenizers below keep that behaviour for parity.
PTB_PUNCTUATION: frozenset[str] = frozenset(
    {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"}
)

# Characters the PTB lexer treats as line ends: one inside a caption would shift every later line.
_LINE_ENDS = re.compile(r"[\r\n\u000b\u000c\u0085\u2028\u2029]")
_SPICE_FILES: tuple[str, ...] = (
    "spice-1.0.jar",
    "lib/stanford-corenlp-3.6.0.jar",
    "lib/stanford-corenlp-3.6.0-models.jar",
)


@dataclass(frozen=True)
class CaptionScores:
    """Corpus-level caption metrics plus what ran, what did not (and why) and the tokenizer used.

    scores: "bleu1".."bleu4", "meteor", "rouge_l", "cider", "spice" (those that ran).
    ran: metric families that produced scores, e.g. ["bleu", "rouge_l", "cider"].
    skipped: metric (or "ptb_tokenizer") -> the reason it did not run as asked.
    tokenizer: "ptb" (Stanford PTBTokenizer, as coco-caption) or "simple" (pure-Python fallback).
    per_image: prediction id -> per-image scores of the metrics that ran (BLEU per image is pycocoevalcap's
        sentence-level BLEU; corpus BLEU is not their mean, and corpus CIDEr/METEOR use corpus statistics).
    """

    scores: dict[str, float]
    ran: list[str]
    skipped: dict[str, str]
    tokenizer: str
    per_image: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self, *, per_image: bool = False) -> dict[str, Any]:
        """JSON-ready copy; per-image scores only on request (they are large for a full test set)."""
        out: dict[str, Any] = {
            "scores": dict(self.scores),
            "ran": list(self.ran),
            "skipped": dict(self.skipped),
            "tokenizer": self.tokenizer,
        }
        if per_image:
            out["per_image"] = {str(k): dict(v) for k, v in self.per_image.items()}
        return out


class _MetricUnavailable(Exception):
    """A metric could not run here; the message is the reason recorded in `CaptionScores.skipped`."""


def find_java(timeout_s: float = 30.0) -> tuple[str | None, str]:
    """Locate a working `java`: (path, "") or (None, the reason it cannot be used)."""
    path = shutil.which("java")
    if path is None:
        return None, "java not found"
    try:
        proc = subprocess.run([path, "-version"], capture_output=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"java at {path} does not run ({exc})"
    if proc.returncode != 0:
        return None, f"`{path} -version` failed with exit code {proc.returncode}: {_tail(proc.stderr)}"
    return path, ""


def ptb_tokenize(sentences: Sequence[str], *, java: str = "java", timeout_s: float = 300.0) -> list[str]:
    """Tokenise like coco-caption: Stanford PTBTokenizer (-preserveLines -lowerCase), then drop punctuation.

    Same jar, flags and punctuation filter as pycocoevalcap's PTBTokenizer, but one JVM for all sentences,
    a temporary file outside site-packages (which may be read-only) and a timeout. Raises RuntimeError when
    Java fails, times out or returns a different number of lines.
    """
    if not sentences:
        return []
    from pycocoevalcap.tokenizer import ptbtokenizer

    jar = Path(ptbtokenizer.__file__).resolve().parent / ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR
    flat = [_LINE_ENDS.sub(" ", s) for s in sentences]
    with tempfile.TemporaryDirectory(prefix="evlgen-ptb-") as tmp:
        path = Path(tmp) / "captions.txt"
        path.write_text("\n".join(flat), encoding="utf-8")
        cmd = [java, "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase"]
        try:
            proc = subprocess.run([*cmd, str(path)], capture_output=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"PTB tokenizer timed out after {timeout_s:g} s") from exc
        except OSError as exc:
            raise RuntimeError(f"PTB tokenizer could not start: {exc}") from exc
    if proc.returncode != 0:
        raise RuntimeError(f"PTB tokenizer failed with exit code {proc.returncode}: {_tail(proc.stderr)}")
    # PTBTokenizer writes UTF-8 whatever the locale; -preserveLines gives one line per input line (empty
    # captions included) and a final newline.
    lines = proc.stdout.decode("utf-8", errors="replace").split("\n")
    if len(lines) < len(flat) or any(line.strip() for line in lines[len(flat) :]):
        raise RuntimeError(f"PTB tokenizer returned {len(lines)} lines for {len(flat)} captions")
    return [
        " ".join(t for t in line.split(" ") if t and t not in PTB_PUNCTUATION) for line in lines[: len(flat)]
    ]


_BRACKETS: tuple[tuple[str, str], ...] = (
    ("(", "-lrb-"),
    (")", "-rrb-"),
    ("[", "-lsb-"),
    ("]", "-rsb-"),
    ("{", "-lcb-"),
    ("}", "-rcb-"),
)
_SPLIT_WORDS: dict[str, tuple[str, ...]] = {
    "cannot": ("can", "not"),
    "gonna": ("gon", "na"),
    "gotta": ("got", "ta"),
    "wanna": ("wan", "na"),
}
_ABBREVIATIONS: frozenset[str] = frozenset(
    {"mr.", "mrs.", "ms.", "dr.", "prof.", "st.", "jr.", "sr.", "vs.", "etc.", "inc.", "ltd.", "co.", "corp."}
)
_ACRONYM = re.compile(r"(?:[a-z]\.){2,}")  # u.s.a., e.g., p.m. -- one letter + "." is a sentence end
_DROP = re.compile(r'"|\.{2,}|-{2,}|;|(?<!\d),|,(?!\d)|(?<!\d):|:(?!\d)')
# PTB keeps a run like "?!" or "!!" as one token, which coco-caption's filter (single marks only) keeps.
_SPLIT_OFF = re.compile(r"([$%#]|[?!]+)")
_CLITIC = re.compile(r"(.+?)(n't|'s|'re|'ve|'ll|'d|'m)")


def simple_tokenize(text: str) -> str:
    """Pure-Python stand-in for coco-caption's PTB tokenisation, used only when Java is unavailable.

    Rules, chosen to agree with PTBTokenizer + coco-caption's filter on ordinary captions (tested against
    it): lower-case; split on whitespace; brackets become -lrb-/-rrb-/-lsb-/-rsb-/-lcb-/-rcb- tokens (which
    coco-caption keeps); double quotes, ellipses, dash runs, trailing hyphens, edge quotes ('single',
    dogs') and a lone ; ? ! are removed (runs such as "?!" stay one token, as in coco-caption), as are , and
    : except between digits (1,000 and 10:30 stay whole); a trailing period is removed except in acronyms
    (u.s.a., e.g.) and a short list of abbreviations (mr., dr., st., ...); clitics are split off as PTB
    does (don't -> do n't, it's -> it 's, wouldn't've -> would n't 've, cannot -> can not); $ % # are split
    from what they touch. Known differences: PTB's much longer abbreviation list, a few rarities such as
    rock'n'roll, and Unicode (PTB drops characters it cannot tokenise, such as emoji, and rewrites some
    quotes and dashes).
    """
    s = text.lower()
    for char, name in _BRACKETS:
        s = s.replace(char, f" {name} ")
    s = _SPLIT_OFF.sub(r" \1 ", _DROP.sub(" ", s))
    out: list[str] = []
    for raw in s.split():
        tok = raw
        if tok.endswith(".") and not (_ACRONYM.fullmatch(tok) or tok in _ABBREVIATIONS):
            tok = tok.rstrip(".")
        tok = tok.strip("'`")  # quotes at either edge; a clitic's apostrophe is inside the word here
        if tok.endswith("-") and tok.strip("-") and not tok.startswith("-"):  # spares -lrb- and friends
            tok = tok.rstrip("-")  # "bat-" -> "bat" "-", and coco-caption drops the "-"
        if not tok:
            continue
        # Peel clitics from the right: "wouldn't've" -> would n't 've.
        tail: list[str] = []
        while m := _CLITIC.fullmatch(tok):
            tok, clitic = m.groups()
            tail.insert(0, clitic)
        out.extend(_SPLIT_WORDS.get(tok, (tok,)))
        out.extend(tail)
    return " ".join(t for t in out if t not in PTB_PUNCTUATION)


def caption_scores(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    *,
    metrics: tuple[str, ...] = DEFAULT_METRICS,
    spice: bool = False,
    timeout_s: float = 300,
) -> CaptionScores:
    """Score one predicted caption per id against that id's reference captions, as coco-caption does.

    predictions: id -> generated caption; references: id -> one or more human captions. The two must cover
    exactly the same ids (ValueError otherwise, naming a few offenders).
    metrics: any of "bleu" (BLEU-1..4), "meteor", "rouge_l", "cider", "spice". CIDEr is coco-caption's
        CIDEr-D (clipped tf-idf, Gaussian length penalty, sigma 6, x10); its IDF comes from the reference
        set being scored, exactly as in coco-caption, so CIDEr of a subset is not the mean over subsets
        and a single image always gets 0.
    spice: also run SPICE (same as listing "spice"); it runs only when its Stanford CoreNLP models are
        already installed in pycocoevalcap's spice/lib folder, otherwise it is skipped with the reason.
        Nothing is ever downloaded.
    timeout_s: limit for each Java step (PTB tokenizer, METEOR, SPICE); a step over it is stopped and
        reported in `skipped` (the tokenizer then falls back to `simple_tokenize`).

    Without a working `java`: tokenisation falls back to `simple_tokenize`, METEOR and SPICE are skipped
    ("java not found"), BLEU / ROUGE-L / CIDEr still run; `tokenizer` and `skipped` say so.
    """
    wanted = _resolve_metrics(metrics, spice)
    ids = _validated_ids(predictions, references)
    if importlib.util.find_spec("pycocoevalcap") is None:
        raise ImportError("caption metrics need pycocoevalcap: pip install 'evlgen[eval]'")

    skipped: dict[str, str] = {}
    java, java_reason = find_java(min(timeout_s, 30.0))
    # Predictions and references go through one tokenizer call: one JVM start instead of two.
    flat = [predictions[i] for i in ids] + [ref for i in ids for ref in references[i]]
    tokens: list[str] | None = None
    tokenizer = "simple"
    if java is None:
        skipped["ptb_tokenizer"] = f"{java_reason}; captions tokenised with the pure-Python fallback"
    else:
        try:
            tokens = ptb_tokenize(flat, java=java, timeout_s=timeout_s)
            tokenizer = "ptb"
        except RuntimeError as exc:
            skipped["ptb_tokenizer"] = f"{exc}; captions tokenised with the pure-Python fallback"
    if tokens is None:
        tokens = [simple_tokenize(s) for s in flat]

    res = {i: [tokens[k]] for k, i in enumerate(ids)}
    gts: dict[str, list[str]] = {}
    pos = len(ids)
    for i in ids:
        gts[i] = tokens[pos : pos + len(references[i])]
        pos += len(references[i])

    scores: dict[str, float] = {}
    per_image: dict[str, dict[str, float]] = {i: {} for i in ids}
    ran: list[str] = []
    for name in wanted:
        if name in ("meteor", "spice") and java is None:
            skipped[name] = java_reason
            continue
        try:
            corpus, per = _run_metric(name, gts, res, ids, java or "java", timeout_s)
        except _MetricUnavailable as exc:
            skipped[name] = str(exc)
            continue
        scores.update(corpus)
        for key, values in per.items():
            for i, value in zip(ids, values, strict=True):
                per_image[i][key] = value
        ran.append(name)
    return CaptionScores(scores=scores, ran=ran, skipped=skipped, tokenizer=tokenizer, per_image=per_image)


def _run_metric(
    name: str,
    gts: dict[str, list[str]],
    res: dict[str, list[str]],
    ids: list[str],
    java: str,
    timeout_s: float,
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """One metric family -> (corpus scores, per-image score lists in `ids` order)."""
    # pycocoevalcap scorers iterate gts.keys(); gts is built in `ids` order, so their per-image lists are too.
    if name == "bleu":
        from pycocoevalcap.bleu.bleu import Bleu

        corpus, per = Bleu(4).compute_score(gts, res, verbose=0)
        return (
            {f"bleu{n + 1}": float(corpus[n]) for n in range(4)},
            {f"bleu{n + 1}": [float(v) for v in per[n]] for n in range(4)},
        )
    if name == "rouge_l":
        from pycocoevalcap.rouge.rouge import Rouge

        score, per = Rouge().compute_score(gts, res)
        return {"rouge_l": float(score)}, {"rouge_l": [float(v) for v in per]}
    if name == "cider":
        from pycocoevalcap.cider.cider import Cider

        score, per = Cider().compute_score(gts, res)
        return {"cider": float(score)}, {"cider": [float(v) for v in per]}
    if name == "meteor":
        score, per = _meteor(gts, res, timeout_s)
        return {"meteor": score}, {"meteor": per}
    if name == "spice":
        score, per = _spice(gts, res, ids, java, timeout_s)
        return {"spice": score}, {"spice": per}
    raise ValueError(f"unknown metric {name!r}")


def _meteor(
    gts: dict[str, list[str]], res: dict[str, list[str]], timeout_s: float
) -> tuple[float, list[float]]:
    """METEOR 1.5 through pycocoevalcap's wrapper, under a timeout, never leaving its JVM behind."""
    from pycocoevalcap.meteor.meteor import Meteor

    try:
        scorer = Meteor()  # starts `java -jar meteor-1.5.jar ... -stdio` and keeps it running
    except OSError as exc:
        raise _MetricUnavailable(f"METEOR could not start Java: {exc}") from exc
    proc = scorer.meteor_p
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["value"] = scorer.compute_score(gts, res)
        except Exception as exc:  # noqa: BLE001 -- becomes the reason METEOR is reported as skipped
            outcome["error"] = exc

    # The wrapper blocks on the JVM's stdout without a timeout, so it runs in a thread we can abandon.
    worker = threading.Thread(target=work, name="evlgen-meteor", daemon=True)
    worker.start()
    worker.join(timeout_s)
    timed_out = worker.is_alive()
    # pycocoevalcap only stops the JVM in __del__, i.e. whenever garbage collection gets to it; stop it now.
    # Killing it also ends a worker stuck reading its output (EOF -> exception inside the worker).
    proc.kill()
    proc.wait()
    worker.join(30)
    err = b""
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        try:
            if stream is proc.stderr and stream is not None:
                err = stream.read()
            if stream is not None:
                stream.close()
        except (OSError, ValueError):
            pass
    # The wrapper's __del__ takes scorer.lock before cleaning up; if compute_score died while holding it,
    # that __del__ would block forever. A fresh lock lets it run, harmlessly, on the reaped process.
    scorer.lock = threading.Lock()
    if timed_out:
        raise _MetricUnavailable(f"METEOR timed out after {timeout_s:g} s")
    if "error" in outcome:
        detail = _tail(err)
        raise _MetricUnavailable(
            f"METEOR failed: {outcome['error']!r}" + (f"; java said: {detail}" if detail else "")
        )
    score, per = outcome["value"]
    return float(score), [float(v) for v in per]


def _spice_dir() -> Path:
    """pycocoevalcap's spice folder (importing the package runs nothing; its Spice class would download)."""
    import pycocoevalcap.spice

    return Path(pycocoevalcap.spice.__file__).resolve().parent


def _spice_command(java: str, spice_dir: Path, in_path: Path, out_path: Path) -> list[str]:
    """The SPICE command line (as pycocoevalcap's, minus -cache: its LMDB cache would be written into
    site-packages and only speeds up repeated runs)."""
    jar = spice_dir / "spice-1.0.jar"
    return [java, "-jar", "-Xmx8G", str(jar), str(in_path), "-out", str(out_path), "-subset", "-silent"]


def _spice(
    gts: dict[str, list[str]], res: dict[str, list[str]], ids: list[str], java: str, timeout_s: float
) -> tuple[float, list[float]]:
    """SPICE F-score, only from models already on disk; mean over images as pycocoevalcap (NaN propagates)."""
    spice_dir = _spice_dir()
    missing = [rel for rel in _SPICE_FILES if not (spice_dir / rel).is_file()]
    if missing:
        raise _MetricUnavailable(
            f"SPICE models not installed ({', '.join(missing)} missing under {spice_dir}); pycocoevalcap "
            "would download Stanford CoreNLP 3.6.0 on first use, which evlgen never does. Install them once "
            "on a machine with internet access: python -m pycocoevalcap.spice.get_stanford_models"
        )
    with tempfile.TemporaryDirectory(prefix="evlgen-spice-") as tmp:
        in_path, out_path = Path(tmp) / "input.json", Path(tmp) / "output.json"
        # Positions as image ids: SPICE echoes them back, and integers survive its JSON round trip unchanged.
        items = [{"image_id": k, "test": res[i][0], "refs": gts[i]} for k, i in enumerate(ids)]
        in_path.write_text(json.dumps(items), encoding="utf-8")
        cmd = _spice_command(java, spice_dir, in_path, out_path)
        try:
            proc = subprocess.run(cmd, cwd=spice_dir, capture_output=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired as exc:
            raise _MetricUnavailable(f"SPICE timed out after {timeout_s:g} s") from exc
        except OSError as exc:
            raise _MetricUnavailable(f"SPICE could not start: {exc}") from exc
        if proc.returncode != 0:
            raise _MetricUnavailable(f"SPICE failed with exit code {proc.returncode}: {_tail(proc.stderr)}")
        try:
            results = json.loads(out_path.read_text(encoding="utf-8"))
            by_pos = {int(item["image_id"]): _to_float(item["scores"]["All"]["f"]) for item in results}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise _MetricUnavailable(f"SPICE output unreadable: {exc!r}") from exc
    per = [by_pos.get(k, math.nan) for k in range(len(ids))]
    return sum(per) / len(per), per


def _to_float(value: object) -> float:
    """SPICE writes "NaN"/null for images without tuples; pycocoevalcap maps those to NaN too."""
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def _resolve_metrics(metrics: Sequence[str], spice: bool) -> list[str]:
    if isinstance(metrics, str):  # a bare string would otherwise be read character by character
        metrics = (metrics,)
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise ValueError(f"unknown caption metric(s) {unknown}; choose from {list(METRICS)}")
    return [m for m in METRICS if m in metrics or (m == "spice" and spice)]


def _validated_ids(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> list[str]:
    """Prediction ids in their given order, after checking both mappings cover the same, well-formed ids."""
    matching_ids(predictions, references, "references", "reference")
    not_str = [i for i, cap in predictions.items() if not isinstance(cap, str)]
    if not_str:
        raise TypeError(f"predictions must be strings (one caption per id); not for {few(not_str)}")
    # A plain string here would be scored as a list of one-character references.
    bad_refs = [
        i
        for i, refs in references.items()
        if isinstance(refs, str)
        or not isinstance(refs, Sequence)
        or not all(isinstance(r, str) for r in refs)
    ]
    if bad_refs:
        raise TypeError(f"references must be lists of strings; not for {few(bad_refs)}")
    empty = [i for i in predictions if len(references[i]) == 0]
    if empty:
        raise ValueError(f"every prediction needs at least one reference; none for {few(empty)}")
    return list(predictions)


def _tail(data: bytes, limit: int = 400) -> str:
    """Last part of a subprocess's stderr, on one line, for an error message."""
    text = " ".join(data.decode("utf-8", errors="replace").split())
    return text if len(text) <= limit else "..." + text[-limit:]
