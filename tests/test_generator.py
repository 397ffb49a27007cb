"""The generator's fast paths give what the plain ones give: the same cents, the same brands."""

from __future__ import annotations

import numpy as np
import pytest

from simulator.catalog import GUIDE_MIN, build_catalog
from simulator.curve import allocate_checked
from simulator.generator import split_cents


@pytest.mark.parametrize("weights,total", [
    (np.ones(100_000), 12_345),                       # every remainder ties: index order decides
    (np.repeat([1.0, 2.0, 3.0], 40_000), 10**9 + 7),  # ties within each of three values
    (np.ones(7), 10**15),                             # more than a unit each left over
    (np.array([5.0]), 3),
    (np.random.default_rng(1).lognormal(0.0, 0.9, 100_003), 3 * 10**12),
])
def test_split_cents_is_the_largest_remainder_split_of_allocate(weights, total):
    """The O(n) split gives `allocate_checked`'s parts exactly, ties to the lower index."""
    expected = allocate_checked(total, weights.copy())
    assert np.array_equal(split_cents(total, weights.copy()), expected)
    assert np.array_equal(split_cents(total, weights.copy(), plus=1), expected + 1)


@pytest.mark.parametrize("n,zipf_s", [(GUIDE_MIN - 1, 1.0), (100_000, 1.0), (100_000, 2.0)])
def test_brands_drawn_through_the_guide_table_are_the_binary_search_s(n, zipf_s):
    """sample_into gives, draw for draw, the brand a binary search of the CDF gives (a
    steep tail, hundreds of brands in a bucket, included)."""
    catalog = build_catalog(250_000, 31_000, seed=3, n_first_time=2_600, zipf_s=zipf_s)
    brand, country = np.empty(n, np.uint32), np.empty(n, np.uint8)
    catalog.sample_into(np.random.default_rng(n), brand, country)
    u = np.random.default_rng(n).random(n) * catalog.popularity_cdf[-1]
    assert np.array_equal(brand, np.searchsorted(catalog.popularity_cdf, u, side="right"))
    assert np.array_equal(country, catalog.country[brand])
