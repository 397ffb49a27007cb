"""Prometheus metrics of `gmv aggregate --metrics-port` and `gmv serve`'s /metrics, scraped
over HTTP from real processes on a real Mosquitto, checked to the cent and the count."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import aiomqtt
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect as ws_connect

from ticker.core.dimensions import FESTIVAL_2020
from ticker.shell.aggregator import Aggregator
from ticker.shell.metrics import MAX_PRODUCER_SERIES, OTHER, AggregatorCollector, registry
from ticker.shell.mqtt import BrokerSettings, Topics

from .brokers import mosquitto_process
from .conftest import festival_limits, free_port, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
GMV = [sys.executable, "-m", "gmv.cli"]
DOCS = (ROOT / "docs" / "metrics.md").read_text()
DASHBOARD = ROOT / "deploy" / "grafana-dashboard.json"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> tuple[Samples, set[str]]:
    """GET /metrics: every sample by (name, sorted labels), and the metric family names."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = r.read().decode()
    samples: Samples = {}
    families = set()
    for family in text_string_to_metric_families(text):
        families.add(family.name + ("_total" if family.type == "counter" else ""))
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, families


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def wait_scrape(port: int, done, timeout: float = 10.0) -> Samples:
    deadline = time.monotonic() + timeout
    while True:
        try:
            samples, _ = scrape(port)
            if done(samples):
                return samples
        except (urllib.error.URLError, ConnectionError, KeyError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError("the metrics never reached the expected values")
        time.sleep(0.1)


def batch(producer: str, seq: int, amounts: list[int], **extra: object) -> bytes:
    n = len(amounts)
    return orjson.dumps({"v": 1, "producer": producer, "seq": seq, "minute": 14400,
                         "amount_cents": amounts, "brand": list(range(n)), "country": [1] * n,
                         "platform": [0] * n, **extra})


def documented() -> set[str]:
    """The metric names in docs/metrics.md's tables (a row starts with `| `name``)."""
    return set(re.findall(r"^\| `(gmv_[a-z_]+)`", DOCS, re.M))


def dashboard_metrics() -> set[str]:
    """Every gmv_* metric name a panel of the Grafana dashboard queries."""
    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in doc["panels"] for t in panel.get("targets", [])]
    assert exprs, "the dashboard queries nothing"
    names = {re.sub(r"_(bucket|count|sum)$", "", name)
             for expr in exprs for name in re.findall(r"\bgmv_[a-z_]+", expr)}
    return names


async def publish(broker: BrokerSettings, messages: list[tuple[str, bytes]]) -> None:
    async with aiomqtt.Client(broker.host, broker.port) as client:
        for topic, payload in messages:
            await client.publish(topic, payload, qos=1)


@pytest.mark.timeout(60)
async def test_aggregator_and_server_metrics_count_to_the_cent(tmp_path, topics):
    """Batches applied, a duplicate, a rejected one and a gap show in `gmv aggregate`'s
    metrics exactly; `gmv serve`'s show its viewer and frames and the merged GMV; a broker
    restart shows as one reconnect of each."""
    with mosquitto_process(tmp_path / "broker") as broker:
        metrics_port, port = free_port(), free_port()
        common = ["--broker", broker.url, "--prefix", topics.prefix]
        procs = [subprocess.Popen(GMV + ["aggregate", *common, "--metrics-port",
                                         str(metrics_port), "--checkpoint",
                                         str(tmp_path / "a.ckpt"), "--checkpoint-interval",
                                         "0.2"], stderr=subprocess.PIPE, text=True),
                 subprocess.Popen(GMV + ["serve", *common, "--port", str(port)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
        try:
            wait_for_port(metrics_port)
            wait_for_port(port)
            wait_scrape(metrics_port, lambda s: value(s, "gmv_aggregator_broker_connected"))
            await asyncio.sleep(0.3)  # the aggregator subscribes once connected
            t = topics.orders
            await publish(broker.settings, [
                (t("m-1"), batch("m-1", 0, [1999, 45000, 129900])),
                (t("m-1"), batch("m-1", 1, [1, 2])),
                (t("m-1"), batch("m-1", 1, [1, 2])),  # redelivered: a duplicate
                (t("m-1"), batch("m-1", 3, [700], sent_at_us=int(time.time() * 1e6))),  # seq 2?
                (t("m-2"), batch("m-2", 0, [-5])),  # a negative amount: rejected
                (t("m-2"), batch("m-3", 0, [5])),  # another producer's payload: rejected
            ])
            agg = wait_scrape(metrics_port, lambda s: value(
                s, "gmv_aggregator_batches_total", outcome="rejected") == 2
                and value(s, "gmv_aggregator_checkpoint_duration_seconds_count") >= 2)
            cents = 1999 + 45000 + 129900 + 1 + 2 + 700
            assert value(agg, "gmv_aggregator_cents_applied_total") == cents
            assert value(agg, "gmv_aggregator_orders_applied_total") == 6
            assert value(agg, "gmv_aggregator_batches_total", outcome="applied") == 3
            assert value(agg, "gmv_aggregator_batches_total", outcome="duplicate") == 1
            assert value(agg, "gmv_aggregator_rejected_total", reason="bad_amount") == 1
            assert value(agg, "gmv_aggregator_rejected_total", reason="producer_mismatch") == 1
            assert value(agg, "gmv_aggregator_gaps") == 1  # seq 2 of m-1 never came
            assert value(agg, "gmv_aggregator_producer_behind_batches", producer="m-1",
                         partition="0") == 2  # 2 and 3 are not applied in order
            assert value(agg, "gmv_aggregator_behind_batches") == 2
            assert value(agg, "gmv_aggregator_producer_streams") == 1
            assert value(agg, "gmv_aggregator_producer_streams_limit") == 1000
            assert value(agg, "gmv_aggregator_latest_minute") == 14400
            assert value(agg, "gmv_aggregator_apply_latency_seconds_bucket", le="+Inf") == 1
            assert 0 <= value(agg, "gmv_aggregator_checkpoint_age_seconds") < 5
            assert value(agg, "gmv_aggregator_info", shard="0", shards="1", partitions="1",
                         durable="true") == 1

            async with ws_connect(f"ws://127.0.0.1:{port}/ws") as ws:
                snapshot = orjson.loads(await ws.recv())
                srv = wait_scrape(port, lambda s: value(s, "gmv_server_gmv_cents") == cents
                                  and value(s, "gmv_server_frames_sent_total",
                                            kind="heartbeat") >= 1)
                assert snapshot["type"] == "snapshot"
                assert value(srv, "gmv_server_viewers") == 1
                assert value(srv, "gmv_server_orders") == 6
                assert value(srv, "gmv_server_frames_sent_total", kind="snapshot") >= 1
                assert value(srv, "gmv_server_frames_skipped_total") == 0
                assert value(srv, "gmv_server_shards_reporting") == 1
                assert value(srv, "gmv_server_broker_reconnects_total") == 0

            broker.restart()
            for p in (metrics_port, port):
                prefix = "gmv_aggregator" if p == metrics_port else "gmv_server"
                after = wait_scrape(p, lambda s: value(s, f"{prefix}_broker_reconnects_total")
                                    == 1 and value(s, f"{prefix}_broker_connected") == 1)
                assert value(after, f"{prefix}_broker_connection_failures_total") >= 1
            final, families = scrape(metrics_port)
            assert value(final, "gmv_aggregator_cents_applied_total") == cents
            _, server_families = scrape(port)
            assert families | server_families == documented(), \
                "docs/metrics.md lists exactly the metrics the processes export"
            missing = dashboard_metrics() - families - server_families
            assert not missing, f"the dashboard queries metrics nobody exports: {missing}"
        finally:
            for proc in procs:
                proc.terminate()
            _, err = procs[0].communicate(timeout=10)
            procs[1].wait(10)
        assert "Traceback" not in err


def test_the_lag_metric_keeps_a_bounded_number_of_series():
    """However many producer ids a state tracks, the lag metric has at most
    MAX_PRODUCER_SERIES of them, the furthest behind, and the rest summed under "(other)"."""
    aggregator = Aggregator(BrokerSettings(), Topics("m"), festival_limits(), FESTIVAL_2020)
    for i in range(200):
        producer = f"p{i:03d}"
        for seq in (0, 1 + i % 7):  # seq 0 applied in order, 1 + i % 7 past a hole
            handled = aggregator.handle(f"m/orders/{producer}/0",
                                        batch(producer, seq, [100]), time.time())
            assert handled.outcome == "applied"
    samples: Samples = {}
    for family in registry(AggregatorCollector(aggregator)).collect():
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    lag = {k: v for k, v in samples.items() if k[0] == "gmv_aggregator_producer_behind_batches"}
    assert len(lag) == MAX_PRODUCER_SERIES + 1
    # Behind: what is past a hole, applied out of order or missing (none when seq 1 came).
    assert sum(lag.values()) == value(samples, "gmv_aggregator_behind_batches") \
        == sum(1 + i % 7 for i in range(200) if i % 7)
    top = {dict(k[1])["producer"]: v for k, v in lag.items() if dict(k[1])["producer"] != OTHER}
    assert set(top.values()) == {7.0}  # the furthest behind, i % 7 == 6
    assert sorted(top) == [f"p{i:03d}" for i in range(6, 200, 7)][:MAX_PRODUCER_SERIES]
    assert value(samples, "gmv_aggregator_gaps") == sum(i % 7 for i in range(200))
    assert value(samples, "gmv_aggregator_cents_applied_total") == 400 * 100


def test_every_dashboard_metric_is_documented():
    """The Grafana dashboard queries only metrics that docs/metrics.md names."""
    assert not dashboard_metrics() - documented()


def test_a_busy_metrics_port_exits_2_with_one_line(mosquitto, topics, capsys):
    """`--metrics-port` on a port in use is a setting error naming it, not a traceback."""
    from gmv.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["aggregate", "--broker", mosquitto.url, "--prefix", topics.prefix,
                     "--no-checkpoint", "--metrics-port", str(port)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith(f"gmv: error: --metrics-port={port}: cannot listen")
