"""Brand catalog: each brand's home country, first-time flag, popularity and debut. Pure.

Popularity is Zipf over a random ranking, scaled so every country gets its share of GMV (one
lucky giant brand cannot reorder the countries), then calibrated around the "big brand"
threshold: the `big_brands` most popular brands are lifted to at least 1.25x the share that
reaches the threshold and all others capped at 0.8x. Sampling noise at any order scale from
0.001 up is a few percent, so the count of brands above the threshold lands on `big_brands`.

Every brand sells at least once: `debut_order` lists the brands in the order their first
sale is forced (popular brands early, by an exponential race), and the generator spends a
share of each minute's orders on the next debuts.

Sampling by popularity is inverse-CDF sampling: a brand for each uniform u in [0, T), the
first brand whose cumulative share is above u (`np.searchsorted(cdf, u, side="right")`).
A binary search over 250,000 shares for each draw misses the cache at nearly every step
(155 ns an order), so `brands_of` looks u up in guide tables first, in two levels. The
2**17 coarse buckets of equal width over [0, T) (512 KiB, four bytes a bucket: the brand
and its country) settle the 67% of draws (at 2020's popularity) whose bucket lies inside
one brand. A bucket that holds a brand boundary is split into 32 fine ones (2**22 over
[0, T), kept only where a coarse bucket needs them: 5.5 MB), which settle all but 6% of
draws; a comparison with the CDF finishes those (more in a steeper tail). The result is
the binary search's, draw for draw: the tables are built from the same floats, and a
bucket is only trusted when the search gives the same brand at both of its ends (5-12 ns
an order, most of it cache misses; building them, 75 ms). A draw comes as the bit
generator's 64-bit output, of which `rng.random` makes u, so its bucket is a shift,
exactly; the country comes with the brand, not from a second lookup; and only a third of
the draws touch the bigger table: fewer cache lines a draw than one 2**21-bucket table
(with a byte a bucket and the countries apart, as before) took.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ticker.core.dimensions import COUNTRIES

# Each overseas country's share of overseas brands and of overseas GMV. The United States
# leads (facts G02, G03 name it the top country selling to China); the rest are a first guess.
OVERSEAS_MIX = {"US": 0.24, "AU": 0.10, "CA": 0.06, "FR": 0.08, "DE": 0.08, "IT": 0.06,
                "JP": 0.12, "KR": 0.09, "NZ": 0.04, "GB": 0.07, "XX": 0.06}
OVERSEAS_GMV_SHARE = 0.12
BIG_LIFT, SMALL_CAP = 1.25, 0.8
COARSE_BITS = 17    # the coarse guide table: 2**17 entries (512 KiB), 67% of draws end there
GUIDE_BITS = 22     # the fine one: 2**22 buckets (those under open coarse ones), 6% open
GUIDE_MIN = 4_096   # draws below which a plain binary search is cheaper than the table's build
MAX_STEPS = 4       # brands in one bucket beyond which an open draw is binary-searched
CHUNK = 1 << 15     # draws looked up at a time: each step's arrays stay in the L2 cache
_BRAND_MASK = (1 << 24) - 1  # a guide entry: the brand in the low 24 bits, the country above
_OPEN = 255         # the country byte of a bucket that holds a brand boundary


@dataclass(frozen=True, eq=False)
class Catalog:
    country: np.ndarray         # uint8 country id per brand (0 = China)
    first_time: np.ndarray      # bool per brand: overseas and new to the festival
    popularity_cdf: np.ndarray  # float64, cumulative share of sampled orders by brand id
    debut_order: np.ndarray     # uint32 brand ids, in the order of their forced first sale

    @property
    def n_brands(self) -> int:
        return len(self.country)

    def brand_name(self, brand: int) -> str:
        """A made-up name for a brand id, from its home country: "US brand 00042". The
        catalog is simulated, and the names say so; "Brand 42" for an id outside it."""
        if not 0 <= brand < len(self.country):
            return f"Brand {brand}"
        return f"{COUNTRIES[int(self.country[brand])][0]} brand {brand:05d}"

    def sample_brands(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n brand ids drawn by popularity (inverse-CDF sampling: n uniforms from `rng`)."""
        brand = np.empty(n, np.uint32)
        self.sample_into(rng, brand, np.empty(n, np.uint8))
        return brand

    def sample_into(self, rng: np.random.Generator, brand: np.ndarray,
                    country: np.ndarray) -> None:
        """Fill `brand` (uint32) with brands drawn by popularity and `country` (uint8) with
        theirs: the same draws, and the same brands, as a binary search of `len(brand)`
        uniforms (`rng.random`) scaled to the CDF's total."""
        n = len(brand)
        for start in range(0, n, CHUNK):
            stop = min(n, start + CHUNK)
            self.brands_of(rng.bit_generator.random_raw(stop - start), brand[start:stop],
                           country[start:stop])

    def brands_of(self, raw: np.ndarray, brand: np.ndarray, country: np.ndarray) -> None:
        """`sample_into` for draws already made: `raw` (uint64) the bit generator's outputs,
        of which `rng.random` makes the uniforms u = (raw >> 11) / 2**53. `brand[i]` is the
        first brand whose CDF is above u[i] x total, `country[i]` its country."""
        cdf = self.popularity_cdf
        if len(raw) < GUIDE_MIN and "_guide" not in self.__dict__ or self._guide is None:
            brand[:] = np.searchsorted(cdf, _uniform(raw) * cdf[-1], side="right")
            np.take(self.country, brand, out=country)
            return
        coarse, fine, rounds, cdf_end = self._guide
        # u's bucket of 2**b is raw >> (64 - b) exactly: u x 2**b only moves the point.
        entry = coarse[(raw >> (64 - COARSE_BITS)).view(np.intp)]
        np.bitwise_and(entry, _BRAND_MASK, out=brand)
        np.right_shift(entry, 24, out=entry)
        country[:] = entry
        wide = np.flatnonzero(country == _OPEN)  # a brand boundary in the coarse bucket
        if not len(wide):
            return
        raw = raw[wide]
        entry = fine[((raw >> (64 - GUIDE_BITS)) - brand[wide]).view(np.intp)]
        found = entry & _BRAND_MASK
        home = (entry >> 24).astype(np.uint8)
        open_ = np.flatnonzero(home == _OPEN)  # and one in the fine bucket too
        if len(open_):
            target = _uniform(raw[open_]) * cdf[-1]  # what the search compares, bit for bit
            if rounds > MAX_STEPS:  # buckets of many brands (a steep tail): search them
                at = np.searchsorted(cdf, target, side="right")
            else:
                at = found[open_].astype(np.intp)
                for _ in range(rounds):  # the first brand whose CDF passes the target
                    at += cdf_end[at] <= target
            found[open_] = at
            home[open_] = self.country[at]
        brand[wide] = found
        country[wide] = home

    @cached_property
    def _guide(self) -> tuple[np.ndarray, np.ndarray, int, np.ndarray] | None:
        """The guide tables, None for a catalog of 2**24 brands or more. The coarse one,
        `_table(COARSE_BITS)`, but for a bucket that holds a brand boundary (and so spans
        2**(GUIDE_BITS - COARSE_BITS) fine buckets) the low bits say where in the fine table
        its fine buckets are: `raw >> (64 - GUIDE_BITS)` minus them. The fine one,
        `_table(GUIDE_BITS)` for those buckets only. The most steps a search in a fine
        bucket takes; the CDF with +inf after it (a step never reads past the end)."""
        if len(self.popularity_cdf) > _BRAND_MASK:
            return None
        coarse, _ = self._table(COARSE_BITS)
        fine, rounds = self._table(GUIDE_BITS)
        per = 1 << (GUIDE_BITS - COARSE_BITS)
        wide = np.flatnonzero(coarse >> 24 == _OPEN)
        fine = fine.reshape(-1, per)[wide].ravel()
        coarse[wide] = (wide - np.arange(len(wide))) * per | _OPEN << 24
        return coarse, fine, rounds, np.append(self.popularity_cdf, np.inf)

    def _table(self, bits: int) -> tuple[np.ndarray, int]:
        """For bucket j of [j/K, (j+1)/K) x total, K = 2**bits: the brand every uniform in
        it gets, with that brand's country in the top byte, or, when the search gives other
        brands at its two ends, where the search starts and 255 (`_OPEN`); and the most
        brands a bucket spans."""
        cdf = self.popularity_cdf
        k = 1 << bits
        edges = np.arange(k + 1, dtype=np.float64) / k * cdf[-1]  # as u * total rounds them
        # searchsorted(cdf, edges, "right") without 4M searches: edge j passes the brands
        # whose CDF is at most it, those with their first edge at or above them at <= j.
        first = np.searchsorted(edges, cdf, side="left")
        at = np.cumsum(np.bincount(first, minlength=k + 2)[:k + 1])
        lo, hi = at[:-1], at[1:]
        top = np.where(lo == hi, self.country[np.minimum(lo, len(cdf) - 1)], _OPEN)
        return (lo | top.astype(np.int64) << 24).astype("<u4"), int((hi - lo).max())


def _uniform(raw: np.ndarray) -> np.ndarray:
    """`rng.random`'s doubles from the bit generator's outputs, exactly as it makes them."""
    return (raw >> 11) * 2.0**-53


def build_catalog(n_brands: int, n_overseas: int, seed: int, *, n_first_time: int = 0,
                  big_brands: int = 0, big_share: float = 0.0,
                  zipf_s: float = 1.0) -> Catalog:
    """`big_share`: the share of sampled GMV that puts a brand above the big-brand threshold."""
    if not 0 < n_brands < 2**32:
        raise ValueError(f"n_brands={n_brands}: must be positive")
    if not 0 <= n_overseas <= n_brands:
        raise ValueError(f"n_overseas={n_overseas}: must be between 0 and n_brands")
    if not 0 <= n_first_time <= n_overseas:
        raise ValueError(f"n_first_time={n_first_time}: must be between 0 and n_overseas")
    rng = np.random.default_rng([seed, 0xB2A4D])
    codes = [code for code, _ in COUNTRIES]
    country = np.zeros(n_brands, np.uint8)
    overseas = rng.choice(n_brands, size=n_overseas, replace=False)
    mix = np.array(list(OVERSEAS_MIX.values()))
    ids = np.array([codes.index(code) for code in OVERSEAS_MIX], np.uint8)
    country[overseas] = ids[rng.choice(len(ids), size=n_overseas, p=mix / mix.sum())]
    first_time = np.zeros(n_brands, bool)
    first_time[rng.choice(overseas, size=n_first_time, replace=False)] = True

    popularity = (rng.permutation(n_brands) + 1.0) ** -zipf_s
    shares = dict(zip(ids.tolist(), (mix / mix.sum() * OVERSEAS_GMV_SHARE).tolist()))
    shares[0] = 1.0 - OVERSEAS_GMV_SHARE if n_overseas < n_brands else 0.0
    for country_id, share in shares.items():
        members = country == country_id
        if members.any():
            popularity[members] *= share / popularity[members].sum()
    popularity /= popularity.sum()
    if big_brands:
        popularity = _calibrate_big_brands(popularity, big_brands, big_share)
    # Exponential race: brand b debuts at Exp(1) / popularity_b, so popular brands come first.
    debut = np.argsort(rng.exponential(size=n_brands) / popularity, kind="stable")
    return Catalog(country, first_time, np.cumsum(popularity), debut.astype(np.uint32))


def _calibrate_big_brands(p: np.ndarray, count: int, share: float) -> np.ndarray:
    """Lift the top `count` shares to BIG_LIFT x `share`, cap the rest at SMALL_CAP x `share`."""
    if not 0 < count < len(p) or not 0 < share * BIG_LIFT * count < 1:
        raise ValueError(f"big_brands={count} at share {share:g} cannot fit in one total")
    top = np.argsort(-p, kind="stable")[:count]
    is_top = np.zeros(len(p), bool)
    is_top[top] = True
    p = p.copy()
    for _ in range(50):  # renormalising moves the shares a little; a few rounds settle them
        p[is_top] = np.maximum(p[is_top], share * BIG_LIFT * 1.001)
        p[~is_top] = np.minimum(p[~is_top], share * SMALL_CAP * 0.999)
        p /= p.sum()
        if p[is_top].min() >= share * BIG_LIFT and p[~is_top].max() <= share * SMALL_CAP:
            return p
    raise ValueError(f"big_brands={count}: calibration did not settle")
