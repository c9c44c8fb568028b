"""Tests for evlgen.data.benchmarks: VQAv2 / OK-VQA, GQA, NoCaps, MSR-VTT and MSVD annotation files.

Every file here is written by hand in the layout of the official release, at toy size.
"""

import json
import os
import pickle

import pytest

from evlgen.config import ConfigError, DataConfig, DatasetConfig, from_dict
from evlgen.data.benchmarks import BenchmarkSource, detect_benchmark, msvd_entries, vqa_entries
from evlgen.data.check import check_dataset
from evlgen.data.pipeline import open_sources
from evlgen.data.sources import CocoSource, RecordError, iter_records, open_source, parse_row


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EVLGEN_CACHE", str(tmp_path / "envcache"))


def _write_json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def _rows(source):
    return list(iter_records(source))


def _converted_rows(source):
    with open(source.converted_path, encoding="utf-8") as fp:
        return [json.loads(line) for line in fp]


# ---------------------------------------------------------------------------------------------
# VQAv2 / OK-VQA

_HEADER = {
    "info": {"description": "This is v2.0 of the VQA dataset.", "version": "2.0", "year": 2017},
    "license": {"name": "Creative Commons Attribution 4.0 International License"},
    "task_type": "Open-Ended",
    "data_type": "mscoco",
}

# Ten answers in annotator order, repeats included: the VQA accuracy counts them.
_ANSWERS_1 = ["down", "down", "at table", "skateboard", "down", "table", "down", "down", "down", "down"]
_ANSWERS_2 = ["yes", "yes", "yes", "yes", "no", "yes", "yes", "yes", "yes", "yes"]


def _answers(texts):
    return [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(texts)]


def _vqa_files(tmp_path, subtype="val2014", extra_questions=(), extra_annotations=()):
    questions = {
        **_HEADER,
        "data_subtype": subtype,
        "questions": [
            {"image_id": 262148, "question": "Where is he looking?", "question_id": 262148000},
            {"image_id": 393225, "question": "Is the bowl empty?", "question_id": 393225001},
            *extra_questions,
        ],
    }
    annotations = {
        "info": _HEADER["info"],
        "license": _HEADER["license"],
        "data_subtype": subtype,
        "annotations": [
            # Not in question order: the reader joins on question_id.
            {
                "question_type": "is the",
                "multiple_choice_answer": "yes",
                "answers": _answers(_ANSWERS_2),
                "image_id": 393225,
                "answer_type": "yes/no",
                "question_id": 393225001,
            },
            {
                "question_type": "none of the above",
                "multiple_choice_answer": "down",
                "answers": _answers(_ANSWERS_1),
                "image_id": 262148,
                "answer_type": "other",
                "question_id": 262148000,
            },
            *extra_annotations,
        ],
    }
    q = _write_json(tmp_path / "vqa" / f"v2_OpenEnded_mscoco_{subtype}_questions.json", questions)
    a = _write_json(tmp_path / "vqa" / f"v2_mscoco_{subtype}_annotations.json", annotations)
    return q, a


def test_vqav2_rows_keep_all_ten_answers_in_order(tmp_path):
    q, a = _vqa_files(tmp_path)
    root = tmp_path / "coco" / "val2014"
    src = open_source(
        DatasetConfig(path=str(q), format="vqav2", annotations=str(a), root=str(root)), tmp_path / "c"
    )
    assert isinstance(src, BenchmarkSource) and len(src) == 2
    rec = src.get(0)
    assert rec.key == "262148000"
    assert rec.location == f"{q}:questions[0]"
    assert rec.image == str(root / "COCO_val2014_000000262148.jpg")
    assert rec.question == "Where is he looking?"
    assert rec.answers == tuple(_ANSWERS_1)
    assert rec.captions == () and rec.video is None
    assert rec.meta == {
        "question_id": 262148000,
        "image_id": 262148,
        "answer_type": "other",
        "question_type": "none of the above",
    }
    second = src.get(1)
    assert second.key == "393225001" and second.answers == tuple(_ANSWERS_2)
    assert second.meta["answer_type"] == "yes/no"
    # The cached conversion keeps what an EvalAI prediction file and later scoring need.
    cached = _converted_rows(src)[0]["row"]
    assert cached["question_id"] == 262148000 and cached["multiple_choice_answer"] == "down"


def test_vqav2_auto_detected_and_okvqa_alias(tmp_path):
    q, a = _vqa_files(tmp_path)
    assert detect_benchmark(str(q)) == "vqav2"
    auto = open_source(DatasetConfig(path=str(q), annotations=str(a)), tmp_path / "c")
    assert isinstance(auto, BenchmarkSource) and auto.format == "vqav2"
    assert auto.get(0).answers == tuple(_ANSWERS_1)

    # OK-VQA: same layout, five distinct answers each given twice, plus raw_answer.
    ok_answers = [
        "race",
        "race",
        "racing",
        "racing",
        "motocross",
        "motocross",
        "dirt",
        "dirt",
        "sport",
        "sport",
    ]
    questions = {
        **_HEADER,
        "data_subtype": "val2014",
        "questions": [
            {"image_id": 297147, "question": "What sport can you use this for?", "question_id": 2971475}
        ],
    }
    annotations = {
        "data_subtype": "val2014",
        "annotations": [
            {
                "image_id": 297147,
                "answer_type": "other",
                "question_type": "eight",
                "question_id": 2971475,
                "answers": [
                    {"answer_id": i + 1, "raw_answer": t, "answer_confidence": "yes", "answer": t}
                    for i, t in enumerate(ok_answers)
                ],
                "confidence": 3,
            }
        ],
    }
    oq = _write_json(tmp_path / "okvqa" / "OpenEnded_mscoco_val2014_questions.json", questions)
    oa = _write_json(tmp_path / "okvqa" / "mscoco_val2014_annotations.json", annotations)
    ok = open_source(DatasetConfig(path=str(oq), format="okvqa", annotations=str(oa)), tmp_path / "c")
    assert ok.format == "okvqa" and len(ok) == 1
    rec = ok.get(0)
    assert rec.answers == tuple(ok_answers) and rec.key == "2971475"
    assert rec.image == str(tmp_path / "okvqa" / "COCO_val2014_000000297147.jpg")


def test_vqav2_test_dev_without_annotations(tmp_path):
    q, _ = _vqa_files(tmp_path, subtype="test-dev2015")
    # Training (the default) cannot use a question without answers ...
    train = open_source(DatasetConfig(path=str(q), format="vqav2"), tmp_path / "c")
    with pytest.raises(RecordError) as info:
        train.get(0)
    assert info.value.location == f"{q}:questions[0]" and info.value.reason == "question without answers"
    # ... prediction can. test-dev images are files of test2015.
    pred = open_source(DatasetConfig(path=str(q)), tmp_path / "c", require_references=False)
    rec = pred.get(1)
    assert rec.answers == () and rec.question == "Is the bowl empty?" and rec.key == "393225001"
    assert rec.image == str(tmp_path / "vqa" / "COCO_test2015_000000393225.jpg")
    assert rec.meta == {"question_id": 393225001, "image_id": 393225}


def test_vqav2_malformed_entries_are_counted_not_fatal(tmp_path):
    q, a = _vqa_files(
        tmp_path,
        extra_questions=[
            "not an object",  # questions[2]
            {"image_id": 1, "question": "no id?"},  # questions[3]
            {"image_id": 262148, "question": "Again?", "question_id": 262148000},  # questions[4], duplicate
            {"image_id": "7", "question": "Text id?", "question_id": 7000},  # questions[5]
            {"image_id": 8, "question": "Bad answers?", "question_id": 8000},  # questions[6]
            {"image_id": 9, "question": "Unannotated?", "question_id": 9000},  # questions[7]
            {"image_id": 10, "question": "Wrong image?", "question_id": 10000},  # questions[8]
            {"image_id": 11, "question": "   ", "question_id": 11000},  # questions[9]
        ],
        extra_annotations=[
            {"question_id": 8000, "image_id": 8, "answers": [{"answer": "a"}, {"answer_id": 2}]},  # [2]
            {"image_id": 3, "answers": []},  # annotations[3]: no question_id, cannot be attached
            {"question_id": 10000, "image_id": 99, "answers": _answers(["x"] * 10)},  # annotations[4]
            {"question_id": 11000, "image_id": 11, "answers": _answers(["y"] * 10)},
            {"question_id": 555, "image_id": 5, "answers": _answers(["z"] * 10)},  # unknown question: ignored
        ],
    )
    src = BenchmarkSource("vqav2", q, annotations=a, cache_dir=tmp_path / "c")
    rows = _rows(src)
    assert [r.key for r in rows if not isinstance(r, RecordError)] == ["262148000", "393225001"]
    errors = [(e.location, e.reason) for e in rows if isinstance(e, RecordError)]
    assert errors == [
        (f"{q}:questions[2]", "not a JSON object"),
        (f"{q}:questions[3]", "bad question_id"),
        (f"{q}:questions[4]", "duplicate question_id"),
        (f"{q}:questions[5]", "bad image_id"),
        (f"{a}:annotations[2]", "bad answers"),
        (f"{q}:questions[7]", "no annotation"),
        (f"{a}:annotations[4]", "image_id differs from the question's"),
        (f"{q}:questions[9]", "empty question"),
        (f"{a}:annotations[3]", "bad question_id"),
    ]
    assert "answers[1] has no answer string" in str(rows[6])
    # The data check counts them by reason, as training would skip them.
    report = check_dataset(
        DatasetConfig(path=str(q), format="vqav2", annotations=str(a)),
        verify_images=False,
        cache_dir=tmp_path / "c",
    )
    assert report.format == "vqav2" and report.rows == 11 and sum(report.bad_rows.values()) == 9
    assert report.bad_rows["bad answers"] == 1 and report.missing_files == 2 and report.usable == 0


def test_vqav2_layout_errors(tmp_path):
    q, a = _vqa_files(tmp_path)
    with pytest.raises(ValueError, match="not a VQA questions file"):
        list(vqa_entries({"images": []}, "/x/q.json"))
    with pytest.raises(ValueError, match="no data_subtype"):
        list(vqa_entries({"questions": []}, "/x/q.json"))
    train_ann = json.loads(a.read_text())
    train_ann["data_subtype"] = "train2014"
    wrong = _write_json(tmp_path / "vqa" / "v2_mscoco_train2014_annotations.json", train_ann)
    with pytest.raises(
        ValueError, match=r"annotations are for data_subtype 'train2014', the questions for 'val2014'"
    ):
        BenchmarkSource("vqav2", q, annotations=wrong, cache_dir=tmp_path / "c")
    # A failed conversion leaves no cache behind.
    assert [p.name for p in (tmp_path / "c" / "index").iterdir() if p.suffix == ".jsonl"] == []
    # An annotations file named as the dataset path is pointed at its questions file.
    with pytest.raises(ValueError, match="looks like a VQA annotations file"):
        open_source(DatasetConfig(path=str(a)), tmp_path / "c")


def test_vqav2_missing_annotations_file_is_a_config_error(tmp_path):
    q, _ = _vqa_files(tmp_path)
    missing = tmp_path / "vqa" / "nope_annotations.json"
    ds = DatasetConfig(path=str(q), format="vqav2", annotations=str(missing))
    with pytest.raises(ConfigError, match=r"annotations='.*nope_annotations\.json': file .* does not exist"):
        open_source(ds, tmp_path / "c")
    with pytest.raises(ConfigError, match=r"^data\.val\[0\] .*annotations="):
        open_sources([ds], str(tmp_path / "c"), "data.val")
    with pytest.raises(ValueError, match="annotations only applies to the vqav2 and okvqa formats"):
        open_source(DatasetConfig(path=str(q), format="gqa", annotations=str(q)), tmp_path / "c")
    with pytest.raises(ValueError, match="split='val' only applies"):
        open_source(DatasetConfig(path=str(q), format="vqav2", split="val"), tmp_path / "c")


def test_vqav2_conversion_cached_and_refreshed(tmp_path):
    q, a = _vqa_files(tmp_path)
    cache = tmp_path / "c"
    first = BenchmarkSource("vqav2", q, annotations=a, cache_dir=cache)
    old = 1_000_000_000 * 10**9
    os.utime(first.converted_path, ns=(old, old))
    second = BenchmarkSource("vqav2", q, annotations=a, cache_dir=cache)
    assert second.converted_path == first.converted_path
    assert os.stat(second.converted_path).st_mtime_ns == old  # not written again
    # Editing the annotations file (not the questions file) converts again and drops the stale cache.
    data = json.loads(a.read_text())
    data["annotations"][1]["answers"] = _answers(["up"] * 10)
    a.write_text(json.dumps(data))
    os.utime(a, ns=(old + 5 * 10**9, old + 5 * 10**9))
    third = BenchmarkSource("vqav2", q, annotations=a, cache_dir=cache)
    assert third.converted_path != first.converted_path and not os.path.exists(first.converted_path)
    assert third.get(0).answers == ("up",) * 10
    # Questions alone are another conversion, kept beside the joined one.
    alone = BenchmarkSource("vqav2", q, cache_dir=cache, require_references=False)
    assert alone.converted_path != third.converted_path and os.path.exists(third.converted_path)


def test_benchmark_source_pickles_small(tmp_path):
    q, a = _vqa_files(tmp_path)
    src = BenchmarkSource("vqav2", q, annotations=a, cache_dir=tmp_path / "c")
    first = src.get(0)
    back = pickle.loads(pickle.dumps(src))
    assert back.get(0) == first and len(back) == 2
    assert len(pickle.dumps(src)) < 4096


# ---------------------------------------------------------------------------------------------
# GQA


def _gqa_question(image_id, question, answer=None, full=None):
    q = {
        "semantic": [{"operation": "select", "dependencies": [], "argument": "table (2)"}],
        "entailed": [],
        "equivalent": ["20968379"],
        "question": question,
        "imageId": image_id,
        "isBalanced": True,
        "groups": {"global": None, "local": "10q-table_color"},
        "semanticStr": "select: table (2)->query: color [0]",
        "annotations": {"answer": {}, "question": {"2": "2"}, "fullAnswer": {}},
        "types": {"detailed": "existThat", "semantic": "obj", "structural": "verify"},
    }
    if answer is not None:
        q["answer"] = answer
        q["fullAnswer"] = full
    return q


def test_gqa_rows_and_errors(tmp_path):
    data = {
        "20968379": _gqa_question(
            "n288870", "Do the shorts have dark color?", "yes", "Yes, the shorts are dark."
        ),
        "20968381": _gqa_question("n288870", "What color is the table?", "brown", "The table is brown."),
        "201307251": "broken",
        "05451384": {"question": "Where is it?", "answer": "left"},
    }
    path = _write_json(tmp_path / "gqa" / "testdev_balanced_questions.json", data)
    assert detect_benchmark(str(path)) == "gqa"
    root = tmp_path / "gqa" / "images"
    src = open_source(DatasetConfig(path=str(path), root=str(root)), tmp_path / "c")
    assert isinstance(src, BenchmarkSource) and src.format == "gqa" and len(src) == 4
    rec = src.get(1)
    assert rec.key == "20968381" and rec.location == f'{path}:["20968381"]'
    assert rec.image == str(root / "n288870.jpg")
    assert rec.question == "What color is the table?" and rec.answers == ("brown",)
    assert rec.meta == {"question_id": "20968381", "image_id": "n288870"}
    assert _converted_rows(src)[0]["row"]["full_answer"] == "Yes, the shorts are dark."
    errors = [(e.location, e.reason) for e in _rows(src) if isinstance(e, RecordError)]
    assert errors == [(f'{path}:["201307251"]', "not a JSON object"), (f'{path}:["05451384"]', "bad imageId")]


def test_gqa_submission_questions_have_no_answers(tmp_path):
    data = {"201640614": _gqa_question("n161313", "Is it an indoors scene?")}
    path = _write_json(tmp_path / "submission_all_questions.json", data)
    with pytest.raises(RecordError, match="question without answers"):
        BenchmarkSource("gqa", path, cache_dir=tmp_path / "c").get(0)
    rec = BenchmarkSource("gqa", path, cache_dir=tmp_path / "c", require_references=False).get(0)
    assert rec.answers == () and rec.image == str(tmp_path / "n161313.jpg") and rec.key == "201640614"


# ---------------------------------------------------------------------------------------------
# NoCaps (read by the official-COCO path)


def _nocaps_image(image_id, domain):
    return {
        "id": image_id,
        "file_name": f"{image_id:04x}6f1bd4b1ee.jpg",
        "open_images_id": f"{image_id:04x}6f1bd4b1ee",
        "height": 1024,
        "width": 768,
        "coco_url": f"https://s3.amazonaws.com/nocaps/val/{image_id:04x}6f1bd4b1ee.jpg",
        "license": 2,
        "date_captured": "2018-11-06 11:04:33",
        "domain": domain,
    }


def test_nocaps_val_keeps_domain(tmp_path):
    data = {
        "licenses": [],
        "info": {"url": "http://nocaps.org", "version": "0.1"},
        "images": [
            _nocaps_image(0, "in-domain"),
            _nocaps_image(1, "near-domain"),
            _nocaps_image(2, "out-domain"),
        ],
        "annotations": [
            {"image_id": 2, "caption": "A jellyfish floats in dark water.", "id": 20},
            {"image_id": 0, "caption": "A man rides a horse.", "id": 0},
            {"image_id": 2, "caption": "An orange jellyfish.", "id": 21},
            {"image_id": 1, "caption": "A red fire truck on a street.", "id": 10},
        ],
    }
    path = _write_json(tmp_path / "nocaps" / "nocaps_val_4500_captions.json", data)
    assert detect_benchmark(str(path)) is None  # a COCO layout, read by CocoSource
    root = tmp_path / "nocaps" / "val"
    src = open_source(DatasetConfig(path=str(path), root=str(root)), tmp_path / "c")
    assert isinstance(src, CocoSource) and len(src) == 3
    rec = src.get(2)
    assert rec.key == "2" and rec.captions == ("A jellyfish floats in dark water.", "An orange jellyfish.")
    assert rec.image == str(root / "00026f1bd4b1ee.jpg")
    assert [src.get(i).meta["domain"] for i in range(3)] == ["in-domain", "near-domain", "out-domain"]
    with open(src.converted_path, encoding="utf-8") as fp:
        assert [json.loads(line)["row"]["domain"] for line in fp] == [
            "in-domain",
            "near-domain",
            "out-domain",
        ]


def test_nocaps_test_image_info_is_for_prediction_only(tmp_path):
    # The test split ships image information only: no "annotations" key at all.
    data = {
        "licenses": [],
        "info": {},
        "images": [_nocaps_image(7, "out-domain"), _nocaps_image(8, "in-domain")],
    }
    path = _write_json(tmp_path / "nocaps_test_image_info.json", data)
    ds = DatasetConfig(path=str(path))
    # Training keeps refusing an image without captions (and open_sources is the training entry point).
    train_rows = _rows(open_sources([ds], str(tmp_path / "c"))[0])
    assert [(e.location, e.reason) for e in train_rows] == [
        (f"{path}:image id 7", "no caption or question"),
        (f"{path}:image id 8", "no caption or question"),
    ]
    pred = open_source(ds, tmp_path / "c", require_references=False)
    rec = pred.get(0)
    assert rec.captions == () and rec.question is None and rec.key == "7"
    assert rec.image == str(tmp_path / "00076f1bd4b1ee.jpg") and rec.meta == {"domain": "out-domain"}


# ---------------------------------------------------------------------------------------------
# MSR-VTT


def _msrvtt(tmp_path):
    def video(i, split):
        return {
            "category": 9,
            "url": f"https://www.youtube.com/watch?v=clip{i}",
            "video_id": f"video{i}",
            "start time": 137.72,
            "end time": 149.44,
            "split": split,
            "id": i,
        }

    data = {
        "info": {"contributor": "Microsoft MSM group", "year": "2016"},
        "videos": [
            video(0, "train"),
            video(1, "train"),
            video(6513, "validate"),
            video(7010, "test"),
            "junk",
        ],
        "sentences": [
            {"caption": "a car is shown", "video_id": "video0", "sen_id": 0},
            {"caption": "a man talks about a car", "video_id": "video1", "sen_id": 1},
            {"caption": "a red car drives", "video_id": "video0", "sen_id": 2},
            {"caption": "people dance", "video_id": "video6513", "sen_id": 3},
            {"caption": 5, "video_id": "video1", "sen_id": 4},  # sentences[4]: bad caption, train video
            {"caption": 6, "video_id": "video7010", "sen_id": 5},  # sentences[5]: bad caption, test video
            {"caption": "orphan", "sen_id": 6},  # sentences[6]: no video_id
            {"caption": "a song plays", "video_id": "video7010", "sen_id": 7},
            {"caption": "unknown clip", "video_id": "video99999", "sen_id": 8},
        ],
    }
    return _write_json(tmp_path / "msrvtt" / "train_val_videodatainfo.json", data)


def test_msrvtt_rows_and_split_filter(tmp_path):
    path = _msrvtt(tmp_path)
    assert detect_benchmark(str(path)) == "msrvtt"
    root = tmp_path / "msrvtt" / "videos"
    train = open_source(DatasetConfig(path=str(path), split="train", root=str(root)), tmp_path / "c")
    assert isinstance(train, BenchmarkSource) and train.format == "msrvtt"
    rows = _rows(train)
    good = [r for r in rows if not isinstance(r, RecordError)]
    assert [(r.key, r.video, r.captions, r.image) for r in good] == [
        ("video0", str(root / "video0.mp4"), ("a car is shown", "a red car drives"), None),
        ("video1", str(root / "video1.mp4"), ("a man talks about a car",), None),
    ]
    assert good[1].location == f"{path}:videos[1]"
    errors = [(e.location, e.reason) for e in rows if isinstance(e, RecordError)]
    # A bad entry that cannot be placed in a split is reported in every split.
    assert errors == [
        (f"{path}:videos[4]", "not a JSON object"),
        (f"{path}:sentences[4]", "bad caption"),
        (f"{path}:sentences[6]", "bad video_id"),
    ]

    val = open_source(DatasetConfig(path=str(path), format="msrvtt", split="val"), tmp_path / "c")
    assert [r.key for r in _rows(val) if not isinstance(r, RecordError)] == ["video6513"]
    test = BenchmarkSource("msrvtt", path, split="test", cache_dir=tmp_path / "c")
    assert test.get(0).captions == ("a song plays",) and test.get(0).key == "video7010"
    assert f"{path}:sentences[5]" in [e.location for e in _rows(test) if isinstance(e, RecordError)]
    everything = BenchmarkSource("msrvtt", path, cache_dir=tmp_path / "c")
    assert [r.key for r in _rows(everything) if not isinstance(r, RecordError)] == [
        "video0",
        "video1",
        "video6513",
        "video7010",
    ]
    with pytest.raises(
        ValueError, match=r"no videos with split 'dev'; splits in the file: test, train, validate"
    ):
        BenchmarkSource("msrvtt", path, split="dev", cache_dir=tmp_path / "c")


def test_msrvtt_lavis_array_reads_through_coco(tmp_path):
    rows = [
        {"video": "video7010.mp4", "caption": ["a man is talking", "a man speaks"], "image_id": "video7010"},
        {"video": "video7011.mp4", "caption": "a cartoon plays", "image_id": "video7011"},
    ]
    path = _write_json(tmp_path / "msrvtt_lavis" / "cap_test.json", rows)
    assert detect_benchmark(str(path)) is None
    src = open_source(DatasetConfig(path=str(path), root=str(tmp_path / "vids")), tmp_path / "c")
    assert isinstance(src, CocoSource)
    rec = src.get(0)
    assert rec.video == str(tmp_path / "vids" / "video7010.mp4") and rec.image is None
    assert rec.captions == ("a man is talking", "a man speaks") and rec.meta == {"image_id": "video7010"}
    assert src.get(1).captions == ("a cartoon plays",)


# ---------------------------------------------------------------------------------------------
# MSVD

_MSVD_HEADER = (
    "###############################################################\n"
    "# Microsoft Research Video Description Corpus\n"
    "# Format: VideoID_Start_End Description\n"
    "###############################################################\n"
)


def test_msvd_rows_and_errors(tmp_path):
    text = (
        _MSVD_HEADER
        + "-4wsuPCjDBc_5_15 a squirrel is eating a peanut in it's shell\n"  # line 5
        + "-4wsuPCjDBc_5_15 a chipmunk is eating\n"
        + "\n"
        + "not-a-clip a person is cooking\n"  # line 8
        + "-7KMZQEsJW4_205_208 a woman is slicing tofu\n"  # line 9
        + "-4wsuPCjDBc_5_15 a squirrel eats\r\n"  # line 10 (a Windows line end)
    ).encode() + b"-7KMZQEsJW4_205_208 caf\xe9 bad bytes\n"  # line 11: Latin-1, not UTF-8
    path = tmp_path / "msvd" / "AllVideoDescriptions.txt"
    path.parent.mkdir()
    path.write_bytes(text)
    assert detect_benchmark(str(path)) == "msvd"
    root = tmp_path / "msvd" / "YouTubeClips"
    src = open_source(DatasetConfig(path=str(path), root=str(root)), tmp_path / "c")
    assert isinstance(src, BenchmarkSource) and src.format == "msvd"
    rows = _rows(src)
    first, second = rows[0], rows[1]
    assert first.key == "-4wsuPCjDBc_5_15" and first.location == f"{path}:5"
    assert first.video == str(root / "-4wsuPCjDBc_5_15.avi")
    assert first.captions == (
        "a squirrel is eating a peanut in it's shell",
        "a chipmunk is eating",
        "a squirrel eats",
    )
    assert second.key == "-7KMZQEsJW4_205_208" and second.captions == ("a woman is slicing tofu",)
    assert [(e.location, e.reason) for e in rows[2:]] == [
        (f"{path}:8", "bad video name"),
        (f"{path}:11", "not UTF-8"),
    ]


def _many_msvd(folder, n):
    """(file, names in sorted order): the file lists the videos shuffled, so a split has to sort them."""
    names = [f"clip{i:04d}_{i}_{i + 4}" for i in range(n)]
    order = sorted(range(n), key=lambda i: (i * 7919) % n)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "AllVideoDescriptions.txt"
    path.write_text(_MSVD_HEADER + "".join(f"{names[i]} caption {i}\n" for i in order))
    return path, names, [names[i] for i in order]


def test_msvd_standard_split_by_sorted_index(tmp_path):
    path, names, file_order = _many_msvd(tmp_path, 1305)
    assert file_order != names
    keys = {}
    for split in ("train", "val", "test"):
        src = open_source(DatasetConfig(path=str(path), format="msvd", split=split), tmp_path / "c")
        keys[split] = [r.key for r in _rows(src)]
    assert sorted(keys["train"]) == names[:1200]
    assert sorted(keys["val"]) == names[1200:1300]
    assert sorted(keys["test"]) == names[1300:]
    # Within a split, rows stay in file order.
    assert keys["val"] == [n for n in file_order if n in set(names[1200:1300])]
    small, _, _ = _many_msvd(tmp_path / "small", 10)
    with pytest.raises(ValueError, match=r"split 'val' is videos 1200-1299 of the sorted names.*only 10"):
        BenchmarkSource("msvd", small, split="val", cache_dir=tmp_path / "c")


def test_msvd_split_from_a_list_file(tmp_path):
    path, names, _ = _many_msvd(tmp_path, 6)
    listing = tmp_path / "test_list.txt"
    listing.write_text(f"# test videos\n{names[4]}.avi\n\n{names[1]}\n{names[4]}\nmissing_1_2\n")
    src = open_source(DatasetConfig(path=str(path), format="msvd", split=str(listing)), tmp_path / "c")
    rows = _rows(src)
    assert sorted(r.key for r in rows[:2]) == [names[1], names[4]]
    # A listed video without any description is a row to predict on, not to train on.
    assert len(rows) == 3 and isinstance(rows[2], RecordError)
    assert (rows[2].location, rows[2].reason) == (f"{listing}:6", "no caption or question")
    pred = BenchmarkSource(
        "msvd", path, split=str(listing), cache_dir=tmp_path / "c", require_references=False
    )
    assert pred.get(2).key == "missing_1_2" and pred.get(2).captions == ()
    # Editing the list converts again.
    old = os.stat(src.converted_path).st_mtime_ns
    listing.write_text(f"{names[0]}\n")
    os.utime(listing, ns=(old + 10**9, old + 10**9))
    again = BenchmarkSource("msvd", path, split=str(listing), cache_dir=tmp_path / "c")
    assert [r.key for r in _rows(again)] == [names[0]] and not os.path.exists(src.converted_path)
    with pytest.raises(FileNotFoundError, match="MSVD split list"):
        BenchmarkSource("msvd", path, split="dev", cache_dir=tmp_path / "c")


def test_msvd_entries_pure(tmp_path):
    entries = list(msvd_entries(b"# c\nabc_1_2 one\nabc_1_2\nabc_1_2 two\nxyz_3_4\n", "/d/f.txt"))
    assert entries == [
        {
            "location": "/d/f.txt:2",
            "key": "abc_1_2",
            "row": {"id": "abc_1_2", "video": "abc_1_2.avi", "captions": ["one", "two"]},
        },
        {"location": "/d/f.txt:5", "key": "xyz_3_4", "row": {"id": "xyz_3_4", "video": "xyz_3_4.avi"}},
    ]


# ---------------------------------------------------------------------------------------------
# Detection, config and the row schema


def test_detection_leaves_other_files_alone(tmp_path):
    coco = _write_json(tmp_path / "captions_val2014.json", {"images": [], "annotations": []})
    assert detect_benchmark(str(coco)) is None
    notes = tmp_path / "notes.txt"
    notes.write_text("# comment\nsome words here\n")
    assert detect_benchmark(str(notes)) is None
    with pytest.raises(ValueError, match="cannot tell the format"):
        open_source(DatasetConfig(path=str(notes)), tmp_path / "c")


def test_config_accepts_benchmark_keys():
    data = from_dict(
        DataConfig,
        {
            "train": [{"path": "/d/q.json", "format": "okvqa", "annotations": "/d/a.json"}],
            "val": {"path": "/d/AllVideoDescriptions.txt", "format": "msvd", "split": "test"},
        },
    )
    assert data.train[0].annotations == "/d/a.json" and data.val.format == "msvd"
    with pytest.raises(ConfigError, match="must be one of"):
        from_dict(DatasetConfig, {"path": "/d/q.json", "format": "vqa"})


def test_parse_row_references_and_meta():
    row = {
        "image": "a.jpg",
        "domain": "near-domain",
        "question_id": True,
        "image_id": [1],
        "answer_type": "other",
    }
    with pytest.raises(RecordError, match="no caption or question"):
        parse_row(row, "f:1", "1", "/r")
    rec = parse_row(row, "f:1", "1", "/r", require_references=False)
    # Only string and integer metadata is kept (a bool is not an id).
    assert rec.captions == () and rec.meta == {"domain": "near-domain", "answer_type": "other"}
    # A caption that is present but empty is a broken row even for prediction.
    with pytest.raises(RecordError, match="empty caption"):
        parse_row({"image": "a.jpg", "caption": " "}, "f:2", "2", "/r", require_references=False)
    assert hash(rec) == hash(parse_row(row, "f:1", "1", "/r", require_references=False))
