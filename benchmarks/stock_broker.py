"""A max-speed replay of the default scenario on a stock Mosquitto against a tuned one.

    .venv/bin/python benchmarks/stock_broker.py [--runs 3] [--order-scale 0.001]

For each broker -- stock (`mosquitto -p PORT`: 1,000 queued messages and 20 in flight a
client) and tuned (deploy/mosquitto.conf's limits: 1,000,000 queued, 100 in flight) -- and
each run: a fresh broker, `gmv aggregate` (checkpointing, the default) and `gmv simulate
--speed max --json` as processes. Reported: the wall time of the simulate (its verdict waits
for the aggregator to apply everything), the verdict, and the shard's totals. The baseline in
the same run is a producer without flow control (what every replay was before): it publishes
the same scenario into the stock broker as fast as it can, and the aggregator's totals show
what survived. Medians of the runs; JSON in benchmarks/results/stock_broker.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._common import MOSQUITTO, RESULTS, free_port, machine_info  # noqa: E402
from simulator.publisher import publish_scenario  # noqa: E402
from simulator.scenario import scenario_for_year  # noqa: E402
from ticker.shell.mqtt import BrokerSettings, ReliablePublisher, Topics, connect  # noqa: E402

GMV = [sys.executable, "-m", "gmv.cli"]
TUNED = "max_queued_messages 1000000\nmax_inflight_messages 100\n"


@contextlib.contextmanager
def broker(tuned: bool, tmp: Path):
    port = free_port()
    if tuned:
        conf = tmp / "mosquitto.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n{TUNED}"
                        "log_dest none\n")
        argv = [MOSQUITTO, "-c", str(conf)]
    else:
        argv = [MOSQUITTO, "-p", str(port)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    try:
        yield BrokerSettings("127.0.0.1", port)
    finally:
        proc.kill()
        proc.wait(10)


async def last_totals(settings: BrokerSettings, done, timeout: float = 120.0) -> dict:
    """Shard 0's live totals once `done(totals)` holds, or the last ones after `timeout`."""
    latest: dict = {}
    with contextlib.suppress(TimeoutError):
        async with connect(settings) as client, asyncio.timeout(timeout):
            await client.subscribe("gmv/v1/totals/0", qos=1)
            async for message in client.messages:
                latest = orjson.loads(message.payload)
                if not message.retain and done(latest):
                    break
    return latest


async def one_run(tuned: bool, flow: bool, order_scale: float) -> dict:
    scenario = scenario_for_year(2020, order_scale=order_scale)
    with tempfile.TemporaryDirectory() as tmp, broker(tuned, Path(tmp)) as settings:
        env = dict(os.environ, GMV_STATE_DIR=tmp)
        aggregator = subprocess.Popen(GMV + ["aggregate", "--broker", settings.url], env=env,
                                      stderr=subprocess.DEVNULL)
        try:
            await last_totals(settings, lambda t: True, 20)
            start = time.monotonic()
            if flow:
                done = subprocess.run(GMV + ["simulate", "--broker", settings.url, "--speed",
                                             "max", "--order-scale", str(order_scale),
                                             "--json"], capture_output=True, text=True,
                                      env=env, timeout=600)
                seconds = time.monotonic() - start
                verdict = orjson.loads(done.stdout.splitlines()[-1])["verdict"]
            else:
                async with ReliablePublisher(settings) as publisher:
                    await publish_scenario(publisher, scenario, Topics(), producer="unpaced",
                                           speed=None)
                seconds, verdict = time.monotonic() - start, None
            totals = await last_totals(settings, lambda t: t["gmv_cents"] == scenario.gmv_cents,
                                       10 if flow else 30)
        finally:
            aggregator.terminate()
            aggregator.wait(30)
    return {"seconds": round(seconds, 2), "exact": bool(verdict and verdict["exact"]),
            "shown_cents": totals.get("gmv_cents"), "gaps": totals.get("gaps"),
            "expected_cents": scenario.gmv_cents}


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--order-scale", type=float, default=0.001)
    args = parser.parse_args(argv)
    cases = {"stock broker, flow control (gmv simulate)": (False, True),
             "tuned broker, flow control (gmv simulate)": (True, True),
             "stock broker, no flow control (baseline)": (False, False)}
    report: dict = {"machine": machine_info(), "order_scale": args.order_scale, "cases": {}}
    for name, (tuned, flow) in cases.items():
        runs = [await one_run(tuned, flow, args.order_scale) for _ in range(args.runs)]
        shown = [r["shown_cents"] or 0 for r in runs]
        report["cases"][name] = {
            "runs": runs, "median_seconds": statistics.median(r["seconds"] for r in runs),
            "exact_runs": sum(r["exact"] for r in runs),
            "median_shown_share": round(statistics.median(shown) / runs[0]["expected_cents"], 4)}
        case = report["cases"][name]
        print(f"{name:45} median {case['median_seconds']:6.2f} s, exact {case['exact_runs']}/"
              f"{args.runs}, screen at {case['median_shown_share']:.1%} of the total",
              flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "stock_broker.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    asyncio.run(main())
