"""Scenarios: a festival window, its GMV total and curve, and how orders are drawn. Pure.

A scenario and a seed fix every order: minute m's orders come from an rng seeded with
(seed, m), so any minute can be generated alone, in any order, with the same result.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ticker.dimensions import FESTIVAL_2020, Window

from .catalog import Catalog, build_catalog
from .curve import allocate, minute_weights
from .generator import MinuteOrders, generate_minute


@dataclass(frozen=True)
class Scenario:
    name: str
    window: Window
    gmv_cents: int           # exact festival total
    aov_cents: int           # average order value at order scale 1
    n_brands: int
    n_overseas: int
    day_weights: tuple[float, ...]
    day_spikes: tuple[float, ...]
    seed: int = 2020
    order_scale: float = 0.001  # fewer, larger orders; every GMV total stays exact

    def __post_init__(self) -> None:
        if not 0 < self.order_scale <= 1:
            raise ValueError(f"order_scale={self.order_scale}: must be in (0, 1]")
        if len(self.day_weights) * 1440 != self.window.minutes:
            raise ValueError("day_weights must give one weight per day of the window")

    @cached_property
    def minute_gmv_cents(self) -> np.ndarray:
        return allocate(self.gmv_cents, minute_weights(list(self.day_weights),
                                                       list(self.day_spikes)))

    @cached_property
    def minute_orders(self) -> np.ndarray:
        """Orders per minute: GMV / AOV at the order scale, at least one, at most one a cent."""
        per_order = self.aov_cents / self.order_scale
        n = np.floor(self.minute_gmv_cents / per_order).astype(np.int64)
        return np.clip(n, 1, self.minute_gmv_cents)

    @cached_property
    def catalog(self) -> Catalog:
        return build_catalog(self.n_brands, self.n_overseas, self.seed)

    def orders(self, minute: int) -> MinuteOrders:
        rng = np.random.default_rng([self.seed, minute])
        return generate_minute(self.catalog, int(self.minute_gmv_cents[minute]),
                               int(self.minute_orders[minute]), rng)


# 2020: RMB 498.2B = USD 74.1B over Nov 1-11 (G01-G04); 250,000 brands, 31,000 overseas
# (G01, G03); average order near RMB 215 = USD 31.98 at 6.723 RMB/USD (facts section 6).
# Two sales windows, Nov 1-3 and Nov 11 (G04, G08); by Nov 11 00:30 about 75% was in (G05).
# The day weights are a first shape; calibration to every published figure comes later.
FESTIVAL_2020_SCENARIO = Scenario(
    name="2020",
    window=FESTIVAL_2020,
    gmv_cents=74_100_000_000_00,
    aov_cents=3198,
    n_brands=250_000,
    n_overseas=31_000,
    day_weights=(0.30, 0.12, 0.10) + (0.16 / 7,) * 7 + (0.32,),
    day_spikes=(60.0, 10.0, 8.0) + (2.0,) * 7 + (120.0,),
)

SCENARIOS = {"2020": FESTIVAL_2020_SCENARIO}
