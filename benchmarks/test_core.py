"""Micro-benchmarks of the aggregator core (pytest-benchmark). Not part of the test run.

    .venv/bin/pytest benchmarks/test_core.py --benchmark-only

(`testpaths = ["tests"]` keeps these out of a plain `pytest`.) Batches are slices of a real
2020 minute at order_scale=1 (see benchmarks/_common.py), so the brand mix is festival-shaped.
Each `AggregateState.apply` round gets a fresh sequence number (made outside the timing), so
the dedup never short-cuts the work.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

pytest.importorskip("pytest_benchmark")

from _common import (  # noqa: E402
    KernelArrays,
    NaiveTotals,
    festival_batches,
    festival_limits,
    naive_messages,
)

from ticker.core.state import AggregateState  # noqa: E402
from ticker.core.wire import decode, encode  # noqa: E402

SIZES = [10_000, 100_000]


@pytest.fixture(scope="module")
def limits():
    return festival_limits()


@pytest.fixture(scope="module", params=SIZES, ids=lambda n: f"{n // 1000}k")
def batch(request):
    return festival_batches(request.param, 1)[0]


@pytest.fixture(scope="module")
def batch_10k():
    return festival_batches(10_000, 1)[0]


def _fresh_seqs(batch):
    counter = itertools.count(1)
    return lambda: ((dataclasses.replace(batch, seq=next(counter)),), {})


# -- codec, 10,000 orders ----------------------------------------------------------------------

@pytest.mark.benchmark(group="codec-10k")
def test_decode_binary_10k(benchmark, batch_10k, limits):
    payload = encode(batch_10k)
    result = benchmark(decode, payload, limits)
    assert len(result) == 10_000


@pytest.mark.benchmark(group="codec-10k")
def test_decode_json_10k(benchmark, batch_10k, limits):
    payload = encode(batch_10k, binary=False)
    result = benchmark(decode, payload, limits)
    assert len(result) == 10_000


@pytest.mark.benchmark(group="codec-10k")
def test_encode_binary_10k(benchmark, batch_10k):
    assert benchmark(encode, batch_10k)[:4] == b"GMVB"


@pytest.mark.benchmark(group="codec-10k")
def test_encode_json_10k(benchmark, batch_10k):
    assert benchmark(encode, batch_10k, binary=False)[:1] == b"{"


# -- apply vs the bare kernels, 10,000 and 100,000 orders --------------------------------------

@pytest.mark.benchmark(group="apply")
def test_apply(benchmark, batch, limits):
    """`AggregateState.apply` (dedup check, 4 np.add.at, 2 np.bincount, bookkeeping)."""
    state = AggregateState(limits)
    state.apply(batch)  # touch every page of the arrays before timing
    benchmark.pedantic(state.apply, setup=_fresh_seqs(batch), rounds=300, warmup_rounds=5)
    assert state.duplicates == 0


@pytest.mark.benchmark(group="apply")
def test_kernel_one_scatter(benchmark, batch, limits):
    """Kernel A: one `np.add.at(gmv_by_brand, brand, amount)`, on the same arrays."""
    arrays = KernelArrays(limits)
    benchmark(arrays.one_scatter, batch)


@pytest.mark.benchmark(group="apply")
def test_kernel_all_scatters(benchmark, batch, limits):
    """Kernel B: every numpy call `apply` makes, without the Python around them."""
    arrays = KernelArrays(limits)
    benchmark(arrays.all_scatters, batch)


@pytest.mark.benchmark(group="apply")
def test_decode_binary_and_apply(benchmark, batch, limits):
    """The aggregator core per message: `decode` then `apply` (no I/O)."""
    state = AggregateState(limits)
    state.apply(batch)
    counter = itertools.count(1)

    def setup():
        return (encode(dataclasses.replace(batch, seq=next(counter))),), {}

    benchmark.pedantic(lambda payload: state.apply(decode(payload, limits)), setup=setup,
                       rounds=300, warmup_rounds=5)
    assert state.duplicates == 0


# -- the naive baseline ------------------------------------------------------------------------

@pytest.mark.benchmark(group="naive-10k")
def test_naive_json_per_order_10k(benchmark, batch_10k):
    """10,000 one-object-per-order JSON documents decoded and summed into Python dicts."""
    messages = naive_messages(batch_10k)
    totals = NaiveTotals()
    benchmark(totals.apply_messages, messages)
    assert totals.orders % 10_000 == 0 and totals.gmv_cents > 0


@pytest.mark.benchmark(group="naive-10k")
def test_decode_json_and_apply_10k(benchmark, batch_10k, limits):
    """Same 10,000 orders as one column-oriented JSON batch: decode + apply."""
    state = AggregateState(limits)
    state.apply(batch_10k)
    counter = itertools.count(1)

    def setup():
        return (encode(dataclasses.replace(batch_10k, seq=next(counter)), binary=False),), {}

    benchmark.pedantic(lambda payload: state.apply(decode(payload, limits)), setup=setup,
                       rounds=100, warmup_rounds=3)
    assert int(np.sum(state.orders_by_brand)) == state.orders
