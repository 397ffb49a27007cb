"""What waking N per-viewer tasks costs per version, by the way each task waits (no sockets).

    .venv/bin/python benchmarks/wake_cost.py [--viewers 5000] [--rounds 30] [--json PATH]

`TickerServer._send_latest` parks every viewer's task on the feed's "changed" event between
versions. This measures the CPU (process time) of one version's wake-up of all N tasks, per
viewer, for three ways of waiting, interleaved round by round in one run:

* plain        `await event.wait()`
* wait_for     `await asyncio.wait_for(event.wait(), 1.0)`: the heartbeat timeout as
               ticker/shell/server.py writes it; on Python 3.11 every call wraps the wait in a new
               Task and schedules a timer;
* timeout_cm   `async with asyncio.timeout(1.0): await event.wait()`: the same timeout
               without the extra Task.

The send itself is not included (see fanout.py for whole frames).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

from _common import machine_info, write_json


async def _viewer(state: dict, how: str, woke: list[int], n: int, done: asyncio.Event) -> None:
    sent = 0
    while True:
        if state["seq"] == sent:
            event = state["event"]
            try:
                if how == "plain":
                    await event.wait()
                elif how == "wait_for":
                    await asyncio.wait_for(event.wait(), 1.0)
                else:
                    async with asyncio.timeout(1.0):
                        await event.wait()
            except TimeoutError:
                pass
            continue
        sent = state["seq"]
        woke[0] += 1
        if woke[0] == n:
            done.set()


async def measure(n: int, rounds: int) -> dict[str, list[float]]:
    kinds = ("plain", "wait_for", "timeout_cm")
    samples: dict[str, list[float]] = {k: [] for k in kinds}
    groups = {}
    for how in kinds:
        state, woke, done = {"event": asyncio.Event(), "seq": 0}, [0], asyncio.Event()
        tasks = [asyncio.create_task(_viewer(state, how, woke, n, done)) for _ in range(n)]
        groups[how] = (state, woke, done, tasks)
    await asyncio.sleep(0.05)
    for _ in range(rounds):
        for how in kinds:
            state, woke, done, _ = groups[how]
            woke[0] = 0
            done.clear()
            t0 = time.process_time()
            event, state["event"] = state["event"], asyncio.Event()
            state["seq"] += 1
            event.set()
            await done.wait()
            for _ in range(3):  # let every task park again before the clock stops
                await asyncio.sleep(0)
            samples[how].append((time.process_time() - t0) / n * 1e6)
    for _, _, _, tasks in groups.values():
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--viewers", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    samples = asyncio.run(measure(args.viewers, args.rounds))
    doc = {"benchmark": "wake_cost", "command": "benchmarks/wake_cost.py " + " ".join(sys.argv[1:]),
           "machine": machine_info(), "viewers": args.viewers, "rounds": args.rounds,
           "median_cpu_us_per_viewer_per_version":
               {k: statistics.median(v) for k, v in samples.items()}}
    base = doc["median_cpu_us_per_viewer_per_version"]["plain"]
    for how, us in doc["median_cpu_us_per_viewer_per_version"].items():
        print(f"{how:<12}{us:8.2f} µs per viewer per version  ({us / base:4.1f}x plain; "
              f"{us * args.viewers * 10 / 1e6:5.2f} cores for {args.viewers} viewers at 10 Hz)")
    if args.json:
        write_json(args.json, doc)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
