"""Tests for evlgen.train.tensorboard and evlgen.train.logger.

Event files are read back with tensorboard's own reader (EventAccumulator, which checks every record's
CRC) and parsed with its protobuf classes: an independent reference for the hand-written encoding.
"""

import io
import json
import logging
import os
import re
import socket
import struct
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as reference_masked_crc32c

from evlgen.train.logger import METRICS_FILE, SUMMARY_FILE, RunLogger, truncate_metrics
from evlgen.train.tensorboard import EventWriter, crc32c, masked_crc32c


def _accumulate(logdir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _scalars(acc: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def _texts(acc: EventAccumulator, tag: str) -> list[tuple[int, str]]:
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(tag)]


def _records(path: Path) -> list[bytes]:
    """Split a TFRecord file, checking both CRCs against tensorboard's implementation."""
    data, pos, payloads = path.read_bytes(), 0, []
    while pos < len(data):
        (length,) = struct.unpack_from("<Q", data, pos)
        (length_crc,) = struct.unpack_from("<I", data, pos + 8)
        assert length_crc == reference_masked_crc32c(data[pos : pos + 8])
        payload = data[pos + 12 : pos + 12 + length]
        (payload_crc,) = struct.unpack_from("<I", data, pos + 12 + length)
        assert payload_crc == reference_masked_crc32c(payload)
        payloads.append(payload)
        pos += 16 + length
    assert pos == len(data)
    return payloads


def _f32(x: float) -> float:
    return float(np.float32(x))


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class TTYStream(io.StringIO):
    def isatty(self) -> bool:
        return True


# --- CRC32C ---------------------------------------------------------------------------------------


def test_crc32c_known_vectors():
    assert crc32c(b"") == 0
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c(b"\xff" * 32) == 0x62A8AB43  # RFC 3720 B.4


def test_crc32c_running_and_masked_match_reference():
    data = bytes(range(256)) * 3 + b"evlgen"
    assert crc32c(data[100:], crc32c(data[:100])) == crc32c(data)
    for chunk in (b"", b"a", data, struct.pack("<Q", 123456789)):
        assert masked_crc32c(chunk) == reference_masked_crc32c(chunk)


# --- EventWriter ----------------------------------------------------------------------------------


def test_event_writer_scalars_and_text_read_back(tmp_path):
    with EventWriter(tmp_path) as writer:
        writer.add_scalar("train/loss", 2.345, 1, wall_time=1234.5)
        writer.add_scalar("train/loss", 1.0 / 3.0, 2)
        writer.add_scalar("train/lr", 1.2e-4, 2)
        writer.add_scalar("val/acc", 1, 10**12)  # int value, step beyond 32 bits
        writer.add_text("samples/captions", "a red *circle*\n\nünïcode", 3)

    name = writer.path.name
    assert writer.path.parent == tmp_path
    assert re.fullmatch(
        rf"events\.out\.tfevents\.\d+\.{re.escape(socket.gethostname())}\.{os.getpid()}\.evlgen", name
    )

    acc = _accumulate(tmp_path)
    assert sorted(acc.Tags()["scalars"]) == ["train/loss", "train/lr", "val/acc"]
    assert _scalars(acc, "train/loss") == [(1, _f32(2.345)), (2, _f32(1.0 / 3.0))]
    assert acc.Scalars("train/loss")[0].wall_time == 1234.5
    assert _scalars(acc, "train/lr") == [(2, _f32(1.2e-4))]
    assert _scalars(acc, "val/acc") == [(10**12, 1.0)]

    assert acc.Tags()["tensors"] == ["samples/captions"]
    assert acc.PluginTagToContent("text") == {"samples/captions": b""}
    assert _texts(acc, "samples/captions") == [(3, "a red *circle*\n\nünïcode")]
    assert acc.Tensors("samples/captions")[0].tensor_proto.dtype == 7  # DT_STRING


def test_event_writer_records_parse_as_events(tmp_path):
    with EventWriter(tmp_path) as writer:
        writer.add_scalar("x", float("nan"), 0)
        writer.add_scalar("big", 1e300, 1)  # beyond float32: stored as inf, not an error
        writer.add_scalar("neg", -2.5, -3)

    events = [event_pb2.Event.FromString(p) for p in _records(writer.path)]
    assert events[0].file_version == "brain.Event:2"
    assert not events[0].HasField("summary")
    values = [(e.step, e.summary.value[0].tag, e.summary.value[0].simple_value) for e in events[1:]]
    assert values[0][:2] == (0, "x") and np.isnan(values[0][2])
    assert values[1:] == [(1, "big", float("inf")), (-3, "neg", -2.5)]


def test_event_writer_flush_makes_records_visible_and_close_is_final(tmp_path):
    writer = EventWriter(tmp_path)
    writer.add_scalar("a", 1.0, 1)
    writer.flush()
    assert _scalars(_accumulate(tmp_path), "a") == [(1, 1.0)]
    writer.close()
    writer.close()
    with pytest.raises(ValueError, match="closed"):
        writer.add_scalar("a", 2.0, 2)


def test_event_writers_in_the_same_second_get_distinct_files_in_order(tmp_path):
    with EventWriter(tmp_path) as first:
        first.add_scalar("a", 1.0, 1)
    with EventWriter(tmp_path) as second:
        second.add_scalar("a", 2.0, 2)
    assert first.path != second.path
    assert sorted(tmp_path.iterdir()) == [first.path, second.path]
    assert _scalars(_accumulate(tmp_path), "a") == [(1, 1.0), (2, 2.0)]


def test_session_start_hides_events_logged_after_the_restart_step(tmp_path):
    with EventWriter(tmp_path) as writer:
        for step in range(1, 7):
            writer.add_scalar("a", float(step), step)
    with EventWriter(tmp_path) as writer:
        writer.add_session_start(5)
        for step in range(5, 8):
            writer.add_scalar("a", 10.0 * step, step)
    expected = [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 50.0), (6, 60.0), (7, 70.0)]
    assert _scalars(_accumulate(tmp_path), "a") == expected


def test_writer_and_logger_import_neither_tensorboard_nor_wandb():
    code = (
        "import sys, evlgen.train.tensorboard, evlgen.train.logger\n"
        "print(sorted(m for m in ('tensorboard', 'wandb', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- RunLogger ------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_logger_writes_metrics_jsonl_and_tensorboard(tmp_path):
    stream = io.StringIO()
    with RunLogger(tmp_path / "run", total_steps=10, stream=stream, clock=FakeClock()) as logger:
        for step in (1, 2, 3):
            logger.log(step, {"loss": 3.0 - 0.5 * step, "lr": 1e-4 * step, "images_per_s": 80 + step})
        logger.log(3, {"loss": 2.25, "cider": np.float64(0.5), "n": torch.tensor(7)}, kind="val")
        logger.log_text(3, "captions", ["a red circle", "two *blue* squares"])

    entries = _read_jsonl(tmp_path / "run" / METRICS_FILE)
    for entry in entries:
        assert isinstance(entry.pop("time"), float)
    assert entries == [
        {"step": 1, "kind": "train", "loss": 2.5, "lr": 1e-4, "images_per_s": 81},
        {"step": 2, "kind": "train", "loss": 2.0, "lr": 2e-4, "images_per_s": 82},
        {"step": 3, "kind": "train", "loss": 1.5, "lr": 1e-4 * 3, "images_per_s": 83},
        {"step": 3, "kind": "val", "loss": 2.25, "cider": 0.5, "n": 7},
        {"step": 3, "kind": "samples", "tag": "captions", "lines": ["a red circle", "two *blue* squares"]},
    ]

    acc = _accumulate(tmp_path / "run" / "tb")
    assert sorted(acc.Tags()["scalars"]) == sorted(
        ["train/loss", "train/lr", "train/images_per_s", "val/loss", "val/cider", "val/n"]
    )
    assert _scalars(acc, "train/loss") == [(1, 2.5), (2, 2.0), (3, 1.5)]
    assert _scalars(acc, "train/lr") == [(s, _f32(1e-4 * s)) for s in (1, 2, 3)]
    assert _scalars(acc, "val/cider") == [(3, 0.5)]
    assert list(acc.PluginTagToContent("text")) == ["samples/captions"]
    assert _texts(acc, "samples/captions") == [(3, "- a red circle\n- two \\*blue\\* squares")]


def test_logger_without_tensorboard_writes_no_event_files(tmp_path):
    with RunLogger(tmp_path, total_steps=5, tensorboard=False, stream=io.StringIO()) as logger:
        logger.log(1, {"loss": 1.0})
    assert sorted(p.name for p in tmp_path.iterdir()) == [METRICS_FILE]


def test_disabled_logger_is_a_no_op(tmp_path):
    stream = io.StringIO()
    run_dir = tmp_path / "rank1"
    logger = RunLogger(run_dir, total_steps=5, enabled=False, wandb_project="p", stream=stream)
    logger.log(1, {"loss": 1.0})
    logger.log(1, {"loss": 1.0}, kind="val")
    logger.log_text(1, "captions", ["x"])
    logger.summary({"done": True})
    logger.close()
    logger.log(2, {"loss": 1.0})  # even after close
    assert not run_dir.exists()
    assert stream.getvalue() == ""


def test_progress_line_non_tty_matches_the_documented_format(tmp_path):
    clock = FakeClock(50.0)
    stream = io.StringIO()
    with RunLogger(tmp_path, total_steps=1000, stream=stream, clock=clock, tensorboard=False) as logger:
        # 120 steps took 120 * 754 / 880 s, so the remaining 880 steps take 754 s = 0:12:34.
        clock.now += 120 * 754 / 880
        logger.log(120, {"loss": 2.3451, "lr": 1.2e-4, "images_per_s": 85.31, "grad_norm": 0.7})
        logger.log(130, {"loss": 2.25})  # no time passed: 130 steps in the same 102.8 s
        logger.log(130, {"loss": 2.0, "cider": 0.4567, "n": 12, "lr": 3e-5}, kind="val")
    assert stream.getvalue().splitlines() == [
        "step 120/1000 (12%) | loss 2.345 | lr 1.2e-04 | 85.3 img/s | ETA 0:12:34",
        "step 130/1000 (13%) | loss 2.25 | ETA 0:11:28",
        "val step 130 | loss 2 | cider 0.4567 | n 12 | lr 3.0e-05",
    ]


def test_eta_counts_only_steps_done_since_a_resume(tmp_path):
    clock = FakeClock()
    logger = RunLogger(tmp_path, total_steps=1000, start_step=500, clock=clock, enabled=False)
    assert np.isnan(logger.eta_seconds(500))
    assert logger.progress_line(500, {}) == "step 500/1000 (50%) | ETA ?"
    clock.now += 50.0
    assert logger.eta_seconds(600) == pytest.approx(200.0)  # 100 steps in 50 s, 400 to go
    assert logger.progress_line(600, {}).endswith("ETA 0:03:20")
    clock.now += 200 * 600.0 - 50.0  # 200 steps at 10 min each, 300 to go
    assert logger.progress_line(700, {}).endswith("ETA 50:00:00")  # hours run past 24
    assert logger.eta_seconds(1000) == 0.0


def test_progress_line_on_a_tty_is_rewritten_in_place(tmp_path):
    stream = TTYStream()
    with RunLogger(tmp_path, total_steps=100, stream=stream, clock=FakeClock(), tensorboard=False) as logger:
        logger.log(1, {"loss": 12.5})
        logger.log(2, {"loss": 1.0})
        logger.log(2, {"loss": 1.5}, kind="val")
        logger.log(3, {"loss": 0.5})
    assert stream.getvalue() == (
        "\rstep 1/100 (1%) | loss 12.5 | ETA 0:00:00"
        "\rstep 2/100 (2%) | loss 1 | ETA 0:00:00   "  # padded over the longer previous line
        "\nval step 2 | loss 1.5\n"
        "\rstep 3/100 (3%) | loss 0.5 | ETA 0:00:00"
        "\n"
    )


def test_logger_rejects_bad_input_and_use_after_close(tmp_path):
    logger = RunLogger(tmp_path, total_steps=5, stream=io.StringIO(), tensorboard=False)
    with pytest.raises(ValueError, match="reserved"):
        logger.log(1, {"step": 3.0})
    with pytest.raises(ValueError, match="kind"):
        logger.log(1, {"loss": 1.0}, kind="samples")
    with pytest.raises(TypeError, match="'loss' must be a number"):
        logger.log(1, {"loss": "low"})
    logger.close()
    logger.close()
    with pytest.raises(ValueError, match="closed"):
        logger.log(1, {"loss": 1.0})
    with pytest.raises(ValueError, match="total_steps"):
        RunLogger(tmp_path, total_steps=-1)


def test_summary_is_written_atomically_and_printed(tmp_path):
    stream = io.StringIO()
    data = {
        "steps": 10,
        "final_loss": 1.25,
        "ckpt": tmp_path / "ckpt",
        "acc": np.float32(0.5),
        "t": torch.ones(2),
    }
    with RunLogger(tmp_path, total_steps=10, stream=stream, tensorboard=False) as logger:
        logger.summary(data)
    expected = {"steps": 10, "final_loss": 1.25, "ckpt": str(tmp_path / "ckpt"), "acc": 0.5, "t": [1.0, 1.0]}
    assert json.loads((tmp_path / SUMMARY_FILE).read_text(encoding="utf-8")) == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == [METRICS_FILE, SUMMARY_FILE]  # no temp file left
    printed = stream.getvalue()
    assert printed.startswith(f"summary ({tmp_path / SUMMARY_FILE}):\n")
    assert json.loads(printed.split("\n", 1)[1]) == expected


# --- resume ---------------------------------------------------------------------------------------


def _metric_lines(steps: list[int]) -> list[str]:
    return [json.dumps({"step": s, "kind": "train", "time": 1.0, "loss": 1.0 / s}) for s in steps]


def test_truncate_metrics_keeps_steps_up_to_the_checkpoint_and_drops_a_torn_line(tmp_path):
    lines = _metric_lines([1, 2, 3])
    lines.insert(2, json.dumps({"step": 2, "kind": "samples", "tag": "c", "lines": ["x"]}))
    lines += _metric_lines([4, 5])
    path = tmp_path / METRICS_FILE
    path.write_text("\n".join(lines) + "\n" + '{"step": 6, "kind": "tr', encoding="utf-8")

    assert truncate_metrics(tmp_path, 3) == 3  # steps 4 and 5, and the torn line
    assert path.read_text(encoding="utf-8") == "\n".join(lines[:4]) + "\n"
    assert not (tmp_path / (METRICS_FILE + ".tmp")).exists()

    before = path.stat().st_mtime_ns
    assert truncate_metrics(tmp_path, 3) == 0
    assert path.stat().st_mtime_ns == before  # nothing to do, nothing rewritten
    assert truncate_metrics(tmp_path, 0) == 4
    assert path.read_bytes() == b""
    assert truncate_metrics(tmp_path / "missing", 3) == 0
    assert not (tmp_path / "missing").exists()


def test_truncate_metrics_handles_a_torn_multibyte_character_and_a_bad_middle_line(tmp_path, caplog):
    good = _metric_lines([1, 2])
    torn = json.dumps({"step": 3, "kind": "samples", "lines": ["ünï"]}, ensure_ascii=False).encode()[:-6]
    path = tmp_path / METRICS_FILE
    path.write_bytes(good[0].encode() + b"\n{not json\n" + good[1].encode() + b"\n" + torn)
    with caplog.at_level(logging.INFO, logger="evlgen.train.logger"):
        assert truncate_metrics(tmp_path, 10) == 2
    assert path.read_text(encoding="utf-8") == good[0] + "\n" + good[1] + "\n"
    assert "line 2, which is not valid JSON" in caplog.text
    assert "torn last line" in caplog.text


def test_logger_appends_after_a_torn_line_on_a_line_of_its_own(tmp_path):
    path = tmp_path / METRICS_FILE
    path.write_text(_metric_lines([1])[0] + '\n{"step": 2, "ki', encoding="utf-8")
    with RunLogger(tmp_path, total_steps=5, start_step=1, stream=io.StringIO(), tensorboard=False) as logger:
        logger.log(2, {"loss": 0.5})
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[1] == '{"step": 2, "ki'
    assert json.loads(lines[2])["loss"] == 0.5
    truncate_metrics(tmp_path, 5)
    assert [e["step"] for e in _read_jsonl(path)] == [1, 2]


def test_resumed_run_replaces_the_steps_logged_after_the_checkpoint(tmp_path):
    with RunLogger(tmp_path, total_steps=10, stream=io.StringIO()) as logger:
        for step in range(1, 7):
            logger.log(step, {"loss": float(step)})
    # Killed after step 6; the last checkpoint was at step 4.
    truncate_metrics(tmp_path, 4)
    with RunLogger(tmp_path, total_steps=10, start_step=4, stream=io.StringIO()) as logger:
        for step in range(5, 8):
            logger.log(step, {"loss": 10.0 * step})

    expected = [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 50.0), (6, 60.0), (7, 70.0)]
    assert [(e["step"], e["loss"]) for e in _read_jsonl(tmp_path / METRICS_FILE)] == expected
    assert _scalars(_accumulate(tmp_path / "tb"), "train/loss") == expected


# --- Weights & Biases -----------------------------------------------------------------------------


def test_wandb_missing_warns_and_logging_goes_on(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with caplog.at_level(logging.WARNING, logger="evlgen.train.logger"):
        logger = RunLogger(tmp_path, total_steps=5, wandb_project="evlgen", stream=io.StringIO())
        logger.log(1, {"loss": 1.0})
        logger.log_text(1, "captions", ["x"])
        logger.summary({"ok": True})
        logger.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["wandb_project is set but wandb is not installed; continuing without W&B"]
    assert [e["step"] for e in _read_jsonl(tmp_path / METRICS_FILE)] == [1, 1]


def _fake_wandb(calls: list) -> types.ModuleType:
    module = types.ModuleType("wandb")

    class Run:
        def __init__(self, run_id: str) -> None:
            self.id = run_id
            self.summary = types.SimpleNamespace(update=lambda d: calls.append(("summary", d)))

        def log(self, data: dict, step: int) -> None:
            calls.append(("log", step, data))

        def finish(self) -> None:
            calls.append(("finish",))

    def init(**kwargs: object) -> Run:
        calls.append(("init", kwargs))
        return Run(kwargs["id"] or "fresh-id")

    module.init = init
    module.Table = lambda columns, data: ("table", columns, data)
    return module


def test_wandb_receives_metrics_samples_summary_and_resumes_the_same_run(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(calls))
    with RunLogger(
        tmp_path, total_steps=5, wandb_project="proj", wandb_config={"lr": 1e-4}, stream=io.StringIO()
    ) as logger:
        logger.log(1, {"loss": 1.0})
        logger.log(1, {"cider": 0.5}, kind="val")
        logger.log_text(1, "captions", ["a", "b"])
        logger.summary({"steps": 1})
    assert calls == [
        (
            "init",
            {"project": "proj", "config": {"lr": 1e-4}, "dir": str(tmp_path), "id": None, "resume": "allow"},
        ),
        ("log", 1, {"train/loss": 1.0}),
        ("log", 1, {"val/cider": 0.5}),
        ("log", 1, {"samples/captions": ("table", ["text"], [["a"], ["b"]])}),
        ("summary", {"steps": 1}),
        ("finish",),
    ]
    calls.clear()
    RunLogger(tmp_path, total_steps=5, start_step=1, wandb_project="proj", stream=io.StringIO()).close()
    assert calls[0][1]["id"] == "fresh-id"
