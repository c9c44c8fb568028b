"""Readers for the standard benchmark annotation files: VQAv2 / OK-VQA, GQA, MSR-VTT and MSVD.

Each reader turns the official release file(s) into rows of the JSON-lines schema of ``records.py``,
the way :class:`~evlgen.data.sources.CocoSource` does for COCO: the files are parsed once and rewritten
as a cached JSON-lines file under the cache folder, named after the size and modification time of
every file read (the questions file and its annotations, or the MSVD split list), and later opens,
DataLoader workers included, read that cache through a :class:`JsonlSource`. Editing any input file
makes the next open convert again and delete the stale cache.

* ``vqav2`` (``okvqa`` is the same reader): an official questions file, optionally with its
  annotations file (without one, test-dev, rows have no answers); one row per question, keyed by
  ``question_id``, all 10 answers in file order, the image ``COCO_{data_subtype}_{image_id:012d}.jpg``.
* ``gqa``: a ``{question_id: {"imageId", "question", "answer", ...}}`` file; image ``{imageId}.jpg``.
* ``msrvtt``: ``{"videos": [...], "sentences": [...]}``; one row per video with all its captions,
  video ``{video_id}.mp4``; ``split`` selects by each video's ``split`` field.
* ``msvd``: ``AllVideoDescriptions.txt`` lines ``VIDEOID_START_END caption``; one row per video,
  video ``{VIDEOID_START_END}.avi``; ``split`` is ``train``/``val``/``test`` (index ranges over the
  sorted names, see :data:`MSVD_SPLITS`) or a text file listing video names.

NoCaps (``nocaps_val_4500_captions.json``) and LAVIS-style arrays (MSR-VTT ``[{"video", "caption"}]``
included) are COCO layouts and stay with ``CocoSource``.

A malformed entry becomes a row that raises :class:`RecordError` (counted and skipped by training and
``evlgen data check``), located in the file a person can open: ``/abs/v2_questions.json:questions[17]``,
``/abs/v2_annotations.json:annotations[3]``, ``/abs/testdev_balanced_questions.json:["20968379"]``,
``/abs/train_val_videodatainfo.json:sentences[9]`` or ``/abs/AllVideoDescriptions.txt:42`` (1-based
line). A file whose overall layout is wrong raises ``ValueError`` when opened.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evlgen.data.records import Record, RecordError, parse_row
from evlgen.data.sources import JsonlSource, _annotation_paths, cached_conversion, load_json

if TYPE_CHECKING:
    from evlgen.config import DatasetConfig

__all__ = [
    "BENCHMARK_FORMATS",
    "MSVD_SPLITS",
    "SPLIT_FORMATS",
    "BenchmarkSource",
    "detect_benchmark",
    "gqa_entries",
    "msrvtt_entries",
    "msvd_entries",
    "open_benchmark",
    "read_name_list",
    "vqa_entries",
]

BENCHMARK_FORMATS: tuple[str, ...] = ("vqav2", "okvqa", "gqa", "msrvtt", "msvd")
# Formats for which DatasetConfig.split means something.
SPLIT_FORMATS: tuple[str, ...] = ("msrvtt", "msvd")
# OK-VQA ships in the VQAv2 layout.
_READER = {"okvqa": "vqav2"}

# The standard MSVD split (Venugopalan et al. 2015): 1200 training, 100 validation and 670 test videos.
# Here it is taken as index ranges [start, end) over the video names sorted as Python sorts strings
# (code points). The usual release numbers videos vid1..vid1970 in youtube_mapping.txt order, which
# is not guaranteed to be that order: for the exact published split, pass a file listing its names.
MSVD_SPLITS: dict[str, tuple[int, int]] = {"train": (0, 1200), "val": (1200, 1300), "test": (1300, 1970)}
_MSVD_NAME = re.compile(r".+_\d+_\d+")

# The test-dev questions are a subset of the test2015 images; there are no COCO_test-dev2015_* files.
_VQA_IMAGE_SUBTYPE = {"test-dev2015": "test2015"}

# Bytes read from the head of a file to recognise its layout without parsing it whole.
_SNIFF_BYTES = 1 << 16


# ---------------------------------------------------------------------------------------------
# Entries: what a conversion writes, one JSON object per line.


def _ok(location: str, key: str, row: dict[str, Any]) -> dict[str, Any]:
    return {"location": location, "key": key, "row": row}


def _bad(location: str, reason: str, detail: str | None = None) -> dict[str, Any]:
    return {"location": location, "error": [reason, detail]}


def _is_id(value: Any) -> bool:
    # bool is an int subclass; `true` is never a question id.
    return (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, str) and bool(value)
    )


def _type(value: Any) -> str:
    return type(value).__name__


# ---------------------------------------------------------------------------------------------
# VQAv2 / OK-VQA


def _vqa_answers(
    data: Any, path: str, subtype: str
) -> tuple[dict[Any, dict[str, Any]], list[dict[str, Any]]]:
    """question_id -> annotation (or the error entry that replaces its row), and unattributable errors."""
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise ValueError(f"{path}: not a VQA annotations file; expected {{'annotations': [...]}}")
    theirs = data.get("data_subtype")
    if isinstance(theirs, str) and theirs != subtype:
        # The classic mistake: val questions with train annotations; every row would lack its answers.
        raise ValueError(
            f"{path}: annotations are for data_subtype {theirs!r}, the questions for {subtype!r}"
        )
    by_qid: dict[Any, dict[str, Any]] = {}
    first_at: dict[Any, int] = {}
    orphans: list[dict[str, Any]] = []
    for idx, ann in enumerate(data["annotations"]):
        where = f"{path}:annotations[{idx}]"
        if not isinstance(ann, dict):
            orphans.append(_bad(where, "not a JSON object", f"got {_type(ann)}"))
            continue
        qid = ann.get("question_id")
        if not _is_id(qid):
            orphans.append(_bad(where, "bad question_id", f"got {qid!r}"))
            continue
        if qid in by_qid:
            by_qid[qid] = _bad(
                where, "duplicate annotation", f"question_id {qid} also at annotations[{first_at[qid]}]"
            )
            continue
        first_at[qid] = idx
        answers = ann.get("answers")
        if not isinstance(answers, list):
            by_qid[qid] = _bad(where, "bad answers", f"expected a list, got {_type(answers)}")
            continue
        texts = []
        for j, item in enumerate(answers):
            text = item.get("answer") if isinstance(item, dict) else None
            if not isinstance(text, str):
                by_qid[qid] = _bad(where, "bad answers", f"answers[{j}] has no answer string")
                break
            texts.append(text)
        else:
            by_qid[qid] = {"location": where, "image_id": ann.get("image_id"), "answers": texts, "ann": ann}
    return by_qid, orphans


def vqa_entries(
    questions: Any, questions_path: str, annotations: Any = None, annotations_path: str | None = None
) -> Iterator[dict[str, Any]]:
    """Entries of a VQAv2/OK-VQA questions file, joined with its annotations file when one is given.

    ``questions``/``annotations`` are the decoded JSON. Raises ``ValueError`` at once for a file that is
    not in the official layout; per-entry defects become error entries. An annotation whose question is
    not in the questions file is ignored (a subset of the questions is a valid evaluation set).
    """
    if not isinstance(questions, dict) or not isinstance(questions.get("questions"), list):
        raise ValueError(
            f"{questions_path}: not a VQA questions file; "
            "expected {'data_subtype': ..., 'questions': [...]}"
        )
    subtype = questions.get("data_subtype")
    if not isinstance(subtype, str) or not subtype:
        raise ValueError(f"{questions_path}: no data_subtype (e.g. 'val2014'), which names the image files")
    joined = None
    orphans: list[dict[str, Any]] = []
    if annotations is not None:
        joined, orphans = _vqa_answers(annotations, annotations_path or "annotations", subtype)
    return _vqa_iter(questions["questions"], questions_path, subtype, joined, annotations_path, orphans)


def _vqa_iter(
    questions: list[Any],
    path: str,
    subtype: str,
    joined: dict[Any, dict[str, Any]] | None,
    annotations_path: str | None,
    orphans: list[dict[str, Any]],
) -> Iterator[dict[str, Any]]:
    image_subtype = _VQA_IMAGE_SUBTYPE.get(subtype, subtype)
    seen: set[Any] = set()
    for idx, q in enumerate(questions):
        where = f"{path}:questions[{idx}]"
        if not isinstance(q, dict):
            yield _bad(where, "not a JSON object", f"got {_type(q)}")
            continue
        qid, image_id = q.get("question_id"), q.get("image_id")
        if not _is_id(qid):
            yield _bad(where, "bad question_id", f"got {qid!r}")
            continue
        if qid in seen:
            # Prediction files are keyed by question_id: two rows with one id cannot both be scored.
            yield _bad(where, "duplicate question_id", str(qid))
            continue
        seen.add(qid)
        if not isinstance(image_id, int) or isinstance(image_id, bool):
            yield _bad(where, "bad image_id", f"expected an integer, got {image_id!r}")
            continue
        # The question text is checked by parse_row, like any row's.
        row: dict[str, Any] = {
            "id": qid,
            "question_id": qid,
            "image_id": image_id,
            "image": f"COCO_{image_subtype}_{image_id:012d}.jpg",
            "question": q.get("question"),
        }
        if joined is not None:
            ann = joined.get(qid)
            if ann is None:
                yield _bad(where, "no annotation", f"question_id {qid} is not in {annotations_path}")
                continue
            if "error" in ann:
                yield ann
                continue
            if ann["image_id"] != image_id:
                detail = f"annotation says image_id {ann['image_id']!r}, questions[{idx}] says {image_id}"
                yield _bad(ann["location"], "image_id differs from the question's", detail)
                continue
            row["answers"] = ann["answers"]
            for field in ("multiple_choice_answer", "answer_type", "question_type"):
                if isinstance(ann["ann"].get(field), str):
                    row[field] = ann["ann"][field]
        yield _ok(where, str(qid), row)
    yield from orphans


# ---------------------------------------------------------------------------------------------
# GQA


def gqa_entries(data: Any, path: str) -> Iterator[dict[str, Any]]:
    """Entries of a GQA questions file (``{question_id: {"imageId", "question", "answer", ...}}``).

    Files without answers (the challenge's submission questions) give rows without answers.
    """
    if not isinstance(data, dict):
        raise ValueError(
            f"{path}: not a GQA questions file; expected {{question_id: {{'imageId': ..., 'question': ...}}}}"
        )
    return _gqa_iter(data, path)


def _gqa_iter(data: dict[str, Any], path: str) -> Iterator[dict[str, Any]]:
    for qid, q in data.items():
        where = f"{path}:[{json.dumps(qid, ensure_ascii=False)}]"
        if not isinstance(q, dict):
            yield _bad(where, "not a JSON object", f"got {_type(q)}")
            continue
        image_id = q.get("imageId")
        if not _is_id(image_id):
            yield _bad(where, "bad imageId", f"got {image_id!r}")
            continue
        row: dict[str, Any] = {
            "id": qid,
            "question_id": qid,
            "image_id": image_id,
            "image": f"{image_id}.jpg",
            "question": q.get("question"),
        }
        if q.get("answer") is not None:
            row["answers"] = [q["answer"]]
        if isinstance(q.get("fullAnswer"), str):
            row["full_answer"] = q["fullAnswer"]
        yield _ok(where, qid, row)


# ---------------------------------------------------------------------------------------------
# MSR-VTT


def msrvtt_entries(data: Any, path: str, split: str | None = None) -> Iterator[dict[str, Any]]:
    """Entries of an MSR-VTT ``*_videodatainfo.json``: one per video, captions in file order.

    ``split`` keeps the videos whose ``split`` field matches (``val`` is read as ``validate``); a split
    no video has raises ``ValueError`` naming the splits present. Sentences of unknown videos are ignored.
    """
    if not (
        isinstance(data, dict)
        and isinstance(data.get("videos"), list)
        and isinstance(data.get("sentences"), list)
    ):
        raise ValueError(f"{path}: not an MSR-VTT file; expected {{'videos': [...], 'sentences': [...]}}")
    wanted = None
    if split is not None:
        wanted = {"validate"} if split in ("val", "validate") else {split}
        present = {v.get("split") for v in data["videos"] if isinstance(v, dict)}
        if not wanted & present:
            found = ", ".join(sorted(str(s) for s in present))
            raise ValueError(f"{path}: no videos with split {split!r}; splits in the file: {found}")
    return _msrvtt_iter(data["videos"], data["sentences"], path, wanted)


def _msrvtt_iter(
    videos: list[Any], sentences: list[Any], path: str, wanted: set[str] | None
) -> Iterator[dict[str, Any]]:
    captions: dict[str, list[str]] = {}
    # (video_id or None when unreadable, entry): an error is reported with its video's split, or
    # with every split when it cannot be attributed (so that it is counted at least once).
    errors: list[tuple[str | None, dict[str, Any]]] = []
    for idx, s in enumerate(sentences):
        where = f"{path}:sentences[{idx}]"
        vid = s.get("video_id") if isinstance(s, dict) else None
        if not isinstance(s, dict):
            errors.append((None, _bad(where, "not a JSON object", f"got {_type(s)}")))
        elif not _is_id(vid):
            errors.append((None, _bad(where, "bad video_id", f"got {vid!r}")))
        elif not isinstance(s.get("caption"), str):
            errors.append(
                (str(vid), _bad(where, "bad caption", f"expected a string, got {_type(s.get('caption'))}"))
            )
        else:
            captions.setdefault(str(vid), []).append(s["caption"])
    selected: set[str] = set()
    for idx, v in enumerate(videos):
        where = f"{path}:videos[{idx}]"
        if not isinstance(v, dict):
            yield _bad(where, "not a JSON object", f"got {_type(v)}")
            continue
        if wanted is not None and v.get("split") not in wanted:
            continue
        vid = v.get("video_id")
        if not isinstance(vid, str) or not vid:
            yield _bad(where, "bad video_id", f"got {vid!r}")
            continue
        if vid in selected:
            yield _bad(where, "duplicate video_id", vid)
            continue
        selected.add(vid)
        row: dict[str, Any] = {"id": vid, "video": f"{vid}.mp4"}
        if isinstance(v.get("split"), str):
            row["split"] = v["split"]
        if vid in captions:
            row["captions"] = captions[vid]
        yield _ok(where, vid, row)
    for vid, entry in errors:
        if vid is None or vid in selected:
            yield entry


# ---------------------------------------------------------------------------------------------
# MSVD


def read_name_list(path: str) -> list[tuple[str, str]]:
    """(video name, location) for each line of a split list: first word, ``.avi`` dropped, no repeats.

    Blank lines and ``#`` comments are skipped; the first word is taken, so ``youtube_mapping.txt``
    style lines (``NAME vid17``) work too.
    """
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    with open(path, encoding="utf-8-sig") as fp:
        for no, line in enumerate(fp, 1):
            words = line.split()
            if not words or words[0].startswith("#"):
                continue
            name = words[0].removesuffix(".avi")
            if name not in seen:
                seen.add(name)
                out.append((name, f"{path}:{no}"))
    if not out:
        raise ValueError(f"{path}: the split list names no videos")
    return out


def msvd_entries(
    data: bytes, path: str, split: str | None = None, listed: Sequence[tuple[str, str]] | None = None
) -> Iterator[dict[str, Any]]:
    """Entries of MSVD's ``AllVideoDescriptions.txt`` (``data``: its bytes): one per video.

    Videos are kept in order of first appearance, with their captions in file order. ``split`` is one
    of :data:`MSVD_SPLITS`; ``listed`` ((name, location) pairs, see :func:`read_name_list`) selects by
    name instead and wins over ``split``. A listed video with no description gives a row without
    captions (usable for prediction only). Lines that cannot be read are error entries in every split.
    """
    videos: dict[str, tuple[int, list[str]]] = {}
    errors: list[dict[str, Any]] = []
    for no, raw in enumerate(data.split(b"\n"), 1):
        where = f"{path}:{no}"
        try:
            line = raw.decode("utf-8").strip().lstrip("\ufeff")
        except UnicodeDecodeError as exc:
            errors.append(_bad(where, "not UTF-8", str(exc)))
            continue
        if not line or line.startswith("#"):
            continue
        name, *rest = line.split(None, 1)
        if not _MSVD_NAME.fullmatch(name):
            errors.append(_bad(where, "bad video name", f"{name!r} is not VIDEOID_START_END"))
            continue
        # A name with no caption still declares the video, so the split indices stay put.
        _, captions = videos.setdefault(name, (no, []))
        if rest:
            captions.append(rest[0])
    if listed is not None:
        chosen = {name for name, _ in listed}
    elif split is not None:
        if split not in MSVD_SPLITS:
            raise ValueError(
                f"{path}: unknown MSVD split {split!r}; use train, val, test or a file of video names"
            )
        start, end = MSVD_SPLITS[split]
        chosen = set(sorted(videos)[start:end])
        if not chosen:
            raise ValueError(
                f"{path}: split {split!r} is videos {start}-{end - 1} of the sorted names, "
                f"but the file describes only {len(videos)} videos"
            )
    else:
        chosen = set(videos)
    return _msvd_iter(videos, chosen, listed or (), path, errors)


def _msvd_iter(
    videos: dict[str, tuple[int, list[str]]],
    chosen: set[str],
    listed: Sequence[tuple[str, str]],
    path: str,
    errors: list[dict[str, Any]],
) -> Iterator[dict[str, Any]]:
    for name, (first, captions) in videos.items():
        if name in chosen:
            row: dict[str, Any] = {"id": name, "video": f"{name}.avi"}
            if captions:
                row["captions"] = captions
            yield _ok(f"{path}:{first}", name, row)
    for name, location in listed:
        if name not in videos:
            yield _ok(location, name, {"id": name, "video": f"{name}.avi"})
    yield from errors


# ---------------------------------------------------------------------------------------------
# Recognising a file


_KEY = r'(?<!\\)"{}"\s*:\s*'


def _has_key(head: str, key: str, opens: str = "") -> bool:
    return re.search(_KEY.format(re.escape(key)) + re.escape(opens), head) is not None


def detect_benchmark(path: str) -> str | None:
    """The benchmark format of a ``.json`` or ``.txt`` file, from its first 64 KiB; None when unsure.

    Raises ``ValueError`` for a VQA annotations file named as the dataset path (it needs its questions).
    """
    with open(path, "rb") as fp:
        head = fp.read(_SNIFF_BYTES).decode("utf-8", errors="ignore").lstrip("\ufeff \t\r\n")
    if path.lower().endswith(".txt"):
        for line in head.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                words = line.split(None, 1)
                return "msvd" if len(words) == 2 and _MSVD_NAME.fullmatch(words[0]) else None
        return None
    if not head.startswith("{"):
        return None
    if _has_key(head, "questions", "[") and _has_key(head, "data_subtype"):
        return "vqav2"
    if _has_key(head, "videos", "[") and _has_key(head, "video_id"):
        return "msrvtt"
    if _has_key(head, "annotations", "[") and _has_key(head, "question_id") and not _has_key(head, "images"):
        raise ValueError(
            f"{path} looks like a VQA annotations file: set path to its questions file, "
            "annotations to this file and format to vqav2"
        )
    if (
        re.match(r'\{\s*"[^"\\]*"\s*:\s*\{', head)
        and _has_key(head, "imageId")
        and _has_key(head, "question")
    ):
        return "gqa"
    return None


# ---------------------------------------------------------------------------------------------
# Conversion and the reader


def _entries(reader: str, path: str, split: str | None, extra: str | None) -> Iterator[dict[str, Any]]:
    if reader == "vqav2":
        annotations = load_json(extra) if extra is not None else None
        return vqa_entries(load_json(path), path, annotations, extra)
    if reader == "gqa":
        return gqa_entries(load_json(path), path)
    if reader == "msrvtt":
        return msrvtt_entries(load_json(path), path, split)
    listed = read_name_list(extra) if extra is not None else None
    with open(path, "rb") as fp:
        data = fp.read()
    return msvd_entries(data, path, None if listed is not None else split, listed)


class BenchmarkSource:
    """Map-style reader over a benchmark file: ``vqav2``, ``okvqa``, ``gqa``, ``msrvtt`` or ``msvd``.

    ``annotations`` is the VQA answers file; ``split`` selects MSR-VTT / MSVD videos (for MSVD, a value
    other than train/val/test is a path to a list of video names). ``require_references=False``
    accepts rows without answers or captions, for prediction. Images and videos are resolved against
    ``root`` (default: the annotation file's folder).
    """

    def __init__(
        self,
        format: str,
        path: str | Path,
        root: str | Path | None = None,
        split: str | None = None,
        annotations: str | Path | None = None,
        cache_dir: str | Path | None = None,
        require_references: bool = True,
    ) -> None:
        if format not in BENCHMARK_FORMATS:
            raise ValueError(f"unknown benchmark format {format!r}; one of {', '.join(BENCHMARK_FORMATS)}")
        reader = _READER.get(format, format)
        if split is not None and reader not in SPLIT_FORMATS:
            raise ValueError(f"{path}: split={split!r} does not apply to the {format} format")
        if annotations is not None and reader != "vqav2":
            raise ValueError(f"{path}: annotations does not apply to the {format} format")
        self.format = format
        self.path, self.root = _annotation_paths(path, root)
        self.split = split
        self.require_references = require_references
        extra = None
        if annotations is not None:
            extra = _existing(annotations, "annotations file")
        elif reader == "msvd" and split is not None and split not in MSVD_SPLITS:
            extra = _existing(
                split, "MSVD split list (split must be train, val, test or a file of video names)"
            )
        self.annotations = extra if reader == "vqav2" else None
        inputs = [self.path] + ([extra] if extra is not None else [])
        self.converted_path = str(
            cached_conversion(
                inputs,
                f"{reader}:{split}:{extra}",
                lambda: _entries(reader, self.path, split, extra),
                cache_dir,
            )
        )
        self._rows = JsonlSource(self.converted_path, root=self.root, cache_dir=cache_dir)

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, i: int) -> Record:
        entry, line = self._rows.read_json(i)
        # The cache is ours, but a damaged one should still fail as a RecordError, not a KeyError.
        if not isinstance(entry, dict) or not isinstance(entry.get("location"), str):
            raise RecordError(f"{self.converted_path}:{line}", "damaged conversion cache")
        if "error" in entry:
            reason, detail = entry["error"]
            raise RecordError(entry["location"], reason, detail)
        return parse_row(
            entry.get("row"),
            entry["location"],
            str(entry.get("key", line)),
            self.root,
            require_references=self.require_references,
        )

    def close(self) -> None:
        self._rows.close()

    def __repr__(self) -> str:
        return f"BenchmarkSource({self.format!r}, {self.path!r}, split={self.split!r}, rows={len(self)})"


def _existing(path: str | Path, what: str) -> str:
    file = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{what} not found: {file}")
    return file


def open_benchmark(
    ds: DatasetConfig, fmt: str, label: str, cache_dir: str | Path | None, require_references: bool
) -> BenchmarkSource:
    """:class:`BenchmarkSource` for a configured dataset; a missing ``annotations`` file is a ConfigError."""
    from evlgen.config import ConfigError

    if ds.annotations is not None:
        file = os.path.abspath(os.path.expanduser(ds.annotations))
        if not os.path.isfile(file):
            raise ConfigError(f"dataset {label}: annotations={ds.annotations!r}: file {file} does not exist")
    return BenchmarkSource(
        fmt,
        os.path.expanduser(ds.path),
        root=ds.root,
        split=ds.split,
        annotations=ds.annotations,
        cache_dir=cache_dir,
        require_references=require_references,
    )
