"""The `gmv` command: clear one-line errors, and each part as its own process."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import orjson
import pytest

from gmv.app import batch_orders
from gmv.cli import build_parser, main

from .conftest import free_port, wait_for_port

GMV = [sys.executable, "-m", "gmv.cli"]
TOTAL = 7_410_000_000_000


@pytest.mark.parametrize("argv, message", [
    (["demo", "--speed", "fast"], "--speed: must be a positive number or 'max', not 'fast'"),
    (["demo", "--speed", "-3"], "--speed: must be a positive number or 'max'"),
    (["demo", "--port", "70000"], "--port: must be 0-65535, not '70000'"),
    (["demo", "--order-scale", "2"], "--order-scale: must be a number in (0, 1]"),
    (["simulate"], "the following arguments are required: --broker"),
    (["simulate", "--broker", "http://x"], "--broker=http://x: expected mqtt://HOST:PORT"),
    (["simulate", "--broker", "mqtt://h:99999"], "--broker=mqtt://h:99999: the port must be"),
    (["simulate", "--broker", "mqtt://h", "--scenario", "1999"], "invalid choice: '1999'"),
    (["bogus"], "invalid choice: 'bogus'"),
    (["simulate", "--broker", "mqtt://127.0.0.1:1", "--encoding", "json", "--batch-orders",
      "200000"], "--batch-orders=200000: JSON batches of more than 100,000 orders can pass"),
    # gmv bench: each of these was a traceback (inf, 1e15, the --json path at the end of the
    # run) or was silently ignored (--scenario with the pool)
    (["bench", "--rate", "inf"], "--rate: must be a finite number above 0, not 'inf'"),
    (["bench", "--duration", "inf"], "--duration: must be a number in (0, 604800]"),
    (["bench", "--rate", "1e15", "--duration", "1"],
     "the settings give 100,000,000,000 batches, more than 20,000,000: lower --rate"),
    (["bench", "--json", "/nonexistent/dir/x.json"],
     "--json /nonexistent/dir/x.json: cannot write in /nonexistent/dir"),
    (["bench", "--scenario", "2009"], "--scenario and --order-scale choose the orders of "
                                      "--source festival; the pool is 2020's"),
])
def test_bad_setting_exits_2_with_one_line_naming_it(argv, message, capsys):
    """A bad option prints one `gmv: error:` line naming the setting, and no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gmv: error: ") and message in err


@pytest.mark.parametrize("argv, expected", [
    (["--speed", "max"], 100_000),
    (["--speed", "1584"], 10_000),
    (["--speed", "max", "--encoding", "json"], 10_000),
    (["--speed", "max", "--batch-orders", "20000"], 20_000),
])
def test_batches_are_large_at_max_speed_unless_given_or_json(argv, expected):
    """Without --batch-orders a binary replay at --speed max sends 100,000-order batches
    (less CPU an order than 10,000), otherwise 10,000; an explicit value always wins."""
    args = build_parser().parse_args(["simulate", "--broker", "mqtt://127.0.0.1:1", *argv])
    assert batch_orders(args) == expected


def test_unreachable_broker_exits_1_with_the_url(capsys):
    """A broker that is not there is reported by URL in one line."""
    port = free_port()
    assert main(["simulate", "--broker", f"mqtt://127.0.0.1:{port}"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"mqtt://127.0.0.1:{port}" in err


def get_totals(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/totals", timeout=5) as r:
        return orjson.loads(r.read())


def wait_totals(port: int, done, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        totals = get_totals(port)
        if done(totals):
            return totals
        time.sleep(0.2)
    raise AssertionError(f"totals never reached the expected state: {totals}")


def test_separate_processes_conserve_the_total(mosquitto, topics, capsys):
    """`gmv aggregate`, `gmv serve` and `gmv simulate` as processes agree to the cent; with
    `--reference` the aggregator counts first-time brands and the server names the brands."""
    from gmv.reference import SHIPPED_2020
    broker = ["--broker", mosquitto.url, "--prefix", topics.prefix]
    reference = ["--reference", str(SHIPPED_2020)]
    port = free_port()
    procs = [subprocess.Popen(GMV + ["aggregate", *broker, *reference]),
             subprocess.Popen(GMV + ["serve", *broker, "--port", str(port), *reference])]
    try:
        wait_for_port(port)
        time.sleep(0.5)  # let the aggregator subscribe
        assert main(["simulate", *broker, "--order-scale", "0.0001", "--json"]) == 0
        report = orjson.loads(capsys.readouterr().out)
        totals = wait_totals(port, lambda t: t["gmv_cents"] == TOTAL and t["minute"] == 15839)
        assert report["gmv_cents"] == TOTAL and totals["orders"] == report["orders"]
        assert 0 < totals["brands_first_time_active"] <= totals["brands_overseas_active"]
        assert re.fullmatch(r"[A-Z]{2} brand \d{5}", totals["top_brands"][0]["name"])
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            assert proc.wait(10) in (0, -signal.SIGTERM)


def test_demo_runs_everything_in_one_process_and_stops_on_ctrl_c():
    """`gmv demo` starts its own broker, replays the festival, serves the total, exits 0 on ^C."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    demo = subprocess.Popen(GMV + ["demo", "--speed", "max", "--port", "0",
                                   "--order-scale", "0.0001"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = demo.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert match, line
        totals = wait_totals(int(match.group(1)), lambda t: t["gmv_cents"] == TOTAL
                             and t["minute"] == 15839)
        assert totals["stats"]["rejected"] == 0 and totals["stats"]["gaps"] == 0
        assert "?operator=1 (token: " in demo.stdout.readline()
        assert "replay done" in demo.stdout.readline()
    finally:
        demo.send_signal(signal.SIGINT)
        out, err = demo.communicate(timeout=15)
    assert demo.returncode == 0, err
    assert "Traceback" not in err and "stopped" in err


def test_sigterm_stops_the_aggregator_cleanly_with_a_final_checkpoint(mosquitto, topics,
                                                                      tmp_path):
    """`docker stop` (SIGTERM) ends `gmv aggregate` with exit 0 and its totals on disk."""
    from simulator.scenario import scenario_for_year
    from ticker.shell import checkpoint

    from .conftest import festival_limits
    path = tmp_path / "agg.ckpt"
    broker = ["--broker", mosquitto.url, "--prefix", topics.prefix]
    port = free_port()
    from gmv.reference import SHIPPED_2020
    procs = [subprocess.Popen(GMV + ["aggregate", *broker, "--checkpoint", str(path),
                                     "--reference", str(SHIPPED_2020)],
                              stderr=subprocess.PIPE, text=True),
             subprocess.Popen(GMV + ["serve", *broker, "--port", str(port)])]
    try:
        wait_for_port(port)
        time.sleep(0.5)
        assert main(["simulate", *broker, "--scenario", "2019", "--order-scale", "0.0001"]) == 0
        wait_totals(port, lambda t: t["gmv_cents"] == scenario_for_year(2019).gmv_cents)
        procs[0].send_signal(signal.SIGTERM)
        _, err = procs[0].communicate(timeout=15)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
    assert procs[0].returncode == 0 and "stopped" in err and "Traceback" not in err
    saved = checkpoint.load(path, festival_limits())
    assert saved.gmv_cents == scenario_for_year(2019).gmv_cents


def run_gmv(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, float]:
    """`gmv ARGS` as a process: exit code, stderr and seconds taken."""
    start = time.monotonic()
    done = subprocess.run(GMV + list(args), capture_output=True, text=True, timeout=60, env=env)
    return done.returncode, done.stderr, time.monotonic() - start


def assert_one_error_line(err: str, *parts: str) -> None:
    assert err.count("\n") == 1 and err.startswith("gmv: error: "), err
    assert "Traceback" not in err and all(part in err for part in parts), err


@pytest.mark.parametrize("data, reason", [
    (None, ": cannot read: No such file or directory"),
    ("a directory", ": cannot read: Is a directory"),
    (b"minute,gmv_cents\n# caf\xe9\n0,5\n", ":2: not UTF-8 text (byte 0xe9)"),
    (b"\x89PNG\r\n\x1a\n\x00", ":1: not UTF-8 text (byte 0x89)"),
], ids=["missing", "directory", "latin-1", "binary"])
def test_replay_of_an_unreadable_curve_exits_2_with_one_line_naming_it(tmp_path, data, reason):
    """`gmv replay X.csv` on a missing, directory, Latin-1 or binary X.csv: one line naming it."""
    path = tmp_path / "festival.csv"
    if data == "a directory":
        path.mkdir()
    elif data is not None:
        path.write_bytes(data)
    code, err, _ = run_gmv("replay", str(path))
    assert code == 2
    assert_one_error_line(err, f"{path}{reason}")


@pytest.mark.parametrize("text, cents", [
    ("elapsed,cumulative_usd\n24:00,0.05\n", 5),
    ("minute,gmv_cents\n0,150000000\n3,7\n", 150_000_007),
    ("elapsed,cumulative_cents\n01:00,500\n02:00,500\n03:00,900\n", 900),
], ids=["five cents in a day", "minutes left out", "a flat hour"])
def test_replay_of_a_curve_with_minutes_without_gmv_publishes_it_exactly(
        mosquitto, topics, tmp_path, capsys, text, cents):
    """A curve with minutes of no GMV replays them as no orders, and its total to the cent."""
    path = tmp_path / "mine.csv"
    path.write_text(text)
    broker = ["--broker", mosquitto.url, "--prefix", topics.prefix]
    aggregator = subprocess.Popen(GMV + ["aggregate", *broker])  # a replay waits for one
    try:
        assert main(["replay", str(path), *broker, "--speed", "max", "--json"]) == 0
    finally:
        aggregator.terminate()
        aggregator.wait(10)
    report = orjson.loads(capsys.readouterr().out)
    assert report["gmv_cents"] == report["verdict"]["applied_cents"] == cents


def test_bench_at_a_dead_broker_exits_1_at_once_naming_it():
    """`gmv bench --broker` with nothing listening there: one line with the URL, in seconds."""
    url = f"mqtt://127.0.0.1:{free_port()}"
    code, err, seconds = run_gmv("bench", "--broker", url, "--duration", "1")
    assert code == 1 and seconds < 5
    assert_one_error_line(err, f"cannot connect to the MQTT broker at {url}")


@pytest.mark.parametrize("args, hint", [
    (["--order-scale", "1e-12"], "use --order-scale 5e-06 or more"),
    (["--shape", "festival", "--rate", "50"],
     "use --order-scale 5e-06 or more, or a higher --rate"),
], ids=["order-scale", "shape-festival-at-a-low-rate"])
def test_bench_from_the_festival_at_a_scale_of_huge_orders_exits_2_before_it_starts(args, hint):
    """`gmv bench --source festival` at an order scale whose orders pass the aggregator's USD
    100M an order: one line naming the order and the scale that fits, before anything runs
    (before: the aggregator refused those batches and the bench reported them as lost)."""
    code, err, seconds = run_gmv("bench", "--source", "festival", "--duration", "3", *args)
    assert code == 2 and seconds < 10
    assert_one_error_line(err, "the 2020 festival has an order of $423,409,703.75, more than "
                               "the aggregator takes ($100,000,000.00 an order)", hint)


def test_bench_whose_own_mosquitto_exits_at_start_says_why_in_one_line(tmp_path):
    """A Mosquitto that exits at start (a broken install) ends the bench with its own words."""
    broken = tmp_path / "mosquitto"
    broken.write_text("#!/bin/sh\necho 'Error: Unable to open config file.' >&2\nexit 3\n")
    broken.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    code, err, seconds = run_gmv("bench", "--duration", "1", env=env)
    assert code == 2 and seconds < 5
    assert_one_error_line(
        err, "the bench's Mosquitto exited with code 3: Error: Unable to open config file.")


@pytest.mark.parametrize("command", [["serve", "--broker", "{broker}"],
                                     ["replay", "2019", "--broker", "{broker}"], ["demo"]],
                         ids=["serve", "replay", "demo"])
def test_a_port_in_use_exits_2_with_one_line_naming_it(mosquitto, command):
    """The field report: a taken --port gave a 33-line ExceptionGroup. Now one line."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = [arg.replace("{broker}", mosquitto.url) for arg in command]
        if command[0] == "replay":  # standalone replays open a ticker of their own
            argv = ["replay", "2019", "--order-scale", "0.0001"]
        code, err, _ = run_gmv(*argv, "--port", str(port))
    assert code == 2
    assert_one_error_line(err, f"--port={port}: cannot listen on 127.0.0.1:{port}")


def test_a_control_token_on_the_command_line_is_refused_with_the_reason():
    """A token in argv shows in `ps`: refused, pointing to the file and the environment."""
    code, err, _ = run_gmv("control", "pause", "--broker", "mqtt://127.0.0.1:1",
                           "--control-token", "s3cret")
    assert code == 2
    assert_one_error_line(err, "--control-token-file", "GMV_CONTROL_TOKEN", "ps")
    assert "s3cret" not in err


def test_control_token_file_feeds_gmv_control(tmp_path):
    """The token comes from --control-token-file (whitespace stripped); an empty file is named."""
    empty = tmp_path / "empty"
    empty.write_text("\n")
    code, err, _ = run_gmv("control", "pause", "--broker", "mqtt://127.0.0.1:1",
                           "--control-token-file", str(empty))
    assert code == 2
    assert_one_error_line(err, f"--control-token-file={empty}: empty")
