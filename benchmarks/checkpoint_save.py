"""A durable aggregator's checkpoints: one save, and a small-batch replay end to end, this
code against an earlier revision's, in one run.

    .venv/bin/python benchmarks/checkpoint_save.py [--against 73ba72e] [--rounds 3]
                                                   [--json benchmarks/results/checkpoint_save.json]

`gmv aggregate` acknowledges a batch only once a checkpoint holds it, and the broker sends at
most its in-flight limit unacknowledged (20 on a stock Mosquitto), so an aggregator of small
batches saves its whole state (4.5 MB for the 2020 festival) every `--max-unacked` (16)
batches. Cases, interleaved round by round:

* `save`: `checkpoint.save` (the spare file rewritten in place) against a new temp file a
  save (`checkpoint._write_atomically`, what `save` did before), and `export` (copy and
  SHA-256), median ms of 15 saves each, in the same directory;
* `replay`: `gmv simulate --order-scale 0.0001` (224,245 orders in 15,840 one-minute batches)
  into `gmv aggregate` (default checkpoint) on a stock `mosquitto -p PORT`, this checkout
  against `--against` (unpacked with `git archive`: skipped where there is no history);
  wall seconds of the replay and the aggregator's CPU seconds.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from _common import (MOSQUITTO, cpu_seconds, festival_limits, free_port, machine_info, median,
                     wait_for_port, write_json)

from ticker.core.state import AggregateState
from ticker.shell import checkpoint

ROOT = Path(__file__).resolve().parents[1]


def save_ms(directory: Path) -> dict[str, float]:
    state = AggregateState(festival_limits())
    data, path = checkpoint.export(state), directory / "agg.ckpt"

    def timed(step) -> float:
        times = []
        for _ in range(15):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        return median(times) * 1000

    return {"save_in_place": timed(lambda: checkpoint.save(path, data)),
            "save_new_file": timed(lambda: checkpoint._write_atomically(path, data)),
            "export": timed(lambda: checkpoint.export(state)), "bytes": len(data)}


def replay(root: Path, port: int, state_dir: Path) -> dict[str, float]:
    """Seconds of `gmv simulate` into a fresh durable `gmv aggregate` of the code at `root`."""
    env = dict(os.environ, PYTHONPATH=str(root), XDG_STATE_HOME=str(state_dir))
    gmv = [sys.executable, "-m", "gmv.cli"]
    broker = ["--broker", f"mqtt://127.0.0.1:{port}", "--prefix", f"bench/{uuid.uuid4().hex}"]
    aggregator = subprocess.Popen(gmv + ["aggregate", *broker], cwd=root, env=env,
                                  stderr=subprocess.DEVNULL)
    try:
        time.sleep(2)  # subscribed
        start = time.perf_counter()
        subprocess.run(gmv + ["simulate", *broker, "--order-scale", "0.0001"], cwd=root,
                       env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return {"seconds": time.perf_counter() - start,
                "aggregator_cpu_s": cpu_seconds(aggregator.pid)}
    finally:
        aggregator.terminate()
        aggregator.wait(15)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--against", default="73ba72e")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    doc: dict = {"command": "benchmarks/checkpoint_save.py " + " ".join(sys.argv[1:]),
                 "machine": machine_info(), "against": args.against, "rounds": []}
    with tempfile.TemporaryDirectory(prefix="gmv-ckpt-bench-") as tmp:
        old = Path(tmp, "against")
        old.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.against],
                                 capture_output=True)
        has_old = archive.returncode == 0
        if has_old:
            subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
        port = free_port()
        broker = subprocess.Popen([MOSQUITTO, "-p", str(port)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)  # stock: no config file
        try:
            wait_for_port(port)
            for n in range(args.rounds):
                codes = [("this", ROOT)] + ([("against", old)] if has_old else [])
                if n % 2:
                    codes.reverse()
                row = {"save_ms": save_ms(Path(tmp))}
                for name, root in codes:
                    row[name] = replay(root, port, Path(tmp, f"state-{name}-{n}"))
                doc["rounds"].append(row)
                print(row, flush=True)
        finally:
            broker.terminate()
            broker.wait(10)
    rounds = doc["rounds"]
    summary = {k: median([r["save_ms"][k] for r in rounds])
               for k in ("save_in_place", "save_new_file", "export")}
    for name in ("this", "against"):
        if name in rounds[0]:
            summary[f"{name}_replay_s"] = median([r[name]["seconds"] for r in rounds])
            summary[f"{name}_aggregator_cpu_s"] = median([r[name]["aggregator_cpu_s"]
                                                          for r in rounds])
    doc["median"] = summary
    print("median:", {k: round(v, 2) for k, v in summary.items()})
    if args.json:
        write_json(args.json, doc)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
