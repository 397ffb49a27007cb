"""Decode + apply of one batch with the caches as the aggregator finds them, this code against
an earlier revision's and the plain numpy kernel, in one run.

    .venv/bin/python benchmarks/apply_cold.py [--against c8a73d7] [--rounds 10]
                                              [--json benchmarks/results/apply_cold.json]

Inside `gmv aggregate` a batch arrives in a buffer the socket has just written, after the
broker client, the totals and the previous batch have pushed the 4 MB of brand totals out of
the caches; `core_ratios.py` times the same work with everything warm. Here each batch is a
fresh copy of its payload made after 1 MiB of other writes, then `wire.decode` +
`AggregateState.apply` are timed (thread CPU time, µs a batch). Cases, interleaved round by
round (which goes first alternates):

* `this`: `ticker.core.state` of this checkout;
* `against`: `ticker/core/state.py` of git revision `--against` (read with `git show`: skipped
  where there is no history), on the same batches;
* `kernel`: the plain numpy of what apply computes (`_common.KernelArrays.all_scatters`:
  six `np.add.at`/`np.bincount` into separate arrays), the baseline any aggregator pays.

Both dimension sets: a reference file's 12 countries x 3 platforms, and 256 x 256 (no file:
`gmv bench`). 36 batches of 10,000 orders cut from Nov 11 12:00; every state's totals are
checked equal at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import (KernelArrays, festival_batches, festival_limits, machine_info, median,
                     system_busy_seconds, write_json)

from ticker.core.state import AggregateState
from ticker.core.wire import Limits, decode, encode

ROOT = Path(__file__).resolve().parents[1]
ARRAYS = ("gmv_by_brand", "orders_by_brand", "gmv_by_country", "orders_by_country",
          "gmv_by_platform", "orders_by_platform", "brand_overseas", "gmv_by_minute")


def state_at(revision: str, tmp: str):
    """AggregateState as `ticker/core/state.py` was at `revision`, or None without git."""
    try:
        source = subprocess.run(["git", "-C", str(ROOT), "show", f"{revision}:ticker/core/state.py"],
                                capture_output=True, check=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    path = Path(tmp, "state_against.py")
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("state_against", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.AggregateState


def measure(limits: Limits, payloads: list[bytes], classes: dict, rounds: int) -> dict:
    junk = np.ones(1 << 20, np.uint8)
    targets = {name: cls(limits) for name, cls in classes.items()}
    targets["kernel"] = KernelArrays(limits)
    seqs = dict.fromkeys(targets, 0)
    samples: dict[str, list[float]] = {name: [] for name in targets}

    def run(name: str, repeat: int = 4) -> float:
        target, cpu = targets[name], 0.0
        for _ in range(repeat):
            for payload in payloads:
                junk[:] = 1  # the rest of the process between two batches
                buffer = bytes(bytearray(payload))  # as the socket hands it over
                start = time.thread_time()
                batch = dataclasses.replace(decode(buffer, limits), seq=seqs[name])
                if name == "kernel":
                    target.all_scatters(batch)
                else:
                    target.apply(batch)
                cpu += time.thread_time() - start
                seqs[name] += 1
        return cpu / (repeat * len(payloads)) * 1e6

    names = list(targets)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            samples[name].append(run(name))
    states = [t for n, t in targets.items() if n != "kernel"]
    for name in ARRAYS:
        assert all(np.array_equal(getattr(states[0], name), getattr(s, name)) for s in states), name
    result = {name: {"median_us": median(v), "samples_us": v} for name, v in samples.items()}
    for name in targets:
        if name != "this":
            result[f"this/{name}"] = median(np.asarray(samples["this"]) / np.asarray(samples[name]))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", default="c8a73d7", help="git revision (default: c8a73d7)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    festival = festival_limits()
    payloads = [encode(b) for b in festival_batches(10_000, 36)]
    doc: dict = {"benchmark": "apply_cold", "command": "benchmarks/apply_cold.py " +
                 " ".join(sys.argv[1:]), "machine": machine_info(), "against": args.against}
    busy0, own0, t0 = system_busy_seconds(), time.process_time(), time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        classes = {"this": AggregateState}
        against = state_at(args.against, tmp)
        if against is not None:
            classes["against"] = against
        for label, limits in (("12 x 3 (reference file)", festival),
                              ("256 x 256 (no file)", dataclasses.replace(
                                  festival, n_countries=256, n_platforms=256))):
            doc[label] = measure(limits, payloads, classes, args.rounds)
    elapsed = time.perf_counter() - t0
    doc["others_cores"] = max(0.0, (system_busy_seconds() - busy0
                                    - (time.process_time() - own0)) / elapsed)
    print(f"decode + apply of a 10,000-order batch, cold cache, median µs of {args.rounds} rounds "
          f"(against = {args.against}); others used {doc['others_cores']:.2f} cores")
    for label in ("12 x 3 (reference file)", "256 x 256 (no file)"):
        row = doc[label]
        cells = "  ".join(f"{name} {row[name]['median_us']:6.1f}" for name in row
                          if isinstance(row[name], dict))
        ratios = "  ".join(f"{name} x{row[name]:.2f}" for name in row if "/" in name)
        print(f"{label:<26}{cells}   {ratios}")
    if args.json:
        write_json(args.json, doc)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
