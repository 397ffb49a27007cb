"""1 shard against 2 in one run: `gmv bench --shards N` alternated, the medians and their ratio.

Each round runs the same overload (more orders/s offered than the pipeline takes, so the
broker holds the backlog and the aggregated rate is the pipeline's capacity) once with one
shard and once with two, in alternating order, so that the noise of a shared machine falls
on both alike. Reported: per run and as medians, the aggregated orders/s, the aggregators'
CPU, and the 2-to-1 ratio of the medians.

    .venv/bin/python benchmarks/shards.py --rounds 3 --json benchmarks/results/shards.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

GMV = [sys.executable, "-m", "gmv.cli"]


def bench(shards: int, args: argparse.Namespace) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        done = subprocess.run(
            GMV + ["bench", "--shards", str(shards), "--rate", str(args.rate), "--duration",
                   str(args.duration), "--batch-orders", str(args.batch_orders),
                   "--encoding", args.encoding, "--producers", str(args.producers),
                   "--drain-timeout", "120", "--json", out.name],
            capture_output=True, text=True, timeout=args.duration * 6 + 120)
        if done.returncode != 0:
            raise SystemExit(f"gmv bench --shards {shards} failed: {done.stderr[-500:]}")
        report = json.loads(Path(out.name).read_text())
    cpu = report["cpu_cores"]
    latency = report["latency_aggregated_ms"] or {}
    return {"shards": shards, "aggregated_orders_per_s": report["aggregated_orders_per_s"],
            "aggregated_orders": report["aggregated_orders"],
            "lost_orders": report["lost_orders"],
            "double_counted_orders": report["double_counted_orders"],
            "shard_cores": [cpu[f"aggregator-{k}"] for k in range(shards)],
            "broker_cores": cpu.get("broker"),
            "producer_cores": round(sum(v for k, v in cpu.items()
                                        if k.startswith("producer-")), 3),
            "p99_aggregated_ms": latency.get("p99")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=float, default=30_000_000)
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--batch-orders", type=int, default=100_000)
    parser.add_argument("--encoding", choices=("binary", "json"), default="binary")
    parser.add_argument("--producers", type=int, default=1)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    runs = []
    for r in range(args.rounds):
        for shards in ((1, 2) if r % 2 == 0 else (2, 1)):
            runs.append(bench(shards, args))
            print(json.dumps(runs[-1]), flush=True)
    median = {n: statistics.median(run["aggregated_orders_per_s"] for run in runs
                                   if run["shards"] == n) for n in (1, 2)}
    result = {"settings": vars(args), "runs": runs, "median_orders_per_s": median,
              "ratio_2_to_1": round(median[2] / median[1], 3)}
    print(f"median aggregated orders/s: 1 shard {median[1] / 1e6:.2f}M, 2 shards "
          f"{median[2] / 1e6:.2f}M, ratio {result['ratio_2_to_1']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
