"""Run logging for the trainer: metrics.jsonl, TensorBoard, a console progress line and optional W&B.

Everything a run reports goes through one `RunLogger`, created on every rank but enabled only on rank
0, so call sites need no rank checks. Outputs, all under the run directory:

* ``metrics.jsonl``: the record of the run, one JSON object per line, append-only. Metric lines are
  ``{"step", "kind", "time", <metrics>}``, sample lines ``{"step", "kind": "samples", "time", "tag",
  "lines"}``. ``step`` counts completed optimizer steps, the same number checkpoints carry, so
  `truncate_metrics` can cut the file back to a checkpoint on resume.
* ``tb/``: TensorBoard event files (scalars under ``<kind>/<name>``, text under ``samples/<tag>``),
  written by the dependency-free `EventWriter`.
* ``summary.json``: the final summary, written atomically.
* the console (stderr by default): a progress line with loss, learning rate, throughput and ETA.

Weights & Biases is used only when a project is named, and imported only then.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

from evlgen.fsutil import atomic_write_bytes
from evlgen.train.tensorboard import EventWriter

__all__ = ["METRICS_FILE", "SUMMARY_FILE", "TB_DIR", "RunLogger", "truncate_metrics"]

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
TB_DIR = "tb"
WANDB_ID_FILE = "wandb_id.txt"

# Keys every metrics.jsonl line carries; a metric with one of these names would overwrite them.
_RESERVED_KEYS = frozenset({"step", "kind", "time", "tag", "lines"})
_SAMPLES_KIND = "samples"
_ORDERED_ITEM = re.compile(r"^(\d+)\.")

# flush() after each line already hands the data to the OS, which keeps it through a crash, kill or
# OOM of the process. fsync only adds safety against a machine crash or power loss, and can take
# seconds on network filesystems, so it is rate-limited: at most this much logging is at risk.
_FSYNC_INTERVAL_S = 10.0


def truncate_metrics(run_dir: str | Path, step: int) -> int:
    """Keep only the metrics.jsonl entries with ``step <= step``, rewriting the file atomically.

    A resumed run calls this with its checkpoint's step before logging again: the killed run may have
    logged steps after its last checkpoint, and those are about to be run (and logged) again. Lines
    that are not JSON are dropped too: a torn last line is the normal trace of a crash mid-write (and
    a resumed run that did not truncate first leaves it in the middle), so only that case is silent.
    Returns the number of lines dropped; a missing file is left missing.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return 0
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    kept: list[bytes] = []
    dropped = 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:  # includes UnicodeDecodeError from a multi-byte character cut in half
            dropped += 1
            if number == len(lines):
                log.info("%s: dropping a torn last line (the run was interrupted mid-write)", path)
            else:
                log.warning("%s: dropping line %d, which is not valid JSON", path, number)
            continue
        entry_step = entry.get("step") if isinstance(entry, dict) else None
        if isinstance(entry_step, int) and entry_step > step:
            dropped += 1
            continue
        kept.append(line)
    new = b"".join(line + b"\n" for line in kept)
    if new != raw:
        atomic_write_bytes(path, new)
    if dropped:
        log.info("%s: kept %d entries up to step %d, dropped %d", path, len(kept), step, dropped)
    return dropped


def _number(name: str, value: object) -> float | int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | float):
        return value
    item = getattr(value, "item", None)  # numpy scalars, 0-d numpy arrays and torch tensors
    if callable(item):
        return _number(name, item())
    raise TypeError(f"metric {name!r} must be a number, got {type(value).__name__}")


def _jsonable(value: object) -> object:
    """json.dumps fallback for summaries, which gather values from many places (paths, tensors)."""
    if isinstance(value, Path):
        return str(value)
    for method in ("item", "tolist"):
        convert = getattr(value, method, None)
        if callable(convert):
            try:
                return convert()
            except (TypeError, ValueError, RuntimeError):
                pass  # e.g. .item() of a multi-element tensor: try the next conversion
    return str(value)


def _format_value(name: str, value: float | int) -> str:
    if isinstance(value, int):
        return str(value)
    if name == "lr" or name.startswith("lr_") or name.endswith("_lr"):
        return f"{value:.1e}"
    if name.endswith("_per_s"):
        return f"{value:.1f}"
    return f"{value:.4g}"


def _format_duration(seconds: float) -> str:
    """H:MM:SS, with hours growing past 24 (long runs are easier to read that way than '1 day, ...')."""
    if not math.isfinite(seconds):
        return "?"
    total = int(round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _markdown_list(lines: list[str]) -> str:
    """One bullet per line, escaped so that TensorBoard's Markdown shows the text as written."""
    # Unescaped, consecutive lines would merge into one paragraph, and a generated caption with '*',
    # '_' or '`' inside, or '#', '-', '>' or '1.' in front, would turn into formatting.
    items = []
    for line in lines:
        line = " ".join(line.split())
        for char in "\\`*_[]":
            line = line.replace(char, "\\" + char)
        if line[:1] in ("#", "-", "+", ">"):
            line = "\\" + line
        line = _ORDERED_ITEM.sub(r"\1\\.", line, count=1)
        items.append("- " + line)
    return "\n".join(items)


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class RunLogger:
    """Rank-0 logging of a run: metrics.jsonl, TensorBoard scalars/text, a progress line, optional W&B.

    run_dir: where metrics.jsonl, summary.json and tb/ go (created if missing).
    total_steps: the run's length in optimizer steps, for the progress percentage and ETA.
    start_step: the step the run resumed from (0 for a fresh run). The ETA counts only steps done by
      this process, and TensorBoard is told to hide points the previous process logged after it.
      Call `truncate_metrics(run_dir, start_step)` before creating the logger to do the same for
      metrics.jsonl.
    enabled: False on non-zero ranks: every method is then a no-op and no file is created.
    tensorboard: write TensorBoard event files to run_dir/tb.
    wandb_project, wandb_config: log to this W&B project too (if wandb is installed). The W&B run id
      is kept in run_dir/wandb_id.txt so that a resumed run continues the same W&B run.
    stream: where the progress line goes (default sys.stderr). On a terminal the line is rewritten in
      place; otherwise (a CI log, a file) each call prints a full line.
    clock: monotonic time source for the ETA; tests inject a fake one.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        total_steps: int,
        start_step: int = 0,
        enabled: bool = True,
        tensorboard: bool = True,
        wandb_project: str | None = None,
        wandb_config: dict | None = None,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if total_steps < 0 or start_step < 0:
            raise ValueError(f"steps must be >= 0, got total_steps={total_steps}, start_step={start_step}")
        self.run_dir = Path(run_dir)
        self.total_steps = total_steps
        self.start_step = start_step
        self.enabled = enabled
        self._closed = False
        self._stream = stream if stream is not None else sys.stderr
        self._tty = _isatty(self._stream)
        self._clock = clock
        self._t0 = clock()
        self._line_open = False  # a TTY progress line is on screen without its newline
        self._line_width = 0
        self._tb: EventWriter | None = None
        self._wandb: Any = None
        self._wandb_run: Any = None
        if not enabled:
            return

        self.run_dir.mkdir(parents=True, exist_ok=True)
        metrics_path = self.run_dir / METRICS_FILE
        torn = (
            metrics_path.exists() and metrics_path.stat().st_size > 0 and not _ends_with_newline(metrics_path)
        )
        self._metrics = open(metrics_path, "a", encoding="utf-8", newline="\n")
        if torn:
            # Keep a torn line from a crash on its own line instead of gluing the next entry to it.
            self._metrics.write("\n")
        self._last_fsync = time.monotonic()
        if tensorboard:
            self._tb = EventWriter(self.run_dir / TB_DIR)
            if start_step > 0:
                self._tb.add_session_start(start_step + 1)
                self._tb.flush()
        if wandb_project:
            self._init_wandb(wandb_project, wandb_config)

    def _init_wandb(self, project: str, config: dict | None) -> None:
        try:
            import wandb
        except ImportError:
            log.warning("wandb_project is set but wandb is not installed; continuing without W&B")
            return
        id_file = self.run_dir / WANDB_ID_FILE
        run_id = id_file.read_text(encoding="utf-8").strip() if id_file.exists() else None
        run = wandb.init(project=project, config=config, dir=str(self.run_dir), id=run_id, resume="allow")
        if run_id is None:
            id_file.write_text(f"{run.id}\n", encoding="utf-8")
        self._wandb, self._wandb_run = wandb, run

    def _active(self) -> bool:
        if not self.enabled:
            return False
        if self._closed:
            raise ValueError(f"RunLogger for {self.run_dir} is closed")
        return True

    def _append(self, entry: dict) -> None:
        self._metrics.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self._metrics.flush()
        now = time.monotonic()
        if now - self._last_fsync >= _FSYNC_INTERVAL_S:
            os.fsync(self._metrics.fileno())
            self._last_fsync = now

    def log(self, step: int, metrics: Mapping[str, float | int], *, kind: str = "train") -> None:
        """Record `metrics` at `step` (completed optimizer steps); kind is "train", "val" or another split.

        Values are stored as given in metrics.jsonl (NaN and inf as the non-standard NaN/Infinity tokens
        that Python's json and pandas read) and as float32 scalars ``<kind>/<name>`` in TensorBoard.
        """
        if not self._active():
            return
        if not kind or kind == _SAMPLES_KIND:
            raise ValueError(f"kind must be a non-empty name other than {_SAMPLES_KIND!r}, got {kind!r}")
        clash = _RESERVED_KEYS.intersection(metrics)
        if clash:
            raise ValueError(f"metric names {sorted(clash)} are reserved in {METRICS_FILE}")
        values = {name: _number(name, value) for name, value in metrics.items()}
        self._append({"step": step, "kind": kind, "time": time.time(), **values})
        if self._tb is not None:
            for name, value in values.items():
                self._tb.add_scalar(f"{kind}/{name}", value, step)
            self._tb.flush()
        if self._wandb_run is not None:
            self._wandb_run.log({f"{kind}/{name}": value for name, value in values.items()}, step=step)
        if kind == "train":
            self._progress(step, values)
        else:
            parts = [f"{kind} step {step}"] + [f"{n} {_format_value(n, v)}" for n, v in values.items()]
            self._print_line(" | ".join(parts))

    def log_text(self, step: int, tag: str, lines: list[str]) -> None:
        """Record text at `step`, e.g. captions generated for a fixed set of images."""
        if not self._active():
            return
        lines = [str(line) for line in lines]
        self._append({"step": step, "kind": _SAMPLES_KIND, "time": time.time(), "tag": tag, "lines": lines})
        if self._tb is not None:
            self._tb.add_text(f"{_SAMPLES_KIND}/{tag}", _markdown_list(lines), step)
            self._tb.flush()
        if self._wandb_run is not None:
            table = self._wandb.Table(columns=["text"], data=[[line] for line in lines])
            self._wandb_run.log({f"{_SAMPLES_KIND}/{tag}": table}, step=step)

    def summary(self, data: dict) -> None:
        """Write the final summary to run_dir/summary.json (atomically) and print it."""
        if not self._active():
            return
        text = json.dumps(data, indent=2, ensure_ascii=False, default=_jsonable)
        atomic_write_bytes(self.run_dir / SUMMARY_FILE, (text + "\n").encode("utf-8"))
        self._print_line(f"summary ({self.run_dir / SUMMARY_FILE}):\n{text}")
        if self._wandb_run is not None:
            self._wandb_run.summary.update(json.loads(text))

    def eta_seconds(self, step: int) -> float:
        """Seconds left, from the mean time per step this process has taken so far (nan before any)."""
        done = step - self.start_step
        left = max(self.total_steps - step, 0)
        if left == 0:
            return 0.0
        if done <= 0:
            return math.nan
        return (self._clock() - self._t0) / done * left

    def progress_line(self, step: int, metrics: Mapping[str, float | int]) -> str:
        """`step 120/1000 (12%) | loss 2.345 | lr 1.2e-04 | 85.3 img/s | ETA 0:12:34`."""
        percent = 100 * step // self.total_steps if self.total_steps > 0 else 100
        parts = [f"step {step}/{self.total_steps} ({percent}%)"]
        for name in ("loss", "lr"):
            if name in metrics:
                parts.append(f"{name} {_format_value(name, metrics[name])}")
        if "images_per_s" in metrics:
            parts.append(f"{metrics['images_per_s']:.1f} img/s")
        parts.append(f"ETA {_format_duration(self.eta_seconds(step))}")
        return " | ".join(parts)

    def _progress(self, step: int, metrics: Mapping[str, float | int]) -> None:
        line = self.progress_line(step, metrics)
        if not self._tty:
            self._print_line(line)
            return
        # Pad with spaces to wipe the rest of a longer previous line (no ANSI codes needed).
        self._stream.write("\r" + line.ljust(self._line_width))
        self._stream.flush()
        self._line_open, self._line_width = True, len(line)

    def _print_line(self, text: str) -> None:
        if self._line_open:
            self._stream.write("\n")
            self._line_open, self._line_width = False, 0
        self._stream.write(text + "\n")
        self._stream.flush()

    def close(self) -> None:
        """Finish the progress line, fsync metrics.jsonl, close TensorBoard and W&B. Idempotent."""
        if not self.enabled or self._closed:
            return
        self._closed = True
        if self._line_open:
            self._stream.write("\n")
            self._stream.flush()
            self._line_open = False
        self._metrics.flush()
        os.fsync(self._metrics.fileno())
        self._metrics.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
