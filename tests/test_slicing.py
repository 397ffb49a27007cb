"""Time slices and bulk catch-up (simulator/slicing.py and the replay loop that uses them):
the pure split and merge fed values, then replays through a real Mosquitto into a real
aggregator: totals moving several times a second at real time, `--from`, seeks and loops
reaching their target minute exactly within a few seconds."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import numpy as np
import pytest

from simulator.flow import FlowControl
from simulator.publisher import Replay, ScenarioSource
from simulator.scenario import scenario_for_year
from simulator.slicing import Bulk, merge, slice_bounds, slices_per_minute
from ticker.core.control import Command
from ticker.shell.mqtt import ReliablePublisher, watch
from ticker.core.wire import ChatbotCount, OrderBatch, decode

from .conftest import festival_limits, running_pipeline

S2020 = scenario_for_year(2020)  # order scale 0.001: 2,310,099 orders over 15,840 minutes
S2019 = scenario_for_year(2019, order_scale=0.0001)  # one day, 1,440 minutes
PEAK = 10 * 1440  # 2020-11-11 00:00, the pinned peak minute
TOKEN = "s3cret"
COLUMNS = ("amount_cents", "brand", "country", "platform")


def concat(batches: list[OrderBatch], name: str) -> list[int]:
    return np.concatenate([getattr(b, name) for b in batches]).tolist()


# --- how many slices, and where they fall --------------------------------------------------

@pytest.mark.parametrize("speed, k", [
    (0.25, 240), (1, 240), (2, 120), (60, 4), (120, 2), (239, 1), (240, 1), (1584, 1),
    (None, 1)])
def test_slices_per_minute_aims_at_four_publishes_a_wall_second(speed, k):
    """A minute is cut into about 4 slices a wall second it lasts, 1 from speed 240 (and at
    max), at most 240 (a quarter of a simulated second)."""
    assert slices_per_minute(speed) == k


def test_slice_bounds_follow_the_per_second_counts_literally():
    """Four seconds of 5, 0, 2 and 1 orders in 8 half-second slices start at orders 0, 2, 5,
    5, 5, 6, 7, 7 and end at 8: a second's orders spread evenly over it, floors taken."""
    assert slice_bounds(np.array([5, 0, 2, 1]), 8).tolist() == [0, 2, 5, 5, 5, 6, 7, 7, 8]
    assert slice_bounds(np.array([3] * 60), 4).tolist() == [0, 45, 90, 135, 180]
    assert slice_bounds(np.array([3] * 60), 1).tolist() == [0, 180]


def test_slice_bounds_refuse_what_is_not_a_per_second_count():
    """No slices, no seconds or a negative count is a ValueError naming k."""
    for per_second, k in (([1, 2], 0), ([], 4), ([1, -1], 2)):
        with pytest.raises(ValueError, match="k="):
            slice_bounds(np.array(per_second, np.int64), k)


@pytest.mark.parametrize("minute", [PEAK, PEAK + 30, 0])
@pytest.mark.parametrize("k", [1, 4, 240])
def test_slices_hold_exactly_the_minutes_orders_in_order(minute, k):
    """The slices of a minute, put together, are the minute's orders, column by column, as
    published whole before; its GMV is unchanged; the chatbot count rides with the last."""
    source = ScenarioSource(S2020, batch_orders=1_000)
    slices = source.slices(minute, k)
    assert len(slices) == k
    batches = [m for part in slices for m in part if isinstance(m, OrderBatch)]
    orders = S2020.orders(minute)
    for name in COLUMNS:
        assert concat(batches, name) == getattr(orders, name).tolist(), name
    assert sum(b.gmv_cents for b in batches) == int(S2020.minute_gmv_cents[minute])
    assert all(b.minute == minute and len(b) <= 1_000 for b in batches)
    counts = [m for part in slices for m in part if isinstance(m, ChatbotCount)]
    assert counts == [m for m in slices[-1] if isinstance(m, ChatbotCount)]
    whole = source.messages(minute)  # one slice: the messages of a minute published whole
    assert [len(m) for m in whole if isinstance(m, OrderBatch)] == \
        [len(b) for b in source.slices(minute, 1)[0] if isinstance(b, OrderBatch)]


def test_the_peak_minute_is_sliced_by_its_per_second_profile():
    """At one slice a second, the peak minute's slices hold exactly its per-second orders
    (rising to the peak second 26, then falling); at 240, each second's four quarters add up
    to it and differ by at most one order."""
    source = ScenarioSource(S2020, batch_orders=10**6)
    per_second = S2020.second_orders(PEAK)
    assert int(per_second.argmax()) == 26 and per_second.sum() == len(S2020.orders(PEAK))
    sizes = [sum(len(b) for b in part if isinstance(b, OrderBatch))
             for part in source.slices(PEAK, 60)]
    assert sizes == per_second.tolist()
    quarters = np.array([sum(len(b) for b in part if isinstance(b, OrderBatch))
                         for part in source.slices(PEAK, 240)]).reshape(60, 4)
    assert quarters.sum(axis=1).tolist() == per_second.tolist()
    assert (quarters.max(axis=1) - quarters.min(axis=1)).max() <= 1
    flat = S2020.second_orders(PEAK + 1)  # a flat minute: a quarter is 15 of its seconds
    assert flat.max() - flat.min() <= 1
    assert np.diff(slice_bounds(flat, 4)).tolist() == flat.reshape(4, 15).sum(axis=1).tolist()


def test_slices_are_deterministic():
    """The same scenario and seed give the same slices, from another Scenario object too."""
    again = ScenarioSource(scenario_for_year(2020))
    one, two = ScenarioSource(S2020).slices(PEAK + 5, 4), again.slices(PEAK + 5, 4)
    for a, b in zip(one, two, strict=True):
        assert [type(m) for m in a] == [type(m) for m in b]
        for x, y in zip(a, b):
            if isinstance(x, OrderBatch):
                assert all(getattr(x, n).tolist() == getattr(y, n).tolist() for n in COLUMNS)
            else:
                assert x == y


# --- bulk batches ----------------------------------------------------------------------------

def plain(minute: int, amounts: list[int], brand: int = 1) -> OrderBatch:
    n = len(amounts)
    return OrderBatch("", 0, minute, np.array(amounts, np.int64), np.full(n, brand, np.uint32),
                      np.zeros(n, np.uint8), np.zeros(n, np.uint8))


def test_bulk_gathers_minutes_into_batches_with_their_minute_runs():
    """Minutes 3, 4 (two batches), 7 become one batch with runs (3,2) (4,3) (7,1), the
    columns in order; the chatbot counts are summed into one at the latest count's minute."""
    bulk = Bulk(max_orders=100)
    assert bulk.add([plain(3, [1, 2]), ChatbotCount("", 0, 3, 10)]) == []
    assert bulk.add([plain(4, [3]), plain(4, [4, 5])]) == []
    assert bulk.add([plain(7, [6]), ChatbotCount("", 0, 6, 5)]) == []
    out = bulk.flush()
    assert len(out) == 2 and bulk.flush() == []
    batch, count = out
    assert batch.minute == 7 and batch.amount_cents.tolist() == [1, 2, 3, 4, 5, 6]
    assert batch.minute_runs.tolist() == [[3, 2], [4, 3], [7, 1]]
    assert batch.order_minutes().tolist() == [3, 3, 4, 4, 4, 7]
    assert count == ChatbotCount("", 0, 6, 15)


def test_bulk_batches_stay_within_max_orders():
    """A batch that would pass max_orders starts the next bulk batch; one bigger than it goes
    out alone, as it is; a bulk of one minute is a plain batch (no runs)."""
    bulk = Bulk(max_orders=3)
    assert bulk.add([plain(1, [1, 1])]) == []
    first = bulk.add([plain(2, [2, 2])])  # 2 + 2 > 3
    assert [b.order_minutes().tolist() for b in first] == [[1, 1]]
    assert first[0].minute_runs is None and first[0].minute == 1
    big = bulk.add([plain(3, [3, 3, 3, 3])])
    assert [b.order_minutes().tolist() for b in big] == [[2, 2]]
    assert [b.order_minutes().tolist() for b in bulk.flush()] == [[3, 3, 3, 3]]
    with pytest.raises(ValueError, match="max_orders=0"):
        Bulk(0)


def test_merge_sorts_orders_by_minute_stably_when_parts_are_not_in_order():
    """Parts of minutes 5 then (4, 5) merge to minutes 4, 5, 5 with each order's columns kept
    together, the earlier part's minute-5 order first."""
    early = OrderBatch("", 0, 5, np.array([40, 50]), np.array([4, 5], np.uint32),
                       np.array([0, 1], np.uint8), np.zeros(2, np.uint8),
                       minute_runs=np.array([[4, 1], [5, 1]]))
    merged = merge([plain(5, [7], brand=9), early])
    assert merged.order_minutes().tolist() == [4, 5, 5]
    assert merged.amount_cents.tolist() == [40, 7, 50]
    assert merged.brand.tolist() == [4, 9, 5] and merged.country.tolist() == [0, 0, 1]


def test_bulk_catch_up_of_ten_days_is_a_few_batches_that_add_up_per_minute():
    """Nov 1 to 11 00:30 of 2020 in bulk is 9 batches of at most 200,000 orders (against
    14,430 minutes of batches one by one), whose per-minute sums are the festival's."""
    source, bulk = ScenarioSource(S2020), Bulk(200_000)
    out = [m for minute in range(14_430) for m in bulk.add(source.messages(minute))]
    out += bulk.flush()
    batches = [b for b in out if isinstance(b, OrderBatch)]
    assert len(batches) == 9 and max(len(b) for b in batches) <= 200_000
    gmv = np.zeros(14_430, np.int64)
    for b in batches:
        np.add.at(gmv, b.order_minutes(), b.amount_cents)
    assert gmv.tolist() == S2020.minute_gmv_cents[:14_430].tolist()
    queries = sum(c.queries for c in out if isinstance(c, ChatbotCount))
    assert queries == int(S2020.minute_chatbot_queries[:14_430].sum())


# --- through a broker: the replay loop -------------------------------------------------------

def cumulative(scenario, minutes: int) -> int:
    """GMV of the first `minutes` minutes: what the totals must be once they are in."""
    return int(scenario.minute_gmv_cents[:minutes].sum())


async def until(done, timeout: float, step: float = 0.005) -> float:
    """Poll `done()` until true; the seconds it took (AssertionError after `timeout`)."""
    start = time.monotonic()
    while not done():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not reached within {timeout} s")
        await asyncio.sleep(step)
    return time.monotonic() - start


def assert_exactly_at(state, scenario, minute: int) -> None:
    """The aggregator holds every minute before `minute`, to the cent and the order, as if
    published minute by minute, and nothing of any later minute."""
    assert state.gmv_by_minute[:minute].tolist() == \
        scenario.minute_gmv_cents[:minute].tolist()
    assert state.orders_by_minute[:minute].tolist() == scenario.minute_orders[:minute].tolist()
    assert not state.gmv_by_minute[minute:].any() and not state.orders_by_minute[minute:].any()
    assert state.gmv_cents == cumulative(scenario, minute)
    assert state.orders == int(scenario.minute_orders[:minute].sum())
    assert state.latest_minute == minute - 1 and state.duplicates == 0


async def test_at_real_time_the_totals_move_several_times_a_second_and_never_back(
        mosquitto, topics):
    """At --speed 1 the aggregator's GMV changes at least 3 times in every wall second (4
    slices a second; before, once a minute), never decreases, never by a minute's worth,
    and adds up exactly to what was published."""
    async with running_pipeline(mosquitto, topics) as pipeline, \
            ReliablePublisher(mosquitto) as publisher, \
            FlowControl(mosquitto, topics, "rt") as flow:
        replay = Replay(publisher, ScenarioSource(S2020), topics, producer="rt", speed=1,
                        flow=flow)
        task = asyncio.create_task(replay.run())
        await until(lambda: pipeline.state.gmv_cents > 0, 10)  # once a shard runs
        samples: list[tuple[float, int]] = []
        start = time.monotonic()
        while (now := time.monotonic() - start) < 3.0:
            samples.append((now, pipeline.state.gmv_cents))
            await asyncio.sleep(0.01)
        await replay.control(Command("pause"))
        await until(lambda: pipeline.state.gmv_cents == replay.report.gmv_cents, 5)
        task.cancel()
    values = [v for _, v in samples]
    assert values == sorted(values)
    steps = [b - a for a, b in zip(values, values[1:]) if b != a]
    assert 0 < max(steps) < int(S2020.minute_gmv_cents[0]) // 2
    for second in (0.0, 1.0, 2.0):
        window = [v for t, v in samples if second <= t < second + 1.0]
        changes = sum(1 for a, b in zip(window, window[1:]) if b != a)
        assert changes >= 3, (second, changes)
    assert replay.report.minutes == 0 and 0 < replay.report.gmv_cents < S2020.minute_gmv_cents[0]


async def test_slices_go_out_on_the_absolute_schedule_at_their_end(mosquitto, topics):
    """At speed 60 (a minute a second, 4 slices), minutes 0-2 arrive as 12 batches at 0.25,
    0.5, ... 3.0 s (each when the clock reaches its end, within 0.2 s), each of one minute,
    holding that minute's orders in sequence."""
    arrivals: list[tuple[float, OrderBatch]] = []
    ready = asyncio.Event()
    limits = festival_limits()
    start = 0.0

    def seen(topic: str, payload: bytes, retained: bool) -> None:
        arrivals.append((time.monotonic() - start, decode(payload, limits)))

    watcher = asyncio.create_task(watch(mosquitto, [f"{topics.prefix}/orders/#"], seen,
                                        ready=ready))
    try:
        await asyncio.wait_for(ready.wait(), 10)
        async with ReliablePublisher(mosquitto) as publisher:
            replay = Replay(publisher, ScenarioSource(S2020), topics, producer="sched",
                            speed=60, last_minute=2)
            start = time.monotonic()
            await replay.run()
            ended = time.monotonic() - start
            await until(lambda: len(arrivals) >= 12, 5)
    finally:
        watcher.cancel()
    assert [b.minute for _, b in arrivals] == [0] * 4 + [1] * 4 + [2] * 4
    assert all(b.minute_runs is None for _, b in arrivals)
    for i, (at, _) in enumerate(arrivals):
        assert abs(at - 0.25 * (i + 1)) < 0.2, (i, at)  # at its start would be 0.25 early
    assert abs(ended - 3.0) < 0.25
    for minute in range(3):
        sizes = [len(b) for _, b in arrivals if b.minute == minute]
        assert sizes == np.diff(slice_bounds(S2020.second_orders(minute), 4)).tolist()


async def test_from_reaches_the_target_minute_exactly_within_seconds(mosquitto, topics):
    """`--from "11-11 00:30"` (minute 14,430) brings the aggregator to the exact figures of
    every minute before it in a few bulk batches (before: 14,430 minutes one by one),
    `catching_up` only meanwhile; then minute 14,430 plays on the clock from its start."""
    target = 14_430
    async with running_pipeline(mosquitto, topics) as pipeline, \
            ReliablePublisher(mosquitto) as publisher, \
            FlowControl(mosquitto, topics, "from") as flow:
        state = pipeline.state
        await until(lambda: flow.acks.shards(time.monotonic()), 10)  # a shard runs
        replay = Replay(publisher, ScenarioSource(S2020), topics, producer="from", speed=60,
                        from_minute=target, flow=flow)
        assert replay.catching_up
        task = asyncio.create_task(replay.run())
        took = await until(lambda: state.gmv_cents >= cumulative(S2020, target), 30)
        if state.latest_minute < target:  # caught before the first slice of 00:30
            assert_exactly_at(state, S2020, target)
        assert state.gmv_by_minute[:target].tolist() == \
            S2020.minute_gmv_cents[:target].tolist()
        assert state.orders_by_minute[:target].tolist() == \
            S2020.minute_orders[:target].tolist()
        assert state.batches < 50  # a few bulk batches and counts, not one per minute
        await asyncio.sleep(0.2)
        assert not replay.catching_up
        # Then the target minute plays on the clock (a minute a second), slice by slice.
        await until(lambda: state.gmv_by_minute[target] == S2020.minute_gmv_cents[target], 3)
        assert not state.gmv_by_minute[target + 2:].any()
        task.cancel()
    print(f"--from 11-11 00:30: exact at the target after {took:.2f} s")


async def test_seek_back_resets_and_lands_exactly_on_the_target(mosquitto, topics):
    """A seek back from 11-05 00:00 to 11-02 12:00 (then a pause) resets the aggregator and
    brings it, in bulk, to exactly every figure of the minutes before 11-02 12:00 and
    nothing after, with no duplicates."""
    back = 1440 + 720
    async with running_pipeline(mosquitto, topics, control_token=TOKEN) as pipeline, \
            ReliablePublisher(mosquitto) as publisher, \
            FlowControl(mosquitto, topics, "back") as flow:
        state = pipeline.state
        replay = Replay(publisher, ScenarioSource(S2020), topics, producer="back", speed=60,
                        from_minute=4 * 1440, control_token=TOKEN, flow=flow)
        task = asyncio.create_task(replay.run())
        await until(lambda: state.gmv_cents >= cumulative(S2020, 4 * 1440), 20)
        await replay.control(Command("seek", to="11-02 12:00"))
        await replay.control(Command("pause"))
        took = await until(lambda: state.resets == 1
                           and state.gmv_cents == cumulative(S2020, back), 20)
        await asyncio.sleep(0.5)  # paused at 12:00: nothing more arrives
        assert_exactly_at(state, S2020, back)
        assert not replay.catching_up and replay.report.resets == 1
        assert state.batches < 50  # since the reset: a few bulk batches, not 2,160 minutes
        task.cancel()
    print(f"seek back to 11-02 12:00: exact after {took:.2f} s")


async def test_seek_forward_mid_minute_publishes_the_rest_of_it_and_lands_exactly(
        mosquitto, topics):
    """At --speed 1, part way through 12:00, a seek to 12:30 and a pause bring the totals to
    exactly the festival's before 12:30: the rest of 12:00 and the minutes up to 12:29 go
    out at once, each order once."""
    async with running_pipeline(mosquitto, topics) as pipeline, \
            ReliablePublisher(mosquitto) as publisher, \
            FlowControl(mosquitto, topics, "mid") as flow:
        state = pipeline.state
        replay = Replay(publisher, ScenarioSource(S2019), topics, producer="mid", speed=1,
                        from_minute=720, flow=flow)
        task = asyncio.create_task(replay.run())
        await until(lambda: state.gmv_by_minute[720] > 0, 10)
        assert 0 < state.gmv_by_minute[720] < S2019.minute_gmv_cents[720]  # part of 12:00
        await replay.control(Command("seek", to="11-11 12:30"))
        await replay.control(Command("pause"))
        took = await until(lambda: state.gmv_cents == cumulative(S2019, 750), 10)
        await asyncio.sleep(0.3)
        assert_exactly_at(state, S2019, 750)  # within 10 s, not 30 minutes on the clock
        task.cancel()
    print(f"seek forward to 12:30: exact after {took:.2f} s")


async def test_loop_plays_the_chosen_range_again_not_the_whole_festival(mosquitto, topics):
    """With --from 12:00 and the last minute 12:01, each new round resets the aggregator,
    catches up to 12:00 in bulk within seconds and plays 12:00-12:01 again (before, the
    round started at 00:00 and took 72 s to reach 12:00 at this speed); every pass exact."""
    async with running_pipeline(mosquitto, topics, control_token=TOKEN) as pipeline, \
            ReliablePublisher(mosquitto) as publisher, \
            FlowControl(mosquitto, topics, "loop") as flow:
        state = pipeline.state
        said: list[str] = []
        replay = Replay(publisher, ScenarioSource(S2019), topics, producer="loop", speed=600,
                        from_minute=720, last_minute=721, loop=True, control_token=TOKEN,
                        flow=flow, say=said.append)
        task = asyncio.create_task(replay.run())
        whole = cumulative(S2019, 722)
        await until(lambda: state.gmv_cents == whole, 10)
        await until(lambda: state.resets == 1, 10)
        took = await until(lambda: state.resets == 1 and state.gmv_cents == whole, 10)
        await until(lambda: state.resets == 2, 10)  # a round within 10 s, not 72 s
        task.cancel()
    print(f"a new round exact after {took:.2f} s")
    assert len(said) >= 2 and all(line.startswith(f"pass {n} verdict: exact: published "
                                                  f"{int(S2019.minute_orders[:722].sum()):,}")
                                  for n, line in zip((1, 2), said))


# --- the command line: --from .. --to ---------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--to", "11-12 00:00"], "--to: '11-12 00:00' is outside the window"),
    (["--to", "noon"], "--to: 'noon': expected MM-DD HH:MM"),
    (["--from", "11-11 12:00", "--to", "11-11 11:59"],
     "--to: '11-11 11:59' is before --from '11-11 12:00'"),
])
def test_bad_to_names_the_option_in_one_line(argv, message, capsys):
    """`--to` outside the window, malformed or before `--from` exits 2 with one line naming
    --to, before any broker is tried."""
    from gmv.cli import main
    assert main(["simulate", "--broker", "mqtt://127.0.0.1:1", "--scenario", "2019",
                 *argv]) == 2
    err = capsys.readouterr().err
    assert err == f"gmv: error: {message}\n" or (err.startswith(f"gmv: error: {message}")
                                                 and err.count("\n") == 1)


def test_simulate_from_to_publishes_up_to_the_last_minute_exactly(mosquitto, topics):
    """`gmv simulate --from "11-11 12:00" --to "11-11 12:09"` publishes everything before
    12:10 (the minutes before 12:00 in bulk) and stops: exact verdict, 730 minutes."""
    import os
    import subprocess
    import sys

    import orjson
    broker = ["--broker", mosquitto.url, "--prefix", topics.prefix]
    aggregator = subprocess.Popen([sys.executable, "-m", "gmv.cli", "aggregate", *broker,
                                   "--scenario", "2019", "--no-checkpoint"])
    try:
        out = subprocess.run([sys.executable, "-m", "gmv.cli", "simulate", *broker,
                              "--scenario", "2019", "--order-scale", "0.0001", "--speed", "max",
                              "--from", "11-11 12:00", "--to", "11-11 12:09", "--json"],
                             capture_output=True, text=True, timeout=60, env=dict(os.environ))
    finally:
        aggregator.terminate()
        aggregator.wait(10)
    report = orjson.loads(out.stdout)
    assert report["gmv_cents"] == cumulative(S2019, 730) and report["minutes"] == 730
    assert report["verdict"]["exact"] and report["batches"] < 730 // 10


def test_a_recordings_minute_is_spread_over_its_slices_in_the_order_recorded(tmp_path):
    """A recording keeps no time within a minute: its 3 batches and count of minute 5 go
    one to a slice in 4 slices, two to a slice in 2, all in one slice at 1, in order."""
    from simulator.recording import CHATBOT, ORDERS, RecordingSource, RecordingWriter
    from ticker.core.dimensions import FESTIVAL_2020
    from ticker.core.wire import encode, encode_chatbot
    path = tmp_path / "minute5.gmvrec"
    with path.open("wb") as file:
        writer = RecordingWriter(file, FESTIVAL_2020, 250_000)
        for seq, amount in enumerate((10, 20, 30)):
            batch = dataclasses.replace(plain(5, [amount]), producer="rec", seq=seq)
            assert writer.write(ORDERS, encode(batch))
        assert writer.write(CHATBOT, encode_chatbot(ChatbotCount("rec", 3, 5, 7)))
    source = RecordingSource(path)

    def shape(k: int) -> list[list[object]]:
        return [[m.queries if isinstance(m, ChatbotCount) else int(m.amount_cents[0])
                 for m in part] for part in source.slices(5, k)]
    assert shape(4) == [[10], [20], [30], [7]]
    assert shape(2) == [[10, 20], [30, 7]]
    assert shape(1) == [[10, 20, 30, 7]] and source.slices(6, 3) == [[], [], []]
