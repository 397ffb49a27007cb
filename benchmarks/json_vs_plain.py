"""Column JSON: our aggregator against the consumer a user would write by hand, same run.

    .venv/bin/python benchmarks/json_vs_plain.py --json benchmarks/results/json_vs_plain.json
    .venv/bin/python benchmarks/json_vs_plain.py --encoding binary --json ...   # the same, binary

A Mosquitto of our own on a free port (unlimited queue, nothing dropped), one publisher
process (`mqtt_ceiling.py`'s lean QoS 1 publisher: pre-encoded 10,000-order slices of a real
2020 minute, each with its own seq, `--window` in flight) and, in turn, one of two consumers,
each its own process, on the same topic and the same stream:

* `plain`: what a user would write by hand: a paho-mqtt 2 client (`loop_forever`, an
  `on_message` callback, paho's automatic PUBACK), `orjson.loads` (or `np.frombuffer` for
  binary), `np.array` of each column and `np.add.at` into GMV and orders by brand, country,
  platform and minute. No validation, no dedup, no framework.
* `ours`: `ticker.shell.aggregator.Aggregator` as `gmv bench` and `gmv aggregate
  --no-checkpoint` run it: aiomqtt with manual acks, `wire.decode` (every rule), dedup by
  (producer, seq), `AggregateState.apply`, acks to the producer and totals every 50 ms.
  `--kinds ... ours-durable` adds the durable one (checkpoints, acks after each).

Cases alternate (plain, ours, plain, ours, ...) `--repeat` times; each consumer subscribes
first, the publisher then sends `--count` batches as fast as the broker takes them, and the
consumer's rate is first to last batch. With `--pin` (default on 2+ CPUs) the consumer runs
on CPU 1, broker and publisher on CPU 0. Reported per case: orders/s, consumer CPU µs per
batch, max RSS, exact (GMV and orders equal to what was published); then the medians and the
median of the paired ratios ours / plain. Every run stops by itself (`--deadline` s a case).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import _common
from _common import cpu_seconds, festival_limits, machine_info, own_mosquitto, \
    system_busy_seconds, write_json

HERE = Path(__file__).resolve()
CEILING = HERE.parent / "mqtt_ceiling.py"


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# == consumers ===================================================================================

def plain_main(args: argparse.Namespace) -> None:
    """The hand-written consumer: paho callback, orjson, np.add.at."""
    import numpy as np
    import orjson
    import paho.mqtt.client as mqtt

    limits = festival_limits()
    gmv_brand = np.zeros(limits.n_brands, np.int64)
    orders_brand = np.zeros(limits.n_brands, np.int64)
    gmv_country = np.zeros(256, np.int64)
    orders_country = np.zeros(256, np.int64)
    gmv_platform = np.zeros(256, np.int64)
    orders_platform = np.zeros(256, np.int64)
    gmv_minute = np.zeros(limits.n_minutes, np.int64)
    orders_minute = np.zeros(limits.n_minutes, np.int64)
    seen = {"n": 0, "gmv": 0, "orders": 0, "t_first": 0.0, "t_last": 0.0, "cpu0": 0.0}

    def columns(payload: bytes):
        if args.encoding == "json":
            doc = orjson.loads(payload)
            return (doc["minute"], np.array(doc["amount_cents"]), np.array(doc["brand"]),
                    np.array(doc["country"]), np.array(doc["platform"]))
        n = int.from_bytes(payload[8:12], "little")
        plen = int.from_bytes(payload[6:8], "little")
        flags = payload[5]
        start = 24 + (8 if flags & 1 else 0)
        offset = start + plen + (-plen % 8)
        amount = np.frombuffer(payload, "<i8", n, offset)
        brand = np.frombuffer(payload, "<u4", n, offset + 8 * n)
        country = np.frombuffer(payload, "u1", n, offset + 12 * n)
        platform = np.frombuffer(payload, "u1", n, offset + 13 * n)
        return int.from_bytes(payload[20:24], "little"), amount, brand, country, platform

    def on_message(c, userdata, message) -> None:
        minute, amount, brand, country, platform = columns(message.payload)
        np.add.at(gmv_brand, brand, amount)
        np.add.at(orders_brand, brand, 1)
        np.add.at(gmv_country, country, amount)
        np.add.at(orders_country, country, 1)
        np.add.at(gmv_platform, platform, amount)
        np.add.at(orders_platform, platform, 1)
        gmv = int(amount.sum())
        gmv_minute[minute] += gmv
        orders_minute[minute] += len(amount)
        now = time.perf_counter()
        if not seen["n"]:
            seen["t_first"] = now
        seen["t_last"], seen["n"] = now, seen["n"] + 1
        seen["gmv"] += gmv
        seen["orders"] += len(amount)
        if seen["n"] >= args.count:
            c.disconnect()

    def on_connect(c, userdata, flags, reason, properties) -> None:
        c.subscribe(args.topic, qos=1)

    def on_subscribe(c, userdata, mid, reasons, properties) -> None:
        seen["cpu0"] = time.process_time()
        print("READY", flush=True)

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                         client_id=f"plain-{uuid.uuid4().hex[:8]}", clean_session=True)
    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, \
        on_message
    timer = threading.Timer(args.deadline, client.disconnect)
    timer.start()
    client.connect("127.0.0.1", args.port, keepalive=60)
    client.loop_forever()
    timer.cancel()
    print("RESULT " + json.dumps({
        "received": seen["n"], "t_first": seen["t_first"], "t_last": seen["t_last"],
        "cpu_s": time.process_time() - seen["cpu0"], "gmv_cents": seen["gmv"],
        "orders": seen["orders"], "max_rss_mb": _rss_mb()}), flush=True)


async def ours_main(args: argparse.Namespace) -> None:
    """The product's consumer, counted at `AggregateState.apply`."""
    from ticker.core.dimensions import FESTIVAL_2020
    from ticker.shell.aggregator import Aggregator
    from ticker.shell.mqtt import BrokerSettings, Topics

    broker = BrokerSettings("127.0.0.1", args.port)
    topics = Topics(args.topic.split("/orders/", 1)[0])
    with tempfile.TemporaryDirectory(prefix="gmv-json-vs-plain-") as tmp:
        path = Path(tmp) / "shard.ckpt" if args.kind == "ours-durable" else None
        aggregator = Aggregator(broker, topics, festival_limits(), FESTIVAL_2020,
                                checkpoint_path=path)
        state = aggregator.state
        apply, seen, done = state.apply, {"n": 0, "t_first": 0.0, "t_last": 0.0}, \
            asyncio.Event()

        def counted_apply(batch, *a, **kw) -> bool:  # on the instance only
            applied = apply(batch, *a, **kw)
            now = time.perf_counter()
            if not seen["n"]:
                seen["t_first"] = now
            seen["t_last"], seen["n"] = now, seen["n"] + 1
            if seen["n"] >= args.count:
                done.set()
            return applied

        state.apply = counted_apply
        task = asyncio.create_task(aggregator.run())
        await asyncio.wait_for(aggregator.ready.wait(), 15)
        cpu0 = time.process_time()
        print("READY", flush=True)
        timed_out = False
        try:
            await asyncio.wait_for(done.wait(), args.deadline)
        except TimeoutError:
            timed_out = True
        cpu = time.process_time() - cpu0
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    print("RESULT " + json.dumps({
        "received": seen["n"], "t_first": seen["t_first"], "t_last": seen["t_last"],
        "cpu_s": cpu, "gmv_cents": state.gmv_cents, "orders": state.orders,
        "duplicates": state.duplicates, "rejected": dict(state.rejected),
        "timed_out": timed_out, "max_rss_mb": _rss_mb()}), flush=True)


# == orchestrator ================================================================================

def _spawn(argv: list[str], cpu: int | None) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, text=True,
                            cwd=HERE.parent)
    if cpu is not None:
        os.sched_setaffinity(proc.pid, {cpu})
    return proc


def _line(proc: subprocess.Popen, prefix: str, timeout: float) -> str:
    found: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            if line.startswith(prefix):
                found.append(line[len(prefix):].strip())
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    if not found:
        raise TimeoutError(f"no {prefix!r} from pid {proc.pid} within {timeout} s")
    return found[0]


def run_case(args: argparse.Namespace, port: int, broker_pid: int, kind: str) -> dict:
    pin = args.pin and (os.cpu_count() or 1) >= 2
    producer = f"bench-{uuid.uuid4().hex[:8]}"
    topic = f"bench/{uuid.uuid4().hex[:10]}/orders/{producer}/0"
    common = ["--port", str(port), "--topic", topic, "--count", str(args.count),
              "--batch-orders", str(args.batch_orders), "--deadline", str(args.deadline)]
    profile = ["--profile", args.profile] if args.profile and kind != "plain" else []
    sub = _spawn([str(HERE), "--role", "consumer", "--kind", kind, "--encoding", args.encoding,
                  *profile, *common], 1 if pin else None)
    pub = None
    try:
        _line(sub, "READY", 30)
        b0, busy0, w0 = cpu_seconds(broker_pid), system_busy_seconds(), time.monotonic()
        pub = _spawn([str(CEILING), "--role", "pub", "--encoding", args.encoding,
                      "--publisher", "lean", "--window", str(args.window), "--producer",
                      producer, *common], 0 if pin else None)
        published = json.loads(_line(pub, "RESULT", args.deadline + 60))
        got = json.loads(_line(sub, "RESULT", args.deadline + 30))
        b1, busy1, w1 = cpu_seconds(broker_pid), system_busy_seconds(), time.monotonic()
        sub.wait(10)
        pub.wait(10)
    finally:
        for proc in (sub, pub):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    n, span = got["received"], got["t_last"] - got["t_first"]
    rate = (n - 1) / span if n > 1 and span > 0 else float("nan")
    return {
        "kind": kind, "encoding": args.encoding, "batch_orders": args.batch_orders,
        "published": published["sent"], "received": n, "messages_per_s": rate,
        "orders_per_s": rate * args.batch_orders,
        "consumer_cpu_us_per_batch": got["cpu_s"] / n * 1e6 if n else None,
        "consumer_cores": got["cpu_s"] / span if span > 0 else None,
        "consumer_max_rss_mb": got["max_rss_mb"],
        "broker_cpu_us_per_batch": (b1 - b0) / published["sent"] * 1e6,
        "publisher_messages_per_s": published["sent"] / published["seconds"],
        "exact": got["gmv_cents"] == published["gmv_cents"]
        and got["orders"] == published["orders"],
        "rejected": got.get("rejected", {}), "pinned": pin,
        "others_cores": ((busy1 - busy0) - (b1 - b0) - published["cpu_s"] - got["cpu_s"])
        / (w1 - w0),
    }


def orchestrate(args: argparse.Namespace) -> int:
    rows: list[dict] = []
    started = time.monotonic()
    print(f"{'kind':<13} {'orders/s':>12} {'cpu µs/batch':>13} {'rss MB':>7} {'exact':>6} "
          f"{'others':>7}")
    if args.broker_inflight:  # as gmv bench's Mosquitto: a bounded in-flight window
        _common.MOSQUITTO_BENCH_CONF = _common.MOSQUITTO_BENCH_CONF.replace(
            "max_inflight_messages 0", f"max_inflight_messages {args.broker_inflight}")
    with own_mosquitto() as (port, broker):
        for r in range(args.repeat):
            for kind in args.kinds:
                if time.monotonic() - started > args.max_seconds:
                    break
                row = run_case(args, port, broker.pid, kind)
                row["round"] = r
                rows.append(row)
                print(f"{kind:<13} {row['orders_per_s']:>12,.0f} "
                      f"{row['consumer_cpu_us_per_batch']:>13,.0f} "
                      f"{row['consumer_max_rss_mb']:>7.0f} {str(row['exact']):>6} "
                      f"{row['others_cores']:>7.2f}", flush=True)
    summary: dict[str, dict] = {}
    for kind in args.kinds:
        mine = [row for row in rows if row["kind"] == kind]
        if mine:
            summary[kind] = {
                "runs": len(mine),
                "median_orders_per_s": statistics.median(r["orders_per_s"] for r in mine),
                "median_cpu_us_per_batch": statistics.median(
                    r["consumer_cpu_us_per_batch"] for r in mine),
                "all_exact": all(r["exact"] for r in mine)}
    ratios = {}
    for kind in args.kinds:
        if kind == "plain":
            continue
        pairs = [(a, b) for a in rows for b in rows if a["round"] == b["round"]
                 and a["kind"] == kind and b["kind"] == "plain"]
        if pairs:
            ratios[kind] = {
                "orders_per_s": statistics.median(a["orders_per_s"] / b["orders_per_s"]
                                                  for a, b in pairs),
                "cpu_per_batch": statistics.median(
                    a["consumer_cpu_us_per_batch"] / b["consumer_cpu_us_per_batch"]
                    for a, b in pairs)}
    for kind, s in summary.items():
        print(f"median {kind:<13} {s['median_orders_per_s']:>12,.0f} orders/s "
              f"{s['median_cpu_us_per_batch']:>8,.0f} µs/batch  exact {s['all_exact']}")
    for kind, ratio in ratios.items():
        print(f"{kind} / plain (median of paired runs): orders/s x{ratio['orders_per_s']:.2f}, "
              f"CPU per batch x{ratio['cpu_per_batch']:.2f}")
    if args.json:
        write_json(args.json, {
            "command": " ".join([".venv/bin/python", "benchmarks/json_vs_plain.py",
                                 *sys.argv[1:]]),
            "machine": machine_info(), "broker_inflight": args.broker_inflight, "rows": rows,
            "summary": summary,
            "ratios_to_plain": ratios})
    return 0 if all(s["all_exact"] for s in summary.values()) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=("orchestrate", "consumer"), default="orchestrate",
                        help=argparse.SUPPRESS)
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    parser.add_argument("--kinds", nargs="+", default=["plain", "ours"],
                        choices=("plain", "ours", "ours-durable"))
    parser.add_argument("--encoding", choices=("json", "binary"), default="json")
    parser.add_argument("--batch-orders", type=int, default=10_000)
    parser.add_argument("--count", type=int, default=2_000, help="batches per case")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of all kinds")
    parser.add_argument("--window", type=int, default=64, help="QoS 1 messages in flight")
    parser.add_argument("--deadline", type=float, default=40.0, help="seconds a case at most")
    parser.add_argument("--max-seconds", type=float, default=300.0,
                        help="no new case after this many seconds")
    parser.add_argument("--broker-inflight", type=int, default=0, metavar="N",
                        help="Mosquitto's max_inflight_messages (default 0: unlimited; "
                             "gmv bench uses 32)")
    parser.add_argument("--no-pin", dest="pin", action="store_false")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--profile", metavar="PATH",
                        help="cProfile our consumer into PATH (pstats), for finding costs")
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--topic", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "consumer":
        if args.kind == "plain":
            plain_main(args)
        elif args.profile:
            import cProfile

            cProfile.runctx("asyncio.run(ours_main(args))", globals(), {"args": args},
                            args.profile)
        else:
            asyncio.run(ours_main(args))
        return 0
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
