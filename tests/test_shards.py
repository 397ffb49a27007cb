"""Several aggregator shards and ticker servers as real processes on real Mosquittos: three
shards end with every figure of one, a shard killed and restarted mid-run ends exact, and
producers on one broker reach shards on a second one bridged to it."""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from .brokers import stock_mosquitto
from .conftest import MOSQUITTO, free_port, wait_for_port
from .test_cli import GMV, get_totals, wait_totals

SCENARIO = ["--scenario", "2019", "--order-scale", "0.0001"]
# What a viewer's frame holds that is not a figure of the festival.
NOT_FIGURES = ("type", "seq", "stats", "replay")


@contextlib.contextmanager
def processes() -> Iterator[list[subprocess.Popen]]:
    """Started processes, each stopped (SIGTERM, then SIGKILL) however the test ends; what
    each wrote to stderr is printed, for a failing test's report."""
    procs: list[subprocess.Popen] = []
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            for stream in (proc.stdout, proc.stderr, getattr(proc, "log", None)):
                if stream is not None and not stream.closed:
                    if stream.seekable():
                        stream.seek(0)
                    print(*proc.args[3:6], stream.read())
                    stream.close()


def gmv(procs: list[subprocess.Popen], *argv: str) -> subprocess.Popen:
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(GMV + list(argv), stdout=subprocess.DEVNULL, stderr=log)
    proc.log = log  # type: ignore[attr-defined]
    procs.append(proc)
    return proc


def serve(procs: list[subprocess.Popen], broker: list[str], shards: int) -> int:
    port = free_port()
    gmv(procs, "serve", *broker, "--shards", str(shards), "--port", str(port))
    wait_for_port(port)
    return port


def simulate(*brokers: list[str], timeout: float = 90) -> list[dict]:
    """`gmv simulate` of the scenario into each of `brokers` at once; their exact reports."""
    runs = [subprocess.Popen(GMV + ["simulate", *broker, *SCENARIO, "--json"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for broker in brokers]
    reports = []
    for run in runs:
        out, err = run.communicate(timeout=timeout)
        assert run.returncode == 0, err
        reports.append(orjson.loads(out))
        assert reports[-1]["verdict"]["exact"], reports[-1]
    return reports


def figures(port: int, report: dict, shards: int) -> dict:
    """The server's view once it shows the whole replay from every shard, figures only."""
    view = wait_totals(port, lambda t: t["gmv_cents"] == report["gmv_cents"]
                       and t["stats"]["shards"] == shards, timeout=30)
    assert view["orders"] == report["orders"] and view["stats"]["gaps"] == 0
    assert view["stats"]["rejected"] == 0 and view["stats"]["shards_quiet"] == []
    return {k: v for k, v in view.items() if k not in NOT_FIGURES}


@pytest.mark.slow
def test_three_shards_end_with_every_figure_of_one_and_two_servers_show_the_same():
    """The same replay into three brand-partitioned shards and into one shard, on a stock
    Mosquitto: every figure (sums, distinct, overseas, first-time and big brands, top brands
    with names, countries, platforms, curve, orders/s, milestones) is equal to the cent; two
    `gmv serve` merging the three shards show identical views."""
    with stock_mosquitto() as broker, processes() as procs:
        three = ["--broker", broker.url, "--prefix", "three"]
        one = ["--broker", broker.url, "--prefix", "one"]
        for k in range(3):
            gmv(procs, "aggregate", *three, "--scenario", "2019", "--shard", f"{k}/3")
        gmv(procs, "aggregate", *one, "--scenario", "2019")
        ports = [serve(procs, three, 3), serve(procs, three, 3), serve(procs, one, 1)]
        report, alone = simulate(three, one)  # three's partitions come from its shards
        assert report["batches"] > report["minutes"]  # a minute's batch split in three
        assert alone["gmv_cents"] == report["gmv_cents"]
        first, second, single = (figures(port, report, n) for port, n in zip(ports, (3, 3, 1)))
    assert first == single
    assert first == second
    assert first["brands_active"] > 1000 and first["top_brands"]


@pytest.mark.slow
def test_a_shard_killed_mid_run_shows_as_quiet_and_after_a_restart_the_total_is_exact():
    """kill -9 of shard 1 of 3 while a replay plays: the screen lists it as quiet, the replay
    waits for it instead of overrunning its queue, and after a restart from its checkpoint
    the verdict and every screen are exact."""
    with stock_mosquitto() as broker, processes() as procs:
        args = ["--broker", broker.url]
        shard = ["aggregate", *args, "--scenario", "2019", "--shard", "1/3"]
        victim = gmv(procs, *shard)
        for k in (0, 2):
            gmv(procs, "aggregate", *args, "--scenario", "2019", "--shard", f"{k}/3")
        port = serve(procs, args, 3)
        sim = subprocess.Popen(GMV + ["simulate", *args, *SCENARIO, "--speed", "14400",
                                      "--json"],  # the day in 6 s
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(sim)
        wait_totals(port, lambda t: t["gmv_cents"] > 0, timeout=20)
        victim.kill()
        victim.wait(10)
        quiet = wait_totals(port, lambda t: t["stats"]["shards_quiet"] == ["1"], timeout=15)
        assert sim.poll() is None  # waiting for shard 1, not done without it
        gmv(procs, *shard)
        out, err = sim.communicate(timeout=90)
        assert sim.returncode == 0, err
        report = orjson.loads(out)
        final = figures(port, report, 3)
    assert report["verdict"]["exact"] and final["gmv_cents"] == report["gmv_cents"]
    assert 0 < quiet["gmv_cents"] < report["gmv_cents"]


def bridged_mosquitto(directory: Path, upstream: int) -> tuple[subprocess.Popen, int]:
    """A Mosquitto bridged to the one on `upstream`: batches, announcements and replay status
    come in from there, acks and totals go out to it (deploy/ has the same bridge)."""
    port = free_port()
    conf = directory / "bridge.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n"
                    f"user {pwd.getpwuid(os.getuid()).pw_name}\nlog_dest none\n"
                    f"connection producers\naddress 127.0.0.1:{upstream}\n"
                    "cleansession false\nrestart_timeout 1\n"
                    "topic gmv/v1/orders/# in 1\ntopic gmv/v1/chatbot/# in 1\n"
                    "topic gmv/v1/producers/# in 1\ntopic gmv/v1/replay in 1\n"
                    "topic gmv/v1/acks/# out 1\ntopic gmv/v1/totals/# out 1\n")
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port)
    return proc, port


@pytest.mark.slow
def test_producers_on_one_broker_and_shards_on_a_bridged_second_end_exact(tmp_path):
    """Producers publish to broker A; two shards and the screen use broker B, bridged to A:
    the replay's verdict and the screen are exact, as on one broker."""
    with stock_mosquitto() as upstream, processes() as procs:
        bridge, port_b = bridged_mosquitto(tmp_path, upstream.port)
        procs.append(bridge)
        downstream = ["--broker", f"mqtt://127.0.0.1:{port_b}"]
        for k in range(2):
            gmv(procs, "aggregate", *downstream, "--scenario", "2019", "--shard", f"{k}/2")
        port = serve(procs, downstream, 2)
        [report] = simulate(["--broker", upstream.url])
        final = figures(port, report, 2)
        assert get_totals(port)["stats"]["shards"] == 2
    assert final["gmv_cents"] == report["gmv_cents"] and final["orders"] == report["orders"]


def test_a_replay_with_other_partitions_than_the_running_shards_exits_2_naming_both(mosquitto,
                                                                                    topics):
    """`gmv simulate --partitions 2` against shards of 3 partitions would publish brands where
    no shard takes them: it stops before publishing, in one line."""
    broker = ["--broker", mosquitto.url, "--prefix", topics.prefix]
    with processes() as procs:
        gmv(procs, "aggregate", *broker, "--no-checkpoint", "--shard", "0/1",
            "--partitions", "3")
        done = subprocess.run(GMV + ["simulate", *broker, *SCENARIO, "--partitions", "2"],
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr == ("gmv: error: --partitions=2: the running shards split the brands "
                           "into 3 partitions\n")


def test_a_shard_restarted_with_another_partitioning_refuses_its_checkpoint(mosquitto, topics,
                                                                           tmp_path):
    """A shard keeps its brands for life: its checkpoint of 0/1 does not load as 0/3."""
    path = tmp_path / "a.ckpt"
    broker = ["--broker", mosquitto.url, "--prefix", topics.prefix, "--checkpoint", str(path)]
    first = subprocess.Popen(GMV + ["aggregate", *broker], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=15)
    done = subprocess.run(GMV + ["aggregate", *broker, "--shard", "0/3"], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert done.stderr == (f"gmv: error: --checkpoint={path}: saved by shard 0/1 of 1 "
                           "partitions, not 0/3 of 3: start each --shard and --partitions "
                           "with its own checkpoint\n")
