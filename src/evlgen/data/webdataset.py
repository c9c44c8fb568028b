"""WebDataset tar shards in the img2dataset layout, streamed member by member.

A sample is the group of consecutive members sharing a key (``000123.jpg`` + ``000123.txt`` [+
``000123.json``]); a video sample has ``000123.mp4`` (or another VIDEO_EXTENSIONS member) instead of
the image. Shards are named by a file, a folder, a glob or a brace range; a broken or
truncated shard yields a :class:`RecordError` and ends, never raising into the training loop.
"""

from __future__ import annotations

import glob
import json
import os
import posixpath
import re
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from evlgen.data.records import Record, RecordError, text_fields

__all__ = ["IMAGE_EXTENSIONS", "VIDEO_EXTENSIONS", "WebDatasetSource", "expand_braces", "resolve_shards"]

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "avi", "mov", "m4v")

GLOB_CHARS = re.compile(r"[*?\[]")
_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")


def _split_top_level(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for pos, char in enumerate(text):
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:pos])
            start = pos + 1
    parts.append(text[start:])
    return parts


def expand_braces(pattern: str) -> list[str]:
    """Shell-style brace expansion: ``{00..12}`` (zero-padded like the bounds) and ``{a,b}``, nested.

    A brace group that is neither a range nor a comma list is kept literally, as bash does.
    """
    start = pattern.find("{")
    while start >= 0:
        depth = 0
        for end in range(start, len(pattern)):
            depth += {"{": 1, "}": -1}.get(pattern[end], 0)
            if depth == 0:
                break
        else:
            return [pattern]  # unbalanced: nothing to expand
        prefix, inner, suffix = pattern[:start], pattern[start + 1 : end], pattern[end + 1 :]
        rng = _RANGE.fullmatch(inner)
        if rng:
            lo_text, hi_text = rng.groups()
            lo, hi = int(lo_text), int(hi_text)
            padded = any(len(t.lstrip("-")) > 1 and t.lstrip("-").startswith("0") for t in (lo_text, hi_text))
            width = max(len(lo_text), len(hi_text)) if padded else 0
            step = 1 if hi >= lo else -1
            options = [f"{n:0{width}d}" for n in range(lo, hi + step, step)]
        else:
            options = _split_top_level(inner)
            if len(options) == 1:
                start = pattern.find("{", start + 1)
                continue
        tails = expand_braces(suffix)
        return [
            prefix + head + tail for option in options for head in expand_braces(option) for tail in tails
        ]
    return [pattern]


def resolve_shards(spec: str) -> tuple[list[str], list[str]]:
    """``(existing shards, missing shards)`` for a tar file, a folder of tars, a glob or a brace range.

    Shards come back sorted and absolute. Only brace ranges can name missing shards (img2dataset leaves
    gaps where a shard failed to download).
    """
    spec = os.path.expanduser(spec)
    if os.path.isdir(spec):
        found = [p for p in glob.glob(os.path.join(glob.escape(spec), "*.tar")) if os.path.isfile(p)]
        return sorted(os.path.abspath(p) for p in found), []
    if os.path.isfile(spec):
        return [os.path.abspath(spec)], []
    found: set[str] = set()
    missing: set[str] = set()
    for candidate in expand_braces(spec):
        if GLOB_CHARS.search(candidate):
            found.update(os.path.abspath(p) for p in glob.glob(candidate) if os.path.isfile(p))
        elif os.path.isfile(candidate):
            found.add(os.path.abspath(candidate))
        else:
            missing.add(os.path.abspath(candidate))
    return sorted(found), sorted(missing - found)


def _sample_key(member_name: str) -> tuple[str, str, str] | None:
    """(key, extension, base name) of a shard member, or None for hidden/metadata files."""
    name = member_name[2:] if member_name.startswith("./") else member_name
    folder, base = posixpath.split(name)
    if not base or base.startswith((".", "_")) or "." not in base:
        return None
    stem, ext = base.split(".", 1)
    return (posixpath.join(folder, stem) if folder else stem), ext.lower(), base


class WebDatasetSource:
    """Streaming reader over WebDataset tar shards in the img2dataset layout.

    A sample is a run of consecutive members sharing a key (``000123.jpg``, ``000123.txt``,
    ``000123.json``). Bad samples and damaged shards are yielded as :class:`RecordError` so the caller
    can count them; iteration never raises for bad data.
    """

    def __init__(self, spec: str | Path) -> None:
        self.spec = os.fspath(spec)
        self.shards, self.missing = resolve_shards(self.spec)
        if not self.shards:
            raise FileNotFoundError(f"no WebDataset shards match {self.spec!r}")

    def __repr__(self) -> str:
        return f"WebDatasetSource({self.spec!r}, shards={len(self.shards)})"

    def iter_shard(self, shard: str) -> Iterator[Record | RecordError]:
        """Every sample of one shard in file order, as a Record or a RecordError."""
        try:
            tar = tarfile.open(shard, mode="r|*")
        except (OSError, tarfile.TarError, EOFError, zlib.error) as exc:
            yield RecordError(shard, "unreadable shard", f"{type(exc).__name__}: {exc}")
            return
        key: str | None = None
        files: dict[str, tuple[str, bytes]] = {}
        done = 0
        try:
            try:
                for member in tar:
                    if not member.isfile():
                        continue
                    parts = _sample_key(member.name)
                    if parts is None:
                        continue
                    member_key, ext, base = parts
                    if member_key != key:
                        # Hand out the finished sample before reading on, so damage further along the
                        # shard cannot take it down too.
                        if key is not None:
                            yield _make_sample(shard, key, files)
                            done += 1
                        key, files = member_key, {}
                    handle = tar.extractfile(member)
                    files[ext] = (base, handle.read() if handle is not None else b"")
            except (OSError, tarfile.TarError, EOFError, zlib.error) as exc:
                yield _truncated(shard, key, done, f"{type(exc).__name__}: {exc}")
                return
            if _lacks_end_marker(tar):
                # Cut off exactly between two members: tarfile reads that as a normal end, but the last
                # sample may be missing files.
                yield _truncated(shard, key, done, "no end-of-archive marker")
                return
            if key is not None:
                yield _make_sample(shard, key, files)
        finally:
            tar.close()


def _truncated(shard: str, key: str | None, done: int, detail: str) -> RecordError:
    # The sample being read when the data ran out is dropped: some of its files may be lost.
    where = f"{shard}:{key}" if key is not None else shard
    inside = f", inside sample {key}" if key is not None else ""
    return RecordError(
        where, "truncated or corrupt shard", f"after {done} complete samples{inside}: {detail}"
    )


def _lacks_end_marker(tar: tarfile.TarFile) -> bool:
    # A tar ends with two zero blocks after the last member; without them the archive was cut between
    # two members. tarfile stops at the marker, so read what follows (normally just padding) to learn
    # how long the (decompressed) stream really is; a cut compressed stream just ends early here.
    stream = tar.fileobj
    try:
        while stream.read(1 << 16):
            pass
    except (OSError, EOFError, zlib.error, tarfile.TarError):
        return True
    length = getattr(stream, "pos", None)
    return isinstance(length, int) and length < tar.offset + 2 * tarfile.BLOCKSIZE


def _make_sample(shard: str, key: str, files: dict[str, tuple[str, bytes]]) -> Record | RecordError:
    where = f"{shard}:{key}"
    try:
        text: dict[str, Any] = {}
        if "json" in files:
            base, data = files["json"]
            try:
                meta = json.loads(data.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise RecordError(where, "undecodable text", f"{base}: {exc}") from None
            if isinstance(meta, dict):
                text = {
                    k: meta[k] for k in ("caption", "captions", "question", "answers", "answer") if k in meta
                }
        if "txt" in files:
            base, data = files["txt"]
            try:
                # The .txt caption wins over the copy img2dataset also stores in the .json.
                text["caption"] = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise RecordError(where, "undecodable text", f"{base}: {exc}") from None
        image = next((files[e] for e in IMAGE_EXTENSIONS if e in files), None)
        video = next((files[e] for e in VIDEO_EXTENSIONS if e in files), None) if image is None else None
        if image is None and video is None:
            media = "/.".join(IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)
            raise RecordError(where, "no image", f"no .{media} file in the sample")
        captions, question, answers = text_fields(text, where)
    except RecordError as exc:
        return exc
    member = image if image is not None else video
    assert member is not None
    return Record(
        location=where,
        key=key,
        image=image[1] if image is not None else None,
        video=video[1] if video is not None else None,
        captions=captions,
        question=question,
        answers=answers,
        name=member[0],
    )
