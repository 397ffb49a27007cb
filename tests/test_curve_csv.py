"""Your own curve from CSV: both kinds parse into a Curve; every error names PATH:LINE."""

from __future__ import annotations

import dataclasses
from datetime import datetime

import numpy as np
import pytest

from simulator.curve_csv import CurveFileError, parse_curve, read_curve
from simulator.scenario import scenario_for_year
from ticker.core.dimensions import BEIJING


def write(tmp_path, text: str):
    path = tmp_path / "my.csv"
    path.write_text(text, encoding="utf-8")
    return path


def test_cumulative_usd_passes_every_row(tmp_path):
    """A one-day USD file: exact total in cents, a 24-hour window, each row reached on time."""
    path = write(tmp_path, "elapsed,cumulative_usd\n00:01:08,1000000000\n01:00,13000000000\n"
                           "12:00,26380000000\n24:00,38404014074.54\n")
    c = read_curve(path)
    assert c.gmv_cents == 3_840_401_407_454 and c.window.minutes == 1440
    assert int(c.minute_gmv_cents().sum()) == c.gmv_cents and c.minute_weights.min() > 0
    assert [m.note for m in c.milestones] == ["line 2", "line 3", "line 4", "line 5"]
    assert all(abs(m.difference_seconds) < 60 for m in c.milestones)
    assert c.window.start == datetime(2020, 11, 11, tzinfo=BEIJING)


def test_cumulative_cents_with_days_minutes_comments_and_flat_part(tmp_path):
    """D HH:MM and plain minutes mix; comments and blanks are skipped; a flat stretch sells 0."""
    path = write(tmp_path, "# two days\n\nelapsed, cumulative_cents\n0,0\n90,500\n"
                           "1 00:00,500\n1 12:30:30,900\n2880,1000\n")
    c = read_curve(path, start=datetime(2021, 11, 10, tzinfo=BEIJING), label="mine")
    assert c.window.minutes == 2880 and c.gmv_cents == 1000 and c.window.label == "mine"
    assert c.year == 2021
    cents = c.minute_gmv_cents()
    assert int(cents.sum()) == 1000 and int(cents[:90].sum()) == 500
    assert int(cents[90:1440].sum()) == 0


def test_cumulative_window_rounds_up_to_a_whole_minute():
    """The last row at 10.5 min ends a window of 11 minutes with nothing in the last half."""
    c = parse_curve("elapsed,cumulative_cents\n10.5,1000\n")
    assert c.window.minutes == 11 and int(c.minute_gmv_cents().sum()) == 1000


def test_per_minute_is_replayed_as_given(tmp_path):
    """Rows in any order, a missing minute is 0, the window ends after the largest minute."""
    c = read_curve(write(tmp_path, "minute,gmv_cents\n2,60000000\n0,150000000\n3,7\n"))
    assert c.minute_gmv_cents().tolist() == [150000000, 0, 60000000, 7]
    assert c.gmv_cents == 210000007 and c.window.minutes == 4
    assert np.array_equal(c.minute_weights, [150000000, 0, 60000000, 7])


def test_byte_order_mark_is_ignored(tmp_path):
    """A file saved with a UTF-8 BOM (as spreadsheets do) still reads its header."""
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeffminute,gmv_cents\n0,5\n".encode())
    assert read_curve(path).gmv_cents == 5


ERRORS = [
    ("", 1, "empty file"),
    ("# only a comment\n\n", 1, "empty file"),
    ("time,gmv\n0,1\n", 1, "unknown header 'time,gmv'"),
    ("# note\nminute,cents\n", 2, "unknown header"),
    ("elapsed,cumulative_usd\n", 1, "no data rows"),
    ("elapsed,cumulative_usd\n01:00,5\n02:00,6,7\n", 3, "expected 2 columns, got 3"),
    ("minute,gmv_cents\n0\n", 2, "expected 2 columns, got 1"),
    ("elapsed,cumulative_cents\n01:00,abc\n", 2, "'abc' is not a whole number of cents"),
    ("elapsed,cumulative_usd\n01:00,1e3\n", 2, "'1e3' is not a US dollar amount"),
    ("elapsed,cumulative_usd\nsoon,5\n", 2, "'soon' is not an elapsed time"),
    ("elapsed,cumulative_usd\n01:75,5\n", 2, "below 60"),
    ("elapsed,cumulative_usd\n01:00,1.005\n", 2, "more than 2 decimals"),
    ("elapsed,cumulative_usd\n01:00,5\n02:00,-5\n", 3, "negative amount -5"),
    ("minute,gmv_cents\n0,5\n1,-1\n", 3, "negative amount -1"),
    ("elapsed,cumulative_usd\n01:00,5\n00:30,6\n", 3, "not after the previous row"),
    ("elapsed,cumulative_usd\n01:00,5\n60,6\n", 3, "not after the previous row"),
    ("elapsed,cumulative_cents\n01:00,90\n02:00,80\n", 3, "below the previous row's"),
    ("elapsed,cumulative_cents\n0,5\n", 2, "at elapsed 0 must be 0"),
    ("elapsed,cumulative_cents\n01:00,0\n02:00,0\n", 3, "no GMV"),
    ("minute,gmv_cents\n0,0\n", 2, "no GMV"),
    ("minute,gmv_cents\n-1,5\n", 2, "minute -1 out of range"),
    ("minute,gmv_cents\n0,5\n86400,5\n", 3, "minute 86400 out of range"),
    ("minute,gmv_cents\n1.5,5\n", 2, "is not a whole number"),
    ("minute,gmv_cents\n7,5\n0,1\n7,6\n", 4, "minute 7 already given on line 2"),
    ("minute,gmv_cents\n0,9007199254740992\n", 2, "too large (max 9007199254740991 cents)"),
    ("minute,gmv_cents\n0,9007199254740991\n1,1\n", 3, "total too large"),
]


@pytest.mark.parametrize(("text", "line", "reason"), ERRORS,
                         ids=[reason for _, _, reason in ERRORS])
def test_malformed_file_names_path_and_line(tmp_path, text, line, reason):
    """Each malformed file raises CurveFileError 'PATH:LINE: reason' at the offending line."""
    path = write(tmp_path, text)
    with pytest.raises(CurveFileError) as err:
        read_curve(path)
    assert str(err.value).startswith(f"{path}:{line}: ")
    assert reason in str(err.value)
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize(("data", "line", "byte"), [
    (b"minute,gmv_cents\n# caf\xe9 au lait\n0,5\n", 2, "0xe9"),
    ("\ufeff# BOM\nminute,gmv_cents\n".encode() + b"0,\xff\n", 3, "0xff"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", 1, "0x89"),
], ids=["latin-1", "after a byte order mark", "binary"])
def test_file_that_is_not_utf8_names_its_line(tmp_path, data, line, byte):
    """A Latin-1 or binary file raises 'PATH:LINE: not UTF-8 text' at the first bad byte."""
    path = tmp_path / "my.csv"
    path.write_bytes(data)
    with pytest.raises(CurveFileError, match="save the curve as UTF-8") as err:
        read_curve(path)
    assert str(err.value).startswith(f"{path}:{line}: not UTF-8 text (byte {byte})")


@pytest.mark.parametrize(("make", "reason"), [
    (lambda path: None, "No such file or directory"),
    (lambda path: path.mkdir(), "Is a directory"),
], ids=["missing", "directory"])
def test_file_that_cannot_be_read_names_path_and_reason(tmp_path, make, reason):
    """A missing file or a directory raises 'PATH: cannot read: REASON'."""
    path = tmp_path / "my.csv"
    make(path)
    with pytest.raises(CurveFileError) as err:
        read_curve(path)
    assert str(err.value) == f"{path}: cannot read: {reason}"


def test_unknown_header_shows_only_its_start():
    """A file with no line breaks that is not a curve gets a short message, not all of it."""
    with pytest.raises(CurveFileError, match="unknown header") as err:
        parse_curve("\x00" * 100_000)
    assert len(str(err.value)) < 400


def test_curve_too_big_for_a_minute_is_refused_up_front_at_its_order_scale(tmp_path):
    """A curve whose busiest minute would need more than 50M orders names it and the way out."""
    c = read_curve(write(tmp_path, "minute,gmv_cents\n0,1\n1,900000000000000\n"))
    with pytest.raises(ValueError, match=r"^curve from my.csv: minute 1 would have [\d,]+ orders "
                                         "at order scale 0.001, more than 50,000,000: lower "):
        dataclasses.replace(scenario_for_year(2020), curve=c, peak=None)
    assert dataclasses.replace(scenario_for_year(2020), curve=c, peak=None,
                               order_scale=0.0001).minute_orders[1] < 50_000_000
