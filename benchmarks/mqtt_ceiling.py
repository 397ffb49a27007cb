"""MQTT ceiling: how many order batches a subscriber gets through our own Mosquitto, at what cost.

    .venv/bin/python benchmarks/mqtt_ceiling.py --json benchmarks/results/mqtt_ceiling.json
    .venv/bin/python benchmarks/mqtt_ceiling.py --batch-orders 100000 --count 2000 \
        --heavy-count 1000 --kinds lean aggregator-lean --json ...

A Mosquitto of our own on a free port of 127.0.0.1 (unlimited queue and in-flight window, so
nothing is dropped), then for each encoding (binary, JSON) and each subscriber kind, two
processes:

* publisher: pre-made payloads (36 different slices of a real 2020 minute at order_scale=1,
  the sequence number patched into each copy so that every batch is new to the aggregator's
  dedup) published at QoS 1 to one topic as fast as the broker acknowledges, `--window`
  messages in flight, for a fixed count. `lean` is a minimal asyncio MQTT 3.1.1 publisher;
  `aiomqtt` is a plain pipelined aiomqtt publisher (a task per `client.publish`), and
  `reliable` is the simulator's own `ticker.shell.mqtt.ReliablePublisher`
  (`--publishers aiomqtt reliable` adds those rows, into the lean subscriber).
* subscriber, one of
  - `aiomqtt`          aiomqtt client, `async for message in client.messages`, counts bytes;
  - `paho`             bare paho-mqtt 2 client (`loop_forever`, `on_message`), counts bytes;
  - `lean`             minimal asyncio MQTT 3.1.1 protocol: parses PUBLISH, sends PUBACK;
  - `aggregator`       the real path: `ticker.shell.aggregator.Aggregator` (aiomqtt with manual
                       acks, decode + apply, totals published every 0.2 s), no checkpoint;
  - `aggregator-lean`  the same decode + `AggregateState.apply` behind the lean protocol.

The publisher starts once the subscriber holds its subscription; the broker queues what the
subscriber has not taken yet, so the subscriber's rate (first to last message) is its own
ceiling. Reported: messages/s, orders/s and MB/s at the subscriber, losses (published -
received), and CPU per message of subscriber, broker and publisher (from /proc and
`time.process_time`). With `--pin` (default on 2+ CPUs) the subscriber runs on CPU 1 and
broker + publisher on CPU 0. Every run stops by itself (count reached or `--deadline`).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from _common import (cpu_seconds, festival_batches, festival_limits, machine_info, own_mosquitto,
                     system_busy_seconds, write_json)

HERE = Path(__file__).resolve()
SLICES = 36


# == payloads ====================================================================================

def payload_factory(encoding: str, n_orders: int, producer: str):
    """(make(seq) -> bytes, gmv_cents(seq), orders per batch): pre-encoded, seq patched in."""
    from ticker.core.wire import encode

    batches = [dataclasses.replace(b, seq=0)
               for b in festival_batches(n_orders, SLICES, producer=producer)]
    gmv = [b.gmv_cents for b in batches]
    encoded = [encode(b, binary=encoding == "binary") for b in batches]
    if encoding == "binary":
        # Header "<4sBBHIQI": the seq (uint64 LE) is at bytes 12..20.
        def make(seq: int) -> bytes:
            p = encoded[seq % SLICES]
            return b"".join((p[:12], seq.to_bytes(8, "little"), p[20:]))
    else:
        parts = []
        for p in encoded:
            head, _, tail = p.partition(b'"seq":' + str(0).encode() + b",")
            assert tail, "JSON layout changed: no seq field found"
            parts.append((head + b'"seq":', b"," + tail))

        def make(seq: int) -> bytes:
            head, tail = parts[seq % SLICES]
            return b"".join((head, str(seq).encode(), tail))
    return make, (lambda seq: gmv[seq % SLICES]), n_orders


# == a minimal MQTT 3.1.1 client protocol =======================================================

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | 0x80 if n else digit)
        if not n:
            return bytes(out)


def _mqtt_str(s: bytes) -> bytes:
    return len(s).to_bytes(2, "big") + s


def connect_packet(client_id: str, keepalive: int = 60) -> bytes:
    body = _mqtt_str(b"MQTT") + bytes((4, 0x02)) + keepalive.to_bytes(2, "big") \
        + _mqtt_str(client_id.encode())
    return b"\x10" + _varint(len(body)) + body


def subscribe_packet(topic: str, pid: int = 1, qos: int = 1) -> bytes:
    body = pid.to_bytes(2, "big") + _mqtt_str(topic.encode()) + bytes((qos,))
    return b"\x82" + _varint(len(body)) + body


class LeanMqtt(asyncio.Protocol):
    """Just enough MQTT 3.1.1: CONNECT, SUBSCRIBE (QoS 1), PUBLISH in and out, PUBACK."""

    def __init__(self, on_publish=None) -> None:
        self.buf = bytearray()
        loop = asyncio.get_running_loop()
        self.connack = loop.create_future()
        self.suback = loop.create_future()
        self.lost = loop.create_future()
        self.on_publish = on_publish  # (buf, start, end) -> None, payload is buf[start:end]
        self.on_puback = None  # (count) -> None
        self.transport = None
        self.paused = False
        self.resumed = asyncio.Event()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def pause_writing(self) -> None:
        self.paused = True
        self.resumed.clear()

    def resume_writing(self) -> None:
        self.paused = False
        self.resumed.set()

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        n, pos, acks, pubacks = len(buf), 0, [], 0
        while n - pos >= 2:
            b0, i, length, mult = buf[pos], pos + 1, 0, 1
            while i < n:
                b = buf[i]
                length += (b & 0x7F) * mult
                mult <<= 7
                i += 1
                if b < 0x80:
                    break
            else:
                break
            end = i + length
            if end > n:
                break
            kind = b0 >> 4
            if kind == 3:  # PUBLISH
                j = i + 2 + ((buf[i] << 8) | buf[i + 1])
                if b0 & 0x06:  # QoS 1 or 2 (we only subscribe at 1)
                    acks.append(b"\x40\x02" + bytes(buf[j:j + 2]))
                    j += 2
                if self.on_publish is not None:
                    self.on_publish(buf, j, end)
            elif kind == 4:  # PUBACK
                pubacks += 1
            elif kind == 2 and not self.connack.done():
                self.connack.set_result(buf[i + 1])
            elif kind == 9 and not self.suback.done():
                self.suback.set_result(buf[i + 2])
            pos = end
        if pos:
            del buf[:pos]
        if acks:
            self.transport.write(b"".join(acks))
        if pubacks and self.on_puback is not None:
            self.on_puback(pubacks)

    def connection_lost(self, exc) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)
        self.resumed.set()


async def lean_connect(port: int, client_id: str, on_publish=None) -> LeanMqtt:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(lambda: LeanMqtt(on_publish), "127.0.0.1", port)
    proto.transport.write(connect_packet(client_id))
    code = await asyncio.wait_for(proto.connack, 10)
    if code != 0:
        raise ConnectionError(f"CONNACK return code {code}")
    return proto


# == publisher ===================================================================================

async def publisher_main(args: argparse.Namespace) -> None:
    make, gmv_of, n_orders = payload_factory(args.encoding, args.batch_orders, args.producer)
    gmv = sum(gmv_of(i) for i in range(args.count))
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    if args.publisher == "lean":
        await _publish_lean(args, make)
    elif args.publisher == "reliable":
        await _publish_reliable(args, make)
    else:
        await _publish_aiomqtt(args, make)
    seconds = time.perf_counter() - t0
    print("RESULT " + json.dumps({"sent": args.count, "seconds": seconds,
                                  "cpu_s": time.process_time() - cpu0, "gmv_cents": gmv,
                                  "orders": args.count * n_orders}), flush=True)


async def _publish_lean(args: argparse.Namespace, make) -> None:
    proto = await lean_connect(args.port, f"bench-pub-{uuid.uuid4().hex[:8]}")
    topic = _mqtt_str(args.topic.encode())
    state = {"acked": 0, "inflight": 0}
    more = asyncio.Event()

    def on_puback(count: int) -> None:
        state["acked"] += count
        state["inflight"] -= count
        more.set()

    proto.on_puback = on_puback
    for seq in range(args.count):
        while state["inflight"] >= args.window:
            more.clear()
            await more.wait()
        if proto.paused:
            await proto.resumed.wait()
        payload = make(seq)
        pid = seq % 65535 + 1
        proto.transport.write(b"".join((b"\x32", _varint(len(topic) + 2 + len(payload)), topic,
                                        pid.to_bytes(2, "big"), payload)))
        state["inflight"] += 1
    while state["acked"] < args.count:
        more.clear()
        await more.wait()
    proto.transport.write(b"\xe0\x00")
    proto.transport.close()


async def _publish_aiomqtt(args: argparse.Namespace, make) -> None:
    import aiomqtt

    async with aiomqtt.Client("127.0.0.1", args.port,
                              identifier=f"bench-pub-{uuid.uuid4().hex[:8]}",
                              max_inflight_messages=args.window, timeout=30) as client:
        client.pending_calls_threshold = args.window * 2
        pending: set[asyncio.Task] = set()
        for seq in range(args.count):
            if len(pending) >= args.window:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()
            pending.add(asyncio.ensure_future(client.publish(args.topic, make(seq), qos=1)))
        await asyncio.gather(*pending)


async def _publish_reliable(args: argparse.Namespace, make) -> None:
    """The product's publisher (simulator/publisher.py): `ticker.shell.mqtt.ReliablePublisher`."""
    from ticker.shell.mqtt import BrokerSettings, ReliablePublisher

    async with ReliablePublisher(BrokerSettings("127.0.0.1", args.port),
                                 max_inflight=args.window) as publisher:
        for seq in range(args.count):
            await publisher.send(args.topic, make(seq))
        await publisher.flush()


# == subscribers =================================================================================

class Tally:
    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.received = 0
        self.bytes = 0
        self.t_first = self.t_last = 0.0
        self.done = asyncio.Event()
        self.cpu0 = 0.0

    def count(self, size: int) -> None:
        now = time.perf_counter()
        if not self.received:
            self.t_first = now
        self.t_last = now
        self.received += 1
        self.bytes += size
        if self.received >= self.expected:
            self.done.set()

    def result(self, **extra) -> dict:
        return {"received": self.received, "bytes": self.bytes, "t_first": self.t_first,
                "t_last": self.t_last, "cpu_s": time.process_time() - self.cpu0, **extra}


def _ready(tally: Tally) -> None:
    tally.cpu0 = time.process_time()
    print("READY", flush=True)


def _state_summary(state) -> dict:
    return {"orders": state.orders, "gmv_cents": state.gmv_cents, "batches": state.batches,
            "duplicates": state.duplicates, "rejected": sum(state.rejected.values())}


async def subscriber_main(args: argparse.Namespace) -> None:
    tally = Tally(args.count)
    result: dict = {}
    try:
        async with asyncio.timeout(args.deadline):
            if args.kind == "aiomqtt":
                await _sub_aiomqtt(args, tally)
            elif args.kind == "lean":
                await _sub_lean(args, tally, aggregate=False, result=result)
            elif args.kind == "aggregator-lean":
                await _sub_lean(args, tally, aggregate=True, result=result)
            elif args.kind == "aggregator":
                await _sub_aggregator(args, tally, result)
    except TimeoutError:
        result["timed_out"] = True
    print("RESULT " + json.dumps(tally.result(**result)), flush=True)


async def _sub_aiomqtt(args: argparse.Namespace, tally: Tally) -> None:
    import aiomqtt

    async with aiomqtt.Client("127.0.0.1", args.port,
                              identifier=f"bench-sub-{uuid.uuid4().hex[:8]}",
                              timeout=30) as client:
        await client.subscribe(args.topic, qos=1)
        _ready(tally)
        async for message in client.messages:
            tally.count(len(message.payload))
            if tally.done.is_set():
                break


async def _sub_lean(args: argparse.Namespace, tally: Tally, *, aggregate: bool,
                    result: dict) -> None:
    if aggregate:
        from ticker.core.state import AggregateState
        from ticker.core.wire import BatchError, decode

        state = AggregateState(festival_limits())
        limits = state.limits

        def on_publish(buf, start, end) -> None:
            payload = bytes(buf[start:end])
            try:
                state.apply(decode(payload, limits))
            except BatchError as exc:
                state.reject(exc.reason)
            tally.count(end - start)
    else:
        state = None

        def on_publish(buf, start, end) -> None:
            tally.count(end - start)

    proto = await lean_connect(args.port, f"bench-sub-{uuid.uuid4().hex[:8]}", on_publish)
    proto.transport.write(subscribe_packet(args.topic))
    await asyncio.wait_for(proto.suback, 10)
    _ready(tally)
    try:
        await tally.done.wait()
    finally:
        if state is not None:
            result.update(_state_summary(state))
        proto.transport.write(b"\xe0\x00")
        proto.transport.close()


async def _sub_aggregator(args: argparse.Namespace, tally: Tally, result: dict) -> None:
    """The product's consumer: `ticker.shell.aggregator.Aggregator` (or the older
    `ticker.shell.mqtt.run_aggregator`), no checkpoint file, i.e. ack right after apply."""
    from ticker.core.dimensions import FESTIVAL_2020
    from ticker.shell.mqtt import BrokerSettings, Topics
    from ticker.core.state import AggregateState

    broker = BrokerSettings("127.0.0.1", args.port)
    topics = Topics(args.topic.rsplit("/orders/", 1)[0])
    try:
        from ticker.shell.aggregator import Aggregator
    except ImportError:
        Aggregator = None
    if Aggregator is not None:
        aggregator = Aggregator(broker, topics, festival_limits(), FESTIVAL_2020)
        state, ready, run = aggregator.state, aggregator.ready, aggregator.run
        result["consumer"] = "ticker.shell.aggregator.Aggregator"
    else:
        from ticker.shell.mqtt import run_aggregator

        state, ready = AggregateState(festival_limits()), asyncio.Event()
        run = lambda: run_aggregator(broker, topics, state, FESTIVAL_2020,  # noqa: E731
                                     shard="bench", ready=ready)
        result["consumer"] = "ticker.shell.mqtt.run_aggregator"
    apply = state.apply

    def counted_apply(batch, *args, **kwargs) -> bool:  # on the instance only
        applied = apply(batch, *args, **kwargs)
        tally.count(len(batch) * 14)  # binary-equivalent bytes; payload size is not visible
        return applied

    state.apply = counted_apply
    task = asyncio.create_task(run())
    try:
        await asyncio.wait_for(ready.wait(), 15)
        _ready(tally)
        await tally.done.wait()
    finally:
        result.update(_state_summary(state))
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def paho_main(args: argparse.Namespace) -> None:
    import paho.mqtt.client as mqtt

    received = {"n": 0, "bytes": 0, "t_first": 0.0, "t_last": 0.0}
    cpu0 = [0.0]
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                         client_id=f"bench-sub-{uuid.uuid4().hex[:8]}", clean_session=True)
    client.max_queued_messages_set(0)

    def on_connect(c, userdata, flags, reason, properties) -> None:
        c.subscribe(args.topic, qos=1)

    def on_subscribe(c, userdata, mid, reasons, properties) -> None:
        cpu0[0] = time.process_time()
        print("READY", flush=True)

    def on_message(c, userdata, message) -> None:
        now = time.perf_counter()
        if not received["n"]:
            received["t_first"] = now
        received["t_last"] = now
        received["n"] += 1
        received["bytes"] += len(message.payload)
        if received["n"] >= args.count:
            c.disconnect()

    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    timer = threading.Timer(args.deadline, client.disconnect)
    timer.start()
    client.connect("127.0.0.1", args.port, keepalive=60)
    client.loop_forever()
    timer.cancel()
    print("RESULT " + json.dumps({"received": received["n"], "bytes": received["bytes"],
                                  "t_first": received["t_first"], "t_last": received["t_last"],
                                  "cpu_s": time.process_time() - cpu0[0]}), flush=True)


# == orchestrator ================================================================================

def _spawn(role_args: list[str], cpu: int | None) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, str(HERE), *role_args], stdout=subprocess.PIPE,
                            text=True, cwd=HERE.parent)
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


def run_case(args: argparse.Namespace, port: int, broker_pid: int, encoding: str, kind: str,
             publisher: str, count: int) -> dict:
    pin = args.pin and (os.cpu_count() or 1) >= 2
    producer = f"bench-{uuid.uuid4().hex[:8]}"
    # orders/{producer}/{partition}: the aggregator rejects any other shape (bad_topic)
    topic = f"bench/{uuid.uuid4().hex[:10]}/orders/{producer}/0"
    common = ["--port", str(port), "--topic", topic, "--count", str(count),
              "--batch-orders", str(args.batch_orders), "--deadline", str(args.deadline)]
    sub = _spawn(["--role", "paho" if kind == "paho" else "sub", "--kind", kind, *common],
                 1 if pin else None)
    pub = None
    try:
        _line(sub, "READY", 30)
        b0, busy0, w0 = cpu_seconds(broker_pid), system_busy_seconds(), time.monotonic()
        pub = _spawn(["--role", "pub", "--encoding", encoding, "--publisher", publisher,
                      "--window", str(args.window), "--producer", producer,
                      *common], 0 if pin else None)
        pub_result = json.loads(_line(pub, "RESULT", args.deadline + 60))
        sub_result = json.loads(_line(sub, "RESULT", args.deadline + 30))
        b1, busy1, w1 = cpu_seconds(broker_pid), system_busy_seconds(), time.monotonic()
        sub.wait(10)
        pub.wait(10)
    finally:
        for proc in (sub, pub):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    n = sub_result["received"]
    span = sub_result["t_last"] - sub_result["t_first"]
    rate = (n - 1) / span if n > 1 and span > 0 else float("nan")
    per_msg_bytes = sub_result["bytes"] / n if n else float("nan")
    row = {
        "encoding": encoding, "subscriber": kind, "publisher": publisher,
        "batch_orders": args.batch_orders, "published": pub_result["sent"], "received": n,
        "lost": pub_result["sent"] - n, "timed_out": bool(sub_result.get("timed_out")),
        "messages_per_s": rate, "orders_per_s": rate * args.batch_orders,
        "MB_per_s": rate * per_msg_bytes / 1e6 if kind != "aggregator" else None,
        "bytes_per_message": per_msg_bytes if kind != "aggregator" else None,
        "subscriber_cpu_us_per_message": sub_result["cpu_s"] / n * 1e6 if n else None,
        "subscriber_cores": sub_result["cpu_s"] / span if span > 0 else None,
        "broker_cpu_us_per_message": (b1 - b0) / pub_result["sent"] * 1e6,
        "publisher_cpu_us_per_message": pub_result["cpu_s"] / pub_result["sent"] * 1e6,
        "publisher_messages_per_s": pub_result["sent"] / pub_result["seconds"],
        "pinned": pin,
        # other processes' CPU during the run (cores), the machine being shared
        "others_cores": ((busy1 - busy0) - (b1 - b0) - pub_result["cpu_s"]
                         - sub_result["cpu_s"]) / (w1 - w0),
    }
    if "orders" in sub_result:
        row["aggregated_orders"] = sub_result["orders"]
        row["gmv_exact"] = (sub_result["gmv_cents"] == pub_result["gmv_cents"]
                            and n == pub_result["sent"])
        row["duplicates"], row["rejected"] = sub_result["duplicates"], sub_result["rejected"]
    return row


def print_row(r: dict) -> None:
    mb = f"{r['MB_per_s']:>8.0f}" if r["MB_per_s"] is not None else f"{'-':>8}"
    print(f"{r['encoding']:<7}{r['subscriber']:<17}{r['publisher']:<8}{r['received']:>7}"
          f"{r['lost']:>6}{r['messages_per_s']:>9.0f}{r['orders_per_s'] / 1e6:>9.2f}{mb}"
          f"{r['subscriber_cpu_us_per_message'] or float('nan'):>9.1f}"
          f"{r['broker_cpu_us_per_message']:>9.1f}{r['publisher_cpu_us_per_message']:>9.1f}"
          f"{r['publisher_messages_per_s']:>9.0f}{r['others_cores']:>7.2f}"
          f"{'' if 'gmv_exact' not in r else ('  exact' if r['gmv_exact'] else '  WRONG')}",
          flush=True)


def summarize(rows: list[dict]) -> list[dict]:
    """Medians over repetitions per (encoding, subscriber, publisher); losses summed."""
    import statistics

    out = []
    for key in dict.fromkeys((r["encoding"], r["subscriber"], r["publisher"]) for r in rows):
        rs = [r for r in rows if (r["encoding"], r["subscriber"], r["publisher"]) == key]
        summary = {"encoding": key[0], "subscriber": key[1], "publisher": key[2],
                   "batch_orders": rs[0]["batch_orders"], "repetitions": len(rs),
                   "lost": sum(r["lost"] for r in rs),
                   "gmv_exact": all(r.get("gmv_exact", True) for r in rs)}
        for name in ("messages_per_s", "orders_per_s", "MB_per_s",
                     "subscriber_cpu_us_per_message", "broker_cpu_us_per_message",
                     "publisher_cpu_us_per_message", "publisher_messages_per_s",
                     "others_cores"):
            values = [r[name] for r in rs if r.get(name) is not None]
            summary[name] = statistics.median(values) if values else None
        out.append(summary)
    return out


def orchestrate(args: argparse.Namespace) -> int:
    started = time.monotonic()
    doc = {"benchmark": "mqtt_ceiling", "command": "benchmarks/mqtt_ceiling.py "
           + " ".join(sys.argv[1:]), "machine": machine_info(), "window": args.window,
           "rows": []}
    print(f"{'enc':<7}{'subscriber':<17}{'pub':<8}{'recv':>7}{'lost':>6}{'msg/s':>9}"
          f"{'Mord/s':>9}{'MB/s':>8}{'sub µs':>9}{'brk µs':>9}{'pub µs':>9}{'pub m/s':>9}"
          f"{'others':>7}")
    print(f"{'':<7}{'':<17}{'':<8}{'':>7}{'':>6}{'':>9}{'':>9}{'':>8}"
          f"{'/msg':>9}{'/msg':>9}{'/msg':>9}")
    with own_mosquitto() as (port, broker):
        if args.pin and (os.cpu_count() or 1) >= 2:
            os.sched_setaffinity(broker.pid, {0})
        cases = [(e, k, "lean") for e in args.encodings for k in args.kinds]
        cases += [(e, "lean", p) for e in args.encodings for p in args.publishers]
        # Repetitions interleave the cases, so that they share the machine's noise.
        for rep in range(args.repeat):
            for encoding, kind, publisher in cases:
                if time.monotonic() - started > args.max_seconds:
                    print(f"skipping {encoding}/{kind}/{publisher}: over --max-seconds",
                          flush=True)
                    continue
                count = args.heavy_count if kind.startswith("aggregator") else args.count
                row = run_case(args, port, broker.pid, encoding, kind, publisher, count)
                row["repetition"] = rep
                doc["rows"].append(row)
                print_row(row)
    doc["summary"] = summarize(doc["rows"])
    if args.repeat > 1:
        print("medians over repetitions:")
        nan = float("nan")
        for r in doc["summary"]:
            print(f"  {r['encoding']:<7}{r['subscriber']:<17}{r['publisher']:<9}"
                  f"msg/s {r['messages_per_s'] or nan:>7.0f}"
                  f"  M orders/s {(r['orders_per_s'] or nan) / 1e6:6.2f}"
                  f"  sub {r['subscriber_cpu_us_per_message'] or nan:7.1f} µs/msg"
                  f"  broker {r['broker_cpu_us_per_message'] or nan:6.1f}"
                  f"  pub {r['publisher_cpu_us_per_message'] or nan:6.1f}  lost {r['lost']}")
    doc["seconds"] = time.monotonic() - started
    if args.json:
        write_json(args.json, doc)
        print(f"wrote {args.json}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=("orchestrate", "pub", "sub", "paho"),
                        default="orchestrate", help=argparse.SUPPRESS)
    parser.add_argument("--encodings", nargs="+", default=["binary", "json"],
                        choices=("binary", "json"))
    parser.add_argument("--kinds", nargs="+",
                        default=["aiomqtt", "paho", "lean", "aggregator", "aggregator-lean"],
                        choices=("aiomqtt", "paho", "lean", "aggregator", "aggregator-lean"))
    parser.add_argument("--publishers", nargs="*", default=[], choices=("aiomqtt", "reliable"),
                        help="also run these publishers into the lean subscriber "
                             "(reliable = ticker.shell.mqtt.ReliablePublisher, the simulator's)")
    parser.add_argument("--batch-orders", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=1,
                        help="repetitions; each one runs every case in turn")
    parser.add_argument("--count", type=int, default=20_000,
                        help="messages per run for the bare subscribers")
    parser.add_argument("--heavy-count", type=int, default=5_000,
                        help="messages per run for the decoding (aggregator) subscribers")
    parser.add_argument("--window", type=int, default=64, help="QoS 1 messages in flight")
    parser.add_argument("--deadline", type=float, default=40.0, help="seconds per run at most")
    parser.add_argument("--max-seconds", type=float, default=90.0,
                        help="start no new run after this many seconds")
    parser.add_argument("--no-pin", dest="pin", action="store_false")
    parser.add_argument("--json", metavar="PATH")
    # role-internal
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--topic", help=argparse.SUPPRESS)
    parser.add_argument("--encoding", help=argparse.SUPPRESS)
    parser.add_argument("--publisher", default="lean", help=argparse.SUPPRESS)
    parser.add_argument("--producer", default="bench", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "pub":
        asyncio.run(publisher_main(args))
    elif args.role == "sub":
        asyncio.run(subscriber_main(args))
    elif args.role == "paho":
        paho_main(args)
    else:
        return orchestrate(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
