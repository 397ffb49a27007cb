"""Fault tests: real processes, real signals, exact totals.

`gmv aggregate`, `gmv serve` and `gmv simulate` run as child processes against a Mosquitto
the test starts itself with persistence on (tests/brokers.py), and the faults are real:
SIGKILL / SIGTERM / SIGSTOP of the aggregator, of the broker and of the ticker server, a
viewer that never reads, and hostile input. Every test compares the exact GMV cents, order
and batch counts with what the producer says it published, so "orders lost == 0" and
"orders double counted == 0" are checked, not assumed; where a fault may legitimately lose
messages (a broker killed before it saved them, a full broker queue) the test checks that
every lost order is reported as a gap instead, to the batch and to the cent.

The figures in docs/reliability.md come from these tests: run with `-rP` to see the
`FAULT ...` line each test prints.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiomqtt
import numpy as np
import orjson
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, WebSocketException

from simulator.publisher import publish_scenario
from simulator.scenario import scenario_for_year
from ticker.shell import checkpoint
from ticker.shell.mqtt import BrokerSettings, ReliablePublisher, Topics, connect
from ticker.shell.server import TickerServer
from ticker.core.wire import OrderBatch, encode

from .brokers import MosquittoProcess, database_size, mosquitto_process
from .conftest import festival_limits, free_port, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
GMV = [sys.executable, "-m", "gmv.cli"]
TOTAL = 7_410_000_000_000
LAST_MINUTE = 15_839
# At --order-scale 0.0001 every minute of the 15,840 fits one batch: used only to pick
# "the middle of the replay"; the expected figures always come from the simulator's report.
REPLAY_BATCHES = 15_840
REPLAY = ["--speed", "max", "--order-scale", "0.0001", "--json"]
# Checkpoint every 64 batches (or every second): below the test broker's
# max_inflight_messages (100), as `gmv aggregate --help` asks, and fast enough that a
# full replay is consumed in about the time it takes to publish it.
AGGREGATE = ["--checkpoint-interval", "1", "--max-unacked", "64"]


def fault_report(name: str, **figures) -> None:
    """One greppable line per test with the figures docs/reliability.md quotes."""
    print(f"FAULT {name}: {orjson.dumps(figures).decode()}")


# ---------------------------------------------------------------------------------------------
# processes


class Gmv:
    """One `gmv ...` command as a child process; stdout and stderr go to a log file."""

    def __init__(self, name: str, args: list[str], log: Path) -> None:
        self.name, self.args, self.log = name, args, log
        self._out = open(log, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(GMV + args, cwd=ROOT, stdin=subprocess.DEVNULL,
                                     stdout=self._out, stderr=subprocess.STDOUT,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1"))

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> int:
        """SIGKILL: no final checkpoint, no goodbye to the broker."""
        self.proc.send_signal(signal.SIGKILL)
        return self.proc.wait(10)

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def output(self) -> str:
        self._out.flush()
        return self.log.read_text(errors="replace")

    def tail(self, lines: int = 25) -> str:
        return "\n".join(self.output().splitlines()[-lines:])

    def check_alive(self, during: str) -> None:
        if not self.alive:
            raise AssertionError(f"`gmv {self.name}` exited with code {self.proc.returncode} "
                                 f"during {during}; its output ends with:\n{self.tail()}")

    def close(self) -> None:
        if self.alive:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(10)
        self._out.close()


@pytest.fixture
def spawn(tmp_path: Path):
    """Start `gmv` commands as processes; whatever is still running is killed at the end."""
    started: list[Gmv] = []

    def start(name: str, *args: str) -> Gmv:
        if name == "aggregate":  # the 2020 dimensions, which the checkpoints are loaded with
            args = (*args, "--reference", str(ROOT / "data" / "reference-2020.toml"))
        process = Gmv(name, [name, *args], tmp_path / f"{name}-{len(started)}.log")
        started.append(process)
        return process

    yield start
    for process in started:
        process.close()


@pytest.fixture
def broker(tmp_path: Path):
    """A Mosquitto of this test's own, persistence on, that the test may stop and kill."""
    with mosquitto_process(tmp_path / "broker") as process:
        yield process


@pytest.fixture
def topics() -> Topics:
    return Topics(f"faults/{uuid.uuid4().hex[:12]}")


def broker_args(broker: MosquittoProcess, topics: Topics) -> list[str]:
    return ["--broker", broker.url, "--prefix", topics.prefix]


async def simulate(broker: MosquittoProcess, topics: Topics, producer: str,
                   timeout: float = 120.0) -> dict:
    """`gmv simulate` a full-speed replay as a process; its JSON report."""
    proc = await asyncio.create_subprocess_exec(
        *GMV, "simulate", *broker_args(broker, topics), *REPLAY, "--producer", producer,
        cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode(errors="replace")[-3000:]
    report = orjson.loads(out.splitlines()[-1])
    assert report["gmv_cents"] == TOTAL and report["producer"] == producer
    return report


@contextlib.asynccontextmanager
async def background(coro) -> AsyncIterator[asyncio.Task]:
    """Run `coro` as a task for the duration of the block; cancelled (and awaited) after it."""
    task = asyncio.create_task(coro)
    try:
        yield task
    finally:
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        for _ in range(3):  # let callbacks the task scheduled on its way out run
            await asyncio.sleep(0)


async def until(condition: Callable[[], object], what: str, timeout: float,
                alive: tuple[Gmv, ...] = (), interval: float = 0.05):
    """Poll `condition()` until it is truthy; fail naming `what`, or a process that died."""
    deadline = time.monotonic() + timeout
    while True:
        for process in alive:
            process.check_alive(what)
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(interval)


# ---------------------------------------------------------------------------------------------
# observing the aggregator: its totals topic, followed across broker restarts


def summary(totals: dict | None) -> dict | None:
    keys = ("gmv_cents", "orders", "batches", "duplicates", "gaps", "rejected", "producers")
    return None if totals is None else {key: totals.get(key) for key in keys}


class TotalsWatcher:
    """Follows `{prefix}/totals/0` like the ticker server does, reconnecting when the broker
    goes away. `received` counts messages, so a test can wait for news from a new process."""

    def __init__(self, broker: BrokerSettings, topics: Topics) -> None:
        self.broker, self.topics = broker, topics
        self.latest: dict | None = None
        self.received = 0
        self.history: list[tuple[float, int, int]] = []  # (time, gmv_cents, batches)

    async def run(self) -> None:
        while True:
            client = aiomqtt.Client(self.broker.host, self.broker.port, timeout=5)
            try:
                async with client:
                    await client.subscribe(self.topics.totals("0"), qos=1)
                    async for message in client.messages:
                        totals = orjson.loads(message.payload)
                        self.latest = totals
                        self.received += 1
                        self.history.append((time.monotonic(), totals["gmv_cents"],
                                             totals["batches"]))
            except aiomqtt.MqttError:
                pass
            finally:
                # A connect that failed (or was cancelled) after paho opened its socket leaves
                # the socket and aiomqtt's housekeeping task behind; garbage-collected after
                # the test's event loop is closed, they raise in some later test.
                client._client._reset_sockets()
            await asyncio.sleep(0.1)

    async def wait(self, done: Callable[[dict], bool], what: str, timeout: float = 60.0, *,
                   since: int = 0, alive: tuple[Gmv, ...] = ()) -> dict:
        """The first totals (received after message number `since`) for which `done` holds."""
        try:
            return await until(lambda: self.received > since and self.latest is not None
                               and done(self.latest) and self.latest, what, timeout, alive)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last totals: {summary(self.latest)}") from None


@contextlib.asynccontextmanager
async def watching(broker: MosquittoProcess, topics: Topics) -> AsyncIterator[TotalsWatcher]:
    watcher = TotalsWatcher(broker.settings, topics)
    async with background(watcher.run()):
        yield watcher


async def settled(watcher: TotalsWatcher, report: dict, what: str,
                  alive: tuple[Gmv, ...], timeout: float = 90.0) -> dict:
    """Totals once every published batch is in; then 1.5 s more for any late redelivery
    (which must show up as a duplicate, never in the totals)."""
    await watcher.wait(lambda t: t["batches"] >= report["batches"] and t["gaps"] == 0,
                       what, timeout, alive=alive)
    await asyncio.sleep(1.5)
    assert watcher.latest is not None
    return watcher.latest


def assert_exact(totals: dict, report: dict) -> None:
    """Orders lost == 0 and orders double counted == 0, to the cent and to the batch."""
    lost_or_double = report["orders"] - totals["orders"]
    assert totals["gmv_cents"] == report["gmv_cents"] == TOTAL, \
        f"GMV off by {totals['gmv_cents'] - TOTAL} cents ({lost_or_double} orders): " \
        f"{summary(totals)}"
    assert totals["orders"] == report["orders"], summary(totals)
    # Each applied (producer, seq) is applied once (the watermarks' job); all of 0..N-1 applied
    # and no more applications than batches: each batch exactly once.
    assert totals["batches"] == report["batches"], summary(totals)
    # The replay's own verdict, from the shard's acks, agrees: every seq applied once (and
    # the shard then forgot the finished producer).
    assert totals["producers"] == 0 and report["verdict"]["exact"], report["verdict"]
    if "chatbot_queries" in report and "chatbot_queries" in totals:
        assert totals["chatbot_queries"] == report["chatbot_queries"], "chatbot queries"
    assert totals["gaps"] == 0 and totals["rejected"] == {}, summary(totals)
    assert totals["minute"] == LAST_MINUTE


def aggregate_args(broker: MosquittoProcess, topics: Topics, path: Path) -> list[str]:
    return [*broker_args(broker, topics), "--checkpoint", str(path), *AGGREGATE]


def saved_batches(path: Path) -> int:
    state = checkpoint.load(path, festival_limits())
    return 0 if state is None else state.batches


# ---------------------------------------------------------------------------------------------
# small hand-made batches, for tests that need to know each batch's value


def small_batch(producer: str, seq: int, *, orders: int = 5) -> OrderBatch:
    """A valid batch whose orders and cents depend on `seq` (so mix-ups show)."""
    i = np.arange(orders, dtype=np.int64)
    return OrderBatch(producer, seq, minute=seq % 15_840,
                      amount_cents=(i + 1) * 1_000 + seq, brand=((i * 7 + seq) % 250_000)
                      .astype(np.uint32), country=(i % 12).astype(np.uint8),
                      platform=(i % 3).astype(np.uint8))


async def publish_small(broker: BrokerSettings, topics: Topics, producer: str,
                        seqs: range) -> tuple[int, int]:
    """Publish `small_batch`es reliably (re-sent after a broker restart); (cents, orders)."""
    cents = orders = 0
    async with ReliablePublisher(broker) as publisher:
        for seq in seqs:
            batch = small_batch(producer, seq)
            await publisher.send(topics.orders(producer), encode(batch, binary=seq % 2 == 0))
            cents, orders = cents + batch.gmv_cents, orders + len(batch)
        await publisher.flush()
    return cents, orders


def applied_seqs(path: Path, producer: str) -> set[int]:
    """The seqs a checkpoint's watermarks say were applied (below next_seq, plus the runs)."""
    state = checkpoint.load(path, festival_limits())
    assert state is not None
    p = state.watermarks.get(producer)
    assert p is not None
    return set(range(p.next_seq)).union(*(range(a, b) for a, b in zip(p.starts, p.ends)))


# =============================================================================================
# 1. the aggregator killed mid-replay


@pytest.mark.slow
async def test_aggregator_sigkill_mid_replay_then_restart_is_exact(tmp_path, broker, topics,
                                                                   spawn):
    """kill -9 of `gmv aggregate --checkpoint` mid-replay, restarted on the same checkpoint:
    exact totals."""
    path = tmp_path / "shard0.ckpt"
    args = aggregate_args(broker, topics, path)
    async with watching(broker, topics) as totals:
        aggregator = spawn("aggregate", *args)
        await totals.wait(lambda t: True, "the aggregator's first totals", 20, alive=(aggregator,))
        async with background(simulate(broker, topics, "kill9")) as replay:
            seen = await totals.wait(lambda t: t["batches"] >= 0.3 * REPLAY_BATCHES,
                                     "30% of the replay aggregated", alive=(aggregator,))
            aggregator.kill()
            assert 0 < seen["batches"] < REPLAY_BATCHES, "not in the middle of the replay"
            saved_state = checkpoint.load(path, festival_limits())
            assert saved_state is not None, "no checkpoint before the kill"
            saved = saved_state.batches
            mark = totals.received
            aggregator = spawn("aggregate", *args)
            restored = await totals.wait(lambda t: True, "the restarted aggregator's totals",
                                         20, since=mark, alive=(aggregator,))
            report = await replay
        final = await settled(totals, report, "the replay's last batch", (aggregator,))
    assert f"resuming {saved_state.orders:,} orders" in aggregator.output()
    assert restored["batches"] >= saved
    assert_exact(final, report)
    fault_report("aggregator_sigkill", batches=report["batches"], orders=report["orders"],
                 shown_before_kill=seen["batches"], checkpointed_at_kill=saved,
                 applied_after_restart=final["batches"] - saved,
                 duplicates_dropped=final["duplicates"], lost=0, double_counted=0)


@pytest.mark.slow
async def test_aggregator_sigkilled_three_times_in_one_replay_is_exact(tmp_path, broker, topics,
                                                                       spawn):
    """Three kill -9 / restart cycles of the aggregator during one replay: exact totals."""
    path = tmp_path / "shard0.ckpt"
    args = aggregate_args(broker, topics, path)
    kills = []
    async with watching(broker, topics) as totals:
        aggregator = spawn("aggregate", *args)
        await totals.wait(lambda t: True, "the aggregator's first totals", 20, alive=(aggregator,))
        async with background(simulate(broker, topics, "kill9x3")) as replay:
            mark = 0
            for fraction in (0.2, 0.45, 0.7):
                seen = await totals.wait(
                    lambda t, f=fraction: t["batches"] >= f * REPLAY_BATCHES,
                    f"{fraction:.0%} of the replay aggregated", since=mark, alive=(aggregator,))
                aggregator.kill()
                assert seen["batches"] < REPLAY_BATCHES, "not in the middle of the replay"
                saved = saved_batches(path)
                kills.append({"seen": seen["batches"], "checkpointed": saved})
                mark = totals.received
                aggregator = spawn("aggregate", *args)
            report = await replay
        final = await settled(totals, report, "the replay's last batch", (aggregator,))
    assert_exact(final, report)
    assert [k["checkpointed"] for k in kills] == sorted(k["checkpointed"] for k in kills)
    fault_report("aggregator_sigkill_x3", batches=report["batches"], kills=kills,
                 duplicates_dropped=final["duplicates"], lost=0, double_counted=0)


async def test_aggregator_killed_before_its_first_checkpoint_loses_nothing(tmp_path, broker,
                                                                            topics, spawn):
    """kill -9 of a fresh aggregator before it wrote any checkpoint: its batches are redelivered
    after the restart, not thrown away with the session."""
    path = tmp_path / "shard0.ckpt"
    # Default --max-unacked (16); a long interval so that no checkpoint is due yet.
    args = [*broker_args(broker, topics), "--checkpoint", str(path),
            "--checkpoint-interval", "600"]
    async with watching(broker, topics) as totals:
        aggregator = spawn("aggregate", *args)
        await totals.wait(lambda t: True, "the aggregator's first totals", 20, alive=(aggregator,))
        first = await publish_small(broker.settings, topics, "early", range(10))
        await totals.wait(lambda t: t["batches"] == 10, "10 batches aggregated",
                          alive=(aggregator,))
        aggregator.kill()
        assert saved_batches(path) == 0, "a checkpoint holds batches: the test needs none yet"
        mark = totals.received
        aggregator = spawn("aggregate", *args)
        await totals.wait(lambda t: True, "the restarted aggregator's totals", 20, since=mark,
                          alive=(aggregator,))
        second = await publish_small(broker.settings, topics, "early", range(10, 20))
        await totals.wait(lambda t: t["batches"] + t["gaps"] >= 20,
                          "20 batches applied or missing", 20, since=mark, alive=(aggregator,))
        await asyncio.sleep(1.5)  # a redelivery may still close a gap
        final = totals.latest
    expected_cents, expected_orders = first[0] + second[0], first[1] + second[1]
    assert final["gaps"] == 0, \
        f"{final['gaps']} batches lost: the restart without a checkpoint ended the " \
        f"persistent session (clean_session=True) and the broker dropped the 10 batches it " \
        f"was holding unacknowledged for it; {summary(final)}"
    assert (final["gmv_cents"], final["orders"], final["batches"]) == \
        (expected_cents, expected_orders, 20)


# =============================================================================================
# 2. the broker restarted or killed mid-replay


@pytest.mark.slow
async def test_broker_restart_mid_replay_is_exact(tmp_path, broker, topics, spawn):
    """Mosquitto SIGTERM'd mid-replay (it saves its persistence DB) and started again on the same
    port: producer, aggregator and ticker server reconnect by themselves; exact totals."""
    path = tmp_path / "shard0.ckpt"
    port = free_port()
    async with watching(broker, topics) as totals:
        aggregator = spawn("aggregate", *aggregate_args(broker, topics, path))
        server = spawn("serve", *broker_args(broker, topics), "--port", str(port))
        await asyncio.to_thread(wait_for_port, port)
        await totals.wait(lambda t: True, "the aggregator's first totals", 20, alive=(aggregator,))
        async with background(simulate(broker, topics, "broker-restart")) as replay:
            seen = await totals.wait(lambda t: t["batches"] >= 0.3 * REPLAY_BATCHES,
                                     "30% of the replay aggregated", alive=(aggregator,))
            assert await asyncio.to_thread(broker.stop) == 0
            saved_db = database_size(broker)
            await asyncio.sleep(1.0)
            await asyncio.to_thread(broker.start)
            report = await replay
        final = await settled(totals, report, "the replay's last batch", (aggregator, server))
        shown = await until(lambda: (t := api_totals(port)) and t["gmv_cents"] == TOTAL and t,
                            "the ticker server to show the final total", 15, (server,))
    assert saved_db > 0, "Mosquitto saved no persistence database on SIGTERM"
    assert seen["batches"] < REPLAY_BATCHES, "not in the middle of the replay"
    assert_exact(final, report)
    assert shown["orders"] == report["orders"] and shown["stats"]["gaps"] == 0
    fault_report("broker_sigterm", batches=report["batches"], seen_before_stop=seen["batches"],
                 persistence_db_bytes=saved_db, duplicates_dropped=final["duplicates"],
                 lost=0, double_counted=0)


async def test_broker_sigkill_mid_replay_loss_is_reported_as_gaps(tmp_path, broker, topics,
                                                                  spawn):
    """Mosquitto SIGKILLed while holding batches it had acknowledged but not saved: whatever is
    lost is reported as gaps, exactly, never lost silently; nothing is counted twice."""
    path = tmp_path / "shard0.ckpt"
    producer = "broker-kill"
    async with watching(broker, topics) as totals:
        aggregator = spawn("aggregate", *aggregate_args(broker, topics, path))
        await totals.wait(lambda t: True, "the aggregator's first totals", 20, alive=(aggregator,))
        await publish_small(broker.settings, topics, producer, range(200))
        await totals.wait(lambda t: t["batches"] == 200, "the first 200 batches",
                          alive=(aggregator,))
        # Paused, the aggregator takes no more batches: the broker queues what follows (after
        # the 100 it may have in flight) and acknowledges it to the producer.
        aggregator.pause()
        try:
            await publish_small(broker.settings, topics, producer, range(200, 400))
            assert broker.kill() == -signal.SIGKILL  # autosave_interval 0: nothing was saved
            mark = totals.received
        finally:
            aggregator.resume()
        await asyncio.to_thread(broker.start)
        # The new broker knows no session: what is published before the aggregator has
        # subscribed again goes nowhere (see docs/reliability.md), so wait for it.
        await totals.wait(lambda t: True, "the aggregator back on the new broker", 30,
                          since=mark, alive=(aggregator,))
        await publish_small(broker.settings, topics, producer, range(400, 600))
        final = await totals.wait(lambda t: t["batches"] + t["gaps"] >= 600,
                                  "every batch applied or reported missing", 30,
                                  alive=(aggregator,))
        await until(lambda: saved_batches(path) == final["batches"],
                    "a checkpoint holding the final state", 10, (aggregator,))
    applied = applied_seqs(path, producer)
    missing = set(range(600)) - applied
    batches = {seq: small_batch(producer, seq) for seq in range(600)}
    assert final["gaps"] == len(missing) and final["batches"] == len(applied), summary(final)
    assert final["gmv_cents"] == sum(batches[s].gmv_cents for s in applied), "double counted"
    assert final["orders"] == sum(len(batches[s]) for s in applied)
    assert missing <= set(range(200, 400)), "lost batches the broker had not been holding"
    assert missing, "the kill lost nothing: it did not hit the broker's queue"
    fault_report("broker_sigkill", batches=600, lost_batches=len(missing),
                 lost_orders=sum(len(batches[s]) for s in missing),
                 lost_cents=sum(batches[s].gmv_cents for s in missing),
                 gaps_reported=final["gaps"], silently_lost=0, double_counted=0,
                 duplicates_dropped=final["duplicates"])


async def drained(totals: TotalsWatcher, path: Path, aggregator: Gmv) -> dict:
    """Totals once the aggregator has checkpointed (so acknowledged) all it applied, and
    nothing more arrives for 1.5 s."""
    last = None
    while True:
        latest = await totals.wait(lambda t: t["batches"] > 0 and
                                   saved_batches(path) == t["batches"],
                                   "a checkpoint holding every applied batch", 30,
                                   alive=(aggregator,))
        if last is not None and summary(latest) == summary(last):
            return latest
        last = latest
        await asyncio.sleep(1.5)


async def test_broker_queue_overflow_is_reported_as_gaps(tmp_path, topics, spawn):
    """Beyond max_inflight_messages + max_queued_messages the broker drops a stalled consumer's
    batches (having acknowledged them to the producer): every drop shows as a gap, exactly."""
    producer = "overflow"
    path = tmp_path / "shard0.ckpt"
    with mosquitto_process(tmp_path / "small-broker", max_queued_messages=50,
                           max_inflight_messages=20) as broker:
        async with watching(broker, topics) as totals:
            aggregator = spawn("aggregate", *broker_args(broker, topics), "--checkpoint",
                               str(path), "--checkpoint-interval", "1", "--max-unacked", "16")
            await totals.wait(lambda t: True, "the aggregator's first totals", 20,
                              alive=(aggregator,))
            aggregator.pause()  # stalled, as by a long GC pause or a saturated disk
            try:
                await publish_small(broker.settings, topics, producer, range(300))
            finally:
                aggregator.resume()
            kept = await drained(totals, path, aggregator)
            await publish_small(broker.settings, topics, producer, range(300, 310))
            final = await totals.wait(lambda t: t["batches"] == kept["batches"] + 10,
                                      "the 10 batches after the overflow", 30,
                                      alive=(aggregator,))
            final = await drained(totals, path, aggregator)
    applied = applied_seqs(path, producer)
    missing = set(range(310)) - applied
    batches = {seq: small_batch(producer, seq) for seq in range(310)}
    assert final["gaps"] == len(missing) > 0, summary(final)
    assert final["batches"] == len(applied), summary(final)
    assert final["gmv_cents"] == sum(batches[s].gmv_cents for s in applied)
    assert final["orders"] == sum(len(batches[s]) for s in applied)
    assert set(range(300, 310)) <= applied
    fault_report("broker_queue_overflow", published=310, kept_while_stalled=kept["batches"],
                 lost_batches=len(missing),
                 lost_cents=sum(batches[s].gmv_cents for s in missing),
                 gaps_reported=final["gaps"], silently_lost=0, double_counted=0)


@pytest.mark.slow
async def test_broker_queue_overflow_at_the_end_of_a_replay_is_reported_as_gaps(
        tmp_path, topics, spawn):
    """A producer without flow control (a third party's) outruns an aggregator stalled through
    the end of its stream, behind Mosquitto's default queue (1000): the batches the broker
    dropped must still show as gaps."""
    producer = "tail"
    path = tmp_path / "shard0.ckpt"
    with mosquitto_process(tmp_path / "default-queue-broker", max_queued_messages=1000,
                           max_inflight_messages=20) as broker:
        async with watching(broker, topics) as totals:
            aggregator = spawn("aggregate", *broker_args(broker, topics), "--checkpoint",
                               str(path), "--checkpoint-interval", "1", "--max-unacked", "16")
            await totals.wait(lambda t: True, "the aggregator's first totals", 20,
                              alive=(aggregator,))
            aggregator.pause()
            try:
                async with ReliablePublisher(broker.settings) as publisher:
                    report = dataclasses.asdict(await publish_scenario(
                        publisher, scenario_for_year(2020, order_scale=0.0001), topics,
                        producer=producer, speed=None))
            finally:
                aggregator.resume()
            # The retained announcement comes back at the aggregator's next re-subscription
            # (every 5 s) once the backlog is through; on a slow machine the totals can stand
            # still longer than `drained` waits before that, so wait for every batch to be
            # applied or a gap (it never comes if the loss is silent).
            await totals.wait(lambda t: t["batches"] + t["gaps"] >= report["batches"],
                              f"{report['batches']} batches applied or reported as gaps "
                              "(a silent loss: the closing announcement dropped with the "
                              "tail, and never read again)", 60, alive=(aggregator,))
            final = await drained(totals, path, aggregator)
    applied = applied_seqs(path, producer)
    lost = report["batches"] - len(applied)
    assert 0 < len(applied) < report["batches"]
    assert final["gmv_cents"] < TOTAL and final["orders"] < report["orders"]
    assert final["gaps"] >= lost, \
        f"{lost} of {report['batches']} batches were dropped by the broker, the totals " \
        f"report {final['gaps']} gaps: the loss is silent; {summary(final)}"


# =============================================================================================
# 3. the ticker server killed and restarted


def api_totals(port: int) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/totals", timeout=2) as r:
            return orjson.loads(r.read())
    except OSError:
        return None


class Follower:
    """A websocket viewer that reconnects like the page does; `view` is its current state,
    rebuilt from the snapshot of each new connection."""

    def __init__(self, port: int) -> None:
        self.url = f"ws://127.0.0.1:{port}/ws"
        self.view: dict = {}
        self.connects = 0
        self.connected = False
        self.snapshots: list[int] = []  # gmv_cents of every snapshot received
        self.bad_updates = 0

    async def run(self) -> None:
        while True:
            try:
                async with ws_connect(self.url, open_timeout=2, max_size=None) as ws:
                    self.connects += 1
                    self.view = {}
                    self.connected = True
                    async for frame in ws:
                        message = orjson.loads(frame)
                        if message["type"] == "snapshot":
                            self.view = message
                            self.snapshots.append(message["gmv_cents"])
                        elif message["type"] == "update":
                            if not self.view or message["seq"] != self.view["seq"] + 1:
                                self.bad_updates += 1
                                continue
                            self.view = {**self.view, **message}
            except (OSError, TimeoutError, WebSocketException):
                pass
            self.connected = False
            await asyncio.sleep(0.1)

    def shows(self, report: dict, connects: int) -> bool:
        return self.connects >= connects and self.view.get("gmv_cents") == TOTAL \
            and self.view.get("orders") == report["orders"] \
            and self.view.get("minute") == LAST_MINUTE


async def test_ticker_server_killed_and_restarted_viewers_reconnect_to_exact_totals(
        broker, topics, spawn):
    """`gmv serve` kill -9'd mid-replay and again after it, restarted on the same port each
    time: every websocket viewer reconnects and shows the exact final totals."""
    port = free_port()
    aggregator = spawn("aggregate", *broker_args(broker, topics))
    server = spawn("serve", *broker_args(broker, topics), "--port", str(port))
    await asyncio.to_thread(wait_for_port, port)
    followers = [Follower(port) for _ in range(4)]
    async with contextlib.AsyncExitStack() as stack:
        for follower in followers:
            await stack.enter_async_context(background(follower.run()))
        await until(lambda: all(f.view for f in followers), "every viewer's snapshot", 10)
        await asyncio.sleep(0.5)  # the aggregator subscribes before the replay starts
        async with background(simulate(broker, topics, "server-kill")) as replay:
            mid = await until(lambda: (t := api_totals(port)) and
                              0.2 * TOTAL < t["gmv_cents"] < TOTAL and t,
                              "the ticker to show part of the total", 60,
                              (aggregator, server))
            server.kill()
            await until(lambda: not any(f.connected for f in followers),
                        "every viewer to notice", 10)
            server = spawn("serve", *broker_args(broker, topics), "--port", str(port))
            report = await replay
        await until(lambda: all(f.shows(report, 2) for f in followers),
                    "every viewer to show the final total after the first restart", 30,
                    (aggregator, server))
        server.kill()  # and once more after the replay: the final total must come back
        await until(lambda: not any(f.connected for f in followers), "every viewer to notice", 10)
        server = spawn("serve", *broker_args(broker, topics), "--port", str(port))
        await until(lambda: all(f.shows(report, 3) for f in followers),
                    "every viewer to show the final total after the second restart", 30,
                    (aggregator, server))
    for follower in followers:
        assert follower.view["stats"]["batches"] == report["batches"]
        assert follower.view["stats"]["gaps"] == 0 and follower.bad_updates == 0
    fault_report("server_sigkill", viewers=len(followers), shown_at_kill=mid["gmv_cents"],
                 connects=[f.connects for f in followers],
                 snapshots_below_previous=sum(
                     1 for f in followers for a, b in zip(f.snapshots, f.snapshots[1:]) if b < a),
                 lost=0, double_counted=0)


# =============================================================================================
# 3b and 6: the page in a real Chromium


@pytest.fixture
async def page():
    playwright = pytest.importorskip("playwright.async_api")
    from .test_browser import CHROMIUM, FLAGS
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/test, which installs chromium")
    async with playwright.async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = await browser.new_page(viewport={"width": 1920, "height": 1080})
        errors: list[str] = []
        loads: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text)
                if m.type == "error" and "WebSocket connection" not in m.text else None)
        page.on("load", lambda _: loads.append(page.url))
        page.loads = loads
        yield page
        await browser.close()
        assert errors == []


@pytest.mark.slow
@pytest.mark.browser
async def test_page_survives_a_ticker_server_restart_without_reload(broker, topics, spawn,
                                                                     page):
    """The page says `reconnecting` while `gmv serve` is down, then `live` with the exact final
    total ($74,100,000,000.00) after it restarts on the same port, without a reload."""
    from playwright.async_api import expect
    port = free_port()
    aggregator = spawn("aggregate", *broker_args(broker, topics))
    server = spawn("serve", *broker_args(broker, topics), "--port", str(port))
    await asyncio.to_thread(wait_for_port, port)
    await page.goto(f"http://127.0.0.1:{port}/")
    status, gmv = page.locator("#status"), page.locator("#gmv")
    await expect(status).to_have_attribute("data-state", "live", timeout=10_000)
    await asyncio.sleep(0.5)
    async with background(simulate(broker, topics, "page-restart")) as replay:
        await until(lambda: (t := api_totals(port)) and 0.2 * TOTAL < t["gmv_cents"] < TOTAL,
                    "part of the total", 60, (aggregator, server))
        server.kill()
        await expect(status).to_have_attribute("data-state", "reconnecting", timeout=10_000)
        shown_while_down = int(await gmv.get_attribute("data-cents"))
        await asyncio.sleep(1.0)
        server = spawn("serve", *broker_args(broker, topics), "--port", str(port))
        report = await replay
    await expect(status).to_have_attribute("data-state", "live", timeout=15_000)
    await expect(gmv).to_have_attribute("data-cents", str(TOTAL), timeout=20_000)
    await expect(gmv).to_have_text("$74,100,000,000.00", timeout=5_000)
    await expect(page.locator("#orders")).to_have_text(f"{report['orders']:,}")
    assert page.loads == [f"http://127.0.0.1:{port}/"], "the page was reloaded"
    assert 0 < shown_while_down < TOTAL
    fault_report("page_server_restart", shown_while_down=shown_while_down,
                 final=TOTAL, reloads=len(page.loads) - 1)


@pytest.mark.slow
@pytest.mark.browser
async def test_page_turns_stale_without_aggregator_and_live_when_it_returns(
        tmp_path, broker, topics, spawn, page):
    """With the aggregator killed and the server up, the page turns `stale` within 10 s, and
    `live` with the exact total (batches queued meanwhile included) once it is back."""
    from playwright.async_api import expect
    path = tmp_path / "shard0.ckpt"
    args = [*broker_args(broker, topics), "--checkpoint", str(path)]
    port = free_port()
    aggregator = spawn("aggregate", *args)
    server = spawn("serve", *broker_args(broker, topics), "--port", str(port))
    await asyncio.to_thread(wait_for_port, port)
    await page.goto(f"http://127.0.0.1:{port}/")
    status, gmv = page.locator("#status"), page.locator("#gmv")
    await asyncio.sleep(0.5)
    before = await publish_small(broker.settings, topics, "stale", range(20))
    await expect(gmv).to_have_attribute("data-cents", str(before[0]), timeout=10_000)
    await expect(status).to_have_attribute("data-state", "live")
    aggregator.kill()
    killed = time.monotonic()
    await expect(status).to_have_attribute("data-state", "stale", timeout=10_000)
    stale_after = time.monotonic() - killed
    during = await publish_small(broker.settings, topics, "stale", range(20, 30))
    await asyncio.sleep(1.0)
    assert await status.get_attribute("data-state") == "stale"
    assert await gmv.get_attribute("data-cents") == str(before[0])
    aggregator = spawn("aggregate", *args)
    restarted = time.monotonic()
    await expect(status).to_have_attribute("data-state", "live", timeout=10_000)
    live_after = time.monotonic() - restarted
    await expect(gmv).to_have_attribute("data-cents", str(before[0] + during[0]), timeout=10_000)
    totals = api_totals(port)
    assert totals["orders"] == before[1] + during[1] and totals["stats"]["batches"] == 30
    assert totals["stats"]["gaps"] == 0
    server.check_alive("the test")
    fault_report("aggregator_down_stale", stale_after_s=round(stale_after, 1),
                 live_after_restart_s=round(live_after, 1), lost=0, double_counted=0)


# =============================================================================================
# 3c. what a restarted server tells viewers before it has heard from an aggregator


@pytest.mark.slow
async def test_restarted_server_does_not_report_a_dead_aggregator_as_fresh(tmp_path, broker,
                                                                          topics, spawn):
    """A `gmv serve` restarted while the aggregator is down must not call the upstream fresh:
    the retained totals it finds are old, so heartbeats say unknown (null) or more than 5 s."""
    port = free_port()
    aggregator = spawn("aggregate", *broker_args(broker, topics))
    server = spawn("serve", *broker_args(broker, topics), "--port", str(port))
    await asyncio.to_thread(wait_for_port, port)
    await asyncio.sleep(0.5)
    await publish_small(broker.settings, topics, "fresh", range(5))
    await until(lambda: (t := api_totals(port)) and t["stats"]["batches"] == 5, "5 batches", 10,
                (aggregator, server))
    aggregator.kill()
    await asyncio.sleep(6.0)  # the aggregator has now been silent for more than 5 s
    server.kill()
    server = spawn("serve", *broker_args(broker, topics), "--port", str(port))
    await asyncio.to_thread(wait_for_port, port)
    ages = []
    async with asyncio.timeout(10), ws_connect(f"ws://127.0.0.1:{port}/ws") as ws:
        while len(ages) < 2:
            message = orjson.loads(await ws.recv())
            if message["type"] == "heartbeat":
                ages.append(message["upstream_age_ms"])
    assert all(age is None or age > 5_000 for age in ages), \
        f"heartbeats say upstream_age_ms={ages} although no aggregator has published for " \
        f"over 6 s: the server counts the age from its own start and from the broker's " \
        f"retained (old) totals message, so the page shows `live`"


@pytest.mark.slow
async def test_restarted_server_never_serves_an_empty_snapshot_when_totals_exist(broker, topics,
                                                                                spawn):
    """A viewer reconnecting to a just-restarted `gmv serve` gets the current totals, never an
    empty $0.00 snapshot from before the server has read the retained totals."""
    port = free_port()
    aggregator = spawn("aggregate", *broker_args(broker, topics))
    server = spawn("serve", *broker_args(broker, topics), "--port", str(port))
    await asyncio.to_thread(wait_for_port, port)
    await asyncio.sleep(0.5)
    cents, _ = await publish_small(broker.settings, topics, "empty", range(5))
    await until(lambda: (t := api_totals(port)) and t["gmv_cents"] == cents, "the totals", 10,
                (aggregator, server))
    firsts = []
    for _ in range(8):  # a race (about 4 restarts in 10 lose it here): try several times
        server.kill()
        server = spawn("serve", *broker_args(broker, topics), "--port", str(port))
        first = None
        async with asyncio.timeout(20):
            while first is None:  # as eager as a wall of screens retrying after a restart
                try:
                    async with ws_connect(f"ws://127.0.0.1:{port}/ws", open_timeout=2) as ws:
                        first = orjson.loads(await ws.recv())
                except (OSError, WebSocketException):
                    await asyncio.sleep(0.005)
        firsts.append(first["gmv_cents"])
    assert firsts == [cents] * len(firsts), \
        f"first snapshots after restarts showed {firsts} cents, the total is {cents}: the " \
        f"server accepts viewers before it has received the retained totals"


# =============================================================================================
# 4. a viewer that stops reading


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def kernel_send_queue(sock) -> int:
    """Bytes written to a socket that the peer has not acknowledged (Linux SIOCOUTQ)."""
    import fcntl
    import struct
    import termios
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]


def stuck_viewer(port: int) -> socket.socket:
    """A raw client that completes the websocket handshake, then never reads again."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: small window
    sock.settimeout(5)
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                 b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                 b"Sec-WebSocket-Version: 13\r\n\r\n")
    response = b""
    while b"\r\n\r\n" not in response:
        response += sock.recv(1)  # byte by byte: read nothing past the handshake
    assert response.startswith(b"HTTP/1.1 101"), response
    return sock


async def test_stuck_viewer_neither_slows_others_nor_grows_memory():
    """A viewer that never reads costs a bounded write buffer, and the other viewers still get
    every version at the full push rate."""
    server = TickerServer(push_hz=20)
    ws_server = await server.serve("127.0.0.1", 0)
    port = ws_server.sockets[0].getsockname()[1]
    padding = "x" * 1_000_000

    async def feed() -> None:
        gmv = 0
        while True:  # a changing totals message every 50 ms; every frame is over 1 MB
            gmv += 100
            window = {"start": "2020-11-01T00:00:00+08:00", "minutes": 15840,
                      "label": f"{gmv} {padding}"}
            server.receive_totals({"v": 1, "shard": "0", "window": window, "minute": 1,
                                   "gmv_cents": gmv, "orders": gmv // 100})
            await asyncio.sleep(0.05)

    received: list[tuple[float, dict]] = []

    async def good_viewer() -> None:
        async with ws_connect(f"ws://127.0.0.1:{port}/ws", max_size=None) as ws:
            async for frame in ws:
                message = orjson.loads(frame)
                if message["type"] != "heartbeat":  # keep no 1 MB frame: RSS is measured
                    received.append((time.monotonic(), {"type": message["type"],
                                                        "seq": message["seq"]}))

    async with background(server.run_pusher()), background(feed()):
        await asyncio.sleep(0.3)
        sock = await asyncio.to_thread(stuck_viewer, port)
        try:
            async with background(good_viewer()):
                await until(lambda: received, "the good viewer's snapshot", 5)
                await asyncio.sleep(1.0)  # the stuck viewer's buffers fill up
                mine = sock.getsockname()
                stuck = next(c for c in ws_server.connections if c.remote_address[1] == mine[1])
                kernel = stuck.transport.get_extra_info("socket")
                rss0, seq0, t0 = rss_bytes(), server.feed.seq, time.monotonic()
                first = len(received)
                buffered, queued = [], []
                for _ in range(50):  # 5 s
                    buffered.append(stuck.transport.get_write_buffer_size())
                    queued.append(kernel_send_queue(kernel))
                    await asyncio.sleep(0.1)
                rss1, seq1, t1 = rss_bytes(), server.feed.seq, time.monotonic()
                window_frames = [m for when, m in received[first:] if when <= t1]
        finally:
            sock.close()
    ws_server.close()
    await ws_server.wait_closed()
    versions = seq1 - seq0
    frame = len(server.feed.snapshot_frame)
    rate = len(window_frames) / (t1 - t0)
    assert versions >= 80, f"only {versions} versions in 5 s: the test's feed is too slow"
    assert all(m["type"] == "update" for m in window_frames), "the good viewer fell behind"
    assert [m["seq"] for m in window_frames] == \
        list(range(window_frames[0]["seq"], window_frames[0]["seq"] + len(window_frames)))
    assert len(window_frames) >= versions - 2 and rate >= 16, (len(window_frames), versions)
    # The stuck viewer's sender is parked in one `send`: at most one frame (plus the 32 KiB
    # high-water mark) waits in user space, the rest sits in the kernel's socket buffer
    # (bounded by net.ipv4.tcp_wmem), and neither grows while versions go by.
    assert 0 < max(buffered) <= frame + 64 * 1024, f"write buffer {max(buffered)} bytes"
    assert (buffered[-1], queued[-1]) == (buffered[10], queued[10]), "stuck buffers grew"
    published = versions * frame
    # A queue per viewer would grow by `published` (~100 MB); allocator noise is a few MB.
    assert rss1 - rss0 < 40 * 2**20, f"RSS grew {rss1 - rss0} bytes over {published} published"
    fault_report("stuck_viewer", versions=versions, good_viewer_updates_per_s=round(rate, 1),
                 frame_bytes=frame, stuck_user_buffer_max=max(buffered),
                 stuck_kernel_queue_max=max(queued), bytes_published_per_viewer=published,
                 rss_growth_bytes=rss1 - rss0)


# =============================================================================================
# 5. hostile input


def json_batch(**fields) -> bytes:
    doc = {"v": 1, "producer": "bad", "seq": 0, "minute": 0, "amount_cents": [100, 200],
           "brand": [1, 2], "country": [0, 1], "platform": [0, 1], **fields}
    return orjson.dumps(doc)


def bad_inputs() -> list[tuple[str, str, bytes]]:
    """(what, expected reason, payload) for each kind of bad batch."""
    limits = festival_limits()
    rng = np.random.default_rng(7)
    noise = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
    noise = b"\x00" + noise  # not "{", not the binary magic
    valid_binary = encode(small_batch("bad", 0))
    return [
        ("malformed JSON", "bad_json", b'{"v":1,"producer":"bad","seq":0,"minute":'),
        ("wrong types: string amounts", "bad_type", json_batch(amount_cents=["100", "200"])),
        ("wrong types: float amounts", "bad_type", json_batch(amount_cents=[1.5, 2.0])),
        ("wrong types: seq is a string", "bad_type", json_batch(seq="1")),
        ("negative amount", "bad_amount", json_batch(amount_cents=[100, -5])),
        ("absurd amount", "bad_amount",
         json_batch(amount_cents=[100, limits.max_order_cents + 1])),
        ("unknown brand id", "unknown_id", json_batch(brand=[1, limits.n_brands])),
        ("unknown country id", "unknown_id", json_batch(country=[0, 200])),
        ("unequal columns", "unequal_columns", json_batch(brand=[1, 2, 3])),
        ("NaN", "bad_json", json_batch().replace(b"[100,200]", b"[NaN,200]")),
        ("Infinity", "bad_json", json_batch().replace(b"[100,200]", b"[100,Infinity]")),
        ("random bytes", "unknown_encoding", noise),
        ("binary header, random body", "bad_length", valid_binary[:-3] + noise[:1]),
        ("truncated binary", "truncated", valid_binary[:10]),
        ("oversized payload", "oversized", b"{" + b" " * limits.max_payload_bytes + b"}"),
    ]


async def test_bad_batches_are_rejected_whole_counted_and_dead_lettered(broker, topics, spawn):
    """Each kind of bad batch, interleaved with valid ones over a real broker, is rejected whole,
    counted by reason and republished on {prefix}/rejected/{reason}; the totals are exactly the
    valid batches; and websocket junk from a viewer changes nothing."""
    port = free_port()
    aggregator = spawn("aggregate", *broker_args(broker, topics))
    server = spawn("serve", *broker_args(broker, topics), "--port", str(port))
    await asyncio.to_thread(wait_for_port, port)
    bad = bad_inputs()
    valid = [small_batch("good", seq) for seq in range(len(bad) + 1)]
    dead: list[tuple[str, bytes]] = []
    async with connect(broker.settings) as listener, connect(broker.settings) as producer:
        await listener.subscribe(topics.rejected("+"), qos=1)

        async def collect() -> None:
            async for message in listener.messages:
                dead.append((str(message.topic), message.payload))

        async with background(collect()):
            await asyncio.sleep(0.5)  # the aggregator has subscribed
            for i, (_what, _reason, payload) in enumerate(bad):
                # A valid batch, then a bad one that claims the *next* valid batch's seq.
                await producer.publish(topics.orders("good"),
                                       encode(valid[i], binary=i % 2 == 0), qos=1)
                if payload.startswith(b"{") and b'"producer":"bad"' in payload:
                    payload = payload.replace(b'"producer":"bad","seq":0',
                                              f'"producer":"good","seq":{i + 1}'.encode())
                    bad[i] = (bad[i][0], bad[i][1], payload)
                await producer.publish(topics.orders("good"), payload, qos=1, timeout=60)
            await producer.publish(topics.orders("good"), encode(valid[-1]), qos=1)
            await until(lambda: len(dead) >= len(bad), "every dead letter", 60, (aggregator,))
        expected_reasons: dict[str, int] = {}
        for _what, reason, _payload in bad:
            expected_reasons[reason] = expected_reasons.get(reason, 0) + 1
        cents = sum(b.gmv_cents for b in valid)
        orders = sum(len(b) for b in valid)
        shown = await until(lambda: (t := api_totals(port)) and
                            t["stats"]["batches"] == len(valid) and
                            t["stats"]["rejected"] == len(bad) and t,
                            "the totals of the valid batches", 30, (aggregator, server))
        async with watching(broker, topics) as totals:
            latest = await totals.wait(lambda t: True, "the aggregator's totals", 10)

        # A viewer sending junk, a fake snapshot and then an oversized frame changes nothing.
        async with ws_connect(f"ws://127.0.0.1:{port}/ws") as junk, \
                ws_connect(f"ws://127.0.0.1:{port}/ws") as witness:
            before = orjson.loads(await witness.recv())
            await junk.send("not json")
            await junk.send(b"\x00\xff binary junk")
            await junk.send(orjson.dumps({"type": "snapshot", "seq": 10**6, "gmv_cents": 1}))
            await junk.send(orjson.dumps({"type": "update", "gmv_cents": 0}).decode())
            await junk.send("x" * 65_536)
            with pytest.raises(ConnectionClosed) as closed:
                async with asyncio.timeout(5):
                    while True:
                        await junk.recv()
            await asyncio.sleep(0.5)
            after = api_totals(port)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.5):
                    while True:  # the witness gets heartbeats, no changed totals
                        message = orjson.loads(await witness.recv())
                        assert message["type"] == "heartbeat", message
    assert sorted(topic for topic, _ in dead) == \
        sorted(topics.rejected(reason) for _w, reason, _p in bad)
    # Each dead letter names its reason and carries the payload's size and head, never more
    # than 512 bytes of it (the 14 MB one included).
    letters = [orjson.loads(payload) for _topic, payload in dead]
    for what, reason, payload in bad:
        head = payload[:512].decode("utf-8", "backslashreplace")
        assert any((d["reason"], d["size"], d["head"]) == (reason, len(payload), head)
                   for d in letters), what
    assert max(len(payload) for _topic, payload in dead) < 2048
    assert latest["rejected"] == expected_reasons
    assert (latest["gmv_cents"], latest["orders"], latest["batches"]) == \
        (cents, orders, len(valid))
    assert latest["producers"] == 1 and latest["gaps"] == 0
    assert (shown["gmv_cents"], shown["orders"]) == (cents, orders)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    assert after == shown and before["gmv_cents"] == cents
    fault_report("bad_input", kinds=len(bad), reasons=expected_reasons,
                 valid_batches=len(valid), dead_letters=len(dead), lost=0, double_counted=0)
