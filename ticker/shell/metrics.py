"""Prometheus metrics of the aggregator and the ticker server (docs/metrics.md).

Strategy. Nothing is counted twice and no hot path grows a hook: the collectors here read
at scrape time what the parts already count (`AggregateState`'s totals, duplicates and
rejections, the watermarks' gaps, the aggregator's checkpoints, a `ConnectionStats` of the
MQTT loop, the server's viewers and frames) and turn it into metric families. A scrape runs
on the event loop, between two messages (the aggregator's own endpoint is served by the
loop, the server's `/metrics` is one more path of its HTTP handler), so it reads one
consistent state and never races the loop; prometheus_client's threaded HTTP server would
read the arrays and dicts while the loop changes them.

Bounded label sets, whatever producers send: rejection reasons are the codec's fixed names
(at most MAX_REASON_SERIES), outcomes and frame kinds are fixed lists, and the lag behind
producers is one series per stream for the MAX_PRODUCER_SERIES streams furthest behind
only, the rest summed into `producer="(other)"` (a name no producer can have). A state
holds up to `max_producers` streams (1,000 by default, a million at most), so an attacker
with many producer ids could otherwise make a scrape as large as that and churn the
series database. The cost of a scrape is one pass over the streams: O(max_producers).
"""

from __future__ import annotations

import heapq
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from http import HTTPStatus
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.registry import Collector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, \
    HistogramMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from ticker.core.errors import ConfigError
from ticker.core.sequence import Producer
from ticker.core.state import LatencyHistogram

if TYPE_CHECKING:
    from ticker.shell.aggregator import Aggregator
    from ticker.shell.mqtt import ConnectionStats
    from ticker.shell.server import TickerServer

MAX_PRODUCER_SERIES = 20  # streams with a series of their own in the lag metric
MAX_REASON_SERIES = 64    # rejection reasons with a series of their own (the codec has ~30)
OTHER = "(other)"         # the label of everything past a cap: not a valid producer id
# Latency buckets exported: every doubling from 128 µs to 2^32 µs (~72 min), +Inf.
LATENCY_DOUBLINGS = range(7, 33)


def exposition(registry: CollectorRegistry) -> Response:
    """The text exposition of `registry` as an HTTP response."""
    body = generate_latest(registry)
    return Response(HTTPStatus.OK.value, HTTPStatus.OK.phrase, Headers([
        ("Content-Type", CONTENT_TYPE_PLAIN_0_0_4), ("Content-Length", str(len(body))),
        ("Cache-Control", "no-cache")]), body)


def registry(*collectors: Collector) -> CollectorRegistry:
    """A registry of its own (never the process-global one) holding `collectors`."""
    reg = CollectorRegistry(auto_describe=False)
    for collector in collectors:
        reg.register(collector)
    return reg


@asynccontextmanager
async def serving(reg: CollectorRegistry, host: str, port: int) -> AsyncIterator[Server | None]:
    """Serve `reg` at http://host:port/metrics on this event loop while in the block; port 0
    serves nothing (and yields None). Any other path is 404; nothing else is answered."""
    if not port:
        yield None
        return

    def answer(connection: ServerConnection, request: Request) -> Response:
        if request.path.partition("?")[0] != "/metrics":
            return Response(HTTPStatus.NOT_FOUND.value, HTTPStatus.NOT_FOUND.phrase,
                            Headers([("Content-Length", "10")]), b"not found\n")
        return exposition(reg)

    async def never(ws: ServerConnection) -> None:  # every request is answered above
        await ws.close()

    try:
        server = await serve(never, host, port, process_request=answer, compression=None,
                             server_header="gmv-metrics")
    except OSError as exc:
        raise ConfigError(f"--metrics-port={port}: cannot listen on {host}:{port} "
                          f"({exc.strerror})") from None
    try:
        yield server
    finally:
        server.close()
        await server.wait_closed()


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def broker_metrics(prefix: str, stats: ConnectionStats) -> Iterator[Metric]:
    """The MQTT connection of one `reconnecting` loop."""
    yield _gauge(f"{prefix}_broker_connected", "1 while connected to the MQTT broker",
                 int(stats.connected))
    yield _counter(f"{prefix}_broker_reconnects_total",
                   "connections to the broker after the first (each follows a lost one)",
                   max(stats.connects - 1, 0))
    yield _counter(f"{prefix}_broker_connection_failures_total",
                   "connections to the broker lost, or attempts that failed", stats.failures)


def latency_buckets(histogram: LatencyHistogram) -> list[tuple[str, float]]:
    """The state's log-spaced latency counts (8 buckets a doubling) as cumulative buckets
    at whole doublings, in seconds, for a Prometheus histogram."""
    counts = histogram.counts
    per = histogram.PER_DOUBLING
    buckets = [(repr(2 ** k / 1e6), float(counts[:k * per].sum())) for k in LATENCY_DOUBLINGS]
    return [*buckets, ("+Inf", float(counts.sum()))]


class AggregatorCollector:
    """An aggregator shard's metrics, read from its state at each scrape (`gmv_aggregator_*`)."""

    def __init__(self, aggregator: Aggregator, *, max_producer_series: int = MAX_PRODUCER_SERIES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_producer_series <= 0:
            raise ValueError(f"max_producer_series={max_producer_series}: must be positive")
        self.aggregator = aggregator
        self.max_producer_series = max_producer_series
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        agg = self.aggregator
        state = agg.state
        p = "gmv_aggregator"
        info = GaugeMetricFamily(f"{p}_info", "the shard this aggregator is (always 1)",
                                 labels=["shard", "shards", "partitions", "durable"])
        info.add_metric([agg.shard.name, str(agg.shard.count), str(agg.shard.partitions),
                         str(agg.durable).lower()], 1)
        yield info
        yield _counter(f"{p}_orders_applied_total", "orders applied (since start or the last "
                       "reset; a restart resumes the checkpoint's count)", state.orders)
        yield _counter(f"{p}_cents_applied_total", "GMV applied, in US cents (exact: at most "
                       "2^53 - 1)", state.gmv_cents)
        yield _counter(f"{p}_chatbot_queries_applied_total", "chatbot queries applied",
                       state.chatbot_queries)
        rejected = sorted(state.rejected.items(), key=lambda kv: (-kv[1], kv[0]))
        batches = CounterMetricFamily(f"{p}_batches", "messages on the order and chatbot "
                                      "topics by outcome: applied (order batches), duplicate "
                                      "(already applied, dropped), rejected (any reason)",
                                      labels=["outcome"])
        batches.add_metric(["applied"], state.batches)
        batches.add_metric(["duplicate"], state.duplicates)
        batches.add_metric(["rejected"], sum(n for _, n in rejected))
        yield batches
        reasons = CounterMetricFamily(f"{p}_rejected", "messages rejected, by reason "
                                      "(docs/wire-format.md)", labels=["reason"])
        for reason, n in rejected[:MAX_REASON_SERIES]:
            reasons.add_metric([reason], n)
        if len(rejected) > MAX_REASON_SERIES:
            reasons.add_metric([OTHER], sum(n for _, n in rejected[MAX_REASON_SERIES:]))
        yield reasons
        yield _counter(f"{p}_resets_total", "operator resets of the totals", state.resets)
        yield _gauge(f"{p}_gaps", "sequence numbers missing now in producers' streams (lost "
                     "by the broker, or not arrived yet)", state.watermarks.gaps)
        yield from self._lag(state.watermarks.producers, state.limits.max_producers)
        yield _gauge(f"{p}_latest_minute", "the latest minute of the window with orders "
                     "(-1: none yet)", state.latest_minute)
        yield _gauge(f"{p}_newest_sent_timestamp_seconds", "the newest publish time stamped "
                     "on an applied batch (Unix time; 0: none)", state.newest_sent_at_us / 1e6)
        latency = HistogramMetricFamily(
            f"{p}_apply_latency_seconds", "from a producer's publish stamp to applying the "
            "batch (stamped batches; no _sum: the state keeps buckets only)")
        latency.add_metric([], latency_buckets(state.latency), None)
        yield latency
        yield from self._checkpoints()
        yield from broker_metrics(p, agg.broker_stats)

    def _lag(self, producers: dict[str, Producer], limit: int) -> Iterator[Metric]:
        p = "gmv_aggregator"
        lag = GaugeMetricFamily(
            f"{p}_producer_behind_batches", "batches a stream has published (seen or announced)"
            f" past what is applied in order; the {self.max_producer_series} streams furthest "
            f"behind, the rest summed as producer=\"{OTHER}\"", labels=["producer", "partition"])
        # One pass: (behind, name) of every stream; the furthest behind get a series.
        behind = [(s.max_seen + 1 - s.next_seq, name) for name, s in producers.items()]
        top = heapq.nsmallest(self.max_producer_series, behind, key=lambda x: (-x[0], x[1]))
        for n, name in top:
            producer, _, partition = name.partition("/")
            lag.add_metric([producer, partition or "0"], n)
        total = sum(n for n, _ in behind)
        if len(behind) > len(top):
            lag.add_metric([OTHER, OTHER], total - sum(n for n, _ in top))
        yield lag
        yield _gauge(f"{p}_behind_batches", "batches published but not applied in order, all "
                     "streams", total)
        yield _gauge(f"{p}_producer_streams", "(producer, partition) streams tracked",
                     len(producers))
        yield _gauge(f"{p}_producer_streams_limit", "streams tracked at most (--max-producers);"
                     " a new one past it is rejected as too_many_producers", limit)

    def _checkpoints(self) -> Iterator[Metric]:
        agg, p = self.aggregator, "gmv_aggregator"
        summary = SummaryMetricFamily(f"{p}_checkpoint_duration_seconds", "checkpoints "
                                      "written and the time they took (writing and fsync)",
                                      count_value=agg.checkpoints,
                                      sum_value=agg.checkpoint_seconds)
        yield summary
        if agg.durable and agg.checkpoints:
            yield _gauge(f"{p}_checkpoint_last_duration_seconds", "how long the latest "
                         "checkpoint took", agg.last_checkpoint_duration)
            yield _gauge(f"{p}_checkpoint_age_seconds", "time since the latest checkpoint "
                         "(what a crash now would make the broker redeliver)",
                         max(self.clock() - agg.last_checkpoint_at, 0.0))


class ServerCollector:
    """A ticker server's metrics (`gmv_server_*`)."""

    def __init__(self, server: TickerServer, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.server = server
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        server, feed, p = self.server, self.server.feed, "gmv_server"
        yield _gauge(f"{p}_viewers", "websocket viewers connected (or connecting)",
                     server.viewers)
        yield _gauge(f"{p}_viewers_limit", "viewers at most (--max-viewers, or what the "
                     "open-files limit allows); more get HTTP 503", server.max_viewers)
        sent = CounterMetricFamily(f"{p}_frames_sent", "websocket frames written to viewers, "
                                   "by kind", labels=["kind"])
        for kind in ("snapshot", "update", "heartbeat"):
            sent.add_metric([kind], server.frames_sent[kind])
        yield sent
        yield _counter(f"{p}_frames_skipped_total", "frames not written to a viewer whose "
                       "socket buffer was full (it gets a snapshot once drained)",
                       server.frames_skipped)
        yield _counter(f"{p}_views_published_total", "versions of the merged view pushed",
                       feed.seq - 1)
        yield _gauge(f"{p}_shards_expected", "aggregator shards merged (--shards)",
                     feed.expected_shards)
        yield _gauge(f"{p}_shards_reporting", "expected shards whose totals this server has",
                     len(feed.shards))
        yield _gauge(f"{p}_shards_quiet", "expected shards without live totals for a while",
                     len(feed.view["stats"]["shards_quiet"]))
        if feed.last_heard is not None:
            yield _gauge(f"{p}_upstream_age_seconds", "time since live totals last came from "
                         "an expected shard", max(self.clock() - feed.last_heard, 0.0))
        ignored = CounterMetricFamily(f"{p}_ignored_messages", "messages on the totals and "
                                      "replay topics dropped, by why", labels=["why"])
        ignored.add_metric(["malformed_totals"], feed.ignored_totals)
        ignored.add_metric(["malformed_replay"], feed.ignored_replay)
        ignored.add_metric(["unknown_shard"], feed.unknown_shard_messages)
        yield ignored
        yield _gauge(f"{p}_gmv_cents", "GMV of the merged view, in US cents",
                     feed.view["gmv_cents"])
        yield _gauge(f"{p}_orders", "orders of the merged view", feed.view["orders"])
        yield from broker_metrics(p, server.broker_stats)
