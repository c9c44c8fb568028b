"""``evlgen data check PATH``: read a whole dataset once and report what training would trip over.

Every row is read through the same reader and image decoder the training pipeline uses, so a row this
check calls usable is one training can use. The report counts bad rows by reason, missing files and
undecodable images, summarises caption and VQA statistics, and lists the first problems with their
file and line, so they can be fixed before a long run rather than skipped silently during it.

Statistics are kept as histograms (word count -> captions), so memory does not grow with the number of
captions; only the per-image caption counts of map-style sources grow with the number of images.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evlgen.config import DatasetConfig
from evlgen.data.sources import (
    CocoSource,
    JsonlSource,
    Record,
    RecordError,
    WebDatasetSource,
    is_streaming,
    iter_records,
    open_source,
)
from evlgen.data.transforms import DEFAULT_MAX_PIXELS, ImageLoadError, load_image

__all__ = ["DataReport", "Problem", "Stats", "check_dataset", "format_report", "main_check"]

# Captions above this many words are counted: the paper trains with max_text_len 32 (tokens), so much
# longer captions get truncated.
LONG_CAPTION_WORDS = 32


@dataclass(frozen=True)
class Stats:
    """Summary of a distribution of non-negative integers (median and p95 interpolate linearly)."""

    count: int = 0
    min: int = 0
    mean: float = 0.0
    median: float = 0.0
    p95: float = 0.0
    max: int = 0

    @staticmethod
    def from_histogram(hist: dict[int, int]) -> Stats:
        """Stats of the values ``v`` repeated ``hist[v]`` times; all zero when empty."""
        items = sorted((v, n) for v, n in hist.items() if n > 0)
        total = sum(n for _, n in items)
        if total == 0:
            return Stats()
        mean = sum(v * n for v, n in items) / total
        return Stats(
            count=total,
            min=items[0][0],
            mean=mean,
            median=_quantile(items, total, 0.5),
            p95=_quantile(items, total, 0.95),
            max=items[-1][0],
        )


def _quantile(items: list[tuple[int, int]], total: int, q: float) -> float:
    """numpy's default (linear) percentile, computed from a sorted histogram."""
    pos = q * (total - 1)
    lo_rank, frac = int(math.floor(pos)), pos - math.floor(pos)

    def value_at(rank: int) -> int:
        seen = 0
        for value, n in items:
            seen += n
            if rank < seen:
                return value
        return items[-1][0]

    lo = value_at(lo_rank)
    return float(lo) if frac == 0 else lo + (value_at(lo_rank + 1) - lo) * frac


@dataclass(frozen=True)
class Problem:
    """One unusable row: where it is (file and line, shard and key) and what is wrong."""

    location: str
    message: str


@dataclass(frozen=True)
class DataReport:
    """What :func:`check_dataset` found. Counts are in rows (samples for shards)."""

    dataset: str
    path: str
    format: str
    # Rows read (blank lines excluded), and rows the training pipeline can use.
    rows: int
    usable: int
    # Rows rejected before any file is opened, by reason (bad JSON, empty caption, ...).
    bad_rows: dict[str, int]
    # Rows whose image or video file does not exist.
    missing_files: int
    # Rows whose image could not be decoded (corrupt, truncated, not an image, over max_pixels).
    bad_images: int
    # Rows whose video does not open or decode.
    bad_videos: int
    # Distinct image/video files among the usable rows (each shard sample counts as its own image).
    images: int
    videos: int
    words_per_caption: Stats
    captions_per_image: Stats
    long_captions: int
    questions: int
    answers_per_question: Stats
    # Total problems and the first `max_problems` of them.
    problem_count: int
    problems: tuple[Problem, ...]
    shards: int = 0
    missing_shards: tuple[str, ...] = ()
    limited: bool = False
    notes: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return self.problem_count == 0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable data (tuples become lists)."""
        out = dataclasses.asdict(self)
        out["ok"] = self.ok
        return json.loads(json.dumps(out))


class _Tally:
    """Mutable counters while reading; frozen into a DataReport at the end."""

    def __init__(self, max_problems: int) -> None:
        self.max_problems = max_problems
        self.rows = 0
        self.usable = 0
        self.bad_rows: Counter[str] = Counter()
        self.missing = 0
        self.bad_images = 0
        self.bad_videos = 0
        self.problem_count = 0
        self.problems: list[Problem] = []
        self.words: Counter[int] = Counter()
        self.answers: Counter[int] = Counter()
        self.long = 0
        self.questions = 0
        # Caption count per image file, so one-row-per-caption files still give captions per image.
        self.per_image: Counter[str] = Counter()
        self.videos: set[str] = set()
        self.streamed_images = 0
        self.streamed_captions: Counter[int] = Counter()

    def problem(self, location: str, message: str) -> None:
        self.problem_count += 1
        if len(self.problems) < self.max_problems:
            self.problems.append(Problem(location, message))

    def bad_row(self, err: RecordError) -> None:
        self.rows += 1
        self.bad_rows[err.reason] += 1
        self.problem(err.location, str(err)[len(err.location) + 2 :])


class _MediaChecker:
    """Opens each file once (rows often repeat an image, one row per caption) and remembers the result."""

    def __init__(self, verify_images: bool, max_pixels: int) -> None:
        self.verify_images = verify_images
        self.max_pixels = max_pixels
        self.seen: dict[str, tuple[str, str] | None] = {}
        self.have_av: bool | None = None

    def check(self, rec: Record) -> tuple[str, str] | None:
        """None when usable, else (kind, message) with kind "missing", "image" or "video"."""
        if isinstance(rec.image, bytes):
            return self._decode(rec.image, rec.name or rec.location)
        if isinstance(rec.video, bytes):
            return self._check_video(rec.video, rec.location)
        path = rec.image if rec.image is not None else rec.video
        assert path is not None  # parse_row guarantees one of them
        if path not in self.seen:
            self.seen[path] = self._check_file(path, is_video=rec.video is not None)
        return self.seen[path]

    def _decode(self, source: str | bytes, name: str) -> tuple[str, str] | None:
        if not self.verify_images:
            return None
        try:
            load_image(source, self.max_pixels, name=name)
        except ImageLoadError as exc:
            return "image", str(exc)
        return None

    def _check_file(self, path: str, is_video: bool) -> tuple[str, str] | None:
        if not os.path.isfile(path):
            return "missing", f"file not found: {path}"
        if not is_video:
            return self._decode(path, path)
        return self._check_video(path, path)

    def _check_video(self, source: str | bytes, name: str) -> tuple[str, str] | None:
        if not self.verify_images or not self.av_available():
            return None
        from evlgen.data.video import check_video

        try:
            check_video(source, self.max_pixels, name=name)
        except ImageLoadError as exc:
            return "video", str(exc)
        return None

    def av_available(self) -> bool:
        if self.have_av is None:
            try:
                import av  # noqa: F401
            except ImportError:
                self.have_av = False
            else:
                self.have_av = True
        return self.have_av


def _records(source: Any, limit: int | None) -> Iterator[Record | RecordError]:
    return itertools.islice(iter_records(source), limit)


def _format_name(source: Any) -> str:
    from evlgen.data.benchmarks import BenchmarkSource

    if isinstance(source, BenchmarkSource):
        return source.format
    if isinstance(source, CocoSource):
        return "coco"
    if isinstance(source, JsonlSource):
        return "jsonl"
    if isinstance(source, WebDatasetSource):
        return "webdataset"
    return type(source).__name__


def check_dataset(
    ds: DatasetConfig,
    *,
    max_problems: int = 20,
    verify_images: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    limit: int | None = None,
    cache_dir: str | Path | None = None,
) -> DataReport:
    """Read every row of ``ds`` (the first ``limit`` rows if given) and report what is wrong with it.

    With ``verify_images`` every image is fully decoded under ``max_pixels`` (videos are opened and
    their first frame decoded, when PyAV is installed); without it only file existence is checked.
    Raises what :func:`evlgen.data.sources.open_source` raises when the dataset cannot be opened.
    """
    source = open_source(ds, cache_dir=cache_dir)
    tally = _Tally(max_problems)
    media = _MediaChecker(verify_images, max_pixels)
    notes: list[str] = []
    missing_shards: tuple[str, ...] = ()
    if isinstance(source, WebDatasetSource):
        missing_shards = tuple(source.missing)
        for shard in missing_shards:
            tally.problem(shard, "shard named by the pattern does not exist")

    read = 0
    for rec in _records(source, limit):
        read += 1
        if isinstance(rec, RecordError):
            tally.bad_row(rec)
            continue
        tally.rows += 1
        failure = media.check(rec)
        if failure is not None:
            kind, message = failure
            if kind == "missing":
                tally.missing += 1
            elif kind == "video":
                tally.bad_videos += 1
            else:
                tally.bad_images += 1
            tally.problem(rec.location, message)
            continue
        tally.usable += 1
        for caption in rec.captions:
            words = len(caption.split())
            tally.words[words] += 1
            tally.long += words > LONG_CAPTION_WORDS
        if rec.question is not None:
            tally.questions += 1
            tally.answers[len(rec.answers)] += 1
        if rec.video is not None:
            tally.videos.add(rec.video if isinstance(rec.video, str) else rec.location)
        elif isinstance(rec.image, str):
            tally.per_image[rec.image] += len(rec.captions)
        else:
            tally.streamed_images += 1
            tally.streamed_captions[len(rec.captions)] += 1

    limited = limit is not None and read >= limit and (is_streaming(source) or len(source) > limit)
    if limited:
        notes.append(f"stopped after the first {limit} rows")
    if not verify_images:
        notes.append("images were not decoded (only their existence was checked)")
    elif tally.videos and not media.av_available():
        notes.append("videos were not opened: PyAV is not installed (pip install av)")

    # Images seen only in VQA rows have no captions and stay out of the captions-per-image figure.
    captions_per_image = Counter(n for n in tally.per_image.values() if n > 0)
    for n, images in tally.streamed_captions.items():
        if n > 0:
            captions_per_image[n] += images
    return DataReport(
        dataset=ds.name or ds.path,
        path=ds.path,
        format=_format_name(source),
        rows=tally.rows,
        usable=tally.usable,
        bad_rows=dict(sorted(tally.bad_rows.items(), key=lambda kv: (-kv[1], kv[0]))),
        missing_files=tally.missing,
        bad_images=tally.bad_images,
        bad_videos=tally.bad_videos,
        images=len(tally.per_image) + tally.streamed_images,
        videos=len(tally.videos),
        words_per_caption=Stats.from_histogram(tally.words),
        captions_per_image=Stats.from_histogram(captions_per_image),
        long_captions=tally.long,
        questions=tally.questions,
        answers_per_question=Stats.from_histogram(tally.answers),
        problem_count=tally.problem_count,
        problems=tuple(tally.problems),
        shards=len(source.shards) if isinstance(source, WebDatasetSource) else 0,
        missing_shards=missing_shards,
        limited=limited,
        notes=tuple(notes),
    )


def _stats_row(label: str, s: Stats) -> str:
    if s.count == 0:
        return f"  {label:<22}{'-':>9}"
    return f"  {label:<22}{s.count:>9}{s.min:>7}{s.mean:>9.2f}{s.median:>9.1f}{s.p95:>9.1f}{s.max:>7}"


def format_report(report: DataReport) -> str:
    """A readable summary: counts, a statistics table, then the problems with their locations."""
    r = report
    where = f"{r.format}: {r.path}" if r.dataset != r.path else r.format
    lines = [f"dataset {r.dataset}  ({where})"]
    if r.shards:
        lines.append(f"  shards                {r.shards:>9}")
    if r.missing_shards:
        lines.append(f"  missing shards        {len(r.missing_shards):>9}")
    lines.append(f"  rows                  {r.rows:>9}")
    lines.append(f"  usable                {r.usable:>9}")
    bad_total = sum(r.bad_rows.values())
    lines.append(f"  bad rows              {bad_total:>9}")
    for reason, n in r.bad_rows.items():
        lines.append(f"    {reason:<20}{n:>9}")
    lines.append(f"  missing files         {r.missing_files:>9}")
    lines.append(f"  unreadable images     {r.bad_images:>9}")
    if r.videos or r.bad_videos:
        lines.append(f"  unreadable videos     {r.bad_videos:>9}")
    lines.append(f"  images                {r.images:>9}")
    if r.videos:
        lines.append(f"  videos                {r.videos:>9}")
    lines.append(f"  questions             {r.questions:>9}")
    lines.append("")
    lines.append(f"  {'(usable rows)':<22}{'count':>9}{'min':>7}{'mean':>9}{'median':>9}{'p95':>9}{'max':>7}")
    lines.append(_stats_row("words per caption", r.words_per_caption))
    lines.append(_stats_row("captions per image", r.captions_per_image))
    lines.append(_stats_row("answers per question", r.answers_per_question))
    lines.append(f"  captions over {LONG_CAPTION_WORDS} words: {r.long_captions}")
    for note in r.notes:
        lines.append(f"  note: {note}")
    lines.append("")
    if r.problem_count == 0:
        lines.append("no problems found")
    else:
        shown = len(r.problems)
        more = f" (first {shown} shown)" if shown < r.problem_count else ""
        lines.append(f"{r.problem_count} problem{'s' if r.problem_count != 1 else ''}{more}:")
        lines.extend(f"  {p.location}: {p.message}" for p in r.problems)
    return "\n".join(lines)


def main_check(
    path: str,
    format: str = "auto",
    root: str | None = None,
    split: str | None = None,
    as_json: bool = False,
    limit: int | None = None,
    annotations: str | None = None,
) -> int:
    """Check one dataset and print the report (text or JSON) to stdout.

    Returns 0 when no problems were found, 1 when some were, and 2 when the dataset cannot be opened
    (the reason is printed to stderr).
    """
    ds = DatasetConfig(path=path, format=format, root=root, split=split, annotations=annotations)  # type: ignore[arg-type]
    try:
        report = check_dataset(ds, limit=limit)
    except (FileNotFoundError, ValueError, NotImplementedError, OSError) as exc:
        print(f"evlgen data check: {exc}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(format_report(report))
    return 0 if report.ok else 1
