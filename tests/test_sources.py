"""Tests for evlgen.data.sources: row schema, JSONL index cache, COCO layouts, WebDataset shards."""

import io
import json
import os
import pickle
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

import evlgen.data.sources as S
from evlgen.config import DatasetConfig
from evlgen.data.sources import (
    CocoSource,
    JsonlSource,
    Record,
    RecordError,
    WebDatasetSource,
    expand_braces,
    is_streaming,
    open_source,
    parse_row,
    resolve_shards,
)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    # Never touch the user's real cache; tests that pass cache_dir explicitly use their own folder.
    monkeypatch.setenv("EVLGEN_CACHE", str(tmp_path / "envcache"))


def _jpeg(colour=(200, 10, 10), size=(8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG")
    return buf.getvalue()


def _write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# parse_row


def test_parse_row_caption_and_paths():
    rec = parse_row({"image": "a/b.jpg", "caption": "  a dog  ", "extra": 1}, "f:3", "3", "/data")
    assert rec == Record(location="f:3", key="3", image="/data/a/b.jpg", captions=("a dog",))
    rec = parse_row({"image": "/abs/x.png", "captions": ["one", " ", "", "two"], "id": 17}, "f:4", "4", "/d")
    assert rec.image == "/abs/x.png" and rec.captions == ("one", "two") and rec.key == "17"


def test_parse_row_vqa_and_video():
    rec = parse_row(
        {"image": "q.jpg", "question": "what? ", "answers": ["yes", "yes", " no"]}, "l", "k", "/r"
    )
    assert rec.question == "what?" and rec.answers == ("yes", "yes", "no") and rec.captions == ()
    assert parse_row({"image": "q.jpg", "question": "q", "answer": "red"}, "l", "k", "/r").answers == ("red",)
    assert parse_row({"image": "q.jpg", "question": "q", "answer": ["a", "b"]}, "l", "k", "/r").answers == (
        "a",
        "b",
    )
    # Official VQA annotation style: a list of {"answer": ...} dicts.
    rec = parse_row({"image": "q.jpg", "question": "q", "answers": [{"answer": "two"}]}, "l", "k", "/r")
    assert rec.answers == ("two",)
    rec = parse_row({"video": "clips/v.mp4", "captions": ["a cat jumps"]}, "l", "k", "/r")
    assert rec.video == "/r/clips/v.mp4" and rec.image is None


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"image": "a.jpg", "caption": "   "}, "empty caption"),
        ({"image": "a.jpg", "caption": ""}, "empty caption"),
        ({"image": "a.jpg", "captions": ["", "  "]}, "empty caption"),
        ({"image": "a.jpg", "captions": []}, "empty caption"),
        ({"image": "a.jpg"}, "no caption or question"),
        ({"caption": "x"}, "no image or video"),
        ({"image": "a.jpg", "video": "b.mp4", "caption": "x"}, "both image and video"),
        ({"image": "", "caption": "x"}, "empty image path"),
        ({"image": 5, "caption": "x"}, "bad image path"),
        ({"image": "a.jpg", "caption": 3}, "bad caption"),
        ({"image": "a.jpg", "question": "q"}, "question without answers"),
        ({"image": "a.jpg", "question": "q", "answers": ["", " "]}, "question without answers"),
        ({"image": "a.jpg", "question": " ", "answers": ["a"]}, "empty question"),
    ],
)
def test_parse_row_rejects(row, reason):
    with pytest.raises(RecordError) as info:
        parse_row(row, "/x/train.jsonl:9", "9", "/x")
    assert info.value.reason == reason
    assert info.value.location == "/x/train.jsonl:9"
    assert str(info.value).startswith("/x/train.jsonl:9: " + reason)


def test_parse_row_rejects_non_object():
    with pytest.raises(RecordError, match="not a JSON object"):
        parse_row(["image", "caption"], "l", "k", "/r")


def test_record_error_pickles():
    err = RecordError("/a.tar:0001", "no image", "detail here")
    back = pickle.loads(pickle.dumps(err))
    assert (back.location, back.reason, back.detail, str(back)) == (
        err.location,
        err.reason,
        err.detail,
        str(err),
    )
    assert isinstance(back, ValueError)


# ---------------------------------------------------------------------------------------------
# JSONL


@pytest.fixture
def jsonl_file(tmp_path):
    lines = [
        json.dumps({"image": "img/a.jpg", "caption": "a red square"}),  # line 1
        "",  # 2
        json.dumps({"image": "/abs/b.png", "captions": ["x y", "", "z"], "id": "b"}),  # 3
        "   \t",  # 4
        "{not json",  # 5
        json.dumps({"image": "c.jpg", "caption": " "}),  # 6
        json.dumps({"image": "d.jpg", "question": "colour?", "answer": "red"}),  # 7
    ]
    path = tmp_path / "ann" / "train.jsonl"
    path.parent.mkdir()
    # No newline after the last row: it must still be found.
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def test_jsonl_rows_and_line_numbers(jsonl_file, tmp_path):
    src = JsonlSource(jsonl_file, cache_dir=tmp_path / "cache")
    assert len(src) == 5
    loc = str(jsonl_file)
    assert [src.line_number(i) for i in range(5)] == [1, 3, 5, 6, 7]

    rec = src.get(0)
    assert rec == Record(
        location=f"{loc}:1", key="1", image=str(tmp_path / "ann" / "img/a.jpg"), captions=("a red square",)
    )
    rec = src.get(1)
    assert (rec.location, rec.key, rec.image, rec.captions) == (f"{loc}:3", "b", "/abs/b.png", ("x y", "z"))
    with pytest.raises(RecordError) as info:
        src.get(2)
    assert info.value.reason == "invalid JSON" and str(info.value).startswith(f"{loc}:5: invalid JSON (")
    with pytest.raises(RecordError, match=f"^{loc}:6: empty caption$"):
        src.get(3)
    rec = src.get(-1)
    assert rec.location == f"{loc}:7" and rec.question == "colour?" and rec.answers == ("red",)
    with pytest.raises(IndexError):
        src.get(5)
    with pytest.raises(IndexError):
        src.get(-6)


def test_jsonl_root_and_bom(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(
        b"\xef\xbb\xbf" + json.dumps({"image": "p.jpg", "caption": "c\u00e9"}).encode() + b"\r\n"
    )
    src = JsonlSource(path, root=tmp_path / "images", cache_dir=tmp_path / "c")
    rec = src.get(0)
    assert rec.image == str(tmp_path / "images" / "p.jpg") and rec.captions == ("c\u00e9",)


def test_jsonl_not_utf8(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(b'{"image": "a.jpg", "caption": "\xff\xfe"}\n')
    with pytest.raises(RecordError, match=":1: not UTF-8"):
        JsonlSource(path, cache_dir=tmp_path / "c").get(0)


def test_jsonl_empty_and_missing(tmp_path):
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n\n  \n")
    assert len(JsonlSource(empty, cache_dir=tmp_path / "c")) == 0
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        JsonlSource(tmp_path / "nope.jsonl", cache_dir=tmp_path / "c")


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7, 16, 64, 1 << 20])
def test_scan_lines_across_chunk_boundaries(chunk):
    rng = np.random.default_rng(chunk)
    lines = []
    for _ in range(60):
        kind = rng.integers(0, 4)
        if kind == 0:
            lines.append("")
        elif kind == 1:
            lines.append(" \t\r")
        else:
            lines.append("x" * int(rng.integers(1, 40)) + " " * int(rng.integers(0, 3)))
    data = "\n".join(lines).encode() + (b"\n" if chunk % 2 else b"")
    expected, offset = [], 0
    for number, line in enumerate(data.split(b"\n"), start=1):
        if line.strip(b" \t\r\n"):
            expected.append((offset, number))
        offset += len(line) + 1
    table = S._scan_lines(io.BytesIO(data), chunk_size=chunk)
    assert table.dtype == np.int64 and table.shape == (len(expected), 2)
    assert [tuple(r) for r in table.tolist()] == expected


def test_jsonl_index_is_cached_and_rebuilt(tmp_path, monkeypatch):
    path = _write_lines(
        tmp_path / "t.jsonl", [json.dumps({"image": f"{i}.jpg", "caption": "c"}) for i in range(3)]
    )
    cache = tmp_path / "cache"
    calls = []
    real_scan = S._scan_lines
    monkeypatch.setattr(S, "_scan_lines", lambda fp, *a, **k: calls.append(1) or real_scan(fp, *a, **k))

    first = JsonlSource(path, cache_dir=cache)
    index = first.index_path
    assert len(calls) == 1 and os.path.dirname(index) == str(cache / "index")
    mtime = os.stat(index).st_mtime_ns
    second = JsonlSource(path, cache_dir=cache)
    assert len(calls) == 1 and second.index_path == index and os.stat(index).st_mtime_ns == mtime
    assert len(second) == 3

    # Changing the file (size and mtime) gives a fresh index; the stale one is removed.
    with open(path, "a") as fp:
        fp.write(json.dumps({"image": "new.jpg", "caption": "d"}) + "\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    third = JsonlSource(path, cache_dir=cache)
    assert len(calls) == 2 and third.index_path != index and len(third) == 4
    assert third.get(3).image == str(tmp_path / "new.jpg")
    assert not os.path.exists(index)
    assert sorted(p.name for p in (cache / "index").iterdir()) == [os.path.basename(third.index_path)]


def test_jsonl_detects_file_changed_after_indexing(tmp_path):
    path = _write_lines(tmp_path / "t.jsonl", [json.dumps({"image": "a.jpg", "caption": "c"})])
    src = JsonlSource(path, cache_dir=tmp_path / "c")
    path.write_text(json.dumps({"image": "other.jpg", "caption": "longer caption"}) + "\n")
    with pytest.raises(RuntimeError, match="changed since it was indexed"):
        src.get(0)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("EVLGEN_CACHE", str(tmp_path / "explicit"))
    assert S.default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("EVLGEN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert S.default_cache_dir() == tmp_path / "xdg" / "evlgen"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert S.default_cache_dir() == tmp_path / "home" / ".cache" / "evlgen"


def test_jsonl_uses_env_cache_by_default(tmp_path):
    path = _write_lines(tmp_path / "t.jsonl", [json.dumps({"image": "a.jpg", "caption": "c"})])
    src = JsonlSource(path)
    assert src.index_path.startswith(str(tmp_path / "envcache" / "index") + os.sep)


def test_jsonl_pickle_round_trip(jsonl_file, tmp_path):
    src = JsonlSource(jsonl_file, cache_dir=tmp_path / "c")
    before = src.get(0)  # opens the file and maps the index
    back = pickle.loads(pickle.dumps(src))
    assert back._fp is None and back._table_cache is None
    assert back.get(0) == before and len(back) == len(src)
    assert src.get(1) == back.get(1)  # the original keeps working


def test_jsonl_reopens_file_in_a_new_process(jsonl_file, tmp_path, monkeypatch):
    # A handle inherited through fork shares its file position with the parent, so a worker must open
    # its own: simulate being a forked child by changing what os.getpid reports.
    src = JsonlSource(jsonl_file, cache_dir=tmp_path / "c")
    expected = src.get(1)
    parent_fp = src._fp
    monkeypatch.setattr(S.os, "getpid", lambda: -12345)
    assert src.get(1) == expected
    assert src._fp is not parent_fp and not parent_fp.closed


def test_jsonl_large_file_is_not_held_in_memory(tmp_path):
    n = 200_000
    path = tmp_path / "big.jsonl"
    row = '{"image": "images/%06d.jpg", "caption": "a photo of thing number %d"}\n'
    path.write_text("".join(row % (i, i) for i in range(n)))
    src = JsonlSource(path, cache_dir=tmp_path / "c")
    assert len(src) == n
    src.get(n - 1)
    table = src._table()
    assert isinstance(table, np.memmap) and table.shape == (n, 2) and table.dtype == np.int64
    # Everything the source would send to a DataLoader worker: paths and a few numbers, no rows.
    assert len(pickle.dumps(src)) < 2048
    assert src.get(123_456).image == str(tmp_path / "images" / "123456.jpg")
    assert src.line_number(123_456) == 123_457


# ---------------------------------------------------------------------------------------------
# COCO-style JSON


def _karpathy(tmp_path):
    def entry(folder, name, split, sentences, **ids):
        return {"filepath": folder, "filename": name, "split": split, "sentences": sentences, **ids}

    images = [
        entry("train2014", "t1.jpg", "train", [{"raw": "A one."}, {"raw": "Uno."}], cocoid=1),
        entry("val2014", "r1.jpg", "restval", [{"raw": "Rest."}], cocoid=2),
        entry("val2014", "v1.jpg", "val", [{"raw": "Val."}], cocoid=3),
        entry("val2014", "e1.jpg", "test", [{"raw": "Test."}], cocoid=4),
        entry("train2014", "t2.jpg", "train", [{"tokens": ["two", "words"]}], imgid=5),
        entry("train2014", "t3.jpg", "train", [], cocoid=6),
    ]
    path = tmp_path / "coco" / "dataset_coco.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path


def test_coco_karpathy_splits(tmp_path):
    path = _karpathy(tmp_path)
    cache = tmp_path / "c"
    train = CocoSource(path, split="train", cache_dir=cache)
    assert len(train) == 4  # train + restval
    rec = train.get(0)
    assert rec.image == str(tmp_path / "coco" / "train2014" / "t1.jpg")
    assert rec.captions == ("A one.", "Uno.") and rec.key == "1"
    assert rec.location == f"{path}:images[0] (id 1)"
    assert train.get(1).captions == ("Rest.",) and train.get(1).image.endswith("val2014/r1.jpg")
    assert train.get(2).captions == ("two words",) and train.get(2).key == "5"
    with pytest.raises(RecordError) as info:
        train.get(3)
    assert info.value.location == f"{path}:images[5] (id 6)" and info.value.reason == "no caption or question"

    val = CocoSource(path, split="val", root=tmp_path / "imgs", cache_dir=cache)
    assert len(val) == 1 and val.get(0).image == str(tmp_path / "imgs" / "val2014" / "v1.jpg")
    assert len(CocoSource(path, split="test", cache_dir=cache)) == 1
    assert len(CocoSource(path, split=None, cache_dir=cache)) == 6
    with pytest.raises(ValueError, match=r"no images with split 'dev'.*restval, test, train, val"):
        CocoSource(path, split="dev", cache_dir=cache)


def test_coco_official_groups_captions(tmp_path):
    data = {
        "images": [{"id": 42, "file_name": "COCO_val_42.jpg"}, {"id": 7, "file_name": "COCO_val_7.jpg"}],
        "annotations": [
            {"image_id": 7, "id": 1, "caption": "first of seven"},
            {"image_id": 42, "id": 2, "caption": "only forty-two"},
            {"image_id": 7, "id": 3, "caption": "second of seven"},
        ],
    }
    path = tmp_path / "captions_val2014.json"
    path.write_text(json.dumps(data))
    src = CocoSource(path, root=tmp_path / "val2014", cache_dir=tmp_path / "c")
    assert len(src) == 2
    assert src.get(0).captions == ("only forty-two",) and src.get(0).key == "42"
    rec = src.get(1)
    assert rec.captions == ("first of seven", "second of seven")
    assert rec.image == str(tmp_path / "val2014" / "COCO_val_7.jpg")
    assert rec.location == f"{path}:image id 7"
    with pytest.raises(ValueError, match="only applies to a Karpathy"):
        CocoSource(path, split="train", cache_dir=tmp_path / "c")


def test_coco_lavis_rows(tmp_path):
    rows = [
        {"image": "val2014/a.jpg", "caption": ["c1", "c2"], "image_id": "a"},
        {"image": "val2014/b.jpg", "caption": ""},
        {"image": "b.jpg", "question": "how many?", "answer": ["2", "2", "3"], "question_id": 9},
    ]
    path = tmp_path / "coco_karpathy_val.json"
    path.write_text(json.dumps(rows))
    src = CocoSource(path, cache_dir=tmp_path / "c")
    assert len(src) == 3
    assert src.get(0).captions == ("c1", "c2") and src.get(0).location == f"{path}:row 0"
    with pytest.raises(RecordError, match=rf"^{path}:row 1: empty caption"):
        src.get(1)
    assert src.get(2).answers == ("2", "2", "3")


def test_coco_unknown_layout_and_bad_json(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"foo": 1}))
    with pytest.raises(ValueError, match="unrecognised layout"):
        CocoSource(path, cache_dir=tmp_path / "c")
    path.write_text("{broken")
    with pytest.raises(ValueError, match="not valid JSON"):
        CocoSource(path, cache_dir=tmp_path / "c")
    # A failed conversion leaves no partial cache behind.
    assert [p for p in (tmp_path / "c" / "index").iterdir() if p.suffix != ".npy"] == []


def test_coco_conversion_is_cached(tmp_path, monkeypatch):
    path = _karpathy(tmp_path)
    cache = tmp_path / "c"
    calls = []
    real = S._coco_rows
    monkeypatch.setattr(S, "_coco_rows", lambda *a: calls.append(a) or real(*a))
    first = CocoSource(path, split="train", cache_dir=cache)
    second = CocoSource(path, split="train", cache_dir=cache)
    assert len(calls) == 1 and first.converted_path == second.converted_path
    CocoSource(path, split="val", cache_dir=cache)
    assert len(calls) == 2
    # Editing the file invalidates the conversion and its line index.
    data = json.loads(path.read_text())
    data["images"] = data["images"][:2]
    path.write_text(json.dumps(data))
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    third = CocoSource(path, split="train", cache_dir=cache)
    assert len(calls) == 3 and len(third) == 2
    assert not os.path.exists(first.converted_path) and not os.path.exists(first._rows.index_path)


def test_coco_pickle_round_trip(tmp_path):
    src = CocoSource(_karpathy(tmp_path), split="train", cache_dir=tmp_path / "c")
    first = src.get(0)
    back = pickle.loads(pickle.dumps(src))
    assert back.get(0) == first and len(back) == 4
    assert len(pickle.dumps(src)) < 4096


# ---------------------------------------------------------------------------------------------
# WebDataset


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _shard(path, samples, extra=()):
    """samples: list of (key, {ext: bytes}); extra: (name, bytes) members added first."""
    with tarfile.open(path, "w") as tar:
        for name, data in extra:
            _add(tar, name, data)
        for key, files in samples:
            for ext, data in files.items():
                _add(tar, f"{key}.{ext}", data)
    return path


@pytest.fixture
def shards(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    img = _jpeg()
    _shard(
        folder / "part-00000.tar",
        [("000000", {"jpg": img, "txt": b"first caption", "json": b'{"url": "u", "caption": "ignored"}'}),
         ("000001", {"png": img, "txt": b"  second  "})],
        extra=[("_stats.json", b"{}"), (".hidden", b"x")],
    )  # fmt: skip
    _shard(
        folder / "part-00001.tar",
        [("000002", {"jpg": img}),  # no caption
         ("000003", {"txt": b"no image here"}),
         ("000004", {"webp": img, "json": b'{"question": "q?", "answers": ["a", "b"]}'}),
         ("000005", {"jpeg": img, "txt": b"\xff\xfe bad"})],
    )  # fmt: skip
    _shard(folder / "part-00002.tar", [("000006", {"jpg": img, "txt": b"last"})])
    (folder / "notes.txt").write_text("not a shard")
    return folder


def test_expand_braces():
    assert expand_braces("s-{000..003}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar", "s-003.tar"]
    assert expand_braces("s-{8..11}.tar") == ["s-8.tar", "s-9.tar", "s-10.tar", "s-11.tar"]
    assert expand_braces("s-{08..11}.tar") == ["s-08.tar", "s-09.tar", "s-10.tar", "s-11.tar"]
    assert expand_braces("{a,b}/x-{0..1}") == ["a/x-0", "a/x-1", "b/x-0", "b/x-1"]
    assert expand_braces("{a,{b,c}d}") == ["a", "bd", "cd"]
    assert expand_braces("x{3..1}") == ["x3", "x2", "x1"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    assert expand_braces("lit{x}.tar") == ["lit{x}.tar"]
    assert expand_braces("lit{x}{1..2}") == ["lit{x}1", "lit{x}2"]
    assert expand_braces("open{1..2") == ["open{1..2"]


def test_shard_specs(shards):
    expected = [str(shards / f"part-0000{i}.tar") for i in range(3)]
    assert WebDatasetSource(shards).shards == expected
    assert WebDatasetSource(str(shards / "part-*.tar")).shards == expected
    assert WebDatasetSource(str(shards / "part-{00000..00002}.tar")).shards == expected
    assert WebDatasetSource(str(shards / "part-0000{2,0}.tar")).shards == [expected[0], expected[2]]
    assert WebDatasetSource(str(shards / "part-00001.tar")).shards == [expected[1]]
    # img2dataset leaves gaps where a shard failed: keep the rest, remember the gaps.
    found, missing = resolve_shards(str(shards / "part-{00000..00004}.tar"))
    assert found == expected and missing == [str(shards / "part-00003.tar"), str(shards / "part-00004.tar")]
    with pytest.raises(FileNotFoundError, match="nothing-"):
        WebDatasetSource(str(shards / "nothing-{0..3}.tar"))


def test_webdataset_samples(shards):
    src = WebDatasetSource(shards)
    out = [r for shard in src.shards for r in src.iter_shard(shard)]
    assert len(out) == 7
    first, second = out[0], out[1]
    s0, s1 = src.shards[0], src.shards[1]
    assert isinstance(first, Record) and first.key == "000000" and first.location == f"{s0}:000000"
    assert first.captions == ("first caption",) and first.image == _jpeg() and first.name == "000000.jpg"
    assert second.captions == ("second",) and second.name == "000001.png"
    assert isinstance(out[2], RecordError) and out[2].location == f"{s1}:000002"
    assert out[2].reason == "no caption or question"
    assert isinstance(out[3], RecordError) and out[3].reason == "no image"
    assert out[4].question == "q?" and out[4].answers == ("a", "b") and out[4].name == "000004.webp"
    assert isinstance(out[5], RecordError) and out[5].reason == "undecodable text"
    assert "000005.txt" in str(out[5])
    assert out[6].captions == ("last",)


def test_webdataset_groups_by_key_in_subfolders(tmp_path):
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("dir")
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
        _add(tar, "dir/a.jpg", _jpeg())
        _add(tar, "dir/a.txt", b"caption of a")
        _add(tar, "./dir/c.JPG", _jpeg())
        _add(tar, "./dir/c.TXT", b"caption of c")
        # The key ends at the first dot (WebDataset's rule), so "seg.png" is not an image extension.
        _add(tar, "d.seg.png", _jpeg())
        _add(tar, "d.txt", b"caption of d")
    recs = list(WebDatasetSource(path).iter_shard(str(path)))
    assert [(r.key, r.captions) for r in recs[:2]] == [
        ("dir/a", ("caption of a",)),
        ("dir/c", ("caption of c",)),
    ]
    assert recs[1].name == "c.JPG"
    assert isinstance(recs[2], RecordError) and recs[2].reason == "no image"


def test_webdataset_truncated_shard(tmp_path):
    img = _jpeg(size=(64, 64))
    full = _shard(tmp_path / "full.tar", [(f"{k:06d}", {"jpg": img, "txt": b"cap"}) for k in range(3)])
    data = full.read_bytes()
    cut = tmp_path / "cut.tar"
    # Cut inside the second sample's image data.
    cut.write_bytes(data[: data.index(img, data.index(img) + 1) + len(img) // 2])
    out = list(WebDatasetSource(cut).iter_shard(str(cut)))
    assert len(out) == 2 and isinstance(out[0], Record) and out[0].key == "000000"
    assert isinstance(out[1], RecordError) and out[1].reason == "truncated or corrupt shard"
    assert out[1].location == f"{cut}:000001" and "after 1 complete samples" in str(out[1])

    # Cut exactly between two members: tarfile alone would call it a clean end.
    boundary = data.index(b"000001.txt") + 1024  # header of 000001.txt, then its one data block
    cut.write_bytes(data[:boundary])
    out = list(WebDatasetSource(cut).iter_shard(str(cut)))
    assert [type(r).__name__ for r in out] == ["Record", "RecordError"]
    assert "no end-of-archive marker" in str(out[1])

    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"not a tar at all" * 64)
    out = list(WebDatasetSource(garbage).iter_shard(str(garbage)))
    assert len(out) == 1 and out[0].reason == "unreadable shard" and out[0].location == str(garbage)


def test_webdataset_compressed_shard(tmp_path):
    plain = _shard(tmp_path / "s.tar", [("k1", {"jpg": _jpeg(), "txt": b"hello"})])
    import gzip

    gz = tmp_path / "s.tar.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    recs = list(WebDatasetSource(gz).iter_shard(str(gz)))
    assert [r.captions for r in recs] == [("hello",)]


def test_webdataset_pickle(shards):
    src = WebDatasetSource(str(shards / "part-{00000..00002}.tar"))
    back = pickle.loads(pickle.dumps(src))
    assert back.shards == src.shards
    assert [getattr(r, "key", None) for r in back.iter_shard(back.shards[0])] == ["000000", "000001"]


# ---------------------------------------------------------------------------------------------
# open_source


def test_open_source_detects_formats(tmp_path, jsonl_file, shards):
    cache = tmp_path / "c"
    assert isinstance(open_source(DatasetConfig(path=str(jsonl_file)), cache), JsonlSource)
    coco = open_source(DatasetConfig(path=str(_karpathy(tmp_path)), split="train"), cache)
    assert isinstance(coco, CocoSource) and len(coco) == 4
    for spec in (
        shards,
        shards / "part-00000.tar",
        shards / "part-*.tar",
        shards / "part-{00000..00001}.tar",
    ):
        src = open_source(DatasetConfig(path=str(spec)), cache)
        assert isinstance(src, WebDatasetSource) and is_streaming(src)
    assert not is_streaming(coco)
    # The format can be forced, and root is passed through.
    rows = open_source(DatasetConfig(path=str(jsonl_file), format="jsonl", root=str(tmp_path / "r")), cache)
    assert rows.get(0).image == str(tmp_path / "r" / "img/a.jpg")


def test_open_source_errors(tmp_path, jsonl_file):
    cache = tmp_path / "c"
    with pytest.raises(FileNotFoundError, match=r"dataset 'mine'.*missing\.jsonl"):
        open_source(DatasetConfig(path=str(tmp_path / "missing.jsonl"), name="mine"), cache)
    with pytest.raises(FileNotFoundError, match=r"dataset 'w'.*no WebDataset shards"):
        open_source(DatasetConfig(path=str(tmp_path / "x-{0..2}.tar"), name="w"), cache)
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="cannot tell the format"):
        open_source(DatasetConfig(path=str(tmp_path / "data.csv")), cache)
    with pytest.raises(ValueError, match="split='train' only applies to the coco, msrvtt and msvd formats"):
        open_source(DatasetConfig(path=str(jsonl_file), split="train"), cache)
    empty = tmp_path / "emptydir"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no .tar shards"):
        open_source(DatasetConfig(path=str(empty)), cache)
    features = tmp_path / "features"
    features.mkdir()
    (features / "index.json").write_text(json.dumps({"format": "evlgen-features", "rows": 3}))
    # Feature caches are recognised and handed to FeatureSource, which checks the cache version.
    with pytest.raises(ValueError, match="cache version None"):
        open_source(DatasetConfig(path=str(features)), cache)
    with pytest.raises(ValueError, match="cache version None"):
        open_source(DatasetConfig(path=str(features), format="features"), cache)
