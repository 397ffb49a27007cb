"""The default 2020 scenario and the order generator: exact, deterministic, in range."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from simulator.catalog import build_catalog
from simulator.generator import generate_minute
from simulator.scenario import FESTIVAL_2020_SCENARIO as S2020


def test_minute_curve_adds_up_to_the_festival_total():
    """The 15,840 minutes of Nov 1-11 2020 hold exactly USD 74.1B in cents."""
    assert len(S2020.minute_gmv_cents) == 15_840
    assert int(S2020.minute_gmv_cents.sum()) == 7_410_000_000_000
    assert S2020.minute_gmv_cents.min() > 0


def test_two_sales_windows_are_busier_than_the_days_between():
    """Nov 1-3 and Nov 11 carry more GMV per day than the quieter Nov 4-10."""
    days = S2020.minute_gmv_cents.reshape(11, 1440).sum(axis=1)
    assert min(days[0], days[10]) > 3 * days[3:10].max()
    assert days[10] == days.max()


@pytest.mark.parametrize("minute", [0, 1, 720, 14_400, 15_839])
def test_minute_orders_add_up_to_the_minute_gmv(minute):
    """A minute's generated amounts are positive and sum to its curve value exactly."""
    orders = S2020.orders(minute)
    assert len(orders) == S2020.minute_orders[minute]
    assert int(orders.amount_cents.sum()) == int(S2020.minute_gmv_cents[minute])
    assert orders.amount_cents.min() >= 1
    assert orders.brand.max() < S2020.n_brands
    assert np.array_equal(orders.country, S2020.catalog.country[orders.brand])


def test_same_seed_same_orders_in_any_order():
    """Minute m's orders depend on (seed, m) only, not on what was generated before."""
    fresh = dataclasses.replace(S2020)
    late = fresh.orders(9000)
    early = S2020.orders(9000)
    for name in ("amount_cents", "brand", "country", "platform"):
        assert np.array_equal(getattr(late, name), getattr(early, name))


def test_another_seed_gives_other_orders_with_the_same_totals():
    """Changing the seed reshuffles orders but keeps every minute's GMV."""
    other = dataclasses.replace(S2020, seed=7)
    assert not np.array_equal(other.orders(100).amount_cents, S2020.orders(100).amount_cents)
    assert np.array_equal(other.minute_gmv_cents, S2020.minute_gmv_cents)


def test_order_scale_changes_counts_not_gmv():
    """A smaller order scale publishes fewer, larger orders and the same GMV."""
    small = dataclasses.replace(S2020, order_scale=0.0001)
    assert small.minute_orders.sum() < S2020.minute_orders.sum() / 5
    assert int(small.orders(14_400).amount_cents.sum()) == int(S2020.minute_gmv_cents[14_400])
    with pytest.raises(ValueError, match="order_scale=0"):
        dataclasses.replace(S2020, order_scale=0)


def test_full_scale_order_count_matches_the_published_aov():
    """At order scale 1 the festival has about 2.3 billion orders (AOV near RMB 215)."""
    full = dataclasses.replace(S2020, order_scale=1.0)
    assert 2.2e9 < full.minute_orders.sum() < 2.4e9


def test_catalog_has_the_2020_overseas_brand_count_and_us_first():
    """31,000 of 250,000 brands are overseas, and the US has the most of them."""
    catalog = build_catalog(250_000, 31_000, seed=1)
    overseas = catalog.country[catalog.country != 0]
    assert len(overseas) == 31_000
    counts = np.bincount(overseas, minlength=12)
    assert counts.argmax() == 1  # United States


def test_generator_refuses_more_orders_than_cents():
    """Every order needs at least one cent."""
    catalog = build_catalog(10, 1, seed=1)
    with pytest.raises(ValueError, match="n_orders=11"):
        generate_minute(catalog, 10, 11, np.random.default_rng(0))
