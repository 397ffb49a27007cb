"""Wire format v1 (ticker/core/wire.py): literal inputs pin the codec; hypothesis fuzzes `decode`.

Every expected value here is written out by hand (or built with `struct.pack`), never derived
from `encode`, so the tests pin the format itself rather than the codec's agreement with
itself. The examples in docs/wire-format.md are checked here too.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ticker.core.wire import MAX_SEQ, BatchError, Limits, OrderBatch, dead_letter, decode, \
    decode_announcement, encode

from .conftest import festival_limits

LIMITS = festival_limits()
DOC = Path(__file__).resolve().parent.parent / "docs" / "wire-format.md"
HEADER = "<4sBBHIQI"  # magic, version, flags, producer_len, n, seq, minute

# A valid JSON batch, written out literally: 2 orders at minute 660 (2020-11-01 11:00 Beijing).
JSON_OK = (b'{"v":1,"producer":"shop-7","seq":42,"minute":660,'
           b'"amount_cents":[1999,10000000000],"brand":[0,249999],'
           b'"country":[0,11],"platform":[2,1]}')


def json_doc(**changes: object) -> bytes:
    """JSON_OK with some fields replaced (a value of `...` deletes the field)."""
    doc = orjson.loads(JSON_OK)
    for key, value in changes.items():
        if value is ...:
            del doc[key]
        else:
            doc[key] = value
    return orjson.dumps(doc)


def binary(producer: bytes = b"shop-7", *, amounts=(1999,), brands=(17,), countries=(0,),
           platforms=(2,), seq: int = 42, minute: int = 660, version: int = 1,
           flags: int = 0, n: int | None = None, plen: int | None = None,
           pad: bool = True) -> bytes:
    """A binary batch built by hand with struct.pack (independent of `encode`)."""
    k = len(amounts)
    n = k if n is None else n
    plen = len(producer) if plen is None else plen
    return b"".join([
        struct.pack(HEADER, b"GMVB", version, flags, plen, n, seq, minute),
        producer,
        b"\0" * (-len(producer) % 8) if pad else b"",
        struct.pack(f"<{k}q", *amounts),
        struct.pack(f"<{len(brands)}I", *brands),
        bytes(countries),
        bytes(platforms),
    ])


def rejected(payload: bytes, reason: str, limits: Limits = LIMITS) -> str:
    """Assert `decode` refuses `payload` with `reason`; return the message for more checks."""
    with pytest.raises(BatchError) as info:
        decode(payload, limits)
    assert info.value.reason == reason, str(info.value)
    message = str(info.value)
    assert message.startswith(f"{reason}: ") and len(message) > len(reason) + 4
    return message


def columns(batch: OrderBatch) -> tuple[str, int, int, list, list, list, list]:
    return (batch.producer, batch.seq, batch.minute, batch.amount_cents.tolist(),
            batch.brand.tolist(), batch.country.tolist(), batch.platform.tolist())


# --- decoding valid batches ---------------------------------------------------------------


def test_json_batch_decodes_to_exact_columns():
    """A literal JSON batch decodes to exactly its producer, seq, minute and columns."""
    batch = decode(JSON_OK, LIMITS)
    assert columns(batch) == ("shop-7", 42, 660, [1999, 10**10], [0, 249999], [0, 11], [2, 1])
    assert len(batch) == 2
    assert batch.gmv_cents == 1999 + 10**10


def test_hand_built_binary_batch_decodes_to_exact_values():
    """A binary batch packed by hand (24-byte header, NUL-padded producer, LE columns) decodes."""
    payload = (struct.pack("<4sBBHIQI", b"GMVB", 1, 0, 5, 2, 7, 14400)
               + b"shop1\0\0\0"
               + struct.pack("<2q", 1999, 10**10)
               + struct.pack("<2I", 0, 249_999)
               + bytes([0, 11])
               + bytes([2, 1]))
    # The header itself, byte by byte: magic, version, flags, producer_len, n, seq, minute.
    assert payload[:24] == bytes.fromhex("474d5642 01 00 0500 02000000 0700000000000000 40380000")
    assert len(payload) == 24 + 8 + 2 * 14
    batch = decode(payload, LIMITS)
    assert columns(batch) == ("shop1", 7, 14400, [1999, 10**10], [0, 249999], [0, 11], [2, 1])
    assert [batch.amount_cents.dtype, batch.brand.dtype, batch.country.dtype,
            batch.platform.dtype] == [np.dtype("<i8"), np.dtype("<u4"), np.dtype("u1"),
                                      np.dtype("u1")]


def test_producer_of_multiple_of_8_bytes_has_no_padding():
    """An 8-byte producer id is followed directly by the columns (padding is 0 bytes, not 8)."""
    payload = (struct.pack(HEADER, b"GMVB", 1, 0, 8, 1, 0, 0) + b"producer"
               + struct.pack("<qIBB", 5, 3, 4, 0))
    assert columns(decode(payload, LIMITS)) == ("producer", 0, 0, [5], [3], [4], [0])


def test_encode_binary_produces_the_documented_bytes():
    """`encode(binary=True)` writes exactly the hand-packed layout."""
    batch = OrderBatch("shop1", 7, 14400, np.array([1999, 10**10]), np.array([0, 249_999]),
                       np.array([0, 11]), np.array([2, 1]))
    assert encode(batch) == (struct.pack(HEADER, b"GMVB", 1, 0, 5, 2, 7, 14400) + b"shop1\0\0\0"
                             + struct.pack("<2q2I2B2B", 1999, 10**10, 0, 249_999, 0, 11, 2, 1))


@pytest.mark.parametrize("binary_encoding", [True, False], ids=["binary", "json"])
def test_round_trip_gives_identical_columns(binary_encoding):
    """decode(encode(batch)) returns the same producer, seq, minute and column values."""
    batch = OrderBatch("Shop_7.eu:a@b-c", MAX_SEQ, 15839,
                       np.array([1, 10**10, 123], np.int64), np.array([249_999, 0, 7], np.uint32),
                       np.array([11, 0, 5], np.uint8), np.array([0, 2, 1], np.uint8))
    back = decode(encode(batch, binary=binary_encoding), LIMITS)
    assert columns(back) == ("Shop_7.eu:a@b-c", MAX_SEQ, 15839, [1, 10**10, 123],
                             [249999, 0, 7], [11, 0, 5], [0, 2, 1])


def test_binary_decoding_does_not_copy_the_columns():
    """Binary columns are read-only numpy views on the payload, not copies."""
    payload = binary(amounts=(5, 6), brands=(1, 2), countries=(3, 4), platforms=(0, 1))
    batch = decode(payload, LIMITS)
    raw = np.frombuffer(payload, np.uint8)
    for name in ("amount_cents", "brand", "country", "platform"):
        column = getattr(batch, name)
        assert np.shares_memory(column, raw), name
        assert not column.flags.writeable, name


def test_leading_whitespace_before_json_is_accepted():
    """Spaces, tabs, CR and LF before the `{` of a JSON batch are allowed."""
    assert columns(decode(b" \t\r\n" + JSON_OK, LIMITS)) == columns(decode(JSON_OK, LIMITS))


def test_json_key_order_does_not_matter():
    """JSON fields may come in any order."""
    payload = (b'{"platform":[2,1],"country":[0,11],"brand":[0,249999],'
               b'"amount_cents":[1999,10000000000],"minute":660,"seq":42,"producer":"shop-7",'
               b'"v":1}')
    assert columns(decode(payload, LIMITS)) == columns(decode(JSON_OK, LIMITS))


def test_boundary_values_are_accepted():
    """The extreme valid values (amount 1 and max, last ids, last minute, max seq) decode."""
    payload = json_doc(seq=MAX_SEQ, minute=15839, amount_cents=[1, 10**10],
                       brand=[0, 249_999], country=[0, 11], platform=[0, 2])
    batch = decode(payload, LIMITS)
    assert (batch.seq, batch.minute) == (2**53 - 1, 15839)
    assert batch.platform.tolist() == [0, 2]


def test_seq_above_2_to_the_53_is_out_of_range():
    """seq is bounded by 2^53 - 1 (exact in JavaScript; no sum of seqs overflows int64)."""
    assert "must be 0..9007199254740991" in rejected(json_doc(seq=2**53), "out_of_range")
    rejected(binary(seq=2**63 - 1), "out_of_range")


def test_producer_id_of_64_topic_safe_characters_is_accepted():
    """Letters, digits and - _ . : @, up to 64 of them, make a producer id."""
    name = "Az09-_.:@" * 7 + "x"
    assert decode(json_doc(producer=name), LIMITS).producer == name
    assert decode(binary(name.encode()), LIMITS).producer == name


@pytest.mark.parametrize("name", ["a/b", "a+b", "a#", "a b", "é", "a\x00b", "shop\n"],
                         ids=["slash", "plus", "hash", "space", "non-ascii", "nul", "newline"])
def test_producer_id_that_would_not_work_as_one_topic_level_is_rejected(name):
    """A producer id names its topic level, so / + # and anything outside the set are refused."""
    rejected(json_doc(producer=name), "bad_producer")
    rejected(binary(name.encode()), "bad_producer")


# --- rejections, one reason at a time -----------------------------------------------------


@pytest.mark.parametrize("payload", [b"", b"hello", b"[1,2,3]", b"GMV", b"gmvb" + bytes(20),
                                     b"\xef\xbb\xbf" + JSON_OK],
                         ids=["empty", "text", "json-array", "short-magic", "lowercase-magic",
                              "utf8-bom"])
def test_unknown_encoding_is_rejected(payload):
    """A payload starting with neither GMVB nor `{` is `unknown_encoding`, naming its start."""
    message = rejected(payload, "unknown_encoding")
    assert repr(payload[:8]) in message


@pytest.mark.parametrize("payload", [b"GMVB", b"GMVB\x01", bytes(binary())[:23]],
                         ids=["magic-only", "magic-version", "23-bytes"])
def test_binary_shorter_than_header_is_truncated(payload):
    """A binary payload shorter than the 24-byte header is `truncated`."""
    message = rejected(payload, "truncated")
    assert f"{len(payload)} bytes, header needs 24" in message


@pytest.mark.parametrize("flags", [0x04, 0x80, 0x07])
def test_binary_unknown_flags_are_rejected(flags):
    """Version 1 defines only flags 0x01 and 0x02: another means a format it cannot read."""
    assert f"flags {flags:#04x}" in rejected(binary(flags=flags), "bad_version")


def test_send_time_travels_in_both_encodings():
    """A batch's optional send time (flag 0x01 + int64, or "sent_at_us") survives a round trip."""
    batch = decode(JSON_OK, LIMITS)
    stamped = OrderBatch(batch.producer, batch.seq, batch.minute, batch.amount_cents,
                         batch.brand, batch.country, batch.platform,
                         sent_at_us=1_700_000_000_123_456)
    for binary_encoding in (True, False):
        payload = encode(stamped, binary=binary_encoding)
        assert decode(payload, LIMITS).sent_at_us == 1_700_000_000_123_456
    raw = encode(stamped)
    assert raw[5] == 0x01 and struct.unpack_from("<q", raw, 24)[0] == 1_700_000_000_123_456
    assert decode(JSON_OK, LIMITS).sent_at_us == 0
    rejected(json_doc(sent_at_us=-1), "out_of_range")
    rejected(json_doc(sent_at_us=1.5), "bad_type")


def test_binary_padding_must_be_nul_bytes():
    """The bytes padding the producer id to 8 are NULs; anything else is `bad_length`."""
    payload = bytearray(binary(b"p"))
    payload[24 + 1] = 0xFF
    assert "padding" in rejected(bytes(payload), "bad_length")


def test_producer_with_control_characters_is_rejected():
    """A producer id must be printable: NUL or a newline is `bad_producer`."""
    rejected(json_doc(producer="a\u0000"), "bad_producer")
    rejected(json_doc(producer="a\nb"), "bad_producer")


def test_binary_wrong_version_is_rejected():
    """A binary version byte other than 1 is `bad_version`."""
    assert "version 2" in rejected(binary(version=2), "bad_version")
    rejected(binary(version=0), "bad_version")


@pytest.mark.parametrize("v", [2, 0, "1", None, True, 1.0, ...],
                         ids=["2", "0", "string", "null", "true", "float", "missing"])
def test_json_wrong_or_missing_version_is_rejected(v):
    """A JSON `v` that is missing or not 1 is `bad_version`."""
    message = rejected(json_doc(v=v), "bad_version")
    assert "v=" in message


@pytest.mark.parametrize("payload", [
    binary(amounts=(5, 6), brands=(1,), countries=(0,), platforms=(0,), n=2),  # short columns
    binary() + b"\0",  # a trailing byte
    binary(pad=False),  # producer not padded to 8 bytes
    binary(n=2),  # header claims 2 orders, 1 present
    binary(plen=200),  # producer length beyond the payload
], ids=["short-columns", "trailing-byte", "no-padding", "n-too-big", "plen-too-big"])
def test_binary_with_wrong_total_length_is_bad_length(payload):
    """A binary payload not header + padded producer + 14 bytes an order is `bad_length`."""
    message = rejected(payload, "bad_length")
    assert f"{len(payload)} bytes" in message and "orders need" in message


@pytest.mark.parametrize("payload", [b"{", b'{"v":1,}', JSON_OK + b"x", b'{"v":NaN}',
                                     b'{"producer":"\\ud800"}', b"{'v': 1}"],
                         ids=["unclosed", "trailing-comma", "trailing-garbage", "nan",
                              "lone-surrogate", "single-quotes"])
def test_invalid_json_is_bad_json(payload):
    """A payload starting with `{` that is not valid JSON is `bad_json`."""
    rejected(payload, "bad_json")


@pytest.mark.parametrize("producer", [..., None, 7, ""], ids=["missing", "null", "number", "empty"])
def test_json_missing_or_empty_producer_is_rejected(producer):
    """A JSON producer that is missing, not a string or empty is `bad_producer`."""
    rejected(json_doc(producer=producer), "bad_producer")


def test_json_producer_longer_than_64_characters_is_rejected():
    """A 65-character producer id is `bad_producer`, and the message gives the limit."""
    assert "must be 1-64 of" in rejected(json_doc(producer="p" * 65), "bad_producer")


def test_binary_empty_producer_is_rejected():
    """A binary batch with producer length 0 is `bad_producer`."""
    rejected(binary(b""), "bad_producer")


def test_binary_producer_longer_than_64_characters_is_rejected():
    """A binary producer id of 65 characters is `bad_producer`."""
    rejected(binary(b"p" * 65), "bad_producer")


def test_binary_non_utf8_producer_is_rejected():
    """A binary producer id that is not valid UTF-8 is `bad_producer`."""
    assert "must be 1-64 of" in rejected(binary(b"shop\xff"), "bad_producer")


@pytest.mark.parametrize("value", [3.0, True, None, "5", 3e2],
                         ids=["float", "true", "null", "string", "exponent"])
def test_json_column_element_that_is_not_an_integer_is_bad_type(value):
    """A column holding 3.0, true, null, "5", a list or 3e2 is `bad_type`, naming the column."""
    message = rejected(json_doc(brand=[1, value]), "bad_type")
    assert "brand holds" in message


@pytest.mark.parametrize("changes", [{"seq": 1.0}, {"seq": True}, {"seq": "1"},
                                     {"minute": 660.0}, {"minute": None}, {"seq": ...}],
                         ids=["seq-float", "seq-true", "seq-string", "minute-float",
                              "minute-null", "seq-missing"])
def test_json_seq_or_minute_that_is_not_an_integer_is_bad_type(changes):
    """A JSON seq or minute that is missing or not an exact integer is `bad_type`."""
    (name,) = changes
    assert f"{name}=" in rejected(json_doc(**changes), "bad_type")


def test_json_float_written_literally_is_bad_type():
    """`3.0` spelled in the JSON text (not only via a dumper) is `bad_type`."""
    rejected(JSON_OK.replace(b"[1999,", b"[3.0,"), "bad_type")


@pytest.mark.parametrize("name", ["amount_cents", "brand", "country", "platform"])
def test_json_missing_column_is_rejected(name):
    """A JSON batch without one of the four columns is `missing_column`, naming it."""
    assert name in rejected(json_doc(**{name: ...}), "missing_column")


def test_json_column_that_is_not_an_array_is_missing_column():
    """A JSON column given as a number or object instead of an array is `missing_column`."""
    rejected(json_doc(country=0), "missing_column")
    rejected(json_doc(platform="01"), "missing_column")


def test_json_columns_of_different_lengths_are_rejected():
    """JSON columns that differ in length are `unequal_columns`."""
    rejected(json_doc(brand=[0, 1, 2]), "unequal_columns")
    rejected(json_doc(platform=[]), "unequal_columns")


def test_binary_cannot_have_unequal_columns():
    """Binary has one `n` for all columns, so missing column bytes show up as `bad_length`."""
    short_platform = binary(amounts=(5, 6), brands=(1, 2), countries=(0, 0), platforms=(0,))
    rejected(short_platform, "bad_length")


def test_json_batch_without_orders_is_empty():
    """A JSON batch whose columns are all `[]` is `empty`."""
    payload = json_doc(amount_cents=[], brand=[], country=[], platform=[])
    assert "at least one order" in rejected(payload, "empty")


def test_binary_batch_without_orders_is_empty():
    """A binary batch with n = 0 (header and producer only) is `empty`."""
    payload = struct.pack(HEADER, b"GMVB", 1, 0, 1, 0, 0, 0) + b"p" + bytes(7)
    rejected(payload, "empty")


SMALL = Limits(n_brands=10, n_minutes=60, n_countries=2, n_platforms=2, max_batch_orders=2,
               max_order_cents=1000)


def test_payload_above_max_payload_bytes_is_oversized():
    """A payload longer than either encoding's largest is `oversized`, before parsing; JSON
    has a budget of its own, 4 MiB by default."""
    assert SMALL.max_payload_bytes == 4 * 2**20
    message = rejected(b"x" * (SMALL.max_payload_bytes + 1), "oversized", SMALL)
    assert f"{SMALL.max_payload_bytes + 1} bytes > {SMALL.max_payload_bytes}" in message
    big = Limits(n_brands=10, n_minutes=60, n_countries=2, n_platforms=2, max_json_bytes=100)
    assert "max_json_bytes=100" in rejected(b"{" + b" " * 100 + b"}", "oversized", big)
    # header, send time, run count, producer id, 60 minute runs, the orders
    assert big.max_payload_bytes == 24 + 8 + 8 + 64 + 60 * 8 + 1_000_000 * 14


def test_binary_order_count_above_limit_is_oversized():
    """A binary header claiming more than max_batch_orders orders is `oversized`."""
    payload = binary(amounts=(1, 2, 3), brands=(1, 2, 3), countries=(0, 0, 0),
                     platforms=(0, 0, 0))
    assert "3 orders > 2" in rejected(payload, "oversized", SMALL)


def test_binary_huge_claimed_order_count_is_oversized_not_allocated():
    """A tiny binary payload claiming 2**32 - 1 orders is `oversized`."""
    rejected(binary(n=2**32 - 1), "oversized")


def test_json_order_count_above_limit_is_oversized():
    """A JSON column longer than max_batch_orders is `oversized`."""
    payload = json_doc(amount_cents=[1, 2, 3], brand=[1, 2, 3], country=[0, 0, 0],
                       platform=[0, 0, 0])
    assert "3 orders > 2" in rejected(payload, "oversized", SMALL)


@pytest.mark.parametrize("minute", [15840, 2**32 - 1])
def test_binary_minute_beyond_the_window_is_out_of_range(minute):
    """A binary minute past the 15,840-minute window is `out_of_range`, naming the range."""
    assert f"minute={minute} outside 0..15839" in rejected(binary(minute=minute), "out_of_range")


@pytest.mark.parametrize("minute", [15840, -1])
def test_json_minute_outside_the_window_is_out_of_range(minute):
    """A JSON minute below 0 or past the window is `out_of_range`."""
    assert "outside 0..15839" in rejected(json_doc(minute=minute), "out_of_range")


def test_negative_seq_is_out_of_range():
    """A negative JSON seq is `out_of_range`."""
    assert "seq=-1" in rejected(json_doc(seq=-1), "out_of_range")


def test_seq_above_2_to_the_63_is_out_of_range():
    """A seq of 2**63 (valid uint64 in binary, valid JSON integer) is `out_of_range`."""
    rejected(binary(seq=2**63), "out_of_range")
    rejected(json_doc(seq=2**63), "out_of_range")


@pytest.mark.parametrize("value", [b"9223372036854775808", b"18446744073709551615",
                                   b"-9223372036854775809", b"18446744073709551616"])
def test_json_integer_beyond_64_bits_is_rejected(value):
    """A JSON column integer outside int64 is refused (`out_of_range`; `bad_type` past uint64)."""
    payload = JSON_OK.replace(b"[1999,", b"[" + value + b",")
    with pytest.raises(BatchError) as info:
        decode(payload, LIMITS)
    # orjson reads integers beyond the uint64 range as floats, hence bad_type there.
    assert info.value.reason in {"out_of_range", "bad_type"}
    if value in (b"9223372036854775808", b"18446744073709551615"):
        assert info.value.reason == "out_of_range"
        assert "amount_cents holds an integer beyond 64 bits" in str(info.value)


@pytest.mark.parametrize("amount", [0, -1, -(2**63), 10**10 + 1, 2**63 - 1],
                         ids=["zero", "negative", "int64-min", "max-plus-one", "int64-max"])
def test_json_amount_not_within_1_to_max_order_cents_is_bad_amount(amount):
    """A JSON amount <= 0 or > max_order_cents is `bad_amount`, and the message gives the range."""
    message = rejected(json_doc(amount_cents=[500, amount]), "bad_amount")
    assert "1..10000000000 cents" in message


@pytest.mark.parametrize("amount", [0, -5, 10**10 + 1])
def test_binary_amount_not_within_1_to_max_order_cents_is_bad_amount(amount):
    """A binary int64 amount <= 0 or > max_order_cents is `bad_amount`."""
    rejected(binary(amounts=(amount,)), "bad_amount")


@pytest.mark.parametrize(("column", "bad", "expected"), [
    ("brand", 250_000, "brand ids must be 0..249999"),
    ("brand", -1, "brand ids must be 0..249999"),
    ("country", 12, "country ids must be 0..11"),
    ("country", -1, "country ids must be 0..11"),
    ("platform", 3, "platform ids must be 0..2"),
])
def test_json_id_out_of_range_is_unknown_id(column, bad, expected):
    """A JSON brand, country or platform id outside its table is `unknown_id`, naming the range."""
    doc = orjson.loads(JSON_OK)
    doc[column] = [doc[column][0], bad]
    assert expected in rejected(orjson.dumps(doc), "unknown_id")


@pytest.mark.parametrize(("changes", "expected"), [
    ({"brands": (250_000,)}, "brand ids"),
    ({"brands": (2**32 - 1,)}, "brand ids"),
    ({"countries": (12,)}, "country ids"),
    ({"countries": (255,)}, "country ids"),
    ({"platforms": (3,)}, "platform ids"),
])
def test_binary_id_out_of_range_is_unknown_id(changes, expected):
    """A binary brand, country or platform id outside its table is `unknown_id`."""
    assert expected in rejected(binary(**changes), "unknown_id")


# --- Limits -------------------------------------------------------------------------------


@pytest.mark.parametrize(("changes", "message"), [
    ({"max_batch_orders": 0}, "max_batch_orders=0: must be a positive integer"),
    ({"n_brands": -1}, "n_brands=-1: must be a positive integer"),
    ({"n_brands": True}, "n_brands=True: must be a positive integer"),
    ({"max_batch_orders": 10**6, "max_order_cents": 2**50},
     "max_batch_orders x max_order_cents must stay below 2**62 "
     "so that no batch sum can overflow int64"),
    ({"n_minutes": 1.5}, "n_minutes=1.5: must be a positive integer"),
    ({"max_order_cents": "100"}, "max_order_cents='100': must be a positive integer"),
    ({"n_countries": 257}, "n_countries and n_platforms must be at most 256 (uint8 columns)"),
    ({"n_platforms": 300}, "n_countries and n_platforms must be at most 256 (uint8 columns)"),
])
def test_limits_rejects_invalid_settings_with_a_message_naming_them(changes, message):
    """Limits refuses a non-positive or non-integer setting, or over 256 countries/platforms."""
    base = dict(n_brands=10, n_minutes=10, n_countries=2, n_platforms=2)
    with pytest.raises(ValueError) as info:
        Limits(**{**base, **changes})
    assert str(info.value) == message


def test_limits_accepts_256_countries_and_platforms():
    """256 countries and platforms (the whole uint8 range) is a valid setting."""
    Limits(n_brands=1, n_minutes=1, n_countries=256, n_platforms=256)


def test_batch_error_is_a_value_error_with_reason():
    """BatchError is a ValueError carrying `.reason` and the message `reason: detail`."""
    error = BatchError("empty", "no orders")
    assert isinstance(error, ValueError)
    assert (error.reason, str(error)) == ("empty", "empty: no orders")


# --- the examples in docs/wire-format.md --------------------------------------------------


def doc_block(language: str) -> str:
    """The first ```language fenced block of docs/wire-format.md."""
    found = re.search(rf"^```{language}\n(.*?)^```", DOC.read_text(), re.S | re.M)
    assert found, f"no ```{language} block in {DOC}"
    return found.group(1)


def test_doc_json_example_decodes():
    """The first ```json block of docs/wire-format.md is a valid batch with the stated values."""
    batch = decode(doc_block("json").encode(), festival_limits())
    assert columns(batch) == ("hand-1", 0, 14400, [1999, 45000, 129900], [17, 4, 249999],
                              [0, 1, 7], [0, 1, 0])
    assert batch.gmv_cents == 176_899  # "USD 1,768.99 in total"
    assert "USD 1,768.99" in DOC.read_text()


def test_doc_mosquitto_pub_json_is_the_json_example():
    """The JSON in the doc's `mosquitto_pub -m '...'` command decodes to the JSON example."""
    commands = re.findall(r"mosquitto_pub .*?hand-1/0 -m '([^']*)'", DOC.read_text())
    assert len(commands) == 1
    assert columns(decode(commands[0].encode(), LIMITS)) == columns(
        decode(doc_block("json").encode(), LIMITS))
    assert "-t gmv/v1/orders/hand-1/0 -m" in DOC.read_text()


async def test_doc_commands_published_by_hand_reach_the_totals(mosquitto, topics):
    """The doc's three mosquitto_pub commands, run as written (prefix and port aside), add
    USD 1,768.99 + USD 469.99 + USD 1,768.99 (the minute runs example: two orders at 00:00,
    one at 00:01) to a running aggregator, nothing rejected; run again, they are
    duplicates."""
    from .conftest import running_pipeline
    text = DOC.read_text()
    commands = [line for line in text.splitlines() if "mosquitto_pub" in line
                and "-q 1 -t gmv/v1/orders/" in line]
    assert len(commands) == 3
    script = "\n".join(commands).replace("gmv/v1/", f"{topics.prefix}/")
    async with running_pipeline(mosquitto, topics) as pipeline:
        for _ in range(2):
            done = await asyncio.create_subprocess_shell(
                script, env={**os.environ, "PORT": str(mosquitto.port)})
            assert await done.wait() == 0
        async with asyncio.timeout(10):
            while pipeline.state.duplicates < 3:
                await asyncio.sleep(0.05)
    assert pipeline.state.gmv_cents == 176_899 + 46_999 + 176_899 and not pipeline.state.rejected
    assert pipeline.state.gmv_by_minute[14400:14402].tolist() == [176_899 + 46_999 + 46_999,
                                                                  129_900]


def test_doc_binary_one_liner_builds_the_documented_hex_bytes():
    """The doc's `python3 -c` one-liner prints exactly the ```hex dump, a valid binary batch."""
    text = DOC.read_text()
    (code,) = re.findall(r"python3 -c '([^']*)' \| mosquitto_pub .* -s$", text, re.M)
    printed = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True,
                             timeout=30).stdout
    dump = bytes.fromhex("".join(line.split("#")[0] for line in doc_block("hex").splitlines()))
    assert printed == dump
    assert len(dump) == 60
    batch = decode(dump, festival_limits())
    assert columns(batch) == ("hand-2", 0, 14400, [1999, 45000], [17, 4], [0, 1], [0, 1])


def test_doc_country_and_platform_tables_match_dimensions():
    """The doc's id tables list exactly dimensions.COUNTRIES and PLATFORMS, in order."""
    from ticker.core.dimensions import COUNTRIES, PLATFORMS
    text = DOC.read_text()
    for i, (code, name) in enumerate(COUNTRIES):
        assert f"| {i} | {code} | {name} |" in text
    for i, name in enumerate(PLATFORMS):
        assert f"| {i} | {name} |" in text


# --- minute runs: one batch spanning several minutes ------------------------------------------

# The JSON and binary examples of docs/wire-format.md: orders at 14400, 14400 and 14401.
JSON_RUNS = (b'{"v":1,"producer":"hand-3","seq":0,"minute":14401,'
             b'"amount_cents":[1999,45000,129900],"brand":[17,4,249999],"country":[0,1,7],'
             b'"platform":[0,1,0],"minute_runs":[14400,2,14401,1]}')


def binary_runs(runs=((14400, 2), (14401, 1)), *, amounts=(1999, 45000, 129900),
                brands=(17, 4, 249999), countries=(0, 1, 7), platforms=(0, 1, 0),
                minute: int = 14401, run_count: int | None = None, sent_at: int | None = None,
                producer: bytes = b"hand-3", cut: int = 0) -> bytes:
    """A binary batch with flag 0x02 packed by hand: the header, the send time (flag 0x01)
    if given, the uint64 run count, the producer id and padding, the runs, the columns."""
    k = len(amounts)
    flags = 0x02 | (0x01 if sent_at is not None else 0)
    payload = b"".join([
        struct.pack(HEADER, b"GMVB", 1, flags, len(producer), k, 0, minute),
        struct.pack("<q", sent_at) if sent_at is not None else b"",
        struct.pack("<Q", len(runs) if run_count is None else run_count),
        producer, b"\0" * (-len(producer) % 8),
        b"".join(struct.pack("<2I", m, c) for m, c in runs),
        struct.pack(f"<{k}q", *amounts), struct.pack(f"<{k}I", *brands),
        bytes(countries), bytes(platforms)])
    return payload[:len(payload) - cut]


def test_json_batch_with_minute_runs_gives_each_order_its_minute():
    """`minute_runs` [14400, 2, 14401, 1]: the first two orders are of 14400, the third of
    14401, which is the batch's `minute`, its latest."""
    batch = decode(JSON_RUNS, LIMITS)
    assert columns(batch) == ("hand-3", 0, 14401, [1999, 45000, 129900], [17, 4, 249999],
                              [0, 1, 7], [0, 1, 0])
    assert batch.order_minutes().tolist() == [14400, 14400, 14401]
    assert batch.order_minutes().dtype == np.int64
    assert [m.tolist() for m in batch.run_minutes()] == [[14400, 14401], [2, 1]]


def test_hand_built_binary_batch_with_minute_runs_decodes_and_encode_writes_it():
    """Flag 0x02: a uint64 run count at 24, the producer id at 32, the runs (uint32 minute,
    uint32 count) at 40, the columns after them: the documented 98 bytes, both ways."""
    payload = binary_runs()
    assert payload == bytes.fromhex(
        "474d5642 01 02 0600 03000000 0000000000000000 41380000"
        "0200000000000000 68616e642d330000 4038000002000000 4138000001000000"
        "cf07000000000000 c8af000000000000 6cfb010000000000 11000000 04000000 8fd00300"
        "000107 000100")
    batch = decode(payload, LIMITS)
    assert columns(batch) == columns(decode(JSON_RUNS, LIMITS))
    assert batch.order_minutes().tolist() == [14400, 14400, 14401]
    assert np.shares_memory(batch.minute_runs, np.frombuffer(payload, np.uint8))
    assert encode(batch) == payload
    assert encode(batch, binary=False) == JSON_RUNS


def test_minute_runs_follow_the_send_time_when_both_flags_are_set():
    """Flags 0x03: the send time at 24, then the run count at 32, the producer id at 40."""
    payload = binary_runs(sent_at=1_700_000_000_123_456)
    assert payload[5] == 0x03 and struct.unpack_from("<qQ", payload, 24) == \
        (1_700_000_000_123_456, 2)
    batch = decode(payload, LIMITS)
    assert batch.sent_at_us == 1_700_000_000_123_456
    assert batch.order_minutes().tolist() == [14400, 14400, 14401]
    assert encode(batch) == payload


def test_a_batch_without_minute_runs_is_all_of_its_minute_as_before():
    """Without runs every order is of `minute` (the format before runs means the same)."""
    batch = decode(JSON_OK, LIMITS)
    assert batch.minute_runs is None and batch.order_minutes().tolist() == [660, 660]
    assert [m.tolist() for m in batch.run_minutes()] == [[660], [2]]
    assert b"minute_runs" not in encode(batch, binary=False) and encode(batch)[5] == 0


def runs_json(runs: object, minute: int = 14401) -> bytes:
    doc = orjson.loads(JSON_RUNS)
    doc["minute_runs"], doc["minute"] = runs, minute
    return json.dumps(doc).encode()


@pytest.mark.parametrize("runs, minute, reason, detail", [
    ([14400, 0, 14401, 3], 14401, "bad_minutes", "at least 1"),
    ([14400, 2, 14401, 2], 14401, "bad_minutes", "add up to the 3 orders"),
    ([14400, 1, 14401, 1], 14401, "bad_minutes", "add up"),
    ([14401, 2, 14401, 1], 14401, "bad_minutes", "strictly increase"),
    ([14401, 2, 14400, 1], 14400, "bad_minutes", "strictly increase"),
    ([14400, 2, 14401, 1], 14400, "bad_minutes", "not the last run's minute"),
    ([], 14401, "bad_minutes", "at least one"),
    ([14400, 2, 14401], 14401, "bad_minutes", "pairs"),
    (5, 14401, "bad_minutes", "not a list"),
    ([14400, 2, 15840, 1], 14401, "out_of_range", "outside 0..15839"),
    ([-1, 2, 14401, 1], 14401, "out_of_range", "outside 0..15839"),
    ([14400, 2.0, 14401, 1], 14401, "bad_type", "2.0"),
    ([14400, 2, 14401, True], 14401, "bad_type", "True"),
    ([2**63, 2, 14401, 1], 14401, "out_of_range", "beyond 64 bits"),
    ([[14400, 2], [14401, 1]], 14401, "too_nested", "five with minute_runs"),
])
def test_json_minute_runs_that_do_not_describe_the_batch_are_rejected(runs, minute, reason,
                                                                       detail):
    """Runs must be minute, count pairs of integers, minutes in the window and strictly
    increasing, the last the batch's minute, counts at least 1 adding up to the batch."""
    assert detail in rejected(runs_json(runs, minute), reason)


def test_more_minute_runs_than_the_window_has_minutes_are_oversized():
    """A batch can hold at most one run per minute of the window (here 10), and at most
    `max_minute_runs`; more is refused before anything is allocated for them."""
    ten = Limits(n_brands=5, n_minutes=10, n_countries=2, n_platforms=3)
    runs = [v for m in range(11) for v in (m, 1)]
    doc = {"v": 1, "producer": "p", "seq": 0, "minute": 10, "amount_cents": [1] * 11,
           "brand": [0] * 11, "country": [0] * 11, "platform": [0] * 11, "minute_runs": runs}
    assert "11 minute runs > 10" in rejected(orjson.dumps(doc), "oversized", ten)
    assert "2000000 minute runs" in rejected(binary_runs(run_count=2_000_000), "oversized")
    assert "1099511627776 minute runs" in rejected(binary_runs(run_count=2**40), "oversized")
    assert Limits(n_brands=1, n_minutes=200_000, n_countries=1, n_platforms=1).max_runs \
        == 100_000
    with pytest.raises(ValueError, match="max_minute_runs=0"):
        Limits(n_brands=1, n_minutes=1, n_countries=1, n_platforms=1, max_minute_runs=0)


@pytest.mark.parametrize("payload, reason, detail", [
    (binary_runs(((14400, 0), (14401, 3))), "bad_minutes", "at least 1"),
    (binary_runs(((14400, 2), (14401, 2))), "bad_minutes", "add up"),
    (binary_runs(((14401, 2), (14401, 1))), "bad_minutes", "strictly increase"),
    (binary_runs(((14400, 2), (14401, 1)), minute=14400), "bad_minutes", "last run's"),
    (binary_runs((), amounts=(1,), brands=(1,), countries=(0,), platforms=(0,)),
     "bad_minutes", "at least one"),
    (binary_runs(((14400, 2), (15840, 1)), minute=15840), "out_of_range", "minute=15840"),
    (binary_runs(((14400, 2), (2**32 - 1, 1)), minute=14401), "out_of_range", "a run's"),
    (binary_runs(run_count=3), "bad_length", "3 orders and 3 minute runs need 106"),
    (binary_runs(run_count=1), "bad_length", "need 90"),
    (binary_runs(cut=1), "bad_length", "97 bytes"),
    (binary_runs()[:28], "truncated", "the run count ends at 32"),
])
def test_binary_minute_runs_that_do_not_describe_the_batch_are_rejected(payload, reason,
                                                                         detail):
    """The binary runs obey the JSON rules; a run count that does not match the payload's
    length is bad_length, and a payload ending inside the run count is truncated."""
    assert detail in rejected(payload, reason)


def test_every_minute_run_reason_is_in_the_docs():
    """The rejection table names bad_minutes, and the doc's run examples are the bytes and
    JSON tested here."""
    text = DOC.read_text()
    assert "| `bad_minutes` |" in text and "minute_runs" in text
    assert JSON_RUNS.decode() in text
    dumps = [bytes.fromhex("".join(line.split("#")[0] for line in block.splitlines()))
             for block in re.findall(r"^```hex\n(.*?)^```", text, re.S | re.M)]
    assert binary_runs() in dumps


# --- fuzzing: decode returns a valid batch or raises BatchError, nothing else ------------

FUZZ = settings(max_examples=400, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])
TINY = Limits(n_brands=5, n_minutes=10, n_countries=2, n_platforms=3, max_batch_orders=4,
              max_order_cents=1000)
limits_strategy = st.sampled_from([LIMITS, TINY])

VALID_BINARY = binary(b"fuzz-producer", amounts=(1, 1000, 77), brands=(0, 4, 2),
                      countries=(0, 1, 1), platforms=(2, 0, 1), seq=3, minute=9)
VALID_JSON = (b'{"v":1,"producer":"fuzz-producer","seq":3,"minute":9,'
              b'"amount_cents":[1,1000,77],"brand":[0,4,2],"country":[0,1,1],"platform":[2,0,1]}')


VALID_RUNS_BINARY = binary_runs(((2, 1), (9, 2)), amounts=(1, 1000, 77), brands=(0, 4, 2),
                                countries=(0, 1, 1), platforms=(2, 0, 1), minute=9)
VALID_RUNS_JSON = (b'{"v":1,"producer":"fuzz-producer","seq":3,"minute":9,"minute_runs":[2,1,9,2],'
                   b'"amount_cents":[1,1000,77],"brand":[0,4,2],"country":[0,1,1],"platform":[2,0,1]}')


def check_decode(payload: bytes, limits: Limits) -> OrderBatch | None:
    """Decode; on success assert every documented invariant of the batch."""
    try:
        batch = decode(payload, limits)
    except BatchError as exc:
        assert exc.reason and str(exc).startswith(exc.reason + ": ")
        return None
    n = len(batch.amount_cents)
    assert 1 <= n <= limits.max_batch_orders
    assert len(batch.brand) == len(batch.country) == len(batch.platform) == n
    assert isinstance(batch.producer, str) and 1 <= len(batch.producer) <= 64
    assert type(batch.seq) is int and 0 <= batch.seq <= 2**63 - 1
    assert type(batch.minute) is int and 0 <= batch.minute < limits.n_minutes
    assert batch.amount_cents.min() >= 1 and batch.amount_cents.max() <= limits.max_order_cents
    assert 0 <= batch.brand.min() and batch.brand.max() < limits.n_brands
    assert 0 <= batch.country.min() and batch.country.max() < limits.n_countries
    assert 0 <= batch.platform.min() and batch.platform.max() < limits.n_platforms
    assert batch.gmv_cents == sum(batch.amount_cents.tolist())
    minutes = batch.order_minutes()
    assert minutes.dtype == np.int64 and len(minutes) == n and minutes[-1] == batch.minute
    assert 0 <= minutes[0] and (np.diff(minutes) >= 0).all()
    return batch


def mutate(data: st.DataObject, payload: bytes) -> bytes:
    """Apply a few random byte flips, truncations, insertions and deletions to `payload`."""
    buf = bytearray(payload)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete"]))
        if not buf:
            op = "insert"
        i = data.draw(st.integers(0, max(len(buf) - 1, 0)))
        if op == "flip":
            buf[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set":
            buf[i] = data.draw(st.integers(0, 255))
        elif op == "truncate":
            del buf[i:]
        elif op == "insert":
            buf[i:i] = data.draw(st.binary(min_size=1, max_size=8))
        else:
            del buf[i:i + data.draw(st.integers(1, 8))]
    return bytes(buf)


def test_fuzz_inputs_are_valid_to_begin_with():
    """The fuzzers' seed payloads decode, so mutations start from a valid batch."""
    for payload in (VALID_BINARY, VALID_JSON, VALID_RUNS_BINARY, VALID_RUNS_JSON):
        for limits in (LIMITS, TINY):
            assert check_decode(payload, limits) is not None


@FUZZ
@given(payload=st.binary(max_size=300), limits=limits_strategy)
def test_fuzz_arbitrary_bytes_decode_or_raise_batch_error(payload, limits):
    """Arbitrary bytes give a valid batch or BatchError, never another exception."""
    check_decode(payload, limits)


@FUZZ
@given(rest=st.binary(max_size=120), version=st.sampled_from([1, 1, 1, 2]),
       limits=limits_strategy)
def test_fuzz_arbitrary_bytes_after_the_binary_magic(rest, version, limits):
    """Arbitrary bytes after `GMVB` and a version byte give a valid batch or BatchError."""
    check_decode(b"GMVB" + bytes([version]) + rest, limits)


@FUZZ
@given(producer=st.binary(max_size=70), n=st.integers(0, 6), seq=st.integers(0, 2**64 - 1),
       minute=st.integers(0, 2**32 - 1), flags=st.integers(0, 255),
       body=st.binary(max_size=100), limits=limits_strategy)
def test_fuzz_structured_binary_header(producer, n, seq, minute, flags, body, limits):
    """Any header fields with random column bytes of the right length decode or raise BatchError."""
    pad = bytes(-len(producer) % 8)
    columns_bytes = (body * (14 * n // max(len(body), 1) + 1))[:14 * n] if body else bytes(14 * n)
    payload = struct.pack(HEADER, b"GMVB", 1, flags, len(producer), n, seq, minute)
    check_decode(payload + producer + pad + columns_bytes, limits)


@FUZZ
@given(data=st.data(), limits=limits_strategy)
def test_fuzz_mutated_binary_batch(data, limits):
    """Byte flips, truncations and insertions of a valid binary batch decode or raise BatchError."""
    check_decode(mutate(data, VALID_BINARY), limits)


@FUZZ
@given(data=st.data(), limits=limits_strategy, json_encoding=st.booleans())
def test_fuzz_mutated_batch_with_minute_runs(data, limits, json_encoding):
    """Byte flips, truncations and insertions of a valid batch with minute runs decode (each
    order's minute in the window, non-decreasing, the last the batch's) or raise BatchError."""
    check_decode(mutate(data, VALID_RUNS_JSON if json_encoding else VALID_RUNS_BINARY), limits)


@FUZZ
@given(data=st.data(), limits=limits_strategy)
def test_fuzz_mutated_json_batch(data, limits):
    """Byte flips, truncations and insertions of a valid JSON batch decode or raise BatchError."""
    check_decode(mutate(data, VALID_JSON), limits)


json_scalars = st.one_of(
    st.integers(-(2**70), 2**70), st.integers(-3, 300), st.floats(allow_nan=False,
                                                                  allow_infinity=False),
    st.booleans(), st.none(), st.text(max_size=70),
)
json_values = st.one_of(json_scalars, st.lists(json_scalars, max_size=6),
                        st.lists(st.integers(-2, 20), max_size=6))


@FUZZ
@given(overrides=st.dictionaries(
           st.sampled_from(["v", "producer", "seq", "minute", "amount_cents", "brand",
                            "country", "platform", "extra"]),
           st.one_of(json_values, st.just(...)), max_size=4),
       limits=limits_strategy)
def test_fuzz_json_fields_of_any_type(overrides, limits):
    """Any JSON value (or absence) in any field gives a valid batch or BatchError."""
    doc = orjson.loads(VALID_JSON)
    for key, value in overrides.items():
        if value is ...:
            doc.pop(key, None)
        else:
            doc[key] = value
    # Integers beyond 64 bits cannot go through orjson.dumps; the stdlib writes them as text.
    check_decode(json.dumps(doc).encode(), limits)


# --- bounds on what decoding costs, and the other small messages ------------------------------

def test_deeply_nested_json_is_refused_before_parsing_with_bounded_memory():
    """30 MB of `[[],[],...` (under the size limit) is `too_nested`, allocating almost nothing
    (before: orjson built ~2 GB of lists for such a payload)."""
    limits = Limits(n_brands=10, n_minutes=60, n_countries=2, n_platforms=2,
                    max_json_bytes=64 * 2**20)
    payload = b'{"v":1,"amount_cents":[' + b"[]," * 10_000_000 + b"[]]}"
    assert len(payload) < limits.max_payload_bytes
    tracemalloc.start()
    try:
        rejected(payload, "too_nested", limits)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000
    rejected(b'{"v":1,"x":{"y":{}}}', "too_nested")
    rejected(json_doc(brand=[1, [1]]), "too_nested")


def test_json_memory_stays_proportional_to_the_payload():
    """A flat JSON batch costs at most ~16x its size to decode: at most 64 MB at 4 MiB."""
    n = 80_000
    payload = json_doc(amount_cents=[10**10] * n, brand=[249_999] * n, country=[11] * n,
                       platform=[2] * n)
    tracemalloc.start()
    try:
        decode(payload, LIMITS)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(payload) < LIMITS.max_json_bytes and peak < 17 * len(payload)


def test_send_time_beyond_2_to_the_53_is_out_of_range():
    """sent_at_us is bounded like every other number, in both encodings."""
    rejected(json_doc(sent_at_us=2**53), "out_of_range")
    stamped = struct.pack(HEADER, b"GMVB", 1, 1, 6, 1, 42, 660) + struct.pack("<q", 2**60)
    rejected(stamped + b"shop-7\0\0" + struct.pack("<qIBB", 1999, 17, 0, 2), "out_of_range")


def test_announcement_decodes_and_bounds_last_seq():
    """An announcement names its producer and a last_seq in -1..2^53-1; anything else is refused."""
    note = decode_announcement(b'{"v":1,"producer":"shop-7","last_seq":41,"orders":3}')
    assert (note.producer, note.last_seq) == ("shop-7", 41)
    for bad, reason in ((b'{"v":1,"producer":"a","last_seq":18446744073709551615}',
                         "out_of_range"), (b'{"v":1,"producer":"a","last_seq":"9"}',
                                           "out_of_range"),
                        (b'{"v":1,"producer":"a/b","last_seq":1}', "bad_producer"),
                        (b'{"v":2,"producer":"a","last_seq":1}', "bad_version"),
                        (b"[1]", "bad_version"), (b"x" * 5000, "oversized")):
        with pytest.raises(BatchError) as caught:
            decode_announcement(bad)
        assert caught.value.reason == reason


def test_dead_letter_carries_the_reason_and_a_bounded_head_not_the_payload():
    """A 1 MB rejected payload becomes a dead letter of under 2 KB with its size and reason."""
    payload = b"{" + b"x" * 1_000_000
    letter = orjson.loads(dead_letter("oversized", "too big", "gmv/v1/orders/a/0", payload))
    assert len(dead_letter("oversized", "too big", "gmv/v1/orders/a/0", payload)) < 2048
    assert letter == {"v": 1, "reason": "oversized", "detail": "too big",
                      "topic": "gmv/v1/orders/a/0", "size": 1_000_001,
                      "head": "{" + "x" * 511, "truncated": True}


def _decoded(payload: bytes, limits: Limits) -> tuple:
    try:
        b = decode(payload, limits)
    except BatchError as exc:
        return ("rejected", exc.reason)
    runs = None if b.minute_runs is None else b.minute_runs.tolist()
    return ("ok", b.producer, b.seq, b.minute, b.sent_at_us, b.amount_cents.tolist(),
            b.brand.tolist(), b.country.tolist(), b.platform.tolist(), runs)


def test_the_fast_json_path_accepts_and_rejects_exactly_what_the_general_path_does(
        monkeypatch):
    """Canonical integer arrays are cut out and parsed by numpy; anything else goes the
    general way. Edge cases (signs, zeros, floats, spaces, 18-20 digits, empty elements, a key
    twice, trailing bytes) and 3,000 random byte mutations decode to the same batch, or are
    rejected for the same reason, with the fast path on and off."""
    import random

    from ticker.core import wire

    limits = Limits(n_brands=1000, n_minutes=100, n_countries=12, n_platforms=3)
    base = (b'{"v":1,"producer":"p","seq":3,"minute":5,"amount_cents":[100,2,30],'
            b'"brand":[0,999,5],"country":[0,1,11],"platform":[0,1,2]')
    docs = [base + b"}", base + b',"minute_runs":[4,1,5,2]}']
    edges = [b"0", b"00", b"01", b"-1", b"1.0", b"1e2", b"true", b"null", b'"1"', b"", b",",
             b"1,,2", b"1,", b",1", b" 1", b"99999999999999999999", b"999999999999999999",
             b"1000000000000000000", b"9223372036854775808", b"[1]", b"1,2,3,4", b"4,3"]
    payloads = []
    for doc in docs:
        for key in (b"amount_cents", b"brand", b"country", b"platform", b"minute_runs"):
            tag = b'"' + key + b'":['
            if tag in doc:
                i = doc.index(tag) + len(tag)
                j = doc.index(b"]", i)
                for edge in edges:
                    p = doc[:i] + edge + doc[j:]
                    payloads += [p, p + b" ", p + b"x",
                                 p.replace(b'"seq":3', b'"seq":3,' + tag + b"7]")]
    rng = random.Random(11)
    for _ in range(3000):
        p = bytearray(rng.choice(docs))
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(p))
            if rng.random() < 0.5:
                p[at] = rng.choice(b'0123456789,[]{}":- .e')
            else:
                del p[at]
        payloads.append(bytes(p))
    fast = [_decoded(p, limits) for p in payloads]
    monkeypatch.setattr(wire, "_split_int_arrays", lambda payload: None)
    assert [_decoded(p, limits) for p in payloads] == fast
    assert sum(f[0] == "ok" for f in fast) > 10  # some of them are valid batches
