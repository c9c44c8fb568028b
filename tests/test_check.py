"""Tests for evlgen.data.check: exact counts on datasets with known defects, statistics, exit codes."""

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from evlgen.config import DatasetConfig
from evlgen.data.check import DataReport, Problem, Stats, check_dataset, format_report, main_check


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EVLGEN_CACHE", str(tmp_path / "cache"))


def _encoded(fmt, colour=(10, 200, 30), size=(12, 9)):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, fmt)
    return buf.getvalue()


LONG = " ".join(f"w{i}" for i in range(35))


@pytest.fixture
def defective(tmp_path):
    """A JSONL dataset whose every defect is known; see the line comments."""
    root = tmp_path / "ds"
    images = root / "images"
    images.mkdir(parents=True)
    (images / "a.jpg").write_bytes(_encoded("JPEG"))
    (images / "b.png").write_bytes(_encoded("PNG"))
    (images / "q.jpg").write_bytes(_encoded("JPEG", (1, 2, 3)))
    jpeg = _encoded("JPEG", size=(64, 64))
    (images / "trunc.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (images / "fake.jpg").write_text("this is not an image")
    rows = [
        {"image": "images/a.jpg", "caption": "a red square on the left"},  # 1: ok, 6 words
        {"image": "images/b.png", "captions": ["one", "two words", ""]},  # 2: ok, 1 + 2 words
        "",  # 3: blank, not a row
        {"image": "images/trunc.jpg", "caption": "truncated image here"},  # 4: bad image
        {"image": "images/fake.jpg", "caption": "not really an image"},  # 5: bad image
        {"image": "images/missing.jpg", "caption": "gone"},  # 6: missing file
        {"image": "images/a.jpg", "caption": "   "},  # 7: empty caption
        "{bad json",  # 8: invalid JSON
        {"image": "images/q.jpg", "question": "what colour?", "answers": ["red", "red", "dark red"]},  # 9
        {"image": "images/a.jpg", "caption": LONG},  # 10: ok, 35 words
        {"caption": "no image"},  # 11: no image or video
        {"image": "images/b.png", "question": "shape?", "answer": "circle"},  # 12: ok, VQA
        {"image": "images/a.jpg", "caption": "third"},  # 13: ok, 1 word
    ]
    path = root / "train.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_counts_on_known_defects(defective):
    report = check_dataset(DatasetConfig(path=str(defective), name="toy"))
    assert report.dataset == "toy" and report.format == "jsonl"
    assert report.rows == 12
    assert report.usable == 6
    assert report.bad_rows == {"empty caption": 1, "invalid JSON": 1, "no image or video": 1}
    assert report.missing_files == 1
    assert report.bad_images == 2
    assert report.bad_videos == 0
    assert report.images == 3  # a.jpg, b.png, q.jpg
    assert report.questions == 2
    assert report.long_captions == 1
    assert not report.ok and report.problem_count == 6
    loc = str(defective)
    assert [p.location for p in report.problems] == [f"{loc}:{n}" for n in (4, 5, 6, 7, 8, 11)]
    messages = [p.message for p in report.problems]
    assert "trunc.jpg" in messages[0] and "fake.jpg" in messages[1]
    assert messages[2] == f"file not found: {defective.parent / 'images' / 'missing.jpg'}"
    assert messages[3] == "empty caption"
    assert messages[4].startswith("invalid JSON (")
    assert messages[5] == "no image or video"


def test_statistics_by_hand(defective):
    report = check_dataset(DatasetConfig(path=str(defective)))
    # Usable captions have 6, 1, 2, 35 and 1 words.
    w = report.words_per_caption
    assert (w.count, w.min, w.max) == (5, 1, 35)
    assert w.mean == pytest.approx(9.0) and w.median == 2.0
    assert w.p95 == pytest.approx(6 + 0.8 * (35 - 6))  # rank 0.95 * 4 = 3.8 between 6 and 35
    # a.jpg has 3 captions (rows 1, 10, 13), b.png 2 (row 2); q.jpg has only a question.
    c = report.captions_per_image
    assert (c.count, c.min, c.max, c.mean, c.median) == (2, 2, 3, 2.5, 2.5)
    assert c.p95 == pytest.approx(2.95)
    a = report.answers_per_question
    assert (a.count, a.min, a.max, a.mean, a.median) == (2, 1, 3, 2.0, 2.0)
    assert a.p95 == pytest.approx(2.9)


def test_without_image_decoding_and_problem_cap(defective):
    report = check_dataset(DatasetConfig(path=str(defective)), verify_images=False, max_problems=2)
    assert report.bad_images == 0 and report.missing_files == 1 and report.usable == 8
    assert report.problem_count == 4 and len(report.problems) == 2
    assert any("not decoded" in n for n in report.notes)


def test_pixel_limit_counts_as_bad_image(defective):
    report = check_dataset(DatasetConfig(path=str(defective)), max_pixels=12 * 9 - 1)
    # a.jpg, b.png and q.jpg are 12x9: every row pointing at them becomes a bad image.
    assert report.usable == 0 and report.bad_images == 8


def test_limit(defective):
    report = check_dataset(DatasetConfig(path=str(defective)), limit=3)
    assert report.rows == 3 and report.usable == 2 and report.bad_images == 1 and report.limited
    assert not check_dataset(DatasetConfig(path=str(defective)), limit=100).limited


def test_stats_match_numpy():
    rng = np.random.default_rng(0)
    values = rng.integers(0, 40, size=501).tolist()
    hist = {}
    for v in values:
        hist[v] = hist.get(v, 0) + 1
    s = Stats.from_histogram(hist)
    assert s.count == 501 and s.min == min(values) and s.max == max(values)
    assert s.mean == pytest.approx(np.mean(values))
    assert s.median == pytest.approx(np.percentile(values, 50))
    assert s.p95 == pytest.approx(np.percentile(values, 95))
    assert Stats.from_histogram({}) == Stats()


def test_report_serialises_and_formats(defective):
    report = check_dataset(DatasetConfig(path=str(defective)))
    data = report.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["ok"] is False and data["usable"] == 6
    assert data["problems"][0] == {"location": f"{defective}:4", "message": report.problems[0].message}
    assert data["words_per_caption"]["max"] == 35
    text = format_report(report)
    assert "usable" in text and "words per caption" in text and "6 problems:" in text
    assert f"{defective}:8: invalid JSON" in text
    assert "empty caption" in text


def test_clean_report_format():
    report = DataReport(
        dataset="d",
        path="/p",
        format="jsonl",
        rows=1,
        usable=1,
        bad_rows={},
        missing_files=0,
        bad_images=0,
        bad_videos=0,
        images=1,
        videos=0,
        words_per_caption=Stats.from_histogram({3: 1}),
        captions_per_image=Stats.from_histogram({1: 1}),
        long_captions=0,
        questions=0,
        answers_per_question=Stats(),
        problem_count=0,
        problems=(),
    )
    assert report.ok and "no problems found" in format_report(report)
    assert Problem("a", "b") == Problem("a", "b")


def test_main_check_exit_codes(defective, tmp_path, capsys):
    assert main_check(str(defective)) == 1
    out = capsys.readouterr().out
    assert "6 problems" in out

    clean = tmp_path / "clean"
    clean.mkdir()
    (clean / "x.png").write_bytes(_encoded("PNG"))
    (clean / "rows.jsonl").write_text(json.dumps({"image": "x.png", "caption": "fine"}) + "\n")
    assert main_check(str(clean / "rows.jsonl"), as_json=True) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is True and data["usable"] == 1

    # root redirects relative paths: the same rows against another folder miss their image.
    assert main_check(str(clean / "rows.jsonl"), root=str(tmp_path)) == 1
    capsys.readouterr()

    assert main_check(str(tmp_path / "nope.jsonl")) == 2
    assert "nope.jsonl" in capsys.readouterr().err
    assert main_check(str(clean / "rows.jsonl"), split="train") == 2


def test_coco_check(tmp_path):
    (tmp_path / "val2014").mkdir()
    (tmp_path / "val2014" / "v.jpg").write_bytes(_encoded("JPEG"))
    images = [
        {
            "filepath": "val2014",
            "filename": "v.jpg",
            "split": "train",
            "cocoid": 1,
            "sentences": [{"raw": "a b"}],
        },
        {
            "filepath": "val2014",
            "filename": "w.jpg",
            "split": "restval",
            "cocoid": 2,
            "sentences": [{"raw": "c"}],
        },
        {
            "filepath": "val2014",
            "filename": "x.jpg",
            "split": "val",
            "cocoid": 3,
            "sentences": [{"raw": "d"}],
        },
    ]
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": images}))
    report = check_dataset(DatasetConfig(path=str(path), split="train"))
    assert report.format == "coco" and report.rows == 2 and report.usable == 1 and report.missing_files == 1
    assert report.problems[0].location == f"{path}:images[1] (id 2)"


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_webdataset_check(tmp_path):
    good = _encoded("JPEG")
    with tarfile.open(tmp_path / "s-0.tar", "w") as tar:
        _add(tar, "_stats.json", b"{}")
        _add(tar, "k0.jpg", good)
        _add(tar, "k0.txt", b"one two three")
        _add(tar, "k1.jpg", b"broken image bytes")
        _add(tar, "k1.txt", b"four")
        _add(tar, "k2.jpg", good)
    with tarfile.open(tmp_path / "s-1.tar", "w") as tar:
        _add(tar, "k3.jpg", good)
        _add(tar, "k3.txt", b"five six")
        _add(tar, "k4.jpg", good)
        _add(tar, "k4.txt", b"seven")
    data = (tmp_path / "s-1.tar").read_bytes()
    (tmp_path / "s-1.tar").write_bytes(data[: data.index(b"k4.txt") + 100])  # cut inside k4's caption header

    report = check_dataset(DatasetConfig(path=str(tmp_path / "s-{0..2}.tar")))
    assert report.format == "webdataset" and report.shards == 2
    assert report.missing_shards == (str(tmp_path / "s-2.tar"),)
    # k0, k1 (bad image), k2 (no caption), k3, then the truncated tail of s-1 as one bad row.
    assert report.rows == 5 and report.usable == 2 and report.bad_images == 1
    assert report.bad_rows == {"no caption or question": 1, "truncated or corrupt shard": 1}
    assert report.problem_count == 1 + 1 + 2  # missing shard, bad image, two bad rows
    assert report.problems[0] == Problem(
        str(tmp_path / "s-2.tar"), "shard named by the pattern does not exist"
    )
    assert report.problems[1].location == f"{tmp_path / 's-0.tar'}:k1"
    assert report.images == 2 and report.words_per_caption.count == 2
    assert report.captions_per_image == Stats.from_histogram({1: 2})


def test_video_rows(tmp_path):
    av = pytest.importorskip("av")
    clip = tmp_path / "ok.mp4"
    container = av.open(str(clip), "w")
    stream = container.add_stream("mpeg4", rate=4)
    stream.width = stream.height = 16
    stream.pix_fmt = "yuv420p"
    for i in range(4):
        frame = av.VideoFrame.from_ndarray(np.full((16, 16, 3), i * 40, np.uint8), format="rgb24")
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    (tmp_path / "bad.mp4").write_bytes(b"nope" * 100)
    rows = [
        {"video": "ok.mp4", "caption": "a clip"},
        {"video": "bad.mp4", "caption": "a broken clip"},
        {"video": "gone.mp4", "caption": "missing"},
    ]
    path = tmp_path / "videos.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = check_dataset(DatasetConfig(path=str(path)))
    assert (report.usable, report.bad_videos, report.missing_files, report.videos) == (1, 1, 1, 1)
    assert report.problems[0].location == f"{path}:2"
    assert "unreadable videos" in format_report(report)
