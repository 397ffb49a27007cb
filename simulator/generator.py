"""Order generator: one simulated minute's orders as columns. Pure: the rng is passed in.

A minute's amounts are drawn around the average order value (log-normal) and then scaled
and rounded so that they add up to the minute's GMV exactly, each at least one cent. The
minute's first orders go to the brands whose debut falls in it, the rest by popularity.

Strategy: the same orders, byte for byte, as the first generator drew, 7-12 times as fast
(`benchmarks/generator.py` runs both; docs/performance.md has the figures). A scenario and
a seed fix the stream, recordings and tests pin it, and a faster sampler that drew other
orders (alias tables, float32 normals) would have changed every figure derived from it for
no gain the exact one cannot reach, so the bit generator gives the same outputs in the
same order: `lognormal(n)`, then `random(n - debuts)` for brands and `random(n)` for
platforms. Those two are taken as the 64-bit outputs `random` makes its doubles from,
u = (raw >> 11) / 2**53 (`bit_generator.random_raw`, one call for both in a minute of up
to 32,768 orders: outputs do not depend on how a run of them is cut into calls), so that
buckets and platform steps are exact integer operations on them. What changed is what is
done with the draws:

- the exact split, largest remainder, was an O(n log n) stable argsort (110-210 ns an
  order); it is now a selection (`np.partition`) of the remainder at the cut and one pass
  that gives a cent to every order below it and to the first orders at it, in index
  order, as the stable sort did: O(n), 3-6 ns an order;
- brands come from two guide tables before the binary search over the CDF (`catalog.py`);
- platforms compare each draw with the two inner steps of the cumulative mix, which is
  what searching the three-step CDF returns;
- the passes over each chunk of 32,768 orders run while its arrays are in the L2 cache, a
  busy minute's columns are written in place, not concatenated, and a minute of one chunk
  takes about 45 numpy calls and as few arrays as the steps need.

The log-normal draws are left as numpy makes them: its ziggurat normal and the C library's
exp, about 14 ns an order, half of what a minute costs now. A vectorised exp would be
faster but differs from the C one in the last bit of 5% of the weights (and between CPUs),
which is enough to move cents. Worker processes were not needed for the rate and would
compete for the two cores with the broker and the aggregator that the orders go to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .catalog import Catalog

PLATFORM_MIX = np.array([0.90, 0.06, 0.04])  # Tmall/Taobao, AliExpress, Lazada
# What `Generator.choice(3, size=n, p=PLATFORM_MIX)` draws from, computed as it does: the
# normalised cumulative mix, into which it sorts n uniforms. A uniform below 1 passes step
# j exactly when it is at least _PLATFORM_CDF[j], so its platform is how many inner steps
# it reaches: two comparisons instead of choice's checks and search.
_PLATFORM_CDF = PLATFORM_MIX.cumsum()
_PLATFORM_CDF /= _PLATFORM_CDF[-1]
assert _PLATFORM_CDF[-1] == 1.0
# The same comparisons on the bit generator's outputs: u = (raw >> 11) / 2**53 is at least
# a step c exactly when raw >> 11 is at least ceil(c x 2**53) (exact: a power of two), so
# when raw is at least that << 11.
_PLATFORM_RAW = [np.uint64(math.ceil(c * 2.0**53)) << np.uint64(11) for c in _PLATFORM_CDF[:-1]]
CHUNK = 1 << 15  # orders per pass: 256 KiB a float64 column, inside the L2 cache


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
    n, d = n_orders, len(debuts)
    weights = rng.lognormal(0.0, 0.9, n)  # finite and positive: valid weights
    amount = split_cents(gmv_cents - n, weights, plus=1)
    brand = np.empty(n, np.uint32)
    country = np.empty(n, np.uint8)
    platform = np.empty(n, np.uint8)
    brand[:d] = debuts
    np.take(catalog.country, debuts, out=country[:d])
    draw = rng.bit_generator.random_raw
    if n <= CHUNK:  # one call for the brands' uniforms and the platforms' that follow them
        raw = draw(2 * n - d)
        catalog.brands_of(raw[:n - d], brand[d:], country[d:])
        _platforms(raw[n - d:], platform)
    else:
        catalog.sample_into(rng, brand[d:], country[d:])
        for start in range(0, n, CHUNK):
            raw = draw(min(CHUNK, n - start))
            _platforms(raw, platform[start:start + len(raw)])
    return MinuteOrders(amount, brand, country, platform)


def _platforms(raw: np.ndarray, out: np.ndarray) -> None:
    """Each draw's platform (`raw`: the bit generator's outputs): how many of the inner
    steps its uniform reaches."""
    np.greater_equal(raw, _PLATFORM_RAW[0], out=out.view(np.bool_))
    for step in _PLATFORM_RAW[1:]:
        out += raw >= step


def keep_freed_memory(limit: int = 1 << 30) -> bool:
    """Ask glibc's malloc to keep freed blocks of up to `limit` bytes for reuse rather than
    give them back to the kernel (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD); False where it cannot.

    For the publishing shells to call once per process, not done on import: a busy minute's
    columns are tens to hundreds of MB, which malloc maps and unmaps afresh for every
    minute, so each minute paid the kernel's page faults again (a third of the generator's
    time at order scale 1: 55,000 faults over 160 minutes, benchmarks/generator.py). The
    cost is that the process keeps its high-water mark (the peak minute's few hundred MB)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return bool(mallopt(m_trim_threshold, limit)) and bool(mallopt(m_mmap_threshold, limit))


def split_cents(total: int, weights: np.ndarray, *, plus: int = 0) -> np.ndarray:
    """`curve.allocate_checked(total, weights) + plus`, the same int64 parts, in O(n).

    `weights`: float64, finite, non-negative, positive sum; overwritten.
    Largest remainder as `allocate_checked` does it: floor every slightly shrunk share, then
    one more unit to the `rest` parts whose (part - share) is smallest, ties by index (its
    stable argsort). Here the cut value is found by selection, not a sort."""
    n = len(weights)
    share = weights
    share *= total * (1 - 2**-32) / weights.sum()  # the same product, in place
    if n <= CHUNK:
        return _split_small(total, share, plus)
    parts = np.empty(n, np.int64)
    gap = np.empty(n, np.float64)  # part - share, for the selection
    floors = 0
    for a in range(0, n, CHUNK):
        s, p = share[a:a + CHUNK], parts[a:a + CHUNK]
        p[...] = s  # truncation: the floor of a share >= 0
        floors += int(p.sum())
        np.subtract(p, s, out=gap[a:a + CHUNK])
    leftover = total - floors
    assert leftover >= 0, "shrunk floors overshot the total"
    whole, rest = divmod(leftover, n)
    if whole:  # a share of more than one unit each is left over (huge orders): rare
        parts += whole
        np.subtract(parts, share, out=gap)
    if not rest:
        parts += plus
        return parts
    gap.partition(rest - 1)
    cut = gap[rest - 1]  # the rest-th smallest (part - share)
    below, ties = 0, []
    for a in range(0, n, CHUNK):
        s, p = share[a:a + CHUNK], parts[a:a + CHUNK]
        g = p - s  # as computed above, bit for bit
        under = g < cut
        below += int(np.count_nonzero(under))
        p += under
        if plus:
            p += plus
        at = np.flatnonzero(g == cut)
        if len(at):
            ties.append(at + a)
    parts[np.concatenate(ties)[:rest - below]] += 1  # the cut itself is among the ties
    return parts


def _split_small(total: int, share: np.ndarray, plus: int) -> np.ndarray:
    """split_cents of one chunk's shares: the same steps in fewer numpy calls and arrays
    (the gaps overwrite the shares, one pass gives the cents)."""
    n = len(share)
    parts = share.astype(np.int64)  # truncation: the floor of a share >= 0
    leftover = total - int(parts.sum())
    assert leftover >= 0, "shrunk floors overshot the total"
    whole, rest = divmod(leftover, n)
    if whole:
        parts += whole
    gap = np.subtract(parts, share, out=share)  # part - share
    if rest:
        cut = np.partition(gap, rest - 1)[rest - 1]  # the rest-th smallest (part - share)
        up = gap <= cut
        more = int(np.count_nonzero(up)) - rest
        if more:  # ties at the cut beyond the cents left: the last ones in index order get none
            up[np.flatnonzero(gap == cut)[-more:]] = False
        parts += up
    if plus:
        parts += plus
    return parts
