"""Replays through a real Mosquitto: control (pause, speed, seek), --from, loop resets,
recordings, and the absolute schedule."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import secrets
import subprocess
import sys
import time

import numpy as np
import orjson
import pytest

from simulator.flow import FlowControl, usd
from simulator.publisher import Replay, ScenarioSource
from simulator.recording import CHATBOT, ORDERS, RecordingWriter
from simulator.scenario import scenario_for_year
from ticker.core.control import Command, sign
from ticker.shell.mqtt import ReliablePublisher, watch
from ticker.core.wire import ChatbotCount, OrderBatch, encode, encode_chatbot

from .conftest import running_pipeline
from .test_cli import get_totals, wait_totals
from .test_pipeline import watch_until

S2019 = scenario_for_year(2019, order_scale=0.0001)  # one day, 1,440 minutes
TOKEN = "s3cret"


def cumulative(scenario, minutes: int) -> int:
    """GMV of the first `minutes` minutes: what the ticker must show once they are in."""
    return int(scenario.minute_gmv_cents[:minutes].sum())


async def test_pause_holds_the_totals_and_resume_continues_to_the_exact_end(mosquitto, topics):
    """Paused, nothing more is published; resumed at a new speed, the replay ends exact."""
    async with running_pipeline(mosquitto, topics, control_token=TOKEN) as pipeline, \
            ReliablePublisher(mosquitto) as publisher:
        replay = Replay(publisher, ScenarioSource(S2019), topics, producer="ctl", speed=1440 * 6,
                        control_token=TOKEN)  # the day in 10 s
        task = asyncio.create_task(replay.run())
        await asyncio.sleep(1.0)
        await replay.control(Command("pause"))
        await asyncio.sleep(0.3)
        held = replay.next_minute
        await asyncio.sleep(1.0)
        assert replay.next_minute == held and 0 < held < 1440
        await replay.control(Command("speed", speed=None))
        await replay.control(Command("resume"))
        report = await asyncio.wait_for(task, 30)
        shown = await watch_until(pipeline.port, lambda v: v["gmv_cents"] == S2019.gmv_cents)
    assert report.gmv_cents == S2019.gmv_cents == pipeline.state.gmv_cents
    assert shown["stats"]["duplicates"] == 0 and shown["stats"]["gaps"] == 0


async def test_seek_forward_publishes_the_skipped_minutes_at_once(mosquitto, topics):
    """Seeking ahead to 12:00 makes the totals equal the festival's up to 12:00 right away."""
    async with running_pipeline(mosquitto, topics, control_token=TOKEN) as pipeline, \
            ReliablePublisher(mosquitto) as publisher:
        replay = Replay(publisher, ScenarioSource(S2019), topics, producer="fwd", speed=60,
                        control_token=TOKEN)
        task = asyncio.create_task(replay.run())
        await replay.control(Command("seek", to="11-11 12:00"))
        target = cumulative(S2019, 720)
        shown = await watch_until(pipeline.port, lambda v: v["gmv_cents"] >= target, timeout=30)
        task.cancel()
    assert target <= shown["gmv_cents"] <= cumulative(S2019, 723)


async def test_seek_back_resets_the_aggregator_and_replays_exactly_to_there(mosquitto, topics):
    """Seeking back to 01:00 resets the totals and brings them to the 01:00 figure, not double."""
    async with running_pipeline(mosquitto, topics, control_token=TOKEN) as pipeline, \
            ReliablePublisher(mosquitto) as publisher, \
            FlowControl(mosquitto, topics, "back") as flow:
        replay = Replay(publisher, ScenarioSource(S2019), topics, producer="back", speed=60,
                        from_minute=600, control_token=TOKEN, flow=flow)
        task = asyncio.create_task(replay.run())
        await watch_until(pipeline.port, lambda v: v["gmv_cents"] >= cumulative(S2019, 600))
        await replay.control(Command("seek", to="11-11 01:00"))
        await replay.control(Command("pause"))
        target = cumulative(S2019, 60)
        shown = await watch_until(pipeline.port, lambda v: v["gmv_cents"] == target
                                  or v["gmv_cents"] == cumulative(S2019, 61), timeout=30)
        task.cancel()
    assert pipeline.state.resets == 1 and replay.report.resets == 1
    assert shown["stats"]["duplicates"] == 0


async def test_loop_starts_again_from_zero(mosquitto, topics):
    """With loop on, the end resets the totals and the festival plays again."""
    async with running_pipeline(mosquitto, topics, control_token=TOKEN) as pipeline, \
            ReliablePublisher(mosquitto) as publisher, \
            FlowControl(mosquitto, topics, "loop") as flow:
        said: list[str] = []
        replay = Replay(publisher, ScenarioSource(S2019), topics, producer="loop", speed=None,
                        loop=True, control_token=TOKEN, flow=flow, say=said.append)
        task = asyncio.create_task(replay.run())
        async with asyncio.timeout(60):
            while replay.report.resets < 2:
                await asyncio.sleep(0.05)
        task.cancel()
        assert replay.report.resets >= 2
        assert pipeline.state.gmv_cents <= S2019.gmv_cents  # never two rounds added up
    # Each pass ended exact before the reset, with the sequence going on (no duplicates).
    orders, cents = f"{int(S2019.minute_orders.sum()):,} orders", usd(S2019.gmv_cents)
    assert said[:2] == [f"pass {n} verdict: exact: published {orders}, {cents}; aggregators "
                        f"applied {orders}, {cents}" for n in (1, 2)]
    assert pipeline.state.duplicates == 0


async def test_replay_ends_on_its_absolute_schedule_despite_a_pause(mosquitto, topics):
    """120 minutes at 7,200x take 1 s; with a 0.5 s pause the replay ends at 1.5 s (±0.3 s)."""
    async with ReliablePublisher(mosquitto) as publisher:
        replay = Replay(publisher, ScenarioSource(S2019), topics, producer="clock",
                        speed=7200, last_minute=119, control_token=TOKEN)
        start = time.monotonic()
        task = asyncio.create_task(replay.run())
        await asyncio.sleep(0.3)
        await replay.control(Command("pause"))
        await asyncio.sleep(0.5)
        await replay.control(Command("resume"))
        await task
    assert abs(time.monotonic() - start - 1.5) < 0.3


@pytest.mark.parametrize("text, message", [
    ("11-12 00:00", "outside the window"), ("noon", "expected MM-DD HH:MM")])
def test_bad_from_names_the_option(text, message, capsys):
    """`--from` outside the window or malformed exits 2 naming --from."""
    from gmv.cli import main
    assert main(["simulate", "--broker", "mqtt://127.0.0.1:1", "--scenario", "2019",
                 "--from", text]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gmv: error: --from: ") and message in err


async def test_record_waits_for_the_first_message_before_idle_exit_counts(
        mosquitto, topics, tmp_path):
    """`gmv record --idle-exit 1` started before its producer keeps waiting, records the batch
    that comes 3 s later, then exits by itself once idle."""
    recording = tmp_path / "late.gmvrec"
    recorder = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gmv.cli", "record", str(recording), "--broker", mosquitto.url,
        "--prefix", topics.prefix, "--idle-exit", "1", stdout=subprocess.PIPE)
    await asyncio.sleep(3)
    assert recorder.returncode is None, "exited before any producer started"
    amounts = np.array([123_45, 67_89], np.int64)
    late = OrderBatch("late", 0, 14400, amounts, np.arange(2, dtype=np.uint32),
                      np.zeros(2, np.uint8), np.zeros(2, np.uint8))
    async with ReliablePublisher(mosquitto) as publisher:
        await publisher.send(topics.orders("late"), encode(late))
        await publisher.flush()
    out, _ = await asyncio.wait_for(recorder.communicate(), 30)
    assert recorder.returncode == 0
    assert "recorded 1 messages, 2 orders" in out.decode() and "(19134 cents)" in out.decode()


def test_record_whose_broker_goes_away_exits_1_with_one_line_and_keeps_the_file(
        topics, tmp_path):
    """The broker stopping under `gmv record` is one `gmv: error:` line naming it (no
    traceback), exit 1, with the count of what was recorded."""
    from .brokers import mosquitto_process
    with mosquitto_process(tmp_path / "broker") as broker:
        recorder = subprocess.Popen(
            [sys.executable, "-m", "gmv.cli", "record", str(tmp_path / "cut.gmvrec"),
             "--broker", broker.url, "--prefix", topics.prefix],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert "recording" in recorder.stderr.readline()
        broker.stop()
        out, err = recorder.communicate(timeout=30)
    assert recorder.returncode == 1
    assert "Traceback" not in err and err.count("gmv: error: ") == 1
    assert f"gmv: error: lost the MQTT broker at {broker.url}" in err
    assert "recorded 0 messages" in out


def test_record_then_replay_the_file_gives_the_same_totals(mosquitto, topics, tmp_path):
    """`gmv record` writes the stream; `gmv replay FILE` publishes it again, same to the cent."""
    from .conftest import free_port, wait_for_port
    broker = ["--broker", mosquitto.url, "--prefix", topics.prefix]
    recording = tmp_path / "stream.gmvrec"
    recorder = subprocess.Popen([sys.executable, "-m", "gmv.cli", "record", str(recording),
                                 *broker, "--scenario", "2019", "--idle-exit", "3"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    live = subprocess.Popen([sys.executable, "-m", "gmv.cli", "aggregate", *broker,
                             "--scenario", "2019"])  # a replay publishes only to a live one
    time.sleep(1.5)  # let them subscribe
    try:
        out = subprocess.run([sys.executable, "-m", "gmv.cli", "simulate", *broker,
                              "--scenario", "2019", "--order-scale", "0.0001", "--json"],
                             capture_output=True, text=True, timeout=60)
    finally:
        live.terminate()
        live.wait(10)
    published = orjson.loads(out.stdout)
    recorded, _ = recorder.communicate(timeout=30)
    assert f"({published['gmv_cents']} cents)" in recorded
    # Replay the file into a fresh aggregator and server on another prefix.
    broker2 = ["--broker", mosquitto.url, "--prefix", topics.prefix + "/again"]
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "gmv.cli", "aggregate", *broker2,
                               "--scenario", "2019"]),
             subprocess.Popen([sys.executable, "-m", "gmv.cli", "serve", *broker2,
                               "--scenario", "2019", "--port", str(port)])]
    try:
        wait_for_port(port)
        time.sleep(0.5)
        out = subprocess.run([sys.executable, "-m", "gmv.cli", "replay", str(recording),
                              *broker2, "--speed", "max", "--json"],
                             capture_output=True, text=True, timeout=60)
        report = orjson.loads(out.stdout)
        totals = wait_totals(port, lambda t: t["gmv_cents"] == published["gmv_cents"])
        assert report["gmv_cents"] == published["gmv_cents"] == S2019.gmv_cents
        assert totals["orders"] == published["orders"] == report["orders"]
        assert totals["stats"]["duplicates"] == 0 and totals["stats"]["gaps"] == 0
        assert get_totals(port)["chatbot_queries"] == published["chatbot_queries"]
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)


def test_seek_and_speed_from_the_command_line(mosquitto, topics):
    """`gmv control` moves a running `gmv simulate`: a new speed, then a seek to the end
    finishes it at once. (The speed is 60, not max: at max this one-day replay ends in 0.3 s,
    before the seek can reach it, which made the test fail on a fast host.)"""
    broker = ["--broker", mosquitto.url, "--prefix", topics.prefix]
    env = dict(os.environ, GMV_CONTROL_TOKEN=TOKEN)
    aggregator = subprocess.Popen([sys.executable, "-m", "gmv.cli", "aggregate", *broker,
                                   "--scenario", "2019"], env=env)
    sim = subprocess.Popen([sys.executable, "-m", "gmv.cli", "simulate", *broker,
                            "--scenario", "2019", "--order-scale", "0.0001", "--speed", "1",
                            "--json"], stdout=subprocess.PIPE, text=True, env=env)
    try:
        time.sleep(2.0)
        for argv in (["speed", "60"], ["seek", "11-11 23:59"]):
            done = subprocess.run([sys.executable, "-m", "gmv.cli", "control", *argv, *broker],
                                  capture_output=True, text=True, timeout=30, env=env)
            assert done.returncode == 0, done.stderr
        out, _ = sim.communicate(timeout=60)
    finally:
        sim.kill()
        aggregator.terminate()
        aggregator.wait(10)
    report = orjson.loads(out)
    assert report["gmv_cents"] == S2019.gmv_cents and report["verdict"]["exact"]
    assert np.int64(S2019.gmv_cents) > 0


def gmv(*argv: str, env: dict, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gmv.cli", *argv], capture_output=True,
                          text=True, timeout=timeout, env=env)


@contextlib.contextmanager
def controllable_simulation(mosquitto, topics):
    """`gmv aggregate` and a real-time `gmv simulate` with the control token, 2 s in;
    yields the broker arguments and the environment holding the token."""
    broker = ["--broker", mosquitto.url, "--prefix", topics.prefix]
    env = dict(os.environ, GMV_CONTROL_TOKEN=TOKEN)
    aggregator = subprocess.Popen([sys.executable, "-m", "gmv.cli", "aggregate", *broker,
                                   "--scenario", "2019", "--no-checkpoint"], env=env)
    sim = subprocess.Popen([sys.executable, "-m", "gmv.cli", "simulate", *broker,
                            "--scenario", "2019", "--order-scale", "0.0001", "--speed", "1"],
                           stdout=subprocess.DEVNULL, env=env)
    try:
        time.sleep(2.0)
        yield broker, env
    finally:
        sim.kill()
        sim.wait(10)
        aggregator.terminate()
        aggregator.wait(10)


def test_gmv_control_reports_the_replays_answer_and_exits_1_unless_obeyed(mosquitto, topics,
                                                                          tmp_path):
    """`gmv control` waits for the replay's answer: obeyed, exit 0 with what it did; an
    invalid seek, a wrong token or no replay at all, exit 1 with the reason (before, each
    printed "sent pause" and exited 0)."""
    with controllable_simulation(mosquitto, topics) as (broker, env):
        paused = gmv("control", "pause", *broker, env=env)
        assert paused.returncode == 0, paused.stderr
        assert paused.stdout.startswith("pause done by replay sim-") and \
            "paused at 11-11 00:0" in paused.stdout
        bad_seek = gmv("control", "seek", "11-40 00:00", *broker, env=env)
        assert bad_seek.returncode == 1
        assert "seek refused by replay" in bad_seek.stderr and "11-40 00:00" in bad_seek.stderr
        wrong = gmv("control", "resume", *broker, env=dict(env, GMV_CONTROL_TOKEN="wrong"))
        assert wrong.returncode == 1 and "resume refused by replay" in wrong.stderr \
            and "bad mac" in wrong.stderr and "unverified" in wrong.stderr
        elsewhere = gmv("control", "pause", "--broker", mosquitto.url, "--prefix",
                        topics.prefix + "/nobody", "--wait", "1", env=env)
        assert elsewhere.returncode == 1
        assert elsewhere.stderr.strip().splitlines() == [
            f"gmv: error: no replay answered pause within 1 s: is one running on "
            f"{mosquitto.url} under --prefix {topics.prefix}/nobody with control "
            "(a control token)?"]


class SentMessages:
    """A publisher that keeps what it is given."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    async def send(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.sent.append((topic, payload))


async def test_a_flood_of_junk_commands_does_not_silence_the_answer_to_a_signed_one(topics):
    """Refusals of commands that do not verify are answered 5 at once, then 1 a second; a
    signed command the replay cannot carry out is still answered at once with why. Before,
    junk from anyone used up the budget and the operator's `gmv control seek '11-40 00:00'`
    got "no replay answered" instead of "'11-40 00:00' is outside the window"."""
    replay = Replay(SentMessages(), ScenarioSource(S2019), topics, producer="r", speed=60,
                    control_token=TOKEN)
    for _ in range(20):
        await replay.obey(orjson.dumps({"v": 1, "cmd": "pause", "ts": time.time(),
                                        "nonce": secrets.token_hex(16), "mac": "0" * 64}))
    answer = await replay.obey(sign(Command("seek", to="11-40 00:00"), TOKEN, now=time.time()))
    assert answer is not None and not answer.ok and "11-40 00:00" in answer.detail
    answers = [orjson.loads(p) for t, p in replay.publisher.sent if t == topics.answers]
    assert len(answers) == 6 and answers[-1]["nonce"] == answer.nonce


# Someone with producer rights on a stock broker (no ACL): it reads each command on the
# control topic and, under that command's nonce, publishes the command again verbatim, a
# junk command, and a forged refusal on the answers topic.
CONTRADICTOR = """
import asyncio, sys, aiomqtt, orjson
async def main(port, prefix):
    async with aiomqtt.Client("127.0.0.1", int(port)) as client:
        await client.subscribe(prefix + "/control", qos=1)
        print("ready", flush=True)
        seen = set()
        async for message in client.messages:
            payload = bytes(message.payload)
            doc = orjson.loads(payload)
            if doc.get("cmd") == "reset" or doc.get("nonce") in seen:
                continue
            seen.add(doc.get("nonce"))
            await client.publish(prefix + "/control", payload, qos=1)
            await client.publish(prefix + "/control", orjson.dumps(
                {**doc, "cmd": "seek", "to": "11-40 00:00", "mac": "0" * 64}), qos=1)
            await client.publish(prefix + "/answers", orjson.dumps(
                {"v": 1, "nonce": doc["nonce"], "cmd": doc["cmd"], "ok": False,
                 "detail": "stale: sent 99 s ago", "by": "sim-x", "mac": "0" * 64}), qos=1)
asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def test_gmv_control_is_not_contradicted_by_copies_or_forgeries_of_its_command(
        mosquitto, topics):
    """On a broker without ACL, whoever reads the control topic can echo an operator's command
    under its nonce (the replay answered "refused: replayed", signed, so it verified), send
    junk under it ("refused: bad mac", signed too) and forge a refusal. None of it may turn
    the replay's real answer into an error: before, `gmv control pause` paused the replay and
    still exited 1 printing "pause refused by replay ...: replayed"."""
    port = mosquitto.url.rpartition(":")[2]
    attacker = subprocess.Popen([sys.executable, "-c", CONTRADICTOR, port, topics.prefix],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert attacker.stdout.readline().strip() == "ready"
        with controllable_simulation(mosquitto, topics) as (broker, env):
            for cmd in ("pause", "resume"):
                done = gmv("control", cmd, *broker, env=env)
                assert done.returncode == 0, done.stderr
                assert done.stdout.startswith(f"{cmd} done by replay sim-"), done.stdout
                assert "refused" not in done.stdout + done.stderr, done.stderr
    finally:
        attacker.kill()
        attacker.communicate(timeout=10)


def write_recording(path, scenario) -> None:
    """The scenario's stream as `gmv record` would have written it off the broker."""
    source = ScenarioSource(scenario)
    with path.open("wb") as file:
        writer = RecordingWriter(file, scenario.window, scenario.n_brands)
        seq = 0
        for minute in range(scenario.window.minutes):
            for message in source.messages(minute):
                message = dataclasses.replace(message, producer="recorded", seq=seq)
                seq += 1
                if isinstance(message, ChatbotCount):
                    assert writer.write(CHATBOT, encode_chatbot(message))
                else:
                    assert writer.write(ORDERS, encode(message))


async def statuses_while(broker, topics, coroutine, *, after: float = 0.0) -> list[dict]:
    """The replay statuses published while `coroutine` runs (and `after` s more)."""
    seen: list[dict] = []

    def on_message(topic: str, payload: bytes, retained: bool) -> None:
        if payload:
            seen.append({**orjson.loads(payload), "retained": retained})

    ready = asyncio.Event()
    watcher = asyncio.create_task(watch(broker, [topics.replay], on_message, ready=ready))
    try:
        await asyncio.wait_for(ready.wait(), 10)
        await coroutine
        await asyncio.sleep(after)
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    return seen


@pytest.mark.parametrize("kind", ["simulate", "replay"])
async def test_every_kind_of_run_says_playing_then_done_and_retains_nothing(mosquitto, topics,
                                                                            tmp_path, kind):
    """`gmv simulate` and `gmv replay --broker` publish their state as they play (speed
    included) and "done" at the end (before, the last status never left the process, so a
    finished run showed "▶ max" for good), and leave no retained status behind for a later
    screen."""
    broker = ["--broker", mosquitto.url, "--prefix", topics.prefix]
    argv = ["simulate", *broker, "--scenario", "2019", "--order-scale", "0.0001"]
    if kind == "replay":
        recording = tmp_path / "day.gmvrec"
        write_recording(recording, S2019)
        argv = ["replay", str(recording), *broker]
    env = dict(os.environ, GMV_CONTROL_TOKEN=TOKEN)
    aggregator = subprocess.Popen([sys.executable, "-m", "gmv.cli", "aggregate", *broker,
                                   "--scenario", "2019", "--no-checkpoint"], env=env)
    try:
        run = asyncio.to_thread(gmv, *argv, "--from", "11-11 20:00", "--speed", "4000",
                                env=env, timeout=60)
        seen = await statuses_while(mosquitto, topics, run)
    finally:
        aggregator.terminate()
        aggregator.wait(10)
    states = [s["state"] for s in seen]
    assert "playing" in states and states[-1] == "done", states
    assert {s["speed"] for s in seen if s["state"] == "playing"} == {4000}
    assert not any(s["retained"] for s in seen)
    assert len({s["run"] for s in seen}) == 1
    left = await statuses_while(mosquitto, topics, asyncio.sleep(0.5))
    assert left == []
