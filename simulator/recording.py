"""Recordings: the raw order stream from a broker in a file, and that file as a replay source.

File format: the line `GMVREC1\\n`, a JSON header line (window, brands), then one record per
message: a kind byte (0 orders, 1 chatbot), a little-endian uint32 length, the payload as it
came off the wire. A (producer, seq) is written once even if the broker delivered it twice,
so a replay of the file adds up to exactly what was aggregated. A recording keeps no
partitions: a replay splits the batches again, by its own.
"""

from __future__ import annotations

import struct
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

import orjson

from ticker.core.dimensions import Window
from ticker.core.partitions import stream_name
from ticker.core.sequence import Watermarks
from ticker.core.wire import MAX_ORDER_CENTS, BatchError, ChatbotCount, Limits, OrderBatch, \
    decode, decode_chatbot

from .curve_csv import MAX_MINUTES
from .flow import misfit

MAGIC = b"GMVREC1\n"
_RECORD = struct.Struct("<BI")
ORDERS, CHATBOT = 0, 1


class RecordingError(ValueError):
    """A file that is not a readable recording (the operator's mistake, named by path)."""


def _limits(window: Window, n_brands: int) -> Limits:
    return Limits(n_brands=n_brands, n_minutes=window.minutes, n_countries=12, n_platforms=3,
                  max_order_cents=MAX_ORDER_CENTS)


class RecordingWriter:
    def __init__(self, file: BinaryIO, window: Window, n_brands: int) -> None:
        self.file, self.limits = file, _limits(window, n_brands)
        self.seen = Watermarks(self.limits)
        self.messages = self.orders = self.gmv_cents = self.skipped = 0
        file.write(MAGIC + orjson.dumps({"window": window.as_dict(), "n_brands": n_brands})
                   + b"\n")

    def write(self, kind: int, payload: bytes, partition: int = 0) -> bool:
        """Record one message of `partition` (its topic's) if valid and new; False if skipped
        (invalid or a duplicate: a (producer, partition, seq) seen before)."""
        try:
            message = decode_chatbot(payload, self.limits) if kind == CHATBOT \
                else decode(payload, self.limits)
            stream = stream_name(message.producer, partition)
            if self.seen.seen(stream, message.seq):
                raise BatchError("duplicate", "")
            self.seen.admit(stream, message.seq)
        except BatchError:
            self.skipped += 1
            return False
        self.seen.mark(stream, message.seq)
        self.file.write(_RECORD.pack(kind, len(payload)) + payload)
        self.messages += 1
        if isinstance(message, OrderBatch):
            self.orders += len(message)
            self.gmv_cents += message.gmv_cents
        return True


class RecordingSource:
    """A recording as a replay source: its messages grouped by simulated minute."""

    def __init__(self, path: Path) -> None:
        self.name = path.name
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise RecordingError(f"{path}: {exc.strerror}") from None
        if not data.startswith(MAGIC):
            raise RecordingError(f"{path}: not a gmv recording (no {MAGIC[:-1].decode()} line)")
        end = data.find(b"\n", len(MAGIC))
        try:
            if end < 0:
                raise ValueError("the file ends inside it")
            header = orjson.loads(data[len(MAGIC):end])
            w = header["window"]
            self.window = Window(datetime.fromisoformat(w["start"]), int(w["minutes"]),
                                 str(w["label"]))
            if not 0 < self.window.minutes <= MAX_MINUTES:
                raise ValueError(f"window of {self.window.minutes} minutes, at most {MAX_MINUTES}")
            limits = _limits(self.window, int(header["n_brands"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise RecordingError(f"{path}: bad header ({exc})") from None
        self._by_minute: dict[int, list[OrderBatch | ChatbotCount]] = defaultdict(list)
        self._needs = {"minutes": self.window.minutes}  # what a shard must accept (misfit)
        offset, count = end + 1, 0
        while offset < len(data):
            if offset + _RECORD.size > len(data):
                raise RecordingError(f"{path}: truncated after record {count}")
            kind, size = _RECORD.unpack_from(data, offset)
            payload = data[offset + _RECORD.size:offset + _RECORD.size + size]
            if len(payload) != size:
                raise RecordingError(f"{path}: truncated in record {count + 1}")
            try:
                message = decode_chatbot(payload, limits) if kind == CHATBOT \
                    else decode(payload, limits)
            except BatchError as exc:
                raise RecordingError(f"{path}: record {count + 1}: {exc}") from None
            self._by_minute[message.minute].append(message)
            if isinstance(message, OrderBatch) and len(message):
                needs = {"brands": int(message.brand.max()) + 1,
                         "countries": int(message.country.max()) + 1,
                         "platforms": int(message.platform.max()) + 1,
                         "max_batch_orders": len(message),
                         "max_order_cents": int(message.amount_cents.max())}
                for key, need in needs.items():
                    self._needs[key] = max(need, self._needs.get(key, 0))
            offset += _RECORD.size + size
            count += 1
        self.records = count

    def messages(self, minute: int) -> list[OrderBatch | ChatbotCount]:
        return self._by_minute.get(minute, [])

    def misfit(self, accepts: dict[str, int]) -> str | None:
        return misfit(accepts, self._needs)

    def slices(self, minute: int, k: int) -> list[list[OrderBatch | ChatbotCount]]:
        """The minute's messages spread over `k` slices of it in the order recorded (a
        recording keeps no time within a minute): message i of n in slice i * k // n."""
        messages = self.messages(minute)
        out: list[list[OrderBatch | ChatbotCount]] = [[] for _ in range(k)]
        for i, message in enumerate(messages):
            out[i * k // len(messages)].append(message)
        return out
