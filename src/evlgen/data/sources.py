"""Annotation readers: turn a dataset on disk into :class:`Record` rows without holding it in memory.

Three kinds of source, two interfaces:

* map-style (``len(source)`` and ``source.get(i)``): :class:`JsonlSource` over a JSON-lines file, and
  :class:`CocoSource` over a COCO-style ``.json`` (Karpathy split file, official captions file, or a
  LAVIS-style array of rows), which is converted once into a cached JSON-lines file; the benchmark
  files (VQAv2 / OK-VQA, GQA, MSR-VTT, MSVD) are read the same way by ``benchmarks.py``;
* streaming (``source.shards`` and ``source.iter_shard(shard)``): :class:`WebDatasetSource` over tar
  shards in the img2dataset layout (defined in ``webdataset.py``, re-exported here).

:func:`open_source` picks the reader for a configured dataset, feature caches included.

A JSON-lines file is never loaded whole: a table of line offsets is built once, saved under the cache
folder, and memory-mapped, so DataLoader workers share it through the page cache. Every reader is
picklable; open files are reopened lazily in each process.

Rows that cannot be used raise (map-style) or yield (streaming) :class:`RecordError`, whose message
starts with a location a person can open: ``/abs/train.jsonl:123`` (1-based line number),
``/abs/shard-000.tar:000123`` or ``/abs/dataset_coco.json:images[17]``. No image file is opened here.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import posixpath
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from evlgen.data.records import MapSource, Record, RecordError, parse_row
from evlgen.data.webdataset import GLOB_CHARS, WebDatasetSource, expand_braces, resolve_shards
from evlgen.fsutil import atomic_write

if TYPE_CHECKING:
    from evlgen.config import DatasetConfig

__all__ = [
    "CocoSource",
    "JsonlSource",
    "MapSource",
    "Record",
    "RecordError",
    "WebDatasetSource",
    "default_cache_dir",
    "expand_braces",
    "get_or_error",
    "is_streaming",
    "iter_records",
    "open_source",
    "parse_row",
    "resolve_shards",
]

# Bumped whenever the layout of cached index or conversion files changes, so stale caches are ignored.
_CACHE_VERSION = 2

# Byte -> "not JSON whitespace"; a line with no such byte is blank and gets no index entry.
_SOLID = np.ones(256, dtype=bool)
_SOLID[list(b" \t\r\n")] = False

_SCAN_CHUNK = 1 << 24


# ---------------------------------------------------------------------------------------------
# Cache files


def default_cache_dir() -> Path:
    """``$EVLGEN_CACHE``, else ``$XDG_CACHE_HOME/evlgen``, else ``~/.cache/evlgen``."""
    explicit = os.environ.get("EVLGEN_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "evlgen"


def _index_dir(cache_dir: str | Path | None) -> Path:
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    folder = base.absolute() / "index"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(
            f"cannot create the evlgen cache folder {folder} ({exc}); set EVLGEN_CACHE to a writable folder"
        ) from exc
    return folder


def _digest(*parts: object) -> str:
    return hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()[:16]


def _signature(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def _cache_name(path: str, variant: str, signature: tuple[int, ...], suffix: str) -> tuple[str, str]:
    """(file name, glob matching every version of it): one file per path/variant, versioned by stat."""
    slug = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(path).stem)[:40]
    stable = f"{slug}-{_digest(_CACHE_VERSION, path, variant)}"
    return f"{stable}-{_digest(*signature)}{suffix}", f"{stable}-*{suffix}"


def _remove_stale(folder: Path, pattern: str, keep: str) -> list[Path]:
    """Delete older versions of a cache file (the annotation file changed since they were written)."""
    removed = []
    for old in folder.glob(pattern):
        if old.name != keep:
            try:
                old.unlink()
                removed.append(old)
            except OSError:
                pass
    return removed


# ---------------------------------------------------------------------------------------------
# JSON lines


def _scan_lines(fp: Any, chunk_size: int = _SCAN_CHUNK) -> np.ndarray:
    """``[n, 2]`` int64: byte offset and 1-based line number of every non-blank line of a binary file."""
    offsets: list[np.ndarray] = []
    numbers: list[np.ndarray] = []
    base = 0  # file offset of buf[0]
    line_no = 1  # line number of the line starting at buf[0]
    carry = b""
    while True:
        block = fp.read(chunk_size)
        buf = carry + block
        if not block:
            # What is left is a last line without a trailing newline.
            if _SOLID[np.frombuffer(buf, dtype=np.uint8)].any():
                offsets.append(np.array([base], dtype=np.int64))
                numbers.append(np.array([line_no], dtype=np.int64))
            break
        arr = np.frombuffer(buf, dtype=np.uint8)
        newlines = np.flatnonzero(arr == 10)
        if newlines.size == 0:
            carry = buf
            continue
        complete = int(newlines[-1]) + 1
        starts = np.concatenate(([0], newlines[:-1] + 1))
        # A line is blank when the count of non-whitespace bytes between its start and newline is 0.
        solid = np.concatenate(([0], np.cumsum(_SOLID[arr[:complete]])))
        keep = solid[newlines] - solid[starts] > 0
        offsets.append(starts[keep].astype(np.int64) + base)
        numbers.append(np.arange(line_no, line_no + starts.size, dtype=np.int64)[keep])
        line_no += starts.size
        base += complete
        carry = buf[complete:]
    if not offsets:
        return np.zeros((0, 2), dtype=np.int64)
    return np.stack([np.concatenate(offsets), np.concatenate(numbers)], axis=1)


def _build_index(path: str, signature: tuple[int, int], cache_dir: str | Path | None) -> Path:
    folder = _index_dir(cache_dir)
    name, pattern = _cache_name(path, "lines", signature, ".npy")
    target = folder / name
    if target.is_file():
        return target
    with open(path, "rb") as fp:
        table = _scan_lines(fp)
    if _signature(path) != signature:
        raise RuntimeError(f"{path} changed while it was being indexed; try again")
    atomic_write(target, lambda fp: np.save(fp, table, allow_pickle=False))
    _remove_stale(folder, pattern, keep=name)
    return target


def _annotation_paths(path: str | Path, root: str | Path | None) -> tuple[str, str]:
    """Absolute annotation file (which must exist) and image root (default: the file's folder)."""
    file = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if not os.path.isfile(file):
        raise FileNotFoundError(f"annotation file not found: {file}")
    folder = os.path.abspath(os.path.expanduser(os.fspath(root))) if root else os.path.dirname(file)
    return file, folder


class JsonlSource:
    """Map-style reader over a JSON-lines annotation file; rows are parsed on demand by :func:`parse_row`.

    Relative paths are resolved against ``root`` (default: the file's folder). The line-offset index is
    built on first open and reused until the file's size or modification time changes.
    ``require_references=False`` accepts rows without captions or answers (for prediction).
    """

    def __init__(
        self,
        path: str | Path,
        root: str | Path | None = None,
        cache_dir: str | Path | None = None,
        require_references: bool = True,
    ) -> None:
        self.path, self.root = _annotation_paths(path, root)
        self.require_references = require_references
        self._signature = _signature(self.path)
        self.index_path = str(_build_index(self.path, self._signature, cache_dir))
        self._fp: Any = None
        self._table_cache: np.ndarray | None = None
        self._pid: int | None = None
        self._len = int(self._table().shape[0])

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        # A memmap pickles as its full contents and file handles not at all: workers reopen both.
        state.update(_fp=None, _table_cache=None, _pid=None)
        return state

    def _claim(self) -> None:
        # A handle inherited through fork shares its file position with the parent and siblings, so
        # every process opens its own.
        pid = os.getpid()
        if self._pid != pid:
            self._fp = None
            self._table_cache = None
            self._pid = pid

    def _table(self) -> np.ndarray:
        self._claim()
        if self._table_cache is None:
            try:
                self._table_cache = np.load(self.index_path, mmap_mode="r", allow_pickle=False)
            except ValueError:
                # Older numpy cannot memory-map a zero-length array; there is nothing to share anyway.
                self._table_cache = np.load(self.index_path, allow_pickle=False)
        return self._table_cache

    def _file(self) -> Any:
        self._claim()
        if self._fp is None:
            fp = open(self.path, "rb")
            st = os.fstat(fp.fileno())
            if (st.st_size, st.st_mtime_ns) != self._signature:
                fp.close()
                raise RuntimeError(f"{self.path} changed since it was indexed; open the dataset again")
            self._fp = fp
        return self._fp

    def close(self) -> None:
        if self._fp is not None:
            self._fp.close()
        self._fp = None
        self._table_cache = None

    def __len__(self) -> int:
        return self._len

    def line_number(self, i: int) -> int:
        """The 1-based line number of row ``i`` in the file (blank lines are counted)."""
        return int(self._table()[self._check(i), 1])

    def _check(self, i: int) -> int:
        if not -self._len <= i < self._len:
            raise IndexError(f"row {i} out of range for {self.path} ({self._len} rows)")
        return i % self._len

    def read_json(self, i: int) -> tuple[Any, int]:
        """Row ``i`` decoded from JSON, and its line number. Raises :class:`RecordError` for bad JSON."""
        offset, line = (int(v) for v in self._table()[self._check(i)])
        fp = self._file()
        fp.seek(offset)
        raw = fp.readline()
        where = f"{self.path}:{line}"
        try:
            # utf-8-sig: editors on Windows put a byte-order mark before the first line.
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise RecordError(where, "not UTF-8", str(exc)) from None
        try:
            return json.loads(text), line
        except json.JSONDecodeError as exc:
            raise RecordError(where, "invalid JSON", f"{exc.msg} at column {exc.colno}") from None

    def get(self, i: int) -> Record:
        obj, line = self.read_json(i)
        return parse_row(
            obj, f"{self.path}:{line}", str(line), self.root, require_references=self.require_references
        )

    def __repr__(self) -> str:
        return f"JsonlSource({self.path!r}, rows={self._len})"


# ---------------------------------------------------------------------------------------------
# COCO-style JSON


def _karpathy_rows(data: dict[str, Any], split: str | None, path: str) -> Iterator[dict[str, Any]]:
    images = data["images"]
    if split is not None:
        # Karpathy's "restval" images are the part of COCO val2014 that the split assigns to training.
        wanted = {"train", "restval"} if split == "train" else {split}
        present = {img.get("split") for img in images if isinstance(img, dict)}
        if not wanted & present:
            found = ", ".join(sorted(str(s) for s in present))
            raise ValueError(f"{path}: no images with split {split!r}; splits in the file: {found}")
    for idx, img in enumerate(images):
        where = f"images[{idx}]"
        if not isinstance(img, dict):
            yield {"where": where, "key": str(idx), "row": img}
            continue
        if split is not None and img.get("split") not in wanted:
            continue
        folder, name = img.get("filepath"), img.get("filename")
        image = posixpath.join(folder, name) if isinstance(folder, str) and isinstance(name, str) else name
        captions = []
        for sentence in img.get("sentences") or []:
            if isinstance(sentence, dict) and isinstance(sentence.get("raw"), str):
                captions.append(sentence["raw"])
            elif isinstance(sentence, dict) and isinstance(sentence.get("tokens"), list):
                captions.append(" ".join(map(str, sentence["tokens"])))
        key = img.get("cocoid", img.get("imgid", idx))
        row = {"id": key, "image": image}
        if captions:
            row["captions"] = captions
        yield {"where": f"{where} (id {key})", "key": str(key), "row": row}


def _official_rows(data: dict[str, Any]) -> Iterator[dict[str, Any]]:
    by_image: dict[Any, list[str]] = {}
    for ann in data.get("annotations") or []:
        if isinstance(ann, dict) and isinstance(ann.get("caption"), str):
            by_image.setdefault(ann.get("image_id"), []).append(ann["caption"])
    for idx, img in enumerate(data["images"]):
        if not isinstance(img, dict):
            yield {"where": f"images[{idx}]", "key": str(idx), "row": img}
            continue
        image_id = img.get("id", idx)
        row: dict[str, Any] = {"id": image_id, "image": img.get("file_name")}
        if image_id in by_image:
            row["captions"] = by_image[image_id]
        # NoCaps images carry their domain (in-domain, near-domain, out-domain); CIDEr is reported per domain.
        if isinstance(img.get("domain"), str):
            row["domain"] = img["domain"]
        yield {"where": f"image id {image_id}", "key": str(image_id), "row": row}


def _coco_rows(path: str, split: str | None) -> Iterator[dict[str, Any]]:
    """Rows of a COCO-style file as ``{"where", "key", "row"}``, the row in the JSON-lines schema."""
    data = load_json(path)
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        first = next((img for img in data["images"] if isinstance(img, dict)), {})
        # Image-info files of unlabelled test splits (COCO test2014, NoCaps test) are official files
        # without "annotations"; their images have "file_name" where Karpathy's have "filename".
        if "annotations" in data or "file_name" in first:
            if split is not None:
                raise ValueError(f"{path}: split={split!r} only applies to a Karpathy dataset_coco.json file")
            return _official_rows(data)
        return _karpathy_rows(data, split, path)
    if isinstance(data, list):
        if split is not None:
            raise ValueError(f"{path}: split={split!r} only applies to a Karpathy dataset_coco.json file")
        return ({"where": f"row {idx}", "key": str(idx), "row": row} for idx, row in enumerate(data))
    raise ValueError(
        f"{path}: unrecognised layout; expected a Karpathy split file ({{'images': [... 'sentences' ...]}}), "
        "an official COCO captions file ({'images': [...], 'annotations': [...]}) or a JSON array of rows"
    )


def load_json(path: str) -> Any:
    """A whole JSON file; bad JSON or non-UTF-8 bytes are a ValueError naming the file and place."""
    try:
        with open(path, "rb") as fp:
            return json.load(fp)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 ({exc})") from None


def cached_conversion(
    inputs: Sequence[str],
    variant: str,
    rows: Callable[[], Iterable[dict[str, Any]]],
    cache_dir: str | Path | None,
) -> Path:
    """The JSON-lines conversion of annotation files, written unless one for these exact files exists.

    Named after ``inputs[0]``, ``variant`` (reader and options) and every input's size and mtime;
    ``rows()`` is only called when the cache is missing. Older conversions of the same file (and their
    line indexes) are removed.
    """
    folder = _index_dir(cache_dir)
    signature = tuple(n for p in inputs for n in _signature(p))
    name, pattern = _cache_name(inputs[0], variant, signature, ".jsonl")
    target = folder / name
    if target.is_file():
        return target
    entries = rows()

    def write(fp: Any) -> None:
        for entry in entries:
            fp.write(json.dumps(entry, ensure_ascii=False).encode("utf-8"))
            fp.write(b"\n")

    atomic_write(target, write)
    if tuple(n for p in inputs for n in _signature(p)) != signature:
        # The cache would carry the old signature with the new contents (or half of each).
        target.unlink(missing_ok=True)
        raise RuntimeError(f"{', '.join(inputs)} changed while being converted; open the dataset again")
    for old in _remove_stale(folder, pattern, keep=name):
        # The line index of a removed conversion is useless too.
        _remove_stale(folder, _cache_name(str(old), "lines", (0, 0), ".npy")[1], keep="")
    return target


class CocoSource:
    """Map-style reader over a COCO-style ``.json``: Karpathy split file, official captions, or rows.

    The JSON is parsed once and rewritten as a cached JSON-lines file; later opens (and workers) read
    that through a :class:`JsonlSource`. Locations point into the original file
    (``/abs/dataset_coco.json:images[17] (id 391895)``). Images are resolved against ``root``
    (default: the JSON file's folder). ``require_references=False`` accepts images without captions
    (a test split, for prediction).
    """

    def __init__(
        self,
        path: str | Path,
        root: str | Path | None = None,
        split: str | None = None,
        cache_dir: str | Path | None = None,
        require_references: bool = True,
    ) -> None:
        self.path, self.root = _annotation_paths(path, root)
        self.split = split
        self.require_references = require_references
        self.converted_path = str(
            cached_conversion([self.path], f"coco:{split}", lambda: _coco_rows(self.path, split), cache_dir)
        )
        self._rows = JsonlSource(self.converted_path, root=self.root, cache_dir=cache_dir)

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, i: int) -> Record:
        wrapped, line = self._rows.read_json(i)
        # The cache is ours, but a damaged one should still fail as a RecordError, not a KeyError.
        if not isinstance(wrapped, dict) or "row" not in wrapped:
            raise RecordError(f"{self.converted_path}:{line}", "damaged conversion cache")
        where = f"{self.path}:{wrapped.get('where', f'row {line}')}"
        key = str(wrapped.get("key", line))
        return parse_row(wrapped["row"], where, key, self.root, require_references=self.require_references)

    def close(self) -> None:
        self._rows.close()

    def __repr__(self) -> str:
        return f"CocoSource({self.path!r}, split={self.split!r}, rows={len(self)})"


# ---------------------------------------------------------------------------------------------
# Choosing a reader


def is_streaming(source: object) -> bool:
    """True for shard-streaming sources (``shards`` + ``iter_shard``), False for map-style ones."""
    return isinstance(source, WebDatasetSource)


def get_or_error(source: Any, i: int) -> Any:
    """Row ``i`` of a map-style source, or the :class:`RecordError` it raised (to be counted, not raised)."""
    try:
        return source.get(i)
    except RecordError as err:
        return err


def iter_records(source: Any) -> Iterator[Any]:
    """Every row of any source in file order, bad rows as :class:`RecordError` values."""
    if is_streaming(source):
        for shard in source.shards:
            yield from source.iter_shard(shard)
    else:
        for i in range(len(source)):
            yield get_or_error(source, i)


def _detect_format(path: str, label: str) -> str:
    if not os.path.exists(path) and ("{" in path or GLOB_CHARS.search(path)):
        return "webdataset"
    if os.path.isdir(path):
        from evlgen.data.features import is_feature_cache

        if is_feature_cache(path):
            return "features"
        if glob.glob(os.path.join(glob.escape(path), "*.tar")):
            return "webdataset"
        raise FileNotFoundError(f"dataset {label}: folder {path} holds no .tar shards and no feature cache")
    if not os.path.exists(path):
        raise FileNotFoundError(f"dataset {label}: {path} does not exist")
    lower = path.lower()
    if lower.endswith(".jsonl"):
        return "jsonl"
    if lower.endswith((".json", ".txt")):
        from evlgen.data.benchmarks import detect_benchmark

        found = detect_benchmark(path)
        if found is not None:
            return found
        if lower.endswith(".json"):
            return "coco"
    if lower.endswith((".tar", ".tar.gz", ".tgz")):
        return "webdataset"
    raise ValueError(
        f"dataset {label}: cannot tell the format of {path} from its name; "
        "set format to jsonl, coco, webdataset, vqav2, gqa, msrvtt or msvd"
    )


def open_source(
    ds: DatasetConfig, cache_dir: str | Path | None = None, *, require_references: bool = True
) -> Any:
    """The reader for one configured dataset (JSONL, COCO, a benchmark file, WebDataset or features).

    ``format="auto"`` is decided from the path (and, for ``.json``/``.txt``, the file's first bytes).
    ``require_references=False`` lets annotation-file readers return rows without captions or answers,
    for prediction on test splits; training keeps the default. Raises ``FileNotFoundError`` for a
    missing path and ``ValueError`` (``ConfigError`` for a missing ``annotations`` file) for a setting
    the format cannot honour.
    """
    from evlgen.data.benchmarks import BENCHMARK_FORMATS, SPLIT_FORMATS, open_benchmark

    path = os.path.expanduser(ds.path)
    label = repr(ds.name or ds.path)
    fmt = _detect_format(path, label) if ds.format == "auto" else ds.format
    if fmt == "features":
        from evlgen.data.features import FeatureSource

        return FeatureSource(path)
    if ds.split is not None and fmt not in ("coco", *SPLIT_FORMATS):
        raise ValueError(
            f"dataset {label}: split={ds.split!r} only applies to the coco, msrvtt and msvd formats "
            f"(got {fmt})"
        )
    if ds.annotations is not None and fmt not in ("vqav2", "okvqa"):
        raise ValueError(
            f"dataset {label}: annotations only applies to the vqav2 and okvqa formats (got {fmt})"
        )
    if fmt == "webdataset":
        try:
            return WebDatasetSource(path)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"dataset {label}: {exc}") from None
    if not os.path.exists(path):
        raise FileNotFoundError(f"dataset {label}: {path} does not exist")
    if fmt == "jsonl":
        return JsonlSource(path, root=ds.root, cache_dir=cache_dir, require_references=require_references)
    if fmt == "coco":
        return CocoSource(
            path, root=ds.root, split=ds.split, cache_dir=cache_dir, require_references=require_references
        )
    if fmt in BENCHMARK_FORMATS:
        return open_benchmark(ds, fmt, label, cache_dir, require_references)
    raise ValueError(f"dataset {label}: unknown format {fmt!r}")
