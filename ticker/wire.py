"""Order-batch codec, wire format v1: one `encode`, one `decode`, every validity rule here.

A batch is one producer's orders for one simulated minute, as equal-length columns.
Two encodings, told apart by their first bytes (see docs/wire-format.md):

* binary  -- starts with the magic ``b"GMVB"``: a 24-byte little-endian header, with flag
  0x01 an int64 send time, the producer id padded to 8 bytes, then the raw columns (amount
  int64, brand uint32, country uint8, platform uint8). Decoding is `np.frombuffer` views:
  no copy, no per-order Python work.
* JSON    -- starts with ``{`` (after optional whitespace): one object with the same fields
  and the columns as arrays; for people, scripts and `mosquitto_pub`.

`decode` either returns a fully valid `OrderBatch` or raises `BatchError` with a short reason
code (``BatchError.reason``) used to count rejections. It never applies anything partially.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import orjson

MAGIC = b"GMVB"
VERSION = 1
_HEADER = struct.Struct("<4sBBHIQI")  # magic, version, flags, producer_len, n, seq, minute
_COLUMNS = (("amount_cents", "<i8"), ("brand", "<u4"), ("country", "u1"), ("platform", "u1"))
FLAG_SENT_AT = 0x01  # an int64 send time (microseconds since the epoch) follows the header
_SENT_AT = struct.Struct("<q")

MAX_PRODUCER_LEN = 64
MAX_SEQ = 2**63 - 1


class BatchError(ValueError):
    """A producer sent a batch that is not valid wire format v1 (the producer's fault)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class Limits:
    """What the receiving side accepts; every rule about value ranges lives here."""

    n_brands: int
    n_minutes: int
    n_countries: int
    n_platforms: int
    max_batch_orders: int = 1_000_000
    max_order_cents: int = 100_000_000  # USD 1M for one order is already absurd

    def __post_init__(self) -> None:
        for name in ("n_brands", "n_minutes", "n_countries", "n_platforms",
                     "max_batch_orders", "max_order_cents"):
            value = getattr(self, name)
            if type(value) is not int or value <= 0:
                raise ValueError(f"{name}={value!r}: must be a positive integer")
        if self.n_countries > 256 or self.n_platforms > 256:
            raise ValueError("n_countries and n_platforms must be at most 256 (uint8 columns)")
        if self.max_batch_orders * self.max_order_cents >= 2**62:
            raise ValueError("max_batch_orders x max_order_cents must stay below 2**62 "
                             "so that no batch sum can overflow int64")

    @property
    def max_payload_bytes(self) -> int:
        # A JSON column of n integers needs at most ~21 bytes per value.
        return 4096 + self.max_batch_orders * 64


@dataclass(frozen=True, eq=False)
class OrderBatch:
    producer: str
    seq: int
    minute: int
    amount_cents: np.ndarray  # int64
    brand: np.ndarray  # uint32
    country: np.ndarray  # uint8
    platform: np.ndarray  # uint8
    sent_at_us: int = 0  # optional: the producer's wall clock at sending, for latency

    def __len__(self) -> int:
        return len(self.amount_cents)

    @property
    def gmv_cents(self) -> int:
        return int(self.amount_cents.sum())


@dataclass(frozen=True)
class ChatbotCount:
    """Customer-service chatbot queries answered in one simulated minute: its own stream."""

    producer: str
    seq: int
    minute: int
    queries: int


MAX_CHATBOT_QUERIES = 10**12


def encode_chatbot(event: ChatbotCount) -> bytes:
    return orjson.dumps({"v": VERSION, "producer": event.producer, "seq": event.seq,
                         "minute": event.minute, "queries": event.queries})


def decode_chatbot(payload: bytes, limits: Limits) -> ChatbotCount:
    """Parse and validate one chatbot count (JSON only), or raise `BatchError`."""
    if len(payload) > 4096:
        raise BatchError("oversized", f"{len(payload)} bytes > 4096")
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise BatchError("bad_json", str(exc)) from None
    if not isinstance(doc, dict) or type(doc.get("v")) is not int or doc["v"] != VERSION:
        raise BatchError("bad_version", f"v={doc.get('v') if isinstance(doc, dict) else doc!r}")
    producer = doc.get("producer")
    if not isinstance(producer, str) or not 0 < len(producer) <= MAX_PRODUCER_LEN \
            or not producer.isprintable():
        raise BatchError("bad_producer", f"producer={producer!r}")
    values = {name: doc.get(name) for name in ("seq", "minute", "queries")}
    for name, value in values.items():
        if type(value) is not int:
            raise BatchError("bad_type", f"{name}={value!r} is not an integer")
    if not 0 <= values["seq"] <= MAX_SEQ or not 0 <= values["minute"] < limits.n_minutes:
        raise BatchError("out_of_range", f"seq={values['seq']}, minute={values['minute']}")
    if not 0 <= values["queries"] <= MAX_CHATBOT_QUERIES:
        raise BatchError("bad_amount", f"queries={values['queries']}")
    return ChatbotCount(producer, **values)


def encode(batch: OrderBatch, *, binary: bool = True) -> bytes:
    """Serialise a batch; the inverse of `decode`."""
    if binary:
        producer = batch.producer.encode()
        pad = b"\0" * (-len(producer) % 8)
        flags = FLAG_SENT_AT if batch.sent_at_us else 0
        header = _HEADER.pack(MAGIC, VERSION, flags, len(producer), len(batch), batch.seq,
                              batch.minute)
        sent_at = _SENT_AT.pack(batch.sent_at_us) if flags else b""
        columns = [np.ascontiguousarray(getattr(batch, name), dtype=dt).tobytes()
                   for name, dt in _COLUMNS]
        return b"".join([header, sent_at, producer, pad, *columns])
    extra = {"sent_at_us": batch.sent_at_us} if batch.sent_at_us else {}
    return orjson.dumps({
        "v": VERSION,
        "producer": batch.producer,
        "seq": batch.seq,
        "minute": batch.minute,
        "amount_cents": batch.amount_cents,
        "brand": batch.brand,
        "country": batch.country,
        "platform": batch.platform,
        **extra,
    }, option=orjson.OPT_SERIALIZE_NUMPY)


def decode(payload: bytes, limits: Limits) -> OrderBatch:
    """Parse and validate one batch, or raise `BatchError`."""
    if len(payload) > limits.max_payload_bytes:
        raise BatchError("oversized", f"{len(payload)} bytes > {limits.max_payload_bytes}")
    if payload[:4] == MAGIC:
        batch = _decode_binary(payload, limits)
    elif payload.lstrip()[:1] == b"{":
        batch = _decode_json(payload, limits)
    else:
        raise BatchError("unknown_encoding", f"first bytes {payload[:8]!r}")
    _check_values(batch, limits)
    return batch


def _decode_binary(payload: bytes, limits: Limits) -> OrderBatch:
    if len(payload) < _HEADER.size:
        raise BatchError("truncated", f"{len(payload)} bytes, header needs {_HEADER.size}")
    _, version, flags, plen, n, seq, minute = _HEADER.unpack_from(payload)
    if version != VERSION:
        raise BatchError("bad_version", f"version {version}")
    if flags & ~FLAG_SENT_AT:
        raise BatchError("bad_version", f"flags {flags:#04x}: version 1 defines only 0x01")
    if n > limits.max_batch_orders:
        raise BatchError("oversized", f"{n} orders > {limits.max_batch_orders}")
    start = _HEADER.size + (_SENT_AT.size if flags else 0)  # the producer id starts here
    offset = start + plen + (-plen % 8)
    expected = offset + n * (8 + 4 + 1 + 1)
    if len(payload) != expected:
        raise BatchError("bad_length", f"{len(payload)} bytes, {n} orders need {expected}")
    sent_at = _SENT_AT.unpack_from(payload, _HEADER.size)[0] if flags else 0
    if sent_at < 0:
        raise BatchError("out_of_range", f"sent_at_us={sent_at}")
    try:
        producer = payload[start:start + plen].decode()
    except UnicodeDecodeError:
        raise BatchError("bad_producer", "producer id is not UTF-8") from None
    if payload[start + plen:offset].strip(b"\0"):
        raise BatchError("bad_length", "padding after the producer id must be NUL bytes")
    columns = {}
    for name, dtype in _COLUMNS:
        column = np.frombuffer(payload, dtype=dtype, count=n, offset=offset)
        columns[name] = column
        offset += column.nbytes
    return OrderBatch(producer, seq, minute, **columns, sent_at_us=sent_at)


def _decode_json(payload: bytes, limits: Limits) -> OrderBatch:
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise BatchError("bad_json", str(exc)) from None
    if type(doc.get("v")) is not int or doc["v"] != VERSION:
        raise BatchError("bad_version", f"v={doc.get('v')!r}")
    producer, seq, minute = doc.get("producer"), doc.get("seq"), doc.get("minute")
    if not isinstance(producer, str):
        raise BatchError("bad_producer", f"producer={producer!r}")
    sent_at = doc.get("sent_at_us", 0)
    for name, value in (("seq", seq), ("minute", minute), ("sent_at_us", sent_at)):
        if type(value) is not int:
            raise BatchError("bad_type", f"{name}={value!r} is not an integer")
    if not 0 <= sent_at < 2**63:
        raise BatchError("out_of_range", f"sent_at_us={sent_at}")
    columns = {}
    for name, dtype in _COLUMNS:
        column = doc.get(name)
        if not isinstance(column, list):
            raise BatchError("missing_column", f"{name} is not a list")
        if len(column) > limits.max_batch_orders:
            raise BatchError("oversized", f"{len(column)} orders > {limits.max_batch_orders}")
        # Only exact ints: floats (even 3.0), bools, null and strings are rejected.
        # (orjson already refuses NaN and Infinity as JSON.) set(map(type)) runs in C.
        if column and set(map(type, column)) != {int}:
            bad = next(v for v in column if type(v) is not int)
            raise BatchError("bad_type", f"{name} holds {bad!r}")
        try:
            columns[name] = np.array(column, dtype=np.int64)
        except OverflowError:
            raise BatchError("out_of_range", f"{name} holds an integer beyond 64 bits") from None
    return OrderBatch(producer, seq, minute, **columns, sent_at_us=sent_at)


def _check_values(batch: OrderBatch, limits: Limits) -> None:
    n = len(batch.amount_cents)
    if any(len(getattr(batch, name)) != n for name, _ in _COLUMNS):
        raise BatchError("unequal_columns", "columns differ in length")
    if n == 0:
        raise BatchError("empty", "a batch holds at least one order")
    if not 0 < len(batch.producer) <= MAX_PRODUCER_LEN or not batch.producer.isprintable():
        raise BatchError("bad_producer",
                         f"producer id must be 1-{MAX_PRODUCER_LEN} printable characters")
    if not 0 <= batch.seq <= MAX_SEQ:
        raise BatchError("out_of_range", f"seq={batch.seq}")
    if not 0 <= batch.minute < limits.n_minutes:
        raise BatchError("out_of_range", f"minute={batch.minute} outside 0..{limits.n_minutes - 1}")
    amount = batch.amount_cents
    if amount.min() <= 0 or amount.max() > limits.max_order_cents:
        raise BatchError("bad_amount",
                         f"amounts must be 1..{limits.max_order_cents} cents, "
                         f"got {amount.min()}..{amount.max()}")
    for name, bound in (("brand", limits.n_brands), ("country", limits.n_countries),
                        ("platform", limits.n_platforms)):
        column = getattr(batch, name)
        if column.min() < 0 or column.max() >= bound:
            raise BatchError("unknown_id", f"{name} ids must be 0..{bound - 1}")

