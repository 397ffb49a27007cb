"""`gmv bench`: an open-loop, festival-shaped load through a real broker, with a report.

Processes: N producers (this module, forked), the aggregator (`gmv aggregate`) and the ticker
server (`gmv serve`) as subprocesses, and Mosquitto (started here unless --broker is given).
The orchestrator watches the aggregator's totals over MQTT and one websocket viewer, then
reports throughput, latency percentiles (publish -> aggregated from the aggregator's
histogram; publish -> websocket frame measured by the viewer), CPU per process, aggregator
memory, and published / aggregated / lost / double-counted counts. Exit 1 if any order was
lost or double counted.

Two sources of orders (`--source`, named in the report): `pool`, batches cut once from a busy
minute of 2020 and re-stamped (a memcpy a batch: the most a producer can offer), and
`festival`, the scenario's own orders from its first minute, generated live by each producer
(its minutes, one in `--producers`, the next one generated in a thread while the last goes
out). With `--shape festival` the festival source spreads every minute of the scenario over
the duration, its order scale chosen so the busiest second offers `--rate` (or as given):
the whole festival, exact to the cent, in `--duration` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson
from websockets.asyncio.client import connect as ws_connect

from simulator.flow import usd
from simulator.generator import keep_freed_memory
from simulator.loadgen import build_pool, deadlines, due_times, festival_own_rates, \
    festival_plan, festival_rates
from simulator.scenario import scenario_for_year

from ticker.core.errors import ConfigError
from ticker.core.partitions import split
from ticker.core.wire import MAX_ORDER_CENTS, encode
from ticker.shell.mqtt import BrokerSettings, ReliablePublisher, Topics, connect, watch_totals

BUSY_MINUTE = 15_120  # Nov 11 12:00: hundreds of thousands of orders at order scale 1
TICKS = 1_000_000


@dataclass
class Proc:
    name: str
    pid: int
    cpu_start: float = 0.0

    def cpu_seconds(self) -> float:
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError):
            return 0.0

    def rss_mb(self) -> float:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0


@dataclass
class Report:
    settings: dict
    published_orders: int = 0
    published_batches: int = 0
    published_gmv_cents: int = 0
    published_bytes: int = 0
    publish_seconds: float = 0.0
    max_lateness_ms: float = 0.0
    aggregated_orders: int = 0
    aggregated_gmv_cents: int = 0
    aggregated_batches: int = 0
    aggregate_seconds: float = 0.0
    duplicates_dropped: int = 0
    gaps: int = 0
    latency_aggregated_ms: dict | None = None
    latency_frame_ms: dict | None = None
    cpu_cores: dict = field(default_factory=dict)
    aggregator_rss_mb: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)  # where the orders came from (--source)

    @property
    def lost_orders(self) -> int:
        return max(self.published_orders - self.aggregated_orders, 0)

    @property
    def double_counted_orders(self) -> int:
        return max(self.aggregated_orders - self.published_orders, 0)

    def as_dict(self) -> dict:
        d = dict(vars(self))
        d.update(lost_orders=self.lost_orders, double_counted_orders=self.double_counted_orders,
                 published_orders_per_s=self._rate(self.published_orders, self.publish_seconds),
                 aggregated_orders_per_s=self._rate(self.aggregated_orders,
                                                    self.aggregate_seconds),
                 batches_per_s=self._rate(self.published_batches, self.publish_seconds),
                 mb_per_s=self._rate(self.published_bytes / 1e6, self.publish_seconds))
        return d

    @staticmethod
    def _rate(amount: float, seconds: float) -> float:
        return round(amount / seconds, 1) if seconds > 0 else 0.0


# --- producers (forked processes) -------------------------------------------------------------

def _produce(index: int, args: dict, go, results) -> None:
    """One producer process: its share of the batches, each at its absolute deadline."""
    asyncio.run(_produce_async(index, args, go, results))


async def _produce_async(index: int, a: dict, go, results) -> None:
    if a["source"] == "festival":
        return await _produce_live(index, a, go, results)
    scenario = scenario_for_year(2020, order_scale=1.0)
    producer = f"bench-{a['run']}-{index}"
    shards = a["shards"]  # one partition per shard; batch i goes to partition i % shards
    pools = [build_pool(scenario, BUSY_MINUTE, a["batch_orders"], 16,
                        binary=a["encoding"] == "binary", producer=producer,
                        partition=(p, shards)) for p in range(shards)]
    due = np.load(a["schedule"])[index::a["producers"]]
    topics = Topics(a["prefix"])
    sent = orders = gmv = size = 0
    lateness = 0.0
    async with ReliablePublisher(a["broker"], max_inflight=a["inflight"]) as publisher:
        results.put(("ready", index, None))
        await asyncio.to_thread(go.wait)  # every producer starts on the same signal
        t0, cpu0 = time.monotonic(), time.process_time()
        for seq, deadline in enumerate(due):
            wait = t0 + deadline - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            lateness = max(lateness, -wait)
            minute = int(deadline / a["seconds"] * (a["window_minutes"] - 1))
            partition, pseq = seq % shards, seq // shards
            pool = pools[partition]
            payload = pool.payload(pseq, pseq, minute, time.time_ns() // 1000)
            topic = topics.orders(producer, partition)
            if a["qos"] == 1:
                await publisher.send(topic, payload)
            else:
                await publisher.send_qos0(topic, payload)
            k = pseq % len(pool.bodies)
            sent, orders, gmv, size = sent + 1, orders + pool.orders[k], \
                gmv + pool.gmv_cents[k], size + len(payload)
            if seq % 64 == 0:
                results.put(("progress", index, orders))
        await publisher.flush()
        seconds = time.monotonic() - t0  # the last batch sent and acknowledged by the broker
        if a["qos"] == 1:  # let the aggregator tell a lost tail from the end of the stream
            for p in range(shards):
                last_seq = (sent - 1 - p) // shards  # -1 if nothing went to partition p
                await publisher.send(topics.producer(producer, p), orjson.dumps(
                    {"v": 1, "producer": producer, "last_seq": last_seq}), retain=True)
            await publisher.flush()
    results.put(("done", index, {"batches": sent, "orders": orders, "gmv_cents": gmv,
                                 "bytes": size, "seconds": seconds,
                                 "cpu_seconds": time.process_time() - cpu0,
                                 "lateness_ms": lateness * 1000}))


async def _produce_live(index: int, a: dict, go, results) -> None:
    """One producer of the festival source: the plan's batches of its minutes (minute %
    producers == index), each made from the minute's orders as generated, split by brand
    partition, at its absolute deadline; the next minute is generated in a thread meanwhile."""
    keep_freed_memory()  # big minutes reuse the memory of the last
    scenario = scenario_for_year(a["year"], order_scale=a["order_scale"])
    plan = festival_plan(scenario, a["batch_orders"])
    saved = np.load(a["schedule"])
    batches, due = saved["batch"], saved["due"]
    mine = plan.minute[batches] % a["producers"] == index
    batches, due = batches[mine], due[mine]
    minutes = list(dict.fromkeys(plan.minute[batches].tolist()))  # in order, once each
    producer = f"bench-{a['run']}-{index}"
    topics, shards, binary = Topics(a["prefix"]), a.get("shards", 1), a["encoding"] == "binary"
    seqs = [0] * shards
    sent = orders = gmv = size = 0
    lateness = 0.0

    # Minutes are generated a group at a time in a thread, the next group while this one
    # goes out: one minute, or as many small ones as make about 200,000 orders.
    counts = scenario.minute_orders
    groups: list[list[int]] = [[]]
    for m in minutes:
        if groups[-1] and (counts[groups[-1]].sum() + counts[m] > 200_000
                           or len(groups[-1]) >= 512):
            groups.append([])
        groups[-1].append(m)

    def generate(g: int):
        return asyncio.ensure_future(asyncio.to_thread(
            lambda: {m: scenario.orders(m) for m in groups[g]})) if g < len(groups) else None

    async with ReliablePublisher(a["broker"], max_inflight=a["inflight"]) as publisher:
        ahead = generate(0)
        made: dict = await ahead if ahead is not None else {}  # before the clock starts
        ahead = generate(1)
        group = 1
        results.put(("ready", index, None))
        await asyncio.to_thread(go.wait)
        t0, cpu0 = time.monotonic(), time.process_time()
        current, minute_orders = None, None
        for b, deadline in zip(batches.tolist(), due.tolist()):
            if plan.minute[b] != current:
                current = int(plan.minute[b])
                if current not in made:
                    made = await ahead
                    group += 1
                    ahead = generate(group)
                minute_orders = made.pop(current)
            wait = t0 + deadline - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            lateness = max(lateness, -wait)
            batch = plan.batch(b, minute_orders, producer=producer, seq=0,
                               sent_at_us=time.time_ns() // 1000)
            for partition, part in split(batch, shards):
                payload = encode(dataclasses.replace(part, seq=seqs[partition]),
                                 binary=binary)
                seqs[partition] += 1
                if a["qos"] == 1:
                    await publisher.send(topics.orders(producer, partition), payload)
                else:
                    await publisher.send_qos0(topics.orders(producer, partition), payload)
                size += len(payload)
            sent, orders, gmv = sent + 1, orders + len(batch), gmv + batch.gmv_cents
            if sent % 64 == 0:
                results.put(("progress", index, orders))
        await publisher.flush()
        seconds = time.monotonic() - t0  # the last batch sent and acknowledged by the broker
        if a["qos"] == 1:
            for p in range(shards):
                await publisher.send(topics.producer(producer, p), orjson.dumps(
                    {"v": 1, "producer": producer, "last_seq": seqs[p] - 1}), retain=True)
            await publisher.flush()
    results.put(("done", index, {"batches": sent, "orders": orders, "gmv_cents": gmv,
                                 "bytes": size, "seconds": seconds,
                                 "cpu_seconds": time.process_time() - cpu0,
                                 "lateness_ms": lateness * 1000}))


def _festival_schedule(args: argparse.Namespace, seconds: int, total: int) \
        -> tuple[dict, dict]:
    """The festival source's batches and their deadlines, and what the report says of it."""
    year = int(args.scenario)
    scale = args.order_scale
    if args.shape == "festival":
        if scale is None:  # the busiest second of the spread-out festival offers --rate
            peak = festival_own_rates(scenario_for_year(year, order_scale=1.0), seconds).max()
            scale = min(1.0, args.rate / peak)
        scenario = scenario_for_year(year, order_scale=scale)
        rates = festival_own_rates(scenario, seconds)
        plan = festival_plan(scenario, args.batch_orders, args.orders)
    else:
        scale = 1.0 if scale is None else scale
        scenario = scenario_for_year(year, order_scale=scale)
        rates = np.full(seconds, float(args.rate))
        plan = festival_plan(scenario, args.batch_orders, total)
    if over := scenario.order_over(MAX_ORDER_CENTS):  # the bench's aggregators would refuse it
        raise ConfigError(
            f"at order scale {scale:g} the {year} festival has an order of {usd(over[1])}, "
            f"more than the aggregator takes ({usd(MAX_ORDER_CENTS)} an order): use --order-scale "
            f"{scenario.order_scale_for(MAX_ORDER_CENTS):g} or more"
            + (", or a higher --rate" if args.order_scale is None else ""))
    due = due_times(rates, plan.orders_before)
    batches = np.arange(len(due))
    orders = int((plan.stop - plan.start)[:len(due)].sum())
    last = int(plan.minute[len(due) - 1]) if len(due) else 0
    described = {"source": "festival", "scenario": scenario.name, "order_scale": scale,
                 "shape": args.shape,
                 "minutes": [0, last], "orders_offered": orders,
                 "peak_orders_per_s": float(rates.max()),
                 "whole_festival": last == scenario.window.minutes - 1 and
                 orders == int(scenario.minute_orders.sum()),
                 "festival_gmv_cents": scenario.gmv_cents}
    return ({"batch": batches, "due": due, "year": year, "order_scale": scale}, described)


# --- the run ----------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Child:
    """A process the bench starts; its stderr goes to a file, to explain an early exit."""

    name: str
    proc: subprocess.Popen
    log: Path

    @classmethod
    def start(cls, name: str, logs: Path, argv: list[str], env: dict | None = None) -> Child:
        log = logs / f"{name}.log"
        with log.open("wb") as stderr:
            return cls(name, subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=stderr,
                                              env=env), log)

    def check(self) -> None:
        """Raise one line with the child's own last words if it has exited."""
        if self.proc.poll() is not None:
            said = self.log.read_text(errors="replace").strip().splitlines() or ["no message"]
            raise ConfigError(f"the bench's {self.name} exited with code "
                              f"{self.proc.returncode}: {said[-1].removeprefix('gmv: error: ')}")


@contextlib.contextmanager
def _own_mosquitto():
    """A Mosquitto of the bench's own on a free port, sized for a load test."""
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(binary).exists():
        raise ConfigError("no --broker given and no mosquitto installed to start one")
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "mosquitto.conf"
        # Unlimited queue: a backlog stays in the broker and shows as latency, never as loss.
        # A bounded in-flight window: the aggregator acknowledges each batch once applied,
        # so unapplied batches wait in the broker, not in the aggregator's memory.
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n"
                        "max_queued_messages 0\nmax_inflight_messages 32\nlog_dest none\n")
        mosquitto = Child.start("Mosquitto", Path(tmp), [binary, "-c", str(conf)])
        try:
            yield mosquitto, port
        finally:
            mosquitto.proc.terminate()
            mosquitto.proc.wait(10)


MAX_BATCHES = 20_000_000  # a schedule's deadlines: 160 MB (a 60 s run at 30M orders/s: 180,000)


def _check(args: argparse.Namespace) -> None:
    """Settings that cannot give the run asked for, before anything starts."""
    if args.source == "pool" and (args.scenario != "2020" or args.order_scale is not None):
        raise ConfigError("--scenario and --order-scale choose the orders of --source festival; "
                          "the pool is 2020's at order scale 1")
    batches = (args.orders or args.rate * args.duration) / args.batch_orders
    if batches > MAX_BATCHES:
        raise ConfigError(f"the settings give {batches:,.0f} batches, more than {MAX_BATCHES:,}: "
                          "lower --rate, --duration or --orders, or raise --batch-orders")
    if args.json and not os.access(Path(args.json).parent, os.W_OK):
        raise ConfigError(f"--json {args.json}: cannot write in {Path(args.json).parent}")


async def run_bench(args: argparse.Namespace, broker: BrokerSettings | None) -> int:
    _check(args)
    stack = contextlib.ExitStack()
    with stack:
        broker_pid = args.broker_pid
        if broker is None:
            mosquitto, port = stack.enter_context(_own_mosquitto())
            await _wait_for_port(mosquitto, port)
            broker, broker_pid = BrokerSettings("127.0.0.1", port), mosquitto.proc.pid
        async with connect(broker):  # a dead broker: one line naming it, before any process
            pass
        report = await _run(args, broker, broker_pid, stack)
    _print(report)
    if args.json:
        Path(args.json).write_bytes(orjson.dumps(
            report.as_dict(), option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    return 1 if report.lost_orders or report.double_counted_orders else 0


async def _run(args, broker: BrokerSettings, broker_pid: int | None, stack) -> Report:
    run = uuid.uuid4().hex[:6]
    topics = Topics(f"bench/{run}")
    total = args.orders or int(args.rate * args.duration)
    seconds = int(args.duration)
    rates = festival_rates(scenario_for_year(2020), seconds, args.rate) \
        if args.shape == "festival" else np.full(seconds, float(args.rate))
    tmp = stack.enter_context(tempfile.TemporaryDirectory())
    if args.source == "festival":
        live, source = _festival_schedule(args, seconds, total)
        due = live["due"]
        schedule = Path(tmp) / "schedule.npz"
        np.savez(schedule, batch=live["batch"], due=due)
    else:
        due = deadlines(rates, args.batch_orders, total)
        schedule = Path(tmp) / "schedule.npy"
        np.save(schedule, due)
        live, source = {}, {"source": "pool", "scenario": "2020", "minute": BUSY_MINUTE,
                            "batches": 16, "restamped": True}
    if not len(due):
        raise ConfigError("the settings give no batch to send: raise --rate or --duration")
    report = Report(settings={k: v for k, v in vars(args).items() if k != "func"},
                    source=source)
    # The bench's login and CA go to its aggregator and server too; the password through
    # the environment, as a command line shows in ps.
    gmv = [sys.executable, "-m", "gmv.cli"]
    common = ["--broker", broker.url, "--prefix", topics.prefix,
              *(["--username", broker.username] if broker.username else []),
              *(["--ca-file", broker.ca_file] if broker.ca_file else [])]
    env = {**os.environ, "GMV_MQTT_PASSWORD": broker.password} if broker.password else None
    port = free_port()
    n = args.shards
    aggregators = [Child.start(f"aggregator-{k}", Path(tmp),  # measures the pipeline alone
                               [*gmv, "aggregate", *common, "--no-checkpoint",
                                "--shard", f"{k}/{n}"], env) for k in range(n)]
    server = Child.start("server", Path(tmp), [*gmv, "serve", *common, "--port", str(port),
                                               "--shards", str(n)], env)
    for child in (*aggregators, server):
        stack.callback(child.proc.wait, 10)
        stack.callback(child.proc.terminate)
    procs = {a.name: Proc(a.name, a.proc.pid) for a in aggregators}
    procs.update(server=Proc("server", server.proc.pid), bench=Proc("bench", os.getpid()))
    if broker_pid:
        procs["broker"] = Proc("broker", broker_pid)

    shard_totals: dict[str, dict] = {}
    latest = _Merged(shard_totals)
    ready = asyncio.Event()

    def note_totals(topic: str, payload: bytes, retained: bool) -> None:
        if topic.startswith(f"{topics.prefix}/totals/"):
            shard_totals[topic.rpartition("/")[2]] = orjson.loads(payload)

    watcher = asyncio.create_task(watch_totals(broker, topics, note_totals, ready=ready))
    await asyncio.wait_for(ready.wait(), 10)
    await _wait_for_port(server, port)
    await asyncio.sleep(1.0)  # the aggregators subscribe
    for child in aggregators:
        child.check()
    frames: list[float] = []
    viewer = asyncio.create_task(_view(port, frames))
    report.aggregator_rss_mb["start"] = _rss(procs, n)

    ctx = multiprocessing.get_context("spawn")  # no copy of this process's event loop
    results, go = ctx.Queue(), ctx.Event()
    shared = dict(run=run, broker=broker, prefix=topics.prefix,
                  schedule=str(schedule), producers=args.producers, qos=args.qos,
                  batch_orders=args.batch_orders, encoding=args.encoding,
                  seconds=max(seconds, 1), window_minutes=15_840, inflight=args.inflight,
                  shards=n)
    shared.update(source=args.source, year=live.get("year"), order_scale=live.get("order_scale"))
    workers = [ctx.Process(target=_produce, args=(i, shared, go, results), daemon=True)
               for i in range(args.producers)]
    for w in workers:
        w.start()
    ready = 0
    while ready < args.producers:
        kind, _, _ = await asyncio.to_thread(results.get, True, 60)
        ready += kind == "ready"
    for p in procs.values():
        p.cpu_start = p.cpu_seconds()
    go.set()
    t0 = time.monotonic()
    done, progress = {}, {}
    while len(done) < args.producers:
        while not results.empty():
            kind, index, value = results.get()
            (done if kind == "done" else progress)[index] = value
        published = sum(d["orders"] if isinstance(d, dict) else 0 for d in done.values()) + \
            sum(v for k, v in progress.items() if k not in done)
        _progress_bar(time.monotonic() - t0, args.duration, published, latest)
        if "after_1M_orders" not in report.aggregator_rss_mb and \
                latest.get("orders", 0) >= 1_000_000:
            report.aggregator_rss_mb["after_1M_orders"] = _rss(procs, n)
        if not any(w.is_alive() for w in workers) and len(done) < args.producers:
            raise ConfigError("a producer process died; run with -v to see why")
        await asyncio.sleep(0.25)
    publish_wall = time.monotonic() - t0
    for d in done.values():
        report.published_orders += d["orders"]
        report.published_batches += d["batches"]
        report.published_gmv_cents += d["gmv_cents"]
        report.published_bytes += d["bytes"]
        report.max_lateness_ms = max(report.max_lateness_ms, d["lateness_ms"])
    # From the start signal to the last producer's last batch, as the producers time it (the
    # loop above sees a producer done up to 0.25 s late, and the announcements after it), but
    # not less than the schedule's n slots (the last batch is due at the start of the last).
    slots = float(due[-1]) * len(due) / (len(due) - 1) if len(due) > 1 else 0.0
    report.publish_seconds = max([slots, *(d["seconds"] for d in done.values())]) if done \
        else publish_wall
    # Drain: wait until the aggregator has every batch, or nothing moves for a while.
    last_change, last_orders = time.monotonic(), -1
    while latest.get("orders", 0) < report.published_orders and \
            time.monotonic() - last_change < args.drain_timeout:
        if latest.get("orders", 0) != last_orders:
            last_change, last_orders = time.monotonic(), latest.get("orders", 0)
        await asyncio.sleep(0.05)
    report.aggregate_seconds = time.monotonic() - t0
    await asyncio.sleep(0.3)  # a last frame reaches the viewer
    wall = time.monotonic() - t0
    report.cpu_cores = {name: round((p.cpu_seconds() - p.cpu_start) / wall, 3)
                        for name, p in procs.items()}
    for index, d in sorted(done.items()):  # producers have exited: they report their own
        report.cpu_cores[f"producer-{index}"] = round(d["cpu_seconds"] / wall, 3)
    report.aggregator_rss_mb[f"end ({latest.get('orders', 0):,} orders)"] = _rss(procs, n)
    report.aggregated_orders = int(latest.get("orders", 0))
    report.aggregated_gmv_cents = int(latest.get("gmv_cents", 0))
    report.aggregated_batches = int(latest.get("batches", 0))
    report.duplicates_dropped = int(latest.get("duplicates", 0))
    report.gaps = int(latest.get("gaps", 0))
    report.latency_aggregated_ms = latest.get("latency_ms")
    report.latency_frame_ms = _percentiles(frames)
    for task in (watcher, viewer):
        task.cancel()
    await asyncio.gather(watcher, viewer, return_exceptions=True)
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    return report


class _Merged:
    """The shards' latest totals, summed where they add up; latency percentiles are the
    worst shard's (an upper bound: percentiles of parts do not merge)."""

    def __init__(self, shards: dict[str, dict]) -> None:
        self.shards = shards

    def get(self, key: str, default=None):
        values = [t[key] for t in self.shards.values() if t.get(key) is not None]
        if not values:
            return default
        if key == "latency_ms":
            return {q: (sum if q == "count" else max)(v[q] for v in values) for q in values[0]}
        return sum(values)


def _rss(procs: dict[str, Proc], shards: int) -> float:
    """The aggregators' resident memory, all shards together."""
    return sum(procs[f"aggregator-{k}"].rss_mb() for k in range(shards))


async def _wait_for_port(child: Child, port: int) -> None:
    for _ in range(200):
        child.check()
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        await asyncio.sleep(0.05)
    raise ConfigError(f"the bench's {child.name} is not listening on port {port} after 10 s")


async def _view(port: int, frames: list[float]) -> None:
    """One websocket viewer: for each frame, now minus the newest send time it includes."""
    newest = 0
    async with ws_connect(f"ws://127.0.0.1:{port}/ws", max_size=2**22) as ws:
        async for message in ws:
            frame = orjson.loads(message)
            sent = frame.get("newest_sent_at_us")
            if sent and sent != newest:
                newest = sent
                frames.append((time.time_ns() // 1000 - sent) / 1000)


def _percentiles(samples: list[float]) -> dict | None:
    if not samples:
        return None
    q = [round(float(v), 3) for v in np.percentile(samples, [50, 90, 99, 99.9])]
    return {"count": len(samples), "p50": q[0], "p90": q[1], "p99": q[2], "p999": q[3],
            "max": round(max(samples), 3)}


_last_line = [0.0]


def _progress_bar(elapsed: float, duration: float, published: int, latest: dict) -> None:
    """A bar redrawn in place on a terminal; a line every 5 s into a file or pipe."""
    tty = sys.stderr.isatty()
    if not tty and elapsed - _last_line[0] < 5:
        return
    _last_line[0] = elapsed
    share = min(elapsed / duration, 1.0) if duration else 1.0
    # Producers report every 64 batches, the aggregator every 50 ms: what is aggregated was
    # published, so the published count shown is never below it.
    aggregated = latest.get("orders", 0)
    published = max(published, aggregated)
    rate = published / elapsed if elapsed > 0 else 0
    line = (f"[{'#' * int(share * 30):<30}] {elapsed:5.1f}s  published {published:>13,} "
            f"({rate / 1e6:5.2f}M/s)  aggregated {aggregated:>13,}")
    sys.stderr.write(f"\r{line}" if tty else f"{line}\n")
    sys.stderr.flush()


def _print(r: Report) -> None:
    d = r.as_dict()
    lines = [
        f"source      {_source_line(r.source)}",
        f"published   {r.published_orders:,} orders in {r.published_batches:,} batches, "
        f"{_per_s(d['published_orders_per_s'])} orders/s, {d['batches_per_s']:,.0f} "
        f"batches/s, {d['mb_per_s']:.1f} MB/s (max lateness {r.max_lateness_ms:.0f} ms)",
        f"aggregated  {r.aggregated_orders:,} orders, {_per_s(d['aggregated_orders_per_s'])} "
        f"orders/s; GMV {r.aggregated_gmv_cents:,} of {r.published_gmv_cents:,} cents",
        f"lost        {r.lost_orders:,} orders; double counted {r.double_counted_orders:,}; "
        f"redeliveries dropped {r.duplicates_dropped:,}; gaps {r.gaps:,}",
        f"latency     publish->aggregated {_fmt(r.latency_aggregated_ms)}",
        f"            publish->websocket  {_fmt(r.latency_frame_ms)}",
        "cpu         " + ", ".join(f"{k} {v:.2f}" for k, v in r.cpu_cores.items())
        + " cores",
        "memory      aggregator RSS " + ", ".join(
            f"{k} {v:.0f} MB" for k, v in r.aggregator_rss_mb.items()),
    ]
    print("\n".join(lines), flush=True)


def _per_s(rate: float) -> str:
    """21.33M, or 5,280 below a million (where 0.01M would say little)."""
    return f"{rate / 1e6:.2f}M" if rate >= 1e6 else f"{rate:,.0f}"


def _source_line(source: dict) -> str:
    if source.get("source") == "festival":
        first, last = source["minutes"]
        whole = ", the whole festival" if source["whole_festival"] else ""
        return (f"festival {source['scenario']} generated live at order scale "
                f"{source['order_scale']:.4g} (minutes {first}-{last}{whole}, "
                f"{source['orders_offered']:,} orders, "
                + ("busiest second " if source.get("shape") == "festival" else "offered at ")
                + f"{source['peak_orders_per_s']:,.0f} orders/s)")
    return (f"pool of {source.get('batches')} batches cut from {source.get('scenario')} minute "
            f"{source.get('minute')}, re-stamped")


def _fmt(p: dict | None) -> str:
    if not p:
        return "n/a"
    return (f"p50 {p['p50']:.1f} ms, p90 {p['p90']:.1f}, p99 {p['p99']:.1f}, "
            f"p99.9 {p['p999']:.1f}, max {p['max']:.1f} ({p['count']:,} samples)")
