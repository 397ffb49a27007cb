"""`gmv bench` runs and conserves its counts; its load generator is exact and open-loop.
(Throughput is measured by benchmarks/reference_runs.sh, never asserted here.)"""

from __future__ import annotations

import subprocess

import numpy as np
import orjson
import pytest

from simulator.loadgen import build_pool, deadlines, due_times, festival_own_rates, \
    festival_plan, festival_rates
from simulator.scenario import scenario_for_year
from gmv.cli import main
from ticker.core.wire import decode

from .conftest import festival_limits
from .test_security import mosquitto_with

S2020 = scenario_for_year(2020, order_scale=1.0)


@pytest.mark.parametrize("binary", [True, False])
def test_pool_payloads_are_valid_batches_stamped_as_asked(binary):
    """A pooled batch re-stamped with producer, seq, minute and send time decodes exactly."""
    pool = build_pool(S2020, 15_120, 1_000, 4, binary=binary, producer="bench-x")
    batch = decode(pool.payload(6, seq=42, minute=900, sent_at_us=1_234_567), festival_limits())
    assert (batch.producer, batch.seq, batch.minute, batch.sent_at_us) == \
        ("bench-x", 42, 900, 1_234_567)
    assert len(batch) == pool.orders[2] == 1_000 and batch.gmv_cents == pool.gmv_cents[2]


def test_a_partitions_pool_holds_only_the_brands_of_that_partition():
    """`--shards N`: each producer sends partition p's batches from a pool of brand % N == p."""
    pool = build_pool(S2020, 15_120, 1_000, 2, binary=True, producer="b", partition=(1, 3))
    batch = decode(pool.payload(1, seq=0, minute=1, sent_at_us=1), festival_limits())
    assert len(batch) == 1_000 and set((batch.brand % 3).tolist()) == {1}


def test_constant_rate_deadlines_are_evenly_spaced_and_absolute():
    """100,000 orders/s in 10,000-order batches: one batch every 0.1 s, from 0."""
    due = deadlines(np.full(3, 100_000.0), 10_000, 10**9)
    assert len(due) == 30 and np.allclose(np.diff(due), 0.1) and due[0] == 0


def test_order_limit_caps_the_schedule():
    """--orders stops the schedule at that many orders."""
    assert len(deadlines(np.full(10, 1e6), 10_000, 55_000)) == 5


def test_festival_shape_peaks_at_the_requested_rate_on_nov_11():
    """The squeezed 2020 curve peaks at --rate in the second that holds Nov 11's midnight."""
    rates = festival_rates(S2020, 60, 583_000)
    assert rates.max() == pytest.approx(583_000) and rates.argmax() == 54  # 14400/15840*60
    assert rates.min() > 0


@pytest.mark.parametrize("shards", [1, 2])
def test_bench_runs_and_its_counts_conserve(mosquitto, tmp_path, capsys, shards):
    """A short bench through a real Mosquitto, into one shard or two brand-partitioned ones,
    loses and double counts nothing, and says so."""
    report_path = tmp_path / "bench.json"
    code = main(["bench", "--broker", mosquitto.url, "--duration", "2", "--rate", "100000",
                 "--batch-orders", "5000", "--shards", str(shards), "--json", str(report_path)])
    report = orjson.loads(report_path.read_bytes())
    assert code == 0
    assert [k for k in report["cpu_cores"] if k.startswith("aggregator-")] == \
        [f"aggregator-{k}" for k in range(shards)]
    assert report["published_orders"] == report["aggregated_orders"] == 200_000
    assert report["published_gmv_cents"] == report["aggregated_gmv_cents"] > 0
    assert report["lost_orders"] == report["double_counted_orders"] == 0
    assert report["latency_aggregated_ms"]["count"] == 40
    out = capsys.readouterr().out
    assert "lost        0 orders; double counted 0" in out


def test_bench_passes_its_login_to_every_process_it_starts(tmp_path, capsys):
    """Through a broker that needs a password, the aggregator, server and producers log in."""
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(tmp_path / "passwd"), "bench", "secret"],
                   check=True, capture_output=True, timeout=30)
    (tmp_path / "password").write_text("secret\n")
    with mosquitto_with(tmp_path, ["allow_anonymous false",
                                   f"password_file {tmp_path / 'passwd'}"]) as port:
        code = main(["bench", "--broker", f"mqtt://127.0.0.1:{port}", "--username", "bench",
                     "--password-file", str(tmp_path / "password"), "--duration", "1",
                     "--rate", "50000", "--batch-orders", "5000"])
    assert code == 0
    assert "aggregated  50,000 orders" in capsys.readouterr().out


def test_festival_plan_cuts_every_minute_into_batches_of_its_own_orders():
    """--source festival: minutes in order, each in batches of at most --batch-orders (its
    last one shorter), together every order of the festival; --orders keeps whole batches."""
    s = scenario_for_year(2020, order_scale=0.001)
    plan = festival_plan(s, 1_000)
    sizes = plan.stop - plan.start
    assert sizes.max() == 1_000 and sizes.min() > 0 and np.all(np.diff(plan.minute) >= 0)
    assert np.array_equal(np.bincount(plan.minute, weights=sizes, minlength=15_840),
                          s.minute_orders)
    orders = s.orders(int(plan.minute[0]))
    first = plan.batch(0, orders, producer="p", seq=3)
    assert first.seq == 3 and len(first) == sizes[0]
    assert np.array_equal(first.amount_cents, orders.amount_cents[:len(first)])
    assert int((festival_plan(s, 1_000, 5_500).stop - festival_plan(s, 1_000, 5_500).start)
               .sum()) <= 5_500


def test_the_festival_s_own_shape_spreads_every_order_over_the_duration():
    """--shape festival with the live source: the minutes' own orders, second by second,
    add up to the festival's, and every batch is due inside the duration, in order."""
    s = scenario_for_year(2020, order_scale=0.001)
    rates = festival_own_rates(s, 60)
    assert rates.sum() == pytest.approx(s.minute_orders.sum()) and rates.argmax() == 54
    plan = festival_plan(s, 10_000)
    due = due_times(rates, plan.orders_before)
    assert len(due) == len(plan) and 0 <= due[0] and due[-1] < 60 and np.all(np.diff(due) >= 0)


def test_bench_from_the_live_generator_says_so_and_conserves(mosquitto, tmp_path, capsys):
    """`gmv bench --source festival`: the festival's first orders, generated live, all
    aggregated, and the report names the source."""
    report_path = tmp_path / "bench.json"
    code = main(["bench", "--broker", mosquitto.url, "--source", "festival", "--order-scale",
                 "0.001", "--duration", "1", "--rate", "100000", "--batch-orders", "10000",
                 "--json", str(report_path)])
    report = orjson.loads(report_path.read_bytes())
    assert code == 0 and report["source"]["source"] == "festival"
    assert report["published_orders"] == report["aggregated_orders"] == \
        report["source"]["orders_offered"] > 90_000
    assert report["published_gmv_cents"] == report["aggregated_gmv_cents"]
    assert "source      festival 2020 generated live at order scale 0.001" in \
        capsys.readouterr().out
