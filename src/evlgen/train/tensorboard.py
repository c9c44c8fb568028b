"""A dependency-free writer of TensorBoard event files (scalars and text).

The `tensorboard` package pulls in protobuf, grpc and a web server; training only needs to append a
few small records, so evlgen writes the format itself:

* a file is a sequence of TFRecords: uint64 length (little-endian), masked CRC32C of those 8 bytes,
  the payload, masked CRC32C of the payload;
* each payload is a serialized `tensorboard.Event` protobuf, encoded here by hand. Field numbers are
  those of tensorboard's event.proto, summary.proto, tensor.proto, tensor_shape.proto and types.proto.

Only what the trainer needs is encoded: the file-version header, scalar summaries, text summaries
(tensor summaries tagged for the text plugin) and a session-start marker for resumed runs. The tests
read the files back with tensorboard's own `EventAccumulator`, which also checks every CRC.
"""

from __future__ import annotations

import math
import os
import socket
import struct
import time
from pathlib import Path
from types import TracebackType

__all__ = ["EventWriter", "crc32c", "masked_crc32c"]

_U32 = 0xFFFFFFFF
_U64 = 0xFFFFFFFFFFFFFFFF

# Wire types of the protobuf encoding.
_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5

# types.proto: DataType.DT_STRING.
_DT_STRING = 7
# event.proto: SessionLog.SessionStatus.START.
_SESSION_START = 1


def _crc32c_table() -> tuple[int, ...]:
    poly = 0x82F63B78  # Castagnoli polynomial, bit-reversed (the data is processed LSB first)
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ poly if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes, crc: int = 0) -> int:
    """CRC-32C (Castagnoli) of `data`; pass a previous result as `crc` to continue a running checksum.

    Pure Python, one table lookup per byte: fast enough for event records of a few hundred bytes.
    """
    table = _CRC32C_TABLE
    crc ^= _U32
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ _U32


def masked_crc32c(data: bytes) -> int:
    """The TFRecord checksum: CRC-32C rotated right by 15 bits plus a constant.

    TFRecord masks the CRC because a CRC computed over data that itself embeds CRCs is weak.
    """
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & _U32


def _varint(value: int) -> bytes:
    # Negative int64 values are encoded as their 64-bit two's complement (10 bytes), as protobuf does.
    value &= _U64
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _int_field(field: int, value: int) -> bytes:
    return _key(field, _VARINT) + _varint(value)


def _double_field(field: int, value: float) -> bytes:
    return _key(field, _FIXED64) + struct.pack("<d", value)


def _float_field(field: int, value: float) -> bytes:
    try:
        packed = struct.pack("<f", value)
    except OverflowError:
        # Beyond float32 range: a diverged loss should show up as inf rather than stop training.
        packed = struct.pack("<f", math.copysign(math.inf, value))
    return _key(field, _FIXED32) + packed


def _bytes_field(field: int, value: bytes) -> bytes:
    return _key(field, _LEN) + _varint(len(value)) + value


def _event(wall_time: float, step: int | None = None, **fields: bytes) -> bytes:
    """An Event message: wall_time = 1, step = 2, and pre-encoded sub-messages given by field name."""
    numbers = {"file_version": 3, "summary": 5, "session_log": 7}
    out = _double_field(1, wall_time)
    if step is not None:
        out += _int_field(2, step)
    for name, payload in fields.items():
        out += _bytes_field(numbers[name], payload)
    return out


class EventWriter:
    """Append scalar and text summaries to a new TensorBoard event file in `logdir`.

    Writes are buffered; call `flush()` to make them visible to a running TensorBoard. Use as a
    context manager or call `close()`.
    """

    def __init__(self, logdir: str | Path) -> None:
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        host, pid, stamp = socket.gethostname(), os.getpid(), int(time.time())
        while True:
            self.path = self.logdir / f"events.out.tfevents.{stamp}.{host}.{pid}.evlgen"
            try:
                # Exclusive create: a second writer opened in the same second by the same process (a
                # resume in one process) must not truncate the first file. Bumping the timestamp keeps
                # the name format and sorts the newer file after the older, which TensorBoard relies on.
                self._file = open(self.path, "xb")
                break
            except FileExistsError:
                stamp += 1
        self._closed = False
        self._write(_event(time.time(), file_version=b"brain.Event:2"))

    def _write(self, payload: bytes) -> None:
        if self._closed:
            raise ValueError(f"EventWriter for {self.path} is closed")
        header = struct.pack("<Q", len(payload))
        self._file.write(
            header
            + struct.pack("<I", masked_crc32c(header))
            + payload
            + struct.pack("<I", masked_crc32c(payload))
        )

    def add_scalar(self, tag: str, value: float, step: int, wall_time: float | None = None) -> None:
        """Record `value` (stored as float32, as TensorBoard does) for `tag` at `step`."""
        summary_value = _bytes_field(1, tag.encode()) + _float_field(2, float(value))
        summary = _bytes_field(1, summary_value)
        self._write(_event(time.time() if wall_time is None else wall_time, int(step), summary=summary))

    def add_text(self, tag: str, text: str, step: int, wall_time: float | None = None) -> None:
        """Record `text` (rendered as Markdown by TensorBoard's text plugin) for `tag` at `step`."""
        plugin_data = _bytes_field(1, b"text")  # PluginData.plugin_name
        metadata = _bytes_field(1, plugin_data)  # SummaryMetadata.plugin_data
        tensor = (
            _int_field(1, _DT_STRING)  # TensorProto.dtype
            + _bytes_field(2, b"")  # TensorProto.tensor_shape: no dims, a scalar
            + _bytes_field(8, text.encode())  # TensorProto.string_val
        )
        summary_value = _bytes_field(1, tag.encode()) + _bytes_field(9, metadata) + _bytes_field(8, tensor)
        summary = _bytes_field(1, summary_value)
        self._write(_event(time.time() if wall_time is None else wall_time, int(step), summary=summary))

    def add_session_start(self, step: int) -> None:
        """Mark a restart at `step`: TensorBoard then discards earlier-written events with step >= `step`.

        A resumed run calls this with (checkpoint step + 1), so points logged by the killed run after
        its last checkpoint are hidden instead of drawn as a second, overlapping curve.
        """
        self._write(_event(time.time(), int(step), session_log=_int_field(1, _SESSION_START)))

    def flush(self) -> None:
        if not self._closed:
            self._file.flush()

    def close(self) -> None:
        if not self._closed:
            self._file.close()
            self._closed = True

    def __enter__(self) -> EventWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
