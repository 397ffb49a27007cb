"""Historical curves 2009-2021: exact totals, fitted milestones, 2020's shape, the docs table."""

from __future__ import annotations

import importlib.util
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import numpy as np
import pytest

from simulator.history import (
    LIKE_FOR_LIKE_2019_CENTS,
    cumulative_at,
    curve,
    curve_like_for_like_2019,
    festival_years,
    festivals,
    milestone_table,
)

ROOT = Path(__file__).resolve().parent.parent
DAY = 1440
NOV11_0030 = 10 * DAY + 30


def day_starts(year: int) -> list[int]:
    """Minute indexes of the days that open with a midnight rush."""
    return [0, 10 * DAY] if curve(year).window.minutes > DAY else [0]


def test_every_year_2009_to_2021_is_there():
    """One curve per year 2009-2021, one day long until 2019, Nov 1-11 in 2020 and 2021."""
    assert festival_years() == list(range(2009, 2022))
    assert {y: curve(y).window.minutes for y in (2019, 2020, 2021)} == {
        2019: DAY, 2020: 11 * DAY, 2021: 11 * DAY}
    assert curve(2020).window.start.isoformat() == "2020-11-01T00:00:00+08:00"


@pytest.mark.parametrize("year", range(2009, 2022))
def test_total_is_the_published_rmb_at_the_documented_rate(year):
    """gmv_cents is the RMB total / rate rounded to the cent, and the minutes add up to it."""
    fest = festivals()[year]
    expected = (Decimal(fest.gmv_rmb) * 100 / Decimal(fest.rmb_per_usd)).quantize(
        Decimal(1), ROUND_HALF_UP)
    cents = curve(year).minute_gmv_cents()
    assert curve(year).gmv_cents == int(expected)
    assert cents.dtype == np.int64 and int(cents.sum()) == int(expected)


def test_headline_totals_in_cents():
    """2019 is RMB 268,444,058,381 at 6.99 and 2020 RMB 498.2B at 6.723 (about USD 74.1B)."""
    assert curve(2019).gmv_cents == 3_840_401_407_454
    assert curve(2020).gmv_cents == 7_410_382_269_820


@pytest.mark.parametrize("row", milestone_table(),
                         ids=lambda r: f"{r['year']}-{r['currency']}{r['amount']}")
def test_precise_milestone_within_tolerance(row):
    """The model reaches the amount within 2% of the published clock time or 1 minute."""
    assert abs(row["difference_s"]) <= row["tolerance_s"]
    assert row["within_tolerance"]


def test_only_precise_milestones_are_checked():
    """Vague figures (2012's 'about 13 h', 2019's '> USD 18B') stay out of the table."""
    rows = milestone_table()
    assert not [r for r in rows if r["year"] == 2012]
    assert not [r for r in rows if r["year"] == 2019 and r["amount"] == 18_000_000_000]
    assert len(rows) == 5 + 7 + 8 + 9 + 12 + 1


@pytest.mark.parametrize("year", range(2009, 2022))
def test_curve_is_positive_with_a_midnight_spike(year):
    """Every minute is > 0; each festival day opens with a rush far above its overnight trough."""
    w = curve(year).minute_weights
    assert len(w) == curve(year).window.minutes and w.min() > 0
    for start in day_starts(year):
        trough = w[start + 4 * 60:start + 5 * 60].mean()
        assert w[start:start + 5].max() > 10 * trough


@pytest.mark.parametrize("year", range(2009, 2022))
def test_evening_is_busier_than_the_night(year):
    """On Nov 11 the 20:00-23:00 rate is above the 03:00-06:00 trough."""
    day = curve(year).minute_weights[-DAY:]
    assert day[20 * 60:23 * 60].mean() > day[3 * 60:6 * 60].mean()


def test_2020_has_two_sales_windows():
    """Nov 1-3 and Nov 11 each carry more than twice the GMV of any day of Nov 4-10."""
    days = curve(2020).minute_gmv_cents().reshape(11, DAY).sum(axis=1)
    assert min(days[[0, 1, 2, 10]]) > 2 * days[3:10].max()


def test_2020_passes_372_3b_by_nov_11_0030():
    """By Nov 11 00:30 the curve holds more than RMB 372.3B, by no more than 0.1%."""
    rmb = cumulative_at(curve(2020), NOV11_0030) * Decimal("6.723") / 100
    assert 372_300_000_000 < rmb < 372_300_000_000 * Decimal("1.001")


def test_2020_is_26_percent_over_2019_like_for_like():
    """Nov 1-11 2019 is USD 74.1B / 1.26 in cents, Nov 11 2019 inside it is curve(2019)."""
    lfl = curve_like_for_like_2019()
    assert lfl.gmv_cents == LIKE_FOR_LIKE_2019_CENTS == 5_880_952_380_952
    assert int(lfl.minute_gmv_cents().sum()) == lfl.gmv_cents
    assert round(curve(2020).gmv_cents / lfl.gmv_cents, 3) == 1.26
    nov11 = cumulative_at(lfl, 11 * DAY) - cumulative_at(lfl, 10 * DAY)
    assert abs(nov11 - curve(2019).gmv_cents) < DAY
    assert cumulative_at(curve(2020), NOV11_0030) > cumulative_at(lfl, NOV11_0030)


def test_cumulative_at_is_exact_at_minutes_and_pro_rata_between():
    """0 at the start, the total at the end, whole minutes exact, half a minute in between."""
    c = curve(2019)
    cents = c.minute_gmv_cents()
    assert cumulative_at(c, 0) == 0 and cumulative_at(c, DAY) == c.gmv_cents
    assert cumulative_at(c, 60) == int(cents[:60].sum())
    assert cumulative_at(c, 60.5) == int(cents[:60].sum()) + int(cents[60]) // 2
    assert cumulative_at(c, -5) == 0 and cumulative_at(c, 10**6) == c.gmv_cents


def test_2021_replays_2020s_shape():
    """2021 published no milestones: same minute shares as 2020, its own total."""
    assert np.allclose(curve(2021).cumulative_share(), curve(2020).cumulative_share())
    assert curve(2021).milestones == ()


def test_curves_are_read_only_and_unknown_years_refused():
    """Cached curves cannot be changed in place; a year without data is a ValueError."""
    assert not curve(2018).minute_weights.flags.writeable
    with pytest.raises(ValueError, match="year=2022"):
        curve(2022)


def test_docs_milestone_table_is_up_to_date():
    """docs/curves.md holds what scripts/milestone_table.py generates now."""
    spec = importlib.util.spec_from_file_location("milestone_table",
                                                  ROOT / "scripts" / "milestone_table.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    doc = (ROOT / "docs" / "curves.md").read_text(encoding="utf-8")
    assert script.render() in doc, "run: .venv/bin/python scripts/milestone_table.py --write"
