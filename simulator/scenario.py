"""Scenarios: a festival curve, its brands, and how orders are drawn. Pure.

A scenario and a seed fix every order: minute m's orders come from an rng seeded with
(seed, m), so any minute can be generated alone, in any order, with the same result.

Order counts follow GMV / average order value at the order scale (1 = the real count).
The peak minute is pinned instead: its per-second profile rises to the published peak rate
at the published second (583,000 orders/s, 26 s after midnight on Nov 11 2020).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ticker.core.dimensions import Window

from .catalog import Catalog, build_catalog
from .curve import allocate
from .generator import MinuteOrders, generate_minute
from .history import Curve, curve, festival_years, festivals

# RMB 100M, the "big brand" line of the 2020 release, written there as USD 15.11M (G01).
BIG_BRAND_CENTS = 15_110_000_00
# A minute's orders are generated at once: 50M take about 2.3 GB and 20 s. The busiest minute
# of any festival at order scale 1 has 29.6M (2019, 00:00); a curve of your own may ask more.
MAX_MINUTE_ORDERS = 50_000_000


@dataclass(frozen=True)
class Peak:
    minute: int              # window minute of the peak
    second: int              # second within that minute
    orders_per_second: int   # at order scale 1

    def profile(self) -> np.ndarray:
        """Orders in each second of the peak minute at scale 1; the peak second is exact."""
        s = np.arange(60, dtype=np.float64)
        rise = (s + 1) / (self.second + 1)
        fall = np.exp(-(s - self.second) / 30.0)
        return np.round(self.orders_per_second * np.where(s <= self.second, rise, fall)) \
            .astype(np.int64)


@dataclass(frozen=True)
class Scenario:
    name: str
    curve: Curve             # window, exact GMV total and per-minute shape
    aov_cents: int           # average order value at order scale 1
    n_brands: int = 250_000
    n_overseas: int = 31_000
    n_first_time: int = 2_600
    big_brands: int = 0      # brands calibrated above BIG_BRAND_CENTS (0: not calibrated)
    chatbot_queries: int = 0
    peak: Peak | None = None
    seed: int = 2020
    order_scale: float = 0.001  # fewer, larger orders; every GMV total stays exact

    def __post_init__(self) -> None:
        if not 0 < self.order_scale <= 1:
            raise ValueError(f"order_scale={self.order_scale}: must be in (0, 1]")
        busiest = int(self.minute_orders.argmax())
        if self.minute_orders[busiest] > MAX_MINUTE_ORDERS:
            raise ValueError(f"{self.window.label}: minute {busiest} would have "
                             f"{self.minute_orders[busiest]:,} orders at order scale "
                             f"{self.order_scale:g}, more than {MAX_MINUTE_ORDERS:,}: "
                             "lower the order scale")

    @property
    def window(self) -> Window:
        return self.curve.window

    @property
    def gmv_cents(self) -> int:
        return self.curve.gmv_cents

    @cached_property
    def minute_gmv_cents(self) -> np.ndarray:
        return self.curve.minute_gmv_cents()

    @cached_property
    def minute_orders(self) -> np.ndarray:
        """Orders per minute: GMV / AOV at the order scale, at least one in a minute with GMV,
        at most one a cent."""
        n = np.floor(self.minute_gmv_cents / (self.aov_cents / self.order_scale))
        if self.peak is not None:
            n[self.peak.minute] = round(self.peak.profile().sum() * self.order_scale)
        return np.clip(n.astype(np.int64), 1, self.minute_gmv_cents)

    def second_orders(self, minute: int) -> np.ndarray:
        """Orders in each second of `minute` (flat, except for the pinned peak minute)."""
        shape = self.peak.profile() if self.peak and minute == self.peak.minute else np.ones(60)
        return allocate(int(self.minute_orders[minute]), shape)

    @cached_property
    def minute_chatbot_queries(self) -> np.ndarray:
        if not self.chatbot_queries:
            return np.zeros(self.window.minutes, np.int64)
        return allocate(self.chatbot_queries, self.curve.minute_weights)

    @cached_property
    def catalog(self) -> Catalog:
        # Sampled GMV excludes the debut orders, spread evenly over all brands. Below an order
        # scale of about 0.0011 there are fewer orders than brands: every order is a debut,
        # popularity plays no part, and the big-brand calibration is left out.
        orders = int(self.minute_orders.sum())
        sampled = self.gmv_cents * (1 - min(self.n_brands, orders) / orders)
        big = self.big_brands if sampled > 2 * BIG_BRAND_CENTS * self.big_brands else 0
        return build_catalog(self.n_brands, self.n_overseas, self.seed,
                             n_first_time=self.n_first_time, big_brands=big,
                             big_share=BIG_BRAND_CENTS / sampled if big else 0.0)

    @cached_property
    def _debut_bounds(self) -> np.ndarray:
        """Where each minute's debuts start in `catalog.debut_order` (one more entry at the end)."""
        orders = self.minute_orders
        debuts = np.minimum(allocate(min(self.n_brands, int(orders.sum())), orders), orders)
        return np.concatenate(([0], np.cumsum(debuts)))

    def order_over(self, limit: int, budget: int = 1 << 22) -> tuple[int, int] | None:
        """The first minute holding an order of more than `limit` cents, with its largest
        order; None if none does. Only a minute of more GMV than `limit` can hold one; those
        are generated to see, when they hold at most `budget` orders in all (where an order
        can come near such a limit, at small order scales, they hold few; at order scale 1
        they hold 100M orders of about USD 32 each, and are not)."""
        risky = np.flatnonzero(self.minute_gmv_cents > limit)
        if not len(risky) or int(self.minute_orders[risky].sum()) > budget:
            return None
        for minute in risky.tolist():
            largest = int(self.orders(minute).amount_cents.max(initial=0))
            if largest > limit:
                return minute, largest
        return None

    def order_scale_for(self, limit: int) -> float:
        """The smallest order scale of 1, 2 or 5 x 10**k above this one at which no order
        passes `limit` cents (`order_over`): a minute's orders grow with the scale, so its
        biggest shrinks. About 50 ms a try (a catalog each), for an error message."""
        scales = (m * 10.0**e for e in range(-15, 1) for m in (1, 2, 5))
        return next((s for s in scales if self.order_scale < s <= 1 and
                     dataclasses.replace(self, order_scale=s).order_over(limit) is None), 1.0)

    def orders(self, minute: int) -> MinuteOrders:
        if not self.minute_orders[minute]:  # no GMV: a gap or flat stretch of your own curve
            empty = np.zeros(0, np.uint8)
            return MinuteOrders(np.zeros(0, np.int64), np.zeros(0, np.uint32), empty, empty)
        rng = np.random.default_rng([self.seed, minute])
        start, stop = self._debut_bounds[minute], self._debut_bounds[minute + 1]
        return generate_minute(self.catalog, int(self.minute_gmv_cents[minute]),
                               int(self.minute_orders[minute]), rng,
                               self.catalog.debut_order[start:stop])


def scenario_for_year(year: int, **changes) -> Scenario:
    """The festival of `year` with its curve; 2020 with every figure the release gives."""
    fest = festivals()[year]
    aov = round(fest.aov_rmb * 100 / float(fest.rmb_per_usd))  # data/festivals.csv's aov_rmb
    c = curve(year)
    extra: dict = {}
    if year == 2020:
        # The headline USD 74.1B, exactly (the rate 6.723 gives 7,410,382,269,820 cents).
        c = dataclasses.replace(c, gmv_cents=74_100_000_000_00)
        # 250,000 brands, 31,000 overseas, 2,600 of them new (G01, G03); more than 470 above
        # RMB 100M (G01, G02; Yicai: more than 474, G13); chatbot queries over 2.1B (G12,
        # single source); the peak of 583,000 orders/s 26 s into Nov 11 (G01, G05, G11).
        extra = dict(big_brands=475, chatbot_queries=2_110_000_000,
                     peak=Peak(minute=10 * 1440, second=26, orders_per_second=583_000))
    return dataclasses.replace(Scenario(str(year), c, aov, **extra), **changes)


def scenario_names() -> list[str]:
    return [str(year) for year in festival_years()]
