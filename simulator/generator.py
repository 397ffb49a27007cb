"""Order generator: one simulated minute's orders as columns. Pure: the rng is passed in.

A minute's amounts are drawn around the average order value (log-normal) and then scaled
and rounded so that they add up to the minute's GMV exactly, each at least one cent. The
minute's first orders go to the brands whose debut falls in it, the rest by popularity.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .catalog import Catalog
from .curve import allocate_checked

PLATFORM_MIX = np.array([0.90, 0.06, 0.04])  # Tmall/Taobao, AliExpress, Lazada
# What `Generator.choice(3, size=n, p=PLATFORM_MIX)` draws from, computed as it does: the
# normalised cumulative mix, into which it sorts n uniforms. Doing that here draws the same
# platforms without choice's checks of p on every call (a third of a small minute's time).
_PLATFORM_CDF = PLATFORM_MIX.cumsum()
_PLATFORM_CDF /= _PLATFORM_CDF[-1]


@dataclass(frozen=True, eq=False)
class MinuteOrders:
    amount_cents: np.ndarray  # int64
    brand: np.ndarray         # uint32
    country: np.ndarray       # uint8
    platform: np.ndarray      # uint8

    def __len__(self) -> int:
        return len(self.amount_cents)

    def slice(self, start: int, stop: int) -> MinuteOrders:
        return MinuteOrders(self.amount_cents[start:stop], self.brand[start:stop],
                            self.country[start:stop], self.platform[start:stop])


def generate_minute(catalog: Catalog, gmv_cents: int, n_orders: int, rng: np.random.Generator,
                    debuts: np.ndarray | None = None) -> MinuteOrders:
    if not 0 < n_orders <= gmv_cents:
        raise ValueError(f"n_orders={n_orders}: must be 1..gmv_cents ({gmv_cents})")
    debuts = np.empty(0, np.uint32) if debuts is None else debuts[:n_orders]
    weights = rng.lognormal(0.0, 0.9, n_orders)  # finite and positive: valid weights
    amount = allocate_checked(gmv_cents - n_orders, weights) + 1
    brand = np.concatenate([debuts, catalog.sample_brands(rng, n_orders - len(debuts))])
    platform = _PLATFORM_CDF.searchsorted(rng.random(n_orders), side="right").astype(np.uint8)
    return MinuteOrders(amount, brand, catalog.country[brand], platform)
