"""The ticker page over a sustained run, measured inside Chromium: does its JS heap stay flat
and its frame time low through an accelerated festival hour at 10 updates a second?

    .venv/bin/python benchmarks/page_soak.py [--seconds 120] [--idle 20] [--json PATH]

Real parts, as separate processes: a Mosquitto of our own, `gmv aggregate --no-checkpoint`
and `gmv serve` (2020 against 2019, the RMB rate, brand names: the full view), and Debian's
Chromium driven by Playwright at 1920x1080 on the page in kiosk mode. This process publishes
the 2020 scenario's first hour of Nov 11 (minutes 14400-14459, the festival's busiest, at
order scale 0.001: real festival-shaped orders) as 20 batches per simulated minute, one every
100 ms, so the hour takes `--seconds` (120 s: 30x real time) and the aggregator and server
turn it into about 10 versions of the view a second.

Measured in the page over CDP (`Performance.getMetrics`: JSHeapUsedSize, TaskDuration,
ScriptDuration, LayoutCount, RecalcStyleCount; `HeapProfiler.collectGarbage` before the heap
figures that say what is retained) and with requestAnimationFrame deltas (a recorder of its
own, on the original rAF, running in both phases), for two phases of the same run:

* idle      the same page holding the same view, nothing arriving (the same-run baseline);
* soak      the festival hour at 10 updates a second.

It also counts the frames the page itself asks for (`requestAnimationFrame` calls by
web/app.js), and after the soak checks the page goes back to asking for none.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _common import (cpu_seconds, free_port, machine_info, own_mosquitto,  # noqa: E402
                     system_busy_seconds, wait_for_port, write_json)

from simulator.scenario import scenario_for_year  # noqa: E402
from ticker.shell.mqtt import BrokerSettings, ReliablePublisher, Topics  # noqa: E402
from ticker.core.wire import OrderBatch, encode  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run"]
FIRST_MINUTE = 14400           # 2020-11-11 00:00 Beijing time
MINUTES = 60
BATCHES_PER_MINUTE = 20
TICK = 0.1                     # one batch every 100 ms
GMV = str(ROOT / ".venv" / "bin" / "gmv")

# Before any page script: count the page's own frame requests, and keep the original rAF for
# the frame-time recorder, which stores deltas in a preallocated array (no garbage of its own).
INIT = """
window.__raf = window.requestAnimationFrame.bind(window);
window.__pageFrames = 0;
window.requestAnimationFrame = (cb) => { window.__pageFrames++; return window.__raf(cb); };
window.__deltas = new Float64Array(1 << 16); window.__n = 0; window.__last = 0;
window.__rec = false;
window.__tick = (t) => {
  if (window.__last && window.__n < window.__deltas.length) {
    window.__deltas[window.__n++] = t - window.__last;
  }
  window.__last = t;
  if (window.__rec) window.__raf(window.__tick);
};
window.__startFrames = () => {
  window.__n = 0; window.__last = 0; window.__rec = true; window.__raf(window.__tick);
};
window.__stopFrames = () => {
  window.__rec = false; return Array.from(window.__deltas.subarray(0, window.__n));
};
"""

METRICS = ("JSHeapUsedSize", "JSHeapTotalSize", "TaskDuration", "ScriptDuration",
           "LayoutCount", "RecalcStyleCount", "LayoutDuration", "Nodes", "JSEventListeners")


async def metrics(cdp) -> dict[str, float]:
    got = await cdp.send("Performance.getMetrics")
    return {m["name"]: m["value"] for m in got["metrics"] if m["name"] in METRICS}


async def after_gc(cdp) -> dict[str, float]:
    """The metrics once a full garbage collection has run: what the page retains."""
    await cdp.send("HeapProfiler.collectGarbage")
    return await metrics(cdp)


def chromium_pids() -> list[int]:
    """Chromium's processes (browser, renderers, GPU, utility), all descendants of ours."""
    parents: dict[int, int] = {}
    names: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                head, tail = (entry / "stat").read_text().rsplit(")", 1)
                parents[int(entry.name)] = int(tail.split()[1])
                names[int(entry.name)] = head.split("(", 1)[1]
    ours, found = {os.getpid()}, True
    while found:
        found = False
        for pid, ppid in parents.items():
            if ppid in ours and pid not in ours:
                ours.add(pid)
                found = True
    return [pid for pid in ours if "chrom" in names.get(pid, "")]


def chromium_cpu() -> float:
    total = 0.0
    for pid in chromium_pids():
        with contextlib.suppress(OSError):
            total += cpu_seconds(pid)
    return total


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] if ordered else 0.0


async def phase(page, cdp, name: str, seconds: float, work=None, frames: bool = True) -> dict:
    """Run `work` (or wait) for `seconds`, measuring the page throughout (and its frame
    times with the recorder, when `frames`: the recorder itself asks for 60 frames a
    second, so the bare idle page is measured without it)."""
    g0 = await after_gc(cdp)
    heap0 = g0["JSHeapUsedSize"]
    m0 = await metrics(cdp)
    frames0 = await page.evaluate("window.__pageFrames")
    seq0 = await page.evaluate("seq")
    if frames:
        await page.evaluate("window.__startFrames()")
    cpu0, busy0 = chromium_cpu(), system_busy_seconds()
    t0 = time.monotonic()
    samples = []

    async def sample() -> None:
        while True:
            await asyncio.sleep(10)
            m = await metrics(cdp)
            samples.append(round(m["JSHeapUsedSize"] / 1e6, 2))

    sampler = asyncio.create_task(sample())
    try:
        if work is None:
            await asyncio.sleep(seconds)
        else:
            await work
    finally:
        sampler.cancel()
    wall = time.monotonic() - t0
    cpu1, busy1 = chromium_cpu(), system_busy_seconds()
    deltas = await page.evaluate("window.__stopFrames()") if frames else []
    m1 = await metrics(cdp)
    frames1 = await page.evaluate("window.__pageFrames")
    seq1 = await page.evaluate("seq")
    g1 = await after_gc(cdp)
    heap1 = g1["JSHeapUsedSize"]
    per_s = lambda key: (m1[key] - m0[key]) / wall  # noqa: E731
    return {
        "phase": name, "seconds": round(wall, 1),
        "versions_per_s": round((seq1 - seq0) / wall, 2),
        "chromium_cores": round((cpu1 - cpu0) / wall, 3),
        "machine_busy_cores": round((busy1 - busy0) / wall, 2),
        "main_thread_busy": round(per_s("TaskDuration"), 4),
        "script_busy": round(per_s("ScriptDuration"), 4),
        "layouts_per_s": round(per_s("LayoutCount"), 1),
        "style_recalcs_per_s": round(per_s("RecalcStyleCount"), 1),
        "page_frames_per_s": round((frames1 - frames0) / wall, 1),
        "frame_ms": {"n": len(deltas), "p50": round(pct(deltas, 50), 2),
                     "p95": round(pct(deltas, 95), 2), "p99": round(pct(deltas, 99), 2),
                     "max": round(max(deltas, default=0), 2),
                     "over_50ms": sum(1 for d in deltas if d > 50),
                     "mean": round(statistics.fmean(deltas), 2) if deltas else 0},
        "heap_mb_after_gc": [round(heap0 / 1e6, 3), round(heap1 / 1e6, 3)],
        "heap_growth_kb": round((heap1 - heap0) / 1e3, 1),
        "heap_mb_samples": samples,
        "nodes_after_gc": [g0["Nodes"], g1["Nodes"]],
        "listeners_after_gc": [g0["JSEventListeners"], g1["JSEventListeners"]],
    }


def festival_hour_batches(producer: str) -> tuple[list[OrderBatch], int]:
    """The first hour of Nov 11 2020, each minute as BATCHES_PER_MINUTE consecutive batches."""
    scenario = scenario_for_year(2020, order_scale=0.001)
    batches, gmv = [], 0
    for minute in range(FIRST_MINUTE, FIRST_MINUTE + MINUTES):
        orders = scenario.orders(minute)
        n = len(orders)
        for i in range(BATCHES_PER_MINUTE):
            part = orders.slice(n * i // BATCHES_PER_MINUTE, n * (i + 1) // BATCHES_PER_MINUTE)
            batches.append(OrderBatch(producer, len(batches), minute, part.amount_cents,
                                      part.brand, part.country, part.platform))
            gmv += int(part.amount_cents.sum())
    return batches, gmv


async def aggregator_up(web: int, timeout: float = 20.0) -> None:
    """Until the server has totals from the aggregator (so it has subscribed: nothing we
    publish is lost before it listens)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            with urllib.request.urlopen(f"http://127.0.0.1:{web}/api/totals", timeout=2) as r:
                if json.load(r)["stats"]["shards"] >= 1:
                    return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"no aggregator totals within {timeout} s")


async def publish(broker: BrokerSettings, topics: Topics, batches: list[OrderBatch],
                  tick: float) -> None:
    loop = asyncio.get_running_loop()
    async with ReliablePublisher(broker) as publisher:
        start = loop.time()
        for i, batch in enumerate(batches):  # an absolute schedule: no drift
            await asyncio.sleep(max(0.0, start + i * tick - loop.time()))
            await publisher.send(topics.orders(batch.producer), encode(batch))
        await publisher.flush()


async def run(args: argparse.Namespace) -> dict:
    from playwright.async_api import async_playwright

    tick = args.seconds / (MINUTES * BATCHES_PER_MINUTE)
    batches, gmv = festival_hour_batches("soak")
    with own_mosquitto() as (port, _), tempfile.TemporaryDirectory() as state:
        broker_url = f"mqtt://127.0.0.1:{port}"
        web = free_port()
        env = dict(os.environ, GMV_STATE_DIR=state)
        procs = [subprocess.Popen([GMV, "aggregate", "--broker", broker_url, "--no-checkpoint"],
                                  env=env, stderr=subprocess.DEVNULL),
                 subprocess.Popen([GMV, "serve", "--broker", broker_url, "--port", str(web)],
                                  env=env, stderr=subprocess.DEVNULL)]
        try:
            wait_for_port(web)
            await aggregator_up(web)
            broker, topics = BrokerSettings("127.0.0.1", port), Topics()
            # A first batch so the screen has a view to hold while idle.
            await publish(broker, topics, batches[:1], 0)
            async with async_playwright() as p:
                browser = await p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
                page = await browser.new_page(viewport={"width": 1920, "height": 1080},
                                              color_scheme="dark")
                await page.add_init_script(INIT)
                cdp = await page.context.new_cdp_session(page)
                await cdp.send("Performance.enable", {"timeDomain": "threadTicks"})
                await page.goto(f"http://127.0.0.1:{web}/?kiosk=1")
                await page.wait_for_selector("#status[data-state=live]", timeout=15_000)
                await asyncio.sleep(3)
                bare = await phase(page, cdp, "idle, bare", args.idle, frames=False)
                idle = await phase(page, cdp, "idle", args.idle)
                soak = await phase(page, cdp, "soak", args.seconds,
                                   publish(broker, topics, batches[1:], tick))
                await asyncio.sleep(2)
                after = await phase(page, cdp, "after", 5)
                shown = await page.get_attribute("#gmv", "data-shown")
                view = await page.evaluate("fetch('/api/totals').then(r => r.json())")
                await browser.close()
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(10)
    page_files = {name: hashlib.sha256((ROOT / "web" / name).read_bytes()).hexdigest()[:12]
                  for name in ("index.html", "app.js", "style.css")}
    return {"benchmark": "page_soak", "machine": machine_info(), "page": page_files,
            "command": " ".join(["benchmarks/page_soak.py", *sys.argv[1:]]),
            "batches": len(batches), "gmv_cents": gmv, "shown_at_end": int(shown or 0),
            "server_at_end": {"gmv_cents": view["gmv_cents"], "stats": view["stats"]},
            "exact_at_end": int(shown or 0) == gmv == view["gmv_cents"],
            "phases": [bare, idle, soak, after]}


def report(doc: dict) -> str:
    rows = [("phase", "s", "versions/s", "Chromium cores", "machine busy", "main thread",
             "script", "layouts/s", "page rAF/s", "frame p50", "p95", "p99", "max", ">50 ms",
             "heap after GC (MB)", "growth")]
    for ph in doc["phases"]:
        f = ph["frame_ms"]
        rows.append((ph["phase"], f"{ph['seconds']}", f"{ph['versions_per_s']}",
                     f"{ph['chromium_cores']:.3f}", f"{ph['machine_busy_cores']:.2f}",
                     f"{ph['main_thread_busy']:.1%}", f"{ph['script_busy']:.1%}",
                     f"{ph['layouts_per_s']}", f"{ph['page_frames_per_s']}",
                     f"{f['p50']}", f"{f['p95']}", f"{f['p99']}", f"{f['max']}",
                     f"{f['over_50ms']}",
                     f"{ph['heap_mb_after_gc'][0]} -> {ph['heap_mb_after_gc'][1]}",
                     f"{ph['heap_growth_kb']:+} KB"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    soak = doc["phases"][2]
    lines.append(f"soak heap samples every 10 s (MB, no GC): {soak['heap_mb_samples']}")
    lines.append(f"soak, after GC: DOM nodes {soak['nodes_after_gc'][0]:.0f} -> "
                 f"{soak['nodes_after_gc'][1]:.0f}, listeners "
                 f"{soak['listeners_after_gc'][0]:.0f} -> {soak['listeners_after_gc'][1]:.0f}; "
                 f"{doc['batches']} batches, screen at the end "
                 f"{'exact' if doc['exact_at_end'] else 'NOT exact'} "
                 f"({doc['shown_at_end']} of {doc['gmv_cents']} cents; server "
                 f"{doc['server_at_end']['gmv_cents']}, {doc['server_at_end']['stats']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=120.0,
                        help="length of the festival hour's replay (default 120 s: 30x)")
    parser.add_argument("--idle", type=float, default=20.0,
                        help="length of the idle baseline (default 20 s)")
    parser.add_argument("--json", help="write the results here as well")
    args = parser.parse_args(argv)
    doc = asyncio.run(run(args))
    print(report(doc))
    if args.json:
        write_json(args.json, doc)
    return 0 if doc["exact_at_end"] else 1


if __name__ == "__main__":
    sys.exit(main())
