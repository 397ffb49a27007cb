"""Brand catalog: each brand's home country and popularity, fixed by a seed. Pure."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ticker.dimensions import COUNTRIES

# Each overseas country's share of overseas brands and of overseas GMV. The United States
# leads (facts G02, G03 name it the top country selling to China); the rest are a first guess.
OVERSEAS_MIX = {"US": 0.24, "AU": 0.10, "CA": 0.06, "FR": 0.08, "DE": 0.08, "IT": 0.06,
                "JP": 0.12, "KR": 0.09, "NZ": 0.04, "GB": 0.07, "XX": 0.06}


@dataclass(frozen=True, eq=False)
class Catalog:
    country: np.ndarray     # uint8 country id per brand
    popularity_cdf: np.ndarray  # float64, cumulative share of orders by brand id

    @property
    def n_brands(self) -> int:
        return len(self.country)

    def sample_brands(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n brand ids drawn by popularity (inverse-CDF sampling, O(n log brands))."""
        u = rng.random(n) * self.popularity_cdf[-1]
        return np.searchsorted(self.popularity_cdf, u, side="right").astype(np.uint32)


OVERSEAS_GMV_SHARE = 0.12


def build_catalog(n_brands: int, n_overseas: int, seed: int, zipf_s: float = 1.0) -> Catalog:
    if not 0 < n_brands < 2**32:
        raise ValueError(f"n_brands={n_brands}: must be positive")
    if not 0 <= n_overseas <= n_brands:
        raise ValueError(f"n_overseas={n_overseas}: must be between 0 and n_brands")
    rng = np.random.default_rng([seed, 0xB2A4D])
    codes = [code for code, _ in COUNTRIES]
    country = np.zeros(n_brands, np.uint8)  # 0 is China
    overseas = rng.choice(n_brands, size=n_overseas, replace=False)
    mix = np.array(list(OVERSEAS_MIX.values()))
    ids = np.array([codes.index(code) for code in OVERSEAS_MIX], np.uint8)
    country[overseas] = ids[rng.choice(len(ids), size=n_overseas, p=mix / mix.sum())]
    # Zipf popularity over a random ranking, then each country's brands scaled to its share,
    # so one lucky giant brand cannot reorder the countries.
    rank = rng.permutation(n_brands) + 1
    popularity = rank.astype(np.float64) ** -zipf_s
    shares = dict(zip(ids.tolist(), (mix / mix.sum() * OVERSEAS_GMV_SHARE).tolist()))
    shares[0] = 1.0 - OVERSEAS_GMV_SHARE if n_overseas < n_brands else 0.0
    for country_id, share in shares.items():
        members = country == country_id
        if members.any():
            popularity[members] *= share / popularity[members].sum()
    return Catalog(country=country, popularity_cdf=np.cumsum(popularity))
