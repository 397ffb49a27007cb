"""`gmv bench` runs and conserves its counts; its load generator is exact and open-loop.
(Throughput is measured by benchmarks/reference_runs.sh, never asserted here.)"""

from __future__ import annotations

import subprocess

import numpy as np
import orjson
import pytest

from simulator.loadgen import build_pool, deadlines, festival_rates
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


def test_bench_runs_and_its_counts_conserve(mosquitto, tmp_path, capsys):
    """A short bench through a real Mosquitto loses and double counts nothing, and says so."""
    report_path = tmp_path / "bench.json"
    code = main(["bench", "--broker", mosquitto.url, "--duration", "2", "--rate", "100000",
                 "--batch-orders", "5000", "--json", str(report_path)])
    report = orjson.loads(report_path.read_bytes())
    assert code == 0
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
