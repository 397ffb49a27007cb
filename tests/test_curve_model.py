"""The day model: exact integrals, a trend fitted without the year it predicts, the docs table."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from simulator.curve_model import DayShape, Published, fit_trend, leave_one_out
from simulator.history import curve, festivals, observed, published, trend

ROOT = Path(__file__).resolve().parent.parent
PREDICTED_YEARS = (2009, 2010, 2012, 2015, 2016, 2017)


def load_script():
    spec = importlib.util.spec_from_file_location("milestone_table",
                                                  ROOT / "scripts" / "milestone_table.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_day_shape_is_a_whole_day_and_inverts_exactly():
    """share_by runs from 0 to 1, the minute weights sum to 1, minutes_to_reach inverts it."""
    shape = DayShape(fast=40.0, slow=20.0, ramp_minutes=0.5, fast_decay=4.0, slow_decay=50.0)
    weights = shape.minute_weights()
    assert len(weights) == 1440 and weights.min() > 0 and abs(weights.sum() - 1) < 1e-12
    assert shape.share_by(0.0) == 0 and abs(shape.share_by(1440.0) - 1) < 1e-12
    at = np.array([21 / 60, 1.5, 17.0, 60.0, 600.0])
    assert np.allclose(shape.minutes_to_reach(shape.share_by(at)), at, atol=0.5 / 60)


def test_the_rate_peaks_at_the_end_of_the_ramp():
    """The rush rises from 00:00 to its peak at ramp_minutes and falls after it."""
    shape = DayShape(fast=40.0, slow=20.0, ramp_minutes=0.5, fast_decay=4.0, slow_decay=50.0)
    t = np.linspace(0, 10, 601)
    rate = np.diff(shape.share_by(t))
    assert abs(t[rate.argmax() + 1] - 0.5) <= 1 / 60
    assert shape.peak_ratio() > 30


def test_peak_ratio_is_the_published_payment_rate_over_the_mean():
    """2015: 85,900 payments/s x RMB 195 over RMB 91.217B / 86,400 s; 2013's is per minute."""
    f = festivals()[2015]
    assert published(2015).peak_ratio == pytest.approx(85_900 * f.aov_rmb * 86_400 / f.gmv_rmb)
    f = festivals()[2013]
    assert published(2013).peak_ratio == pytest.approx(790_000 / 60 * 204 * 86_400 / f.gmv_rmb)


def test_peak_orders_count_as_payments_at_most_one_to_one():
    """2018 publishes orders only: its payment rate is below its order rate, never above."""
    f = festivals()[2018]
    orders_ratio = f.peak_orders_per_s * f.aov_rmb * 86_400 / f.gmv_rmb
    assert 0.5 * orders_ratio < published(2018).peak_ratio < orders_ratio


def test_leave_one_out_never_sees_the_held_out_years_times():
    """Doubling 2019's published times changes nothing in its prediction, only in the others'."""
    obs = observed()
    moved = dict(obs)
    moved[2019] = dataclasses.replace(obs[2019], minutes=tuple(2 * m for m in obs[2019].minutes))
    before, after = leave_one_out(obs), leave_one_out(moved)
    assert np.array_equal(before[2019], after[2019])
    assert not np.array_equal(before[2018], after[2018])


def test_eleven_day_festivals_are_not_the_day_models():
    """2020 and 2021 span Nov 1-11: asking the day model for them is refused."""
    with pytest.raises(ValueError, match="year=2020"):
        published(2020)


def test_trend_needs_two_years():
    """A trend from one year is refused with the years it was given."""
    with pytest.raises(ValueError, match=r"\[2019\]"):
        fit_trend({2019: observed()[2019]})


def test_a_higher_peak_ratio_gives_a_bigger_opening():
    """Within the fitted range, more peak means more of the day in its first hour."""
    low, high = trend().peak_ratios
    shares = [trend().predict(Published(2016, r)).share_by(60.0)
              for r in np.geomspace(low, high, 5)]
    assert np.all(np.diff(shares) > 0)


def test_outside_the_fitted_range_the_nearest_end_is_used():
    """2009's peak ratio (60) is above every fitted year's: it is predicted at the top one."""
    low, high = trend().peak_ratios
    assert published(2009).peak_ratio > high
    assert trend().predict(published(2009)) == trend().predict(Published(2011, high))


@pytest.mark.parametrize("year", PREDICTED_YEARS)
def test_years_without_milestones_are_the_models_prediction(year):
    """Their curve is the trend's day for their published year and peak ratio, minute for minute."""
    expected = trend().predict(published(year)).minute_weights()
    assert np.allclose(curve(year).minute_weights / curve(year).minute_weights.sum(), expected)
    assert "predicted from peak ratio" in curve(year).model


def test_docs_leave_one_out_table_is_up_to_date():
    """docs/curves.md holds the leave-one-out table scripts/milestone_table.py makes now."""
    doc = (ROOT / "docs" / "curves.md").read_text(encoding="utf-8")
    assert load_script().render_loo() in doc, \
        "run: .venv/bin/python scripts/milestone_table.py --write"


@pytest.mark.parametrize("year", (2015, 2016, 2017))
def test_predicted_busiest_minute_matches_the_published_payment_peak(year):
    """A predicted year's busiest minute, in orders a second at its average order, is within a
    factor of 1.5 of its published peak payments a second (85,900, 120,000 and 256,000)."""
    f = festivals()[year]
    w = curve(year).minute_weights
    per_second = w.max() / w.sum() * f.gmv_rmb / f.aov_rmb / 60
    assert 1 / 1.5 < per_second / float(f.peak_payments_per_s) < 1.5
