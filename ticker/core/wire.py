"""Order-batch codec, wire format v1: one `encode`, one `decode`, every validity rule here.

A batch is one producer's orders for one simulated minute, as equal-length columns; or,
with minute runs, for several minutes: runs of (minute, count) say which orders belong to
which minute (minutes strictly increasing, counts adding up to the batch), and `minute` is
the last run's, the latest in the batch. Catching up after a seek sends a festival's first
days in a few such batches instead of one per minute.
Two encodings, told apart by their first bytes (see docs/wire-format.md):

* binary  -- starts with the magic ``b"GMVB"``: a 24-byte little-endian header, with flag
  0x01 an int64 send time, with flag 0x02 a uint64 run count, the producer id padded to
  8 bytes, with flag 0x02 the runs (uint32 minute, uint32 count), then the raw columns
  (amount int64, brand uint32, country uint8, platform uint8). Decoding is `np.frombuffer`
  views: no copy, no per-order Python work.
* JSON    -- starts with ``{`` (after optional whitespace): one object with the same fields
  and the columns as arrays (the runs as one flat array `minute_runs`: minute, count,
  minute, count, ...); for people, scripts and `mosquitto_pub`.

`decode` either returns a fully valid `OrderBatch` or raises `BatchError` with a short reason
code (``BatchError.reason``) used to count rejections. It never applies anything partially.
Every number a producer sends has a bound here, so no valid message can overflow a total,
and JSON is screened before parsing so that its memory stays proportional to its size.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

MAGIC = b"GMVB"
VERSION = 1
_HEADER = struct.Struct("<4sBBHIQI")  # magic, version, flags, producer_len, n, seq, minute
_COLUMNS = (("amount_cents", "<i8"), ("brand", "<u4"), ("country", "u1"), ("platform", "u1"))
FLAG_SENT_AT = 0x01  # an int64 send time (microseconds since the epoch) follows the header
FLAG_MINUTE_RUNS = 0x02  # a uint64 run count follows (after the send time, if any)
_FLAGS = FLAG_SENT_AT | FLAG_MINUTE_RUNS
_SENT_AT = struct.Struct("<q")
_RUN_COUNT = struct.Struct("<Q")
_RUN = np.dtype([("minute", "<u4"), ("count", "<u4")])  # one run, 8 bytes

MAX_PRODUCER_LEN = 64
# A producer id is one MQTT topic level (orders/{producer}/{partition}) that a broker ACL can
# tie to the MQTT user name, so it holds none of / + # or NUL: letters, digits and - _ . : @
PRODUCER_ID = re.compile(r"[A-Za-z0-9._:@-]{1,64}")
# 2^53 - 1: exact as a JavaScript number, and no sum of sequence numbers overflows int64.
MAX_SEQ = 2**53 - 1
MAX_TOTAL = 2**53 - 1  # cents, orders or queries in any total (USD 90 trillion)
MAX_SENT_AT_US = 2**53 - 1  # microseconds since the epoch: the year 2255
# What `gmv aggregate` takes for one order, USD 100M: a replay at a small order scale makes
# few, huge orders (a minute's GMV in one at the smallest), which a replay checks before
# it sends them (the shards' totals say their limit).
MAX_ORDER_CENTS = 10**10
_BINARY_BYTES_PER_ORDER = 8 + 4 + 1 + 1


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
    max_producers: int = 1_000  # producer ids one aggregator keeps sequences for
    max_seq_jump: int = 1_000_000  # how far past its highest seq a producer may jump
    max_seq_holes: int = 1_000  # runs of missing seqs tracked per producer
    # Parsing JSON peaks at ~16x its size (orjson, measured), so JSON batches get a budget of
    # their own: 4 MiB holds ~130,000 orders; bigger batches are binary's job.
    max_json_bytes: int = 4 * 2**20
    # Runs of (minute, count) in one batch. Minutes strictly increase, so a batch never
    # needs more runs than the window has minutes (15,840 for the 11 days; a curve file's
    # window is at most 86,400): 100,000 covers any window, and costs at most 800 KB.
    max_minute_runs: int = 100_000

    def __post_init__(self) -> None:
        for name in ("n_brands", "n_minutes", "n_countries", "n_platforms",
                     "max_batch_orders", "max_order_cents", "max_producers", "max_seq_jump",
                     "max_seq_holes", "max_json_bytes", "max_minute_runs"):
            value = getattr(self, name)
            if type(value) is not int or value <= 0:
                raise ValueError(f"{name}={value!r}: must be a positive integer")
        if self.n_countries > 256 or self.n_platforms > 256:
            raise ValueError("n_countries and n_platforms must be at most 256 (uint8 columns)")
        if self.max_batch_orders * self.max_order_cents >= 2**62:
            raise ValueError("max_batch_orders x max_order_cents must stay below 2**62 "
                             "so that no batch sum can overflow int64")

    @property
    def max_binary_bytes(self) -> int:
        return _HEADER.size + _SENT_AT.size + _RUN_COUNT.size + MAX_PRODUCER_LEN + \
            self.max_runs * _RUN.itemsize + self.max_batch_orders * _BINARY_BYTES_PER_ORDER

    @property
    def max_runs(self) -> int:
        """Minute runs a batch may hold: as many as the window has minutes (they strictly
        increase), at most `max_minute_runs`."""
        return min(self.max_minute_runs, self.n_minutes)

    @property
    def max_payload_bytes(self) -> int:
        """The largest payload of either encoding."""
        return max(self.max_binary_bytes, self.max_json_bytes)


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
    # Optional: shape (R, 2), rows (minute, count), minutes strictly increasing, counts adding
    # up to len(self), the last minute equal to `minute`; None: every order is in `minute`.
    minute_runs: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.amount_cents)

    @property
    def gmv_cents(self) -> int:
        return int(self.amount_cents.sum())

    def run_minutes(self) -> tuple[np.ndarray, np.ndarray]:
        """The batch's minutes (int64, strictly increasing) and how many orders each has."""
        if self.minute_runs is None:
            return np.array([self.minute], np.int64), np.array([len(self)], np.int64)
        runs = np.asarray(self.minute_runs, dtype=np.int64)
        return runs[:, 0], runs[:, 1]

    def order_minutes(self) -> np.ndarray:
        """Each order's simulated minute (int64), in order."""
        if self.minute_runs is None:
            return np.full(len(self), self.minute, dtype=np.int64)
        minutes, counts = self.run_minutes()
        return np.repeat(minutes, counts)


def minute_runs(order_minutes: np.ndarray) -> np.ndarray | None:
    """The runs (shape (R, 2), int64) of non-decreasing per-order minutes, or None when they
    are all one minute (then a plain batch says it). Raises ValueError if they decrease."""
    minutes = np.asarray(order_minutes, dtype=np.int64)
    if len(minutes) == 0:
        raise ValueError("no orders")
    step = np.diff(minutes)
    if step.size and step.min() < 0:
        raise ValueError("order minutes must not decrease")
    starts = np.concatenate(([0], np.flatnonzero(step) + 1))
    if len(starts) == 1:
        return None
    counts = np.diff(np.concatenate((starts, [len(minutes)])))
    return np.stack([minutes[starts], counts], axis=1)


@dataclass(frozen=True)
class ChatbotCount:
    """Customer-service chatbot queries answered in one simulated minute. A count shares its
    producer's sequence numbers with the producer's order batches."""

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
    doc = _small_json(payload)
    producer = _producer(doc.get("producer"))
    values: dict[str, int] = {}
    for name in ("seq", "minute", "queries"):
        value = doc.get(name)
        if type(value) is not int:
            raise BatchError("bad_type", f"{name}={value!r} is not an integer")
        values[name] = value
    if not 0 <= values["seq"] <= MAX_SEQ or not 0 <= values["minute"] < limits.n_minutes:
        raise BatchError("out_of_range", f"seq={values['seq']}, minute={values['minute']}")
    if not 0 <= values["queries"] <= MAX_CHATBOT_QUERIES:
        raise BatchError("bad_amount", f"queries={values['queries']}")
    return ChatbotCount(producer, **values)


@dataclass(frozen=True)
class Announcement:
    """A producer's word on how far it got: every seq up to `last_seq` was published, so any
    of them missing is a gap (a lost tail included)."""

    producer: str
    last_seq: int


def decode_announcement(payload: bytes) -> Announcement:
    """Parse `{"v": 1, "producer": ID, "last_seq": N, ...}`, or raise `BatchError`."""
    doc = _small_json(payload)
    last_seq = doc.get("last_seq")
    if type(last_seq) is not int or not -1 <= last_seq <= MAX_SEQ:
        raise BatchError("out_of_range", f"last_seq={last_seq!r}: must be -1..{MAX_SEQ}")
    return Announcement(_producer(doc.get("producer")), last_seq)


def _small_json(payload: bytes, limit: int = 4096) -> dict[str, Any]:
    """A small flat JSON object with `v` = 1 (chatbot counts, announcements)."""
    if len(payload) > limit:
        raise BatchError("oversized", f"{len(payload)} bytes > {limit}")
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise BatchError("bad_json", str(exc)) from None
    if not isinstance(doc, dict) or type(doc.get("v")) is not int or doc["v"] != VERSION:
        raise BatchError("bad_version", f"v={doc.get('v') if isinstance(doc, dict) else doc!r}")
    return doc


def _producer(value: object) -> str:
    if not isinstance(value, str) or not PRODUCER_ID.fullmatch(value):
        raise BatchError("bad_producer", f"producer={value!r}: must be 1-{MAX_PRODUCER_LEN} of "
                                         "A-Z a-z 0-9 - _ . : @")
    return value


def dead_letter(reason: str, detail: str, topic: str, payload: bytes, head: int = 512) -> bytes:
    """What goes on the dead-letter topic: the reason and a bounded head of the payload, so a
    rejected 64 MB payload costs the broker half a kilobyte, not 64 MB again."""
    return orjson.dumps({"v": VERSION, "reason": reason, "detail": detail[:300], "topic": topic,
                         "size": len(payload),
                         "head": payload[:head].decode("utf-8", "backslashreplace"),
                         "truncated": len(payload) > head})


def encode(batch: OrderBatch, *, binary: bool = True) -> bytes:
    """Serialise a batch; the inverse of `decode`."""
    runs = batch.minute_runs
    if binary:
        producer = batch.producer.encode()
        pad = b"\0" * (-len(producer) % 8)
        flags = (FLAG_SENT_AT if batch.sent_at_us else 0) | \
            (FLAG_MINUTE_RUNS if runs is not None else 0)
        header = _HEADER.pack(MAGIC, VERSION, flags, len(producer), len(batch), batch.seq,
                              batch.minute)
        sent_at = _SENT_AT.pack(batch.sent_at_us) if batch.sent_at_us else b""
        run_count, run_bytes = b"", b""
        if runs is not None:
            run_count = _RUN_COUNT.pack(len(runs))
            run_bytes = np.ascontiguousarray(runs, dtype="<u4").tobytes()
        columns = [np.ascontiguousarray(getattr(batch, name), dtype=dt).tobytes()
                   for name, dt in _COLUMNS]
        return b"".join([header, sent_at, run_count, producer, pad, run_bytes, *columns])
    extra: dict[str, object] = {"sent_at_us": batch.sent_at_us} if batch.sent_at_us else {}
    if runs is not None:
        extra["minute_runs"] = np.asarray(runs, dtype=np.int64).ravel()
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
        if len(payload) > limits.max_json_bytes:
            raise BatchError("oversized", f"{len(payload)} bytes > max_json_bytes="
                             f"{limits.max_json_bytes}; send large batches as binary")
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
    if flags & ~_FLAGS:
        raise BatchError("bad_version",
                         f"flags {flags:#04x}: version 1 defines only 0x01 and 0x02")
    if n > limits.max_batch_orders:
        raise BatchError("oversized", f"{n} orders > {limits.max_batch_orders}")
    start = _HEADER.size + (_SENT_AT.size if flags & FLAG_SENT_AT else 0)
    n_runs = 0
    if flags & FLAG_MINUTE_RUNS:
        if len(payload) < start + _RUN_COUNT.size:
            raise BatchError("truncated", f"{len(payload)} bytes, the run count ends at "
                             f"{start + _RUN_COUNT.size}")
        n_runs = _RUN_COUNT.unpack_from(payload, start)[0]
        if n_runs > limits.max_runs:
            raise BatchError("oversized", f"{n_runs} minute runs > {limits.max_runs} (the "
                             "window's minutes, at most max_minute_runs)")
        start += _RUN_COUNT.size
    # The producer id starts at `start`; the runs, then the columns, at multiples of 8.
    offset = start + plen + (-plen % 8)
    expected = offset + n_runs * _RUN.itemsize + n * _BINARY_BYTES_PER_ORDER
    if len(payload) != expected:
        what = f"{n} orders" + (f" and {n_runs} minute runs" if n_runs else "")
        raise BatchError("bad_length", f"{len(payload)} bytes, {what} need {expected}")
    sent_at = _SENT_AT.unpack_from(payload, _HEADER.size)[0] if flags & FLAG_SENT_AT else 0
    if not 0 <= sent_at <= MAX_SENT_AT_US:
        raise BatchError("out_of_range", f"sent_at_us={sent_at}: must be 0..{MAX_SENT_AT_US}")
    producer = payload[start:start + plen].decode("ascii", "replace")  # checked in _check_values
    if payload[start + plen:offset].strip(b"\0"):
        raise BatchError("bad_length", "padding after the producer id must be NUL bytes")
    runs = None
    if flags & FLAG_MINUTE_RUNS:
        runs = np.frombuffer(payload, dtype="<u4", count=2 * n_runs, offset=offset) \
            .reshape(n_runs, 2)
        offset += runs.nbytes
    columns = {}
    for name, dtype in _COLUMNS:
        column = np.frombuffer(payload, dtype=dtype, count=n, offset=offset)
        columns[name] = column
        offset += column.nbytes
    return OrderBatch(producer, seq, minute, **columns, sent_at_us=sent_at, minute_runs=runs)


def _decode_json(payload: bytes, limits: Limits) -> OrderBatch:
    split = _split_int_arrays(payload)
    if split is not None:
        skeleton, arrays = split
        try:
            return _decode_json_doc(skeleton, limits, arrays)
        except _NotFast:
            pass
    return _decode_json_doc(payload, limits, {})


# The fast path of JSON batches. Parsing 40,000 integers into Python ints with orjson and
# checking their types costs most of a JSON batch's decode. An array that is nothing but
# canonical JSON integers (digits and commas: no sign, no leading zero, no spaces, as
# orjson.dumps and json.dumps(separators=(",", ":")) write them) is cut out of the text and
# parsed by numpy in C; the rest, the skeleton with those arrays left empty, goes through
# the very same checks as any batch. Anything else (spaces, negative numbers, floats, a key
# twice, more digits than 18) takes the general path, so both paths accept and reject the
# same payloads with the same reasons. Each key is found as `"name":[`, the only way it can
# occur outside a string: inside one its quotes would be escaped.
_FAST_ARRAYS = tuple((name, f'"{name}":['.encode()) for name in
                     [name for name, _ in _COLUMNS] + ["minute_runs"])
_MAX_FAST = 10**18  # below this every canonical integer has at most 18 digits: exact
_COMMA, _ZERO = ord(","), ord("0")


class _NotFast(Exception):
    """The skeleton is not what the fast path expects: decode the payload as it is."""


def _split_int_arrays(payload: bytes) -> tuple[bytes, dict[str, np.ndarray]] | None:
    """(the payload with the canonical integer arrays emptied, those arrays as int64), or
    None when nothing can be cut out safely."""
    spans = []
    for name, key in _FAST_ARRAYS:
        at = payload.find(key)
        if at < 0:
            continue
        start = at + len(key)
        end = payload.find(b"]", start)
        if end < 0 or payload.find(key, end) >= 0:
            return None
        spans.append((start, end, name))
    if not spans:
        return None
    spans.sort()
    pieces, arrays, last = [], {}, 0
    for start, end, name in spans:
        values = _canonical_ints(payload[start:end])
        if values is None:
            return None
        pieces.append(payload[last:start])
        arrays[name], last = values, end
    pieces.append(payload[last:])
    return b"".join(pieces), arrays


def _canonical_ints(text: bytes) -> np.ndarray | None:
    """`text` (what is between an array's brackets) as int64, if it is canonical JSON
    integers below 10^18 separated by commas; else None."""
    if not text:
        return np.zeros(0, np.int64)
    if text.translate(None, b"0123456789,"):
        return None
    chars = np.frombuffer(text, np.uint8)
    comma = chars == _COMMA
    if comma[0] or comma[-1] or (comma[1:] & comma[:-1]).any():
        return None  # an empty element
    # A leading zero: a 0 that starts an element and is followed by a digit.
    if (chars[0] == _ZERO and len(chars) > 1 and not comma[1]) or \
            (comma[:-2] & (chars[1:-1] == _ZERO) & ~comma[2:]).any():
        return None
    values = np.fromstring(text, dtype=np.int64, sep=",")
    if len(values) != int(np.count_nonzero(comma)) + 1 or \
            (len(values) and int(values.max()) >= _MAX_FAST):
        return None
    return values


def _decode_json_doc(payload: bytes, limits: Limits,
                     fast: dict[str, np.ndarray]) -> OrderBatch:
    """Decode a JSON batch; `fast`: its arrays parsed already, emptied in `payload`."""
    # A batch is one flat object with four arrays of integers. Refusing anything more nested
    # before parsing bounds the memory: 64 MB of "[[],[],..." would otherwise become 2 GB of
    # Python lists. (Brackets inside strings count too; a producer id holds none.)
    arrays = len(_COLUMNS) + (b'"minute_runs"' in payload)
    if payload.count(b"{") > 1 or payload.count(b"[") > arrays:
        raise BatchError("too_nested", "a JSON batch is one object holding four flat arrays "
                                       "(five with minute_runs)")
    if fast and payload.count(b"[") != len(fast):
        raise _NotFast  # arrays of another kind beside the fast ones
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        if fast:
            raise _NotFast from None  # the general path names the error in the payload
        raise BatchError("bad_json", str(exc)) from None
    if fast and (not isinstance(doc, dict) or any(doc.get(name) != [] for name in fast)):
        raise _NotFast
    if type(doc.get("v")) is not int or doc["v"] != VERSION:
        raise BatchError("bad_version", f"v={doc.get('v')!r}")
    producer, seq, minute = doc.get("producer"), doc.get("seq"), doc.get("minute")
    if not isinstance(producer, str):
        raise BatchError("bad_producer", f"producer={producer!r}")
    sent_at = doc.get("sent_at_us", 0)
    for name, value in (("seq", seq), ("minute", minute), ("sent_at_us", sent_at)):
        if type(value) is not int:
            raise BatchError("bad_type", f"{name}={value!r} is not an integer")
    if not 0 <= sent_at <= MAX_SENT_AT_US:
        raise BatchError("out_of_range", f"sent_at_us={sent_at}: must be 0..{MAX_SENT_AT_US}")
    columns = {}
    for name, dtype in _COLUMNS:
        if name in fast:
            if len(fast[name]) > limits.max_batch_orders:
                raise BatchError("oversized", f"{len(fast[name])} orders > "
                                 f"{limits.max_batch_orders}")
            columns[name] = fast[name]
            continue
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
    runs = None
    if "minute_runs" in fast:
        flat_fast = fast["minute_runs"]
        if len(flat_fast) > 2 * limits.max_runs:
            raise BatchError("oversized", f"{len(flat_fast) // 2} minute runs > "
                             f"{limits.max_runs} (the window's minutes, at most "
                             "max_minute_runs)")
        if len(flat_fast) % 2:
            raise BatchError("bad_minutes", "minute_runs holds minute, count pairs: "
                                            f"{len(flat_fast)} numbers")
        runs = flat_fast.reshape(-1, 2)
    elif "minute_runs" in doc:
        flat = doc["minute_runs"]
        if not isinstance(flat, list):
            raise BatchError("bad_minutes", "minute_runs is not a list")
        if len(flat) > 2 * limits.max_runs:
            raise BatchError("oversized", f"{len(flat) // 2} minute runs > {limits.max_runs} "
                             "(the window's minutes, at most max_minute_runs)")
        if flat and set(map(type, flat)) != {int}:
            bad = next(v for v in flat if type(v) is not int)
            raise BatchError("bad_type", f"minute_runs holds {bad!r}")
        if len(flat) % 2:
            raise BatchError("bad_minutes", "minute_runs holds minute, count pairs: "
                                            f"{len(flat)} numbers")
        try:
            runs = np.array(flat, dtype=np.int64).reshape(-1, 2)
        except OverflowError:
            raise BatchError("out_of_range", "minute_runs holds an integer beyond 64 "
                                             "bits") from None
    return OrderBatch(producer, seq, minute, **columns, sent_at_us=sent_at, minute_runs=runs)


def _check_values(batch: OrderBatch, limits: Limits) -> None:
    n = len(batch.amount_cents)
    if any(len(getattr(batch, name)) != n for name, _ in _COLUMNS):
        raise BatchError("unequal_columns", "columns differ in length")
    if n == 0:
        raise BatchError("empty", "a batch holds at least one order")
    _producer(batch.producer)
    if not 0 <= batch.seq <= MAX_SEQ:
        raise BatchError("out_of_range", f"seq={batch.seq}: must be 0..{MAX_SEQ}")
    if not 0 <= batch.minute < limits.n_minutes:
        raise BatchError("out_of_range", f"minute={batch.minute} outside 0..{limits.n_minutes - 1}")
    amount = batch.amount_cents
    if amount.min() <= 0 or amount.max() > limits.max_order_cents:
        raise BatchError("bad_amount",
                         f"amounts must be 1..{limits.max_order_cents} cents, "
                         f"got {amount.min()}..{amount.max()}")
    for name, bound in (("brand", limits.n_brands), ("country", limits.n_countries),
                        ("platform", limits.n_platforms)):
        column = getattr(batch, name)  # unsigned in binary batches: no minimum to check
        if (column.dtype.kind != "u" and column.min() < 0) or column.max() >= bound:
            raise BatchError("unknown_id", f"{name} ids must be 0..{bound - 1}")
    if batch.minute_runs is not None:
        _check_runs(batch.minute_runs, batch.minute, n, limits)


def _check_runs(runs: np.ndarray, minute: int, n: int, limits: Limits) -> None:
    """Minute runs: at least one, minutes in the window and strictly increasing, the last
    equal to the batch's `minute`, each count at least 1, the counts adding up to `n`."""
    if len(runs) == 0:
        raise BatchError("bad_minutes", "minute runs: at least one (minute, count)")
    minutes, counts = runs[:, 0], runs[:, 1]
    if minutes.min() < 0 or minutes.max() >= limits.n_minutes:
        raise BatchError("out_of_range", f"a run's minute outside 0..{limits.n_minutes - 1}")
    if len(runs) > 1 and (np.diff(minutes.astype(np.int64)) <= 0).any():
        raise BatchError("bad_minutes", "run minutes must strictly increase")
    if int(minutes[-1]) != minute:
        raise BatchError("bad_minutes", f"minute={minute} is not the last run's minute "
                                        f"{int(minutes[-1])}")
    # Each count in 1..n first, so that their sum (at most 100,000 x 2^32) fits an int64.
    if counts.min() < 1 or counts.max() > n or int(counts.astype(np.int64).sum()) != n:
        raise BatchError("bad_minutes", f"run counts must be at least 1 and add up to the "
                                        f"{n} orders")

