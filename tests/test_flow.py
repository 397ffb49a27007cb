"""Flow control: the pure ack window fed literal messages, then whole replays through a stock
Mosquitto (no config file), where a producer that outruns its consumer loses batches."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import time

import orjson
import pytest

from simulator.flow import AckWindow, Verdict
from simulator.publisher import ScenarioSource
from simulator.recording import ORDERS, RecordingWriter
from simulator.scenario import scenario_for_year
from ticker.shell.mqtt import Topics, connect
from ticker.core.wire import ChatbotCount, encode

from .brokers import stock_mosquitto
from .conftest import free_port
from .test_cli import GMV, TOTAL, wait_totals

T = Topics("gmv/v1")


def ack(shard: str, next_seq: int, *, orders: int = 0, cents: int = 0, resets: int = 0,
        max_seen: int | None = None, state: str = "s1") -> tuple[str, bytes]:
    doc = {"v": 1, "shard": shard, "producer": "me", "next_seq": next_seq,
           "max_seen": next_seq - 1 if max_seen is None else max_seen, "gaps": 0,
           "orders": orders, "gmv_cents": cents, "chatbot_queries": 0, "resets": resets,
           "state": state}
    return T.acks(shard, "me"), orjson.dumps(doc)


def totals(state: str = "s1") -> bytes:
    return orjson.dumps({"v": 1, "shard": "0", "state": state})


def window(size: int = 10) -> AckWindow:
    return AckWindow(T, "me", size)


def test_no_running_aggregator_means_no_room():
    """Nothing is published until a shard is known: a broker keeps nothing for no one."""
    acks = window()
    assert acks.applied(0.0) is None and not acks.room(0, 0.0)
    acks.receive(T.totals("0"), b"{}", True, 0.0)  # a retained copy may be a dead shard's
    assert not acks.room(0, 0.0)
    acks.receive(T.totals("0"), b"{}", False, 1.0)
    assert acks.room(0, 1.0) and acks.room(9, 1.0) and not acks.room(10, 1.0)


def test_the_window_follows_the_slowest_shard_and_a_shard_that_acked_is_waited_for():
    """Room is counted from the lowest next_seq; a silent shard that acked us still counts."""
    acks = window()
    for shard, seq in (("0", 50), ("1", 20)):
        acks.receive(*ack(shard, seq), False, 0.0)
    assert acks.applied(0.0) == 20 and acks.room(29, 0.0) and not acks.room(30, 0.0)
    assert acks.applied(100.0) == 20  # silent for 100 s: its session may hold our batches


def test_a_running_shard_that_has_not_acked_yet_holds_the_window_at_the_start():
    """A live shard without an ack for us counts as having applied nothing of this pass."""
    acks = window()
    acks.receive(*ack("0", 30), True, 0.0)
    acks.receive(T.totals("1"), b"{}", False, 0.0)
    acks.begin()
    assert acks.start_seqs == [30] and acks.applied(0.0) == 30
    acks.receive(T.totals("2"), b"{}", False, 5.0)
    assert acks.shards(5.0) == {"0", "1", "2"} and acks.shards(20.0) == {"0"}


def test_a_known_producer_continues_its_sequence_and_is_judged_on_this_pass_only():
    """begin() starts past the highest seq any shard saw; the verdict subtracts what was there."""
    acks = window()
    acks.receive(*ack("0", 100, orders=40, cents=4000, max_seen=104), True, 0.0)
    acks.begin()
    assert acks.start_seqs == [105] and acks.baseline == (40, 4000)
    acks.receive(*ack("0", 110, orders=45, cents=4500, max_seen=109), False, 1.0)
    verdict = acks.verdict([110], 5, 500, 1.0)
    assert verdict.exact and (verdict.applied_orders, verdict.applied_cents) == (5, 500)


def test_verdict_lines_say_exact_or_why_not():
    """One line with both sides; MISMATCH names what is missing."""
    exact = Verdict("me", 3, 12345, 3, 12345, 0, 1)
    assert exact.line() == ("verdict: exact: published 3 orders, $123.45; aggregators applied "
                            "3 orders, $123.45")
    assert Verdict("me", 3, 12345, 1, 45, 2, 1).line().startswith(
        "verdict: MISMATCH (2 messages not applied)")
    assert "no aggregator acknowledged" in Verdict("me", 3, 5, 0, 0, 3, 0).line()
    assert not Verdict("me", 3, 5, 3, 6, 0, 1).exact


def test_a_shard_running_another_state_than_it_acked_us_from_has_forgotten_us():
    """A shard in memory that restarted shows a new state id in its totals: what it applied of
    ours in this run is gone, and the pass cannot be exact."""
    acks = window()
    acks.receive(*ack("0", 500, state="s1"), False, 0.0)
    acks.receive(T.totals("0"), totals("s1"), False, 0.5)
    assert acks.forgot == set()
    acks.receive(T.totals("0"), totals("s2"), False, 1.0)
    assert acks.forgot == {"0"}


def test_a_retained_ack_from_an_older_state_is_dropped_not_a_failure():
    """Before this run, a shard that started over simply does not know us any more."""
    acks = window()
    acks.receive(*ack("0", 500, state="old"), True, 0.0)
    acks.receive(T.totals("0"), totals("new"), False, 0.5)
    acks.begin()
    assert acks.forgot == set() and acks.acks == {} and acks.start_seqs == [0]


@pytest.mark.parametrize("payload", [b"", b"[]", b"{}", b'{"next_seq": "9"}', b"\xff",
                                     orjson.dumps({"next_seq": 2**60})])
def test_malformed_acks_are_ignored(payload):
    """Anything on an ack topic that is not a well-formed ack changes nothing."""
    acks = window()
    acks.receive(T.acks("0", "me"), payload, False, 0.0)
    acks.receive(T.acks("0", "other"), ack("0", 5)[1], False, 0.0)  # someone else's
    assert acks.acks == {}


# --- whole replays through a stock Mosquitto ------------------------------------------------

def run(*argv: str, timeout: float = 120, **options) -> subprocess.CompletedProcess:
    return subprocess.run(GMV + list(argv), capture_output=True, text=True, timeout=timeout,
                          **options)


@pytest.mark.slow
def test_max_speed_demo_on_a_stock_mosquitto_ends_exact():
    """The field report: `gmv demo --speed max --broker` on `mosquitto -p PORT` showed $21.79B
    with 14,044 gaps after saying $74.1B; now the screen lands on the total, to the cent."""
    with stock_mosquitto() as broker:
        port = free_port()
        demo = subprocess.Popen(GMV + ["demo", "--speed", "max", "--broker", broker.url,
                                       "--port", str(port)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            lines = [demo.stdout.readline() for _ in range(3)]
            shown = wait_totals(port, lambda t: t["gmv_cents"] == TOTAL, timeout=5)
        finally:
            demo.send_signal(signal.SIGINT)
            demo.communicate(timeout=15)
    assert re.search(r"verdict: exact: published 2,310,099 orders, \$74,100,000,000\.00; "
                     r"aggregators applied 2,310,099 orders, \$74,100,000,000\.00", lines[2])
    assert shown["gmv_cents"] == TOTAL and shown["stats"]["gaps"] == 0
    assert demo.returncode == 0


@pytest.mark.slow
def test_max_speed_replay_of_a_recording_on_a_stock_mosquitto_ends_exact(tmp_path):
    """The field report: `gmv replay stream.gmvrec --broker ... --speed max` exited 0 over a
    screen at $53.13B; now the aggregator applies every batch and the verdict says so."""
    scenario = scenario_for_year(2020, order_scale=0.0001)
    source, recording = ScenarioSource(scenario), tmp_path / "stream.gmvrec"
    with open(recording, "wb") as file:
        writer = RecordingWriter(file, scenario.window, scenario.n_brands)
        seq = 0
        for minute in range(scenario.window.minutes):
            for message in source.messages(minute):
                if not isinstance(message, ChatbotCount):
                    writer.write(ORDERS, encode(message.__class__(
                        "rec", seq, minute, message.amount_cents, message.brand,
                        message.country, message.platform)))
                    seq += 1
    with stock_mosquitto() as broker:
        port = free_port()
        aggregator = subprocess.Popen(GMV + ["aggregate", "--broker", broker.url])
        server = subprocess.Popen(GMV + ["serve", "--broker", broker.url, "--port", str(port)])
        try:
            done = run("replay", str(recording), "--broker", broker.url, "--speed", "max",
                       "--json")
            shown = wait_totals(port, lambda t: t["gmv_cents"] >= TOTAL, timeout=30)
        finally:
            for proc in (aggregator, server):
                proc.terminate()
                proc.wait(10)
    report = orjson.loads(done.stdout)
    assert done.returncode == 0, done.stderr
    assert report["verdict"]["exact"] and report["gmv_cents"] == TOTAL == writer.gmv_cents
    assert shown["gmv_cents"] == TOTAL and shown["stats"]["gaps"] == 0


async def test_without_an_aggregator_a_replay_says_so_once_and_publishes_nothing():
    """MQTT keeps nothing for a subscriber that does not exist: the replay waits for one, says
    so in one line, and goes on exact once `gmv aggregate` starts."""
    with stock_mosquitto() as broker:
        topics, heard = Topics("gmv/v1"), []
        async with connect(broker) as spy:
            await spy.subscribe(f"{topics.prefix}/orders/#", qos=1)
            sim = await asyncio.create_subprocess_exec(
                *GMV, "simulate", "--broker", broker.url, "--scenario", "2019",
                "--order-scale", "0.0001", "--json", stdout=subprocess.PIPE,
                stderr=subprocess.PIPE)
            try:
                async with asyncio.timeout(7):
                    async for message in spy.messages:
                        heard.append(message)
            except TimeoutError:
                pass
            aggregator = subprocess.Popen(GMV + ["aggregate", "--broker", broker.url,
                                                 "--scenario", "2019", "--no-checkpoint"])
            try:
                out, err = await asyncio.wait_for(sim.communicate(), 60)
            finally:
                aggregator.terminate()
                aggregator.wait(10)
    assert heard == []
    waits = [line for line in err.decode().splitlines() if "waiting" in line]
    assert waits == [f"gmv: waiting for an aggregator on gmv/v1 (start `gmv aggregate --broker "
                     f"{broker.url}`): nothing is published until one runs"]
    assert sim.returncode == 0 and orjson.loads(out)["verdict"]["exact"]


@pytest.mark.slow
def test_a_replay_whose_aggregator_loses_its_state_exits_1_with_the_verdict():
    """An in-memory aggregator restarted mid-replay forgets what it applied: the replay stops
    with a MISMATCH verdict and exit 1, instead of reporting the published total as done."""
    with stock_mosquitto() as broker:
        memory = GMV + ["aggregate", "--broker", broker.url, "--no-checkpoint"]
        aggregator = subprocess.Popen(memory)
        sim = subprocess.Popen(GMV + ["simulate", "--broker", broker.url, "--order-scale",
                                      "0.0001", "--speed", "1584"],  # 10 s
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(3)
            aggregator.kill()
            aggregator.wait(10)
            aggregator = subprocess.Popen(memory)
            out, err = sim.communicate(timeout=90)
        finally:
            sim.kill()
            aggregator.terminate()
            aggregator.wait(10)
    assert sim.returncode == 1, err
    assert "restarted without its checkpoint" in err
    assert re.search(r"^verdict: MISMATCH \(\d[\d,]* messages not applied\): published ", out,
                     re.MULTILINE), out


def test_loop_without_a_control_token_is_refused_up_front():
    """Looping resets the aggregators between passes, which takes the operator's token."""
    env = {k: v for k, v in os.environ.items() if k != "GMV_CONTROL_TOKEN"}
    done = run("simulate", "--broker", "mqtt://127.0.0.1:1", "--loop", env=env)
    assert done.returncode == 2 and done.stderr.startswith("gmv: error: --loop needs a control")


async def test_a_finished_replay_leaves_no_producer_state_behind(mosquitto, topics):
    """After an exact verdict the replay clears its announcement; the shard then forgets it and
    clears its acks: a thousand finished runs do not fill --max-producers or the broker's
    retained store (nor does its status, which is not retained)."""
    broker = ["--broker", mosquitto.url, "--prefix", topics.prefix]
    aggregator = subprocess.Popen(GMV + ["aggregate", *broker, "--scenario", "2019"])
    try:
        done = await asyncio.create_subprocess_exec(
            *GMV, "simulate", *broker, "--scenario", "2019", "--order-scale", "0.0001", "--json",
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        out, _ = await asyncio.wait_for(done.communicate(), 60)
        assert orjson.loads(out)["verdict"]["exact"]
        await asyncio.sleep(1.5)  # the shard checkpoints and clears
        retained: dict[str, bytes] = {}
        async with connect(mosquitto) as client:
            await client.subscribe(f"{topics.prefix}/#", qos=1)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.5):
                    async for message in client.messages:
                        if message.retain:
                            retained[message.topic.value] = message.payload
    finally:
        aggregator.terminate()
        aggregator.wait(10)
    assert sorted(retained) == [topics.totals("0")]  # the replay status is not retained
    assert orjson.loads(retained[topics.totals("0")])["producers"] == 0


@pytest.mark.parametrize("aggregate, simulate, why", [
    (["--brands", "1000"], [],
     "brand ids below 250,000; the shard takes ids below 1,000 (its --brands or --reference)"),
    ([], ["--order-scale", "0.000001"],
     "an order of $128,252,490.03; the shard takes at most $100,000,000.00, and at order "
     "scale 1e-06 minute 11-01 00:01 has one: use --order-scale 5e-06 or more"),
], ids=["too-few-brands", "tiny-order-scale"])
async def test_a_replay_the_shard_would_refuse_exits_2_naming_why_and_publishes_nothing(
        aggregate, simulate, why):
    """A replay whose batches the running shard would reject (fewer brands than the scenario,
    an order above the shard's USD 100M an order at a tiny order scale) stops at once with
    one line saying why (exit 2, a bad setting) and publishes no batch. Before, the shard
    rejected every batch and the replay waited for its acks for ever ('waiting to publish
    seq 200')."""
    with stock_mosquitto() as broker:
        topics, heard = Topics("gmv/v1"), []
        aggregator = subprocess.Popen(GMV + ["aggregate", "--broker", broker.url,
                                             "--no-checkpoint", *aggregate])
        try:
            async with connect(broker) as spy:
                await spy.subscribe(f"{topics.prefix}/orders/#", qos=1)
                sim = await asyncio.create_subprocess_exec(
                    *GMV, "simulate", "--broker", broker.url, "--speed", "max", *simulate,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)

                async def listen() -> None:
                    async for message in spy.messages:
                        heard.append(message)
                listening = asyncio.create_task(listen())
                _, err = await asyncio.wait_for(sim.communicate(), 60)
                await asyncio.sleep(0.5)  # anything published would have arrived
                listening.cancel()
        finally:
            aggregator.terminate()
            aggregator.wait(10)
    assert sim.returncode == 2, err
    assert err.decode().splitlines()[-1] == \
        f"gmv: error: shard 0 would refuse this replay's batches: {why}"
    assert heard == []


def test_a_shard_says_what_it_accepts_and_a_replay_source_what_it_needs():
    """The shard's totals carry the ranges it accepts; the 2020 scenario fits a shard of its
    own dimensions, and is refused, with the reason, by one of fewer countries or a shorter
    window."""
    from simulator.flow import ShardLayout, misfit
    from ticker.core.state import AggregateState
    from ticker.core.wire import MAX_ORDER_CENTS, Limits

    state = AggregateState(Limits(n_brands=250_000, n_minutes=15_840, n_countries=12,
                                  n_platforms=3, max_order_cents=MAX_ORDER_CENTS))
    accepts = ShardLayout.parse(orjson.dumps(state.snapshot())).accepts
    assert accepts == {"brands": 250_000, "minutes": 15_840, "countries": 12, "platforms": 3,
                       "max_batch_orders": 1_000_000, "max_order_cents": MAX_ORDER_CENTS}
    source = ScenarioSource(scenario_for_year(2020))
    assert source.misfit(accepts) is None
    assert source.misfit({**accepts, "countries": 5}) == \
        "country ids below 12; the shard takes ids below 5 (its --reference)"
    assert source.misfit({**accepts, "minutes": 1_440}) == \
        "a window of 15,840 minutes; the shard's has 1,440 (its --scenario)"
    assert misfit(accepts, {"max_batch_orders": 2_000_000}) == \
        "batches of 2,000,000 orders; the shard takes at most 1,000,000"
    bad = orjson.dumps({**state.snapshot(), "accepts": {**accepts, "brands": -1}})
    assert ShardLayout.parse(bad).accepts is None  # not trusted: nothing is checked


def test_a_recording_needs_what_its_batches_hold(tmp_path):
    """A recording's replay checks the shard against the ids, batch sizes and orders its
    batches actually hold: a shard of fewer brands than the largest id recorded refuses it."""
    from simulator.recording import RecordingSource

    scenario = scenario_for_year(2020, order_scale=0.0001)
    path = tmp_path / "minute.gmvrec"
    with open(path, "wb") as file:
        writer = RecordingWriter(file, scenario.window, scenario.n_brands)
        for seq, message in enumerate(ScenarioSource(scenario).messages(14_400)):
            writer.write(ORDERS, encode(message.__class__(
                "rec", seq, 14_400, message.amount_cents, message.brand, message.country,
                message.platform)))
    orders = scenario.orders(14_400)
    top = int(orders.brand.max())
    accepts = {"brands": 250_000, "minutes": 15_840, "countries": 12, "platforms": 3,
               "max_batch_orders": 1_000_000, "max_order_cents": 10**10}
    source = RecordingSource(path)
    assert source.misfit(accepts) is None
    assert source.misfit({**accepts, "minutes": 1_440}) == \
        "a window of 15,840 minutes; the shard's has 1,440 (its --scenario)"
    assert source.misfit({**accepts, "brands": top}) == (
        f"brand ids below {top + 1:,}; the shard takes ids below {top:,} (its --brands or "
        "--reference)")
    largest = int(orders.amount_cents.max())
    assert source.misfit({**accepts, "max_order_cents": largest - 1}).startswith(
        f"an order of ${largest // 100:,}.{largest % 100:02d}; the shard takes at most")
