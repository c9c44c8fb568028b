"""Annotation rows: the `Record` every reader produces, the row schema, and the one error type.

A row names its image or video (a path resolved against a root, or bytes from a shard) and its text:
caption rows carry one or more captions, VQA rows a question and answers. A row that cannot be used
becomes a :class:`RecordError` whose message starts with a location a person can open.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["META_FIELDS", "MapSource", "Record", "RecordError", "parse_row", "text_fields"]

# Row fields copied into ``Record.meta`` when they hold a string or an integer: what scoring and
# prediction files need beyond the text (EvalAI wants question ids, NoCaps CIDEr is reported per
# domain, VQAv2 accuracy per answer type).
META_FIELDS: tuple[str, ...] = ("question_id", "image_id", "domain", "answer_type", "question_type")


@dataclass(frozen=True)
class Record:
    """One annotation row, before any image file is opened."""

    # Where the row came from, for error messages: "/abs/train.jsonl:123", "/abs/shard-000.tar:KEY".
    location: str
    # Stable id: the row's "id", else the line number (jsonl), sample key (webdataset) or image id (coco).
    key: str
    # Absolute path, or the encoded bytes of a shard member; None for video rows.
    image: str | bytes | None
    # Absolute path, or the bytes of a shard's video member (.mp4, ...); None for image rows.
    video: str | bytes | None = None
    captions: tuple[str, ...] = ()
    question: str | None = None
    answers: tuple[str, ...] = ()
    # File name of the image or video inside a shard (e.g. "000123.jpg"), for messages and decoder hints.
    name: str | None = None
    # The row's META_FIELDS that are set (e.g. {"question_id": 262148000, "answer_type": "other"}).
    # Left out of the hash so that a Record stays hashable.
    meta: dict[str, str | int] = dataclasses.field(default_factory=dict, hash=False)


class RecordError(ValueError):
    """A row that cannot be used (bad JSON, missing or empty fields, no image).

    ``reason`` is a short category shared by all rows with the same defect (what ``evlgen data check``
    counts); ``detail`` is specific to this row. The message is ``"LOCATION: reason (detail)"``.
    """

    def __init__(self, location: str, reason: str, detail: str | None = None) -> None:
        self.location = location
        self.reason = reason
        self.detail = detail
        super().__init__(f"{location}: {reason}" + (f" ({detail})" if detail else ""))

    def __reduce__(self) -> tuple[Any, ...]:
        # Streaming readers yield these from DataLoader workers, so they must survive pickling; the
        # default reduce would call __init__ with the formatted message only.
        return (type(self), (self.location, self.reason, self.detail))


class MapSource(Protocol):
    """What map-style sources share: a length and random access by row index."""

    def __len__(self) -> int: ...

    def get(self, i: int) -> Record: ...


# ---------------------------------------------------------------------------------------------
# Row schema


def _strings(value: Any, field: str, where: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        out = []
        for item in value:
            # Official VQA annotations hold answers as {"answer": ..., "answer_confidence": ...}.
            if isinstance(item, dict) and isinstance(item.get("answer"), str):
                item = item["answer"]
            if not isinstance(item, str):
                raise RecordError(where, f"bad {field}", f"expected strings, got {type(item).__name__}")
            out.append(item)
        return out
    raise RecordError(where, f"bad {field}", f"expected a string or a list, got {type(value).__name__}")


def text_fields(
    obj: dict[str, Any], where: str, require_references: bool = True
) -> tuple[tuple[str, ...], str | None, tuple[str, ...]]:
    """Captions, question and answers of a row, validated and stripped.

    With ``require_references=False`` a row may have no caption (an image to caption) and a question
    may have no answers (VQA test-dev): such rows can be predicted on, not trained or scored on. A
    caption or question that is present but empty is still an error.
    """
    captions: list[str] = []
    seen_caption_field = False
    for field in ("caption", "captions"):
        value = obj.get(field)
        if value is None:
            continue
        seen_caption_field = True
        items = _strings(value, field, where)
        if isinstance(value, str) and not value.strip():
            raise RecordError(where, "empty caption")
        captions.extend(s.strip() for s in items if s.strip())
    if seen_caption_field and not captions:
        raise RecordError(where, "empty caption")

    question = obj.get("question")
    answers: tuple[str, ...] = ()
    if question is not None:
        if not isinstance(question, str):
            raise RecordError(where, "bad question", f"expected a string, got {type(question).__name__}")
        if not question.strip():
            raise RecordError(where, "empty question")
        raw = obj.get("answers", obj.get("answer"))
        # Repeated answers are kept: VQA accuracy counts how many annotators gave each one.
        answers = (
            tuple(a.strip() for a in _strings(raw, "answers", where) if a.strip()) if raw is not None else ()
        )
        if not answers and require_references:
            raise RecordError(where, "question without answers")
        question = question.strip()
    if not captions and question is None and require_references:
        raise RecordError(where, "no caption or question")
    return tuple(captions), question, answers


def _resolve(value: Any, field: str, root: str, where: str) -> str:
    if not isinstance(value, str):
        raise RecordError(where, f"bad {field} path", f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise RecordError(where, f"empty {field} path")
    return value if os.path.isabs(value) else os.path.join(root, value)


def _meta(obj: dict[str, Any]) -> dict[str, str | int]:
    # Metadata never decides whether a row can be trained on, so a value of another type is dropped
    # rather than turned into an error that would cost a usable sample.
    return {
        name: value
        for name in META_FIELDS
        if isinstance(value := obj.get(name), str | int) and not isinstance(value, bool)
    }


def parse_row(obj: Any, location: str, key: str, root: str, *, require_references: bool = True) -> Record:
    """Validate one decoded JSON row and resolve its paths against ``root``.

    ``key`` is used when the row has no ``"id"``. ``require_references=False`` accepts rows without
    captions or answers, for prediction (see :func:`text_fields`). Raises :class:`RecordError` naming
    ``location``.
    """
    if not isinstance(obj, dict):
        raise RecordError(location, "not a JSON object", f"got {type(obj).__name__}")
    image, video = obj.get("image"), obj.get("video")
    if image is not None and video is not None:
        raise RecordError(location, "both image and video")
    if image is None and video is None:
        raise RecordError(location, "no image or video")
    image_path = _resolve(image, "image", root, location) if image is not None else None
    video_path = _resolve(video, "video", root, location) if video is not None else None
    captions, question, answers = text_fields(obj, location, require_references)
    row_id = obj.get("id")
    return Record(
        location=location,
        key=str(row_id) if row_id is not None else key,
        image=image_path,
        video=video_path,
        captions=captions,
        question=question,
        answers=answers,
        meta=_meta(obj),
    )
