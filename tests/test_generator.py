"""The generator's fast paths give what the plain ones give: the same cents, the same brands."""

from __future__ import annotations

import numpy as np
import pytest

from simulator.catalog import GUIDE_MIN, build_catalog
from simulator.curve import allocate_checked
from simulator.generator import _PLATFORM_CDF, CHUNK, _platforms, generate_minute, split_cents


@pytest.mark.parametrize("weights,total", [
    (np.ones(100_000), 12_345),                       # every remainder ties: index order decides
    (np.ones(10_000), 12_345),                        # the same in one chunk
    (np.repeat([1.0, 2.0, 3.0], 4_000), 10**9 + 7),   # ties within each of three, one chunk
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


@pytest.mark.parametrize("n,n_debuts", [(13_557, 3), (CHUNK, 0), (CHUNK + 1, 2), (100_000, 40)])
def test_a_minute_is_what_the_plain_draws_give(n, n_debuts):
    """generate_minute's orders are those of the plain calls in their order: lognormal(n)
    split by allocate_checked, random(n - debuts) binary-searched for brands, random(n)
    sorted into the platform mix, however the generator cuts or merges the draws."""
    catalog = build_catalog(250_000, 31_000, seed=5, n_first_time=2_600)
    debuts = catalog.debut_order[:n_debuts]
    gmv = 300 * n + 12_345
    got = generate_minute(catalog, gmv, n, np.random.default_rng([9, n]), debuts)
    rng = np.random.default_rng([9, n])
    amount = allocate_checked(gmv - n, rng.lognormal(0.0, 0.9, n)) + 1
    cdf = catalog.popularity_cdf
    brand = np.concatenate([debuts, np.searchsorted(cdf, rng.random(n - n_debuts) * cdf[-1],
                                                    side="right")])
    platform = np.searchsorted(_PLATFORM_CDF, rng.random(n), side="right")
    assert np.array_equal(got.amount_cents, amount)
    assert np.array_equal(got.brand, brand) and got.brand.dtype == np.uint32
    assert np.array_equal(got.country, catalog.country[brand])
    assert np.array_equal(got.platform, platform) and got.platform.dtype == np.uint8


def test_platforms_from_raw_bits_are_the_searched_cdf_at_every_step():
    """The raw-bit comparisons give searchsorted's platform at and beside each step."""
    steps = (np.ceil(_PLATFORM_CDF[:-1] * 2.0**53).astype(np.uint64) << np.uint64(11))
    raw = np.concatenate([steps, steps - np.uint64(1), steps + np.uint64(2047),
                          np.array([0, 2**64 - 1], np.uint64),
                          np.random.default_rng(2).bit_generator.random_raw(10_000)])
    out = np.empty(len(raw), np.uint8)
    _platforms(raw, out)
    u = (raw >> np.uint64(11)) * 2.0**-53
    assert np.array_equal(out, np.searchsorted(_PLATFORM_CDF, u, side="right"))
