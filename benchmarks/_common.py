"""Shared helpers for the benchmarks: festival-shaped batches, timing, processes, machine info.

Batches come from the 2020 scenario at order_scale=1 (the real order count): minute 15120
(2020-11-11 12:00 Beijing time) holds a few hundred thousand orders (315,122 with the first
scenario, 369,599 with the calibrated one), so 10,000- and 100,000-order batches are slices of
one real minute and their brand/country/platform mix is festival-shaped (Zipf brands, about 88%
domestic, 90% Tmall/Taobao).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import inspect
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson

from simulator.generator import MinuteOrders
from ticker.core.dimensions import FESTIVAL_2020
from ticker.core.wire import OrderBatch, Limits

BUSY_MINUTE = 15120  # 2020-11-11 12:00 Beijing time: 300,000-400,000 orders at order_scale=1
RESULTS = Path(__file__).resolve().parent / "results"
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def festival_limits() -> Limits:
    """What `gmv aggregate` accepts (gmv/cli.py `_limits`)."""
    return Limits(n_brands=250_000, n_minutes=FESTIVAL_2020.minutes, n_countries=12,
                  n_platforms=3, max_order_cents=10**10)


def festival_2020(order_scale: float = 1.0):
    """The 2020 scenario, whichever way simulator/scenario.py currently exposes it."""
    from simulator import scenario as module

    base = getattr(module, "FESTIVAL_2020_SCENARIO", None)
    if base is None:
        base = module.scenario_for_year(2020)
    return dataclasses.replace(base, order_scale=order_scale)


@functools.cache
def minute_orders(minute: int = BUSY_MINUTE) -> MinuteOrders:
    return festival_2020(1.0).orders(minute)


def festival_batches(n_orders: int, count: int, *, producer: str = "bench",
                     first_seq: int = 0) -> list[OrderBatch]:
    """`count` batches of `n_orders` consecutive orders of the busy minute (wrapping around)."""
    orders = minute_orders()
    total = len(orders)
    if n_orders > total:
        raise ValueError(f"{n_orders} orders > {total} in minute {BUSY_MINUTE}")
    slots = total // n_orders
    batches = []
    for i in range(count):
        start = (i % slots) * n_orders
        part = orders.slice(start, start + n_orders)
        batches.append(OrderBatch(producer, first_seq + i, BUSY_MINUTE, part.amount_cents,
                                  part.brand, part.country, part.platform))
    return batches


# -- the naive baseline: one JSON object per order, summed into Python dicts ------------------

def naive_messages(batch: OrderBatch) -> list[bytes]:
    """One JSON document per order (what a per-order MQTT message would carry)."""
    return [orjson.dumps({"producer": batch.producer, "minute": batch.minute,
                          "amount_cents": a, "brand": b, "country": c, "platform": p})
            for a, b, c, p in zip(batch.amount_cents.tolist(), batch.brand.tolist(),
                                  batch.country.tolist(), batch.platform.tolist())]


class NaiveTotals:
    """The same totals as AggregateState (by brand, minute, country, platform), in dicts."""

    def __init__(self) -> None:
        self.gmv_by_brand: dict[int, int] = {}
        self.orders_by_brand: dict[int, int] = {}
        self.gmv_by_minute: dict[int, int] = {}
        self.orders_by_minute: dict[int, int] = {}
        self.gmv_by_country: dict[int, int] = {}
        self.orders_by_country: dict[int, int] = {}
        self.gmv_by_platform: dict[int, int] = {}
        self.orders_by_platform: dict[int, int] = {}
        self.gmv_cents = 0
        self.orders = 0

    def apply_messages(self, messages: list[bytes]) -> None:
        loads = orjson.loads
        gb, ob = self.gmv_by_brand, self.orders_by_brand
        gm, om = self.gmv_by_minute, self.orders_by_minute
        gc, oc = self.gmv_by_country, self.orders_by_country
        gp, op = self.gmv_by_platform, self.orders_by_platform
        gmv = orders = 0
        for message in messages:
            o = loads(message)
            a, b, c, p, m = (o["amount_cents"], o["brand"], o["country"], o["platform"],
                             o["minute"])
            gb[b] = gb.get(b, 0) + a
            ob[b] = ob.get(b, 0) + 1
            gm[m] = gm.get(m, 0) + a
            om[m] = om.get(m, 0) + 1
            gc[c] = gc.get(c, 0) + a
            oc[c] = oc.get(c, 0) + 1
            gp[p] = gp.get(p, 0) + a
            op[p] = op.get(p, 0) + 1
            gmv += a
            orders += 1
        self.gmv_cents += gmv
        self.orders += orders


# -- the bare kernels ------------------------------------------------------------------------

def apply_marks_overseas() -> bool:
    """Whether the current `AggregateState.apply` also marks brands sold from abroad."""
    from ticker.core.state import AggregateState

    return "brand_overseas" in inspect.getsource(AggregateState.apply)


def source_digests() -> dict[str, str]:
    """sha256 (first 12 hex digits) of the product files measured, to tell versions apart."""
    root = Path(__file__).resolve().parent.parent
    out = {}
    for name in ("ticker/core/wire.py", "ticker/core/state.py", "ticker/core/feed.py", "ticker/shell/server.py",
                 "ticker/shell/mqtt.py", "ticker/shell/aggregator.py", "simulator/scenario.py",
                 "simulator/generator.py", "simulator/catalog.py"):
        with contextlib.suppress(OSError):
            out[name] = hashlib.sha256((root / name).read_bytes()).hexdigest()[:12]
    return out


class KernelArrays:
    """The same int64 arrays as AggregateState, for the bare numpy kernels."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.overseas = apply_marks_overseas()
        self.brand_overseas = np.zeros(limits.n_brands, np.uint8)
        self.gmv_by_brand = np.zeros(limits.n_brands, np.int64)
        self.orders_by_brand = np.zeros(limits.n_brands, np.int64)
        self.gmv_by_minute = np.zeros(limits.n_minutes, np.int64)
        self.orders_by_minute = np.zeros(limits.n_minutes, np.int64)
        self.gmv_by_country = np.zeros(limits.n_countries, np.int64)
        self.orders_by_country = np.zeros(limits.n_countries, np.int64)
        self.gmv_by_platform = np.zeros(limits.n_platforms, np.int64)
        self.orders_by_platform = np.zeros(limits.n_platforms, np.int64)

    def one_scatter(self, batch: OrderBatch) -> None:
        """Kernel A: the single scatter GMV-by-brand, nothing else."""
        np.add.at(self.gmv_by_brand, batch.brand, batch.amount_cents)

    def all_scatters(self, batch: OrderBatch) -> None:
        """Kernel B: the plain numpy of the totals `AggregateState.apply` computes (as apply
        did before its cache work), no Python bookkeeping."""
        amount = batch.amount_cents
        batch_gmv = int(amount.sum())
        np.add.at(self.gmv_by_brand, batch.brand, amount)
        np.add.at(self.orders_by_brand, batch.brand, 1)
        np.add.at(self.gmv_by_country, batch.country, amount)
        np.add.at(self.gmv_by_platform, batch.platform, amount)
        self.orders_by_country += np.bincount(batch.country, minlength=self.limits.n_countries)
        self.orders_by_platform += np.bincount(batch.platform,
                                               minlength=self.limits.n_platforms)
        if self.overseas:  # as apply does since it tracks brands sold from abroad
            self.brand_overseas[batch.brand[batch.country != 0]] = 1
        self.gmv_by_minute[batch.minute] += batch_gmv
        self.orders_by_minute[batch.minute] += len(amount)


# -- statistics ------------------------------------------------------------------------------

def median(values) -> float:
    return float(np.median(np.asarray(values, dtype=np.float64)))


def percentiles(values, qs=(50, 99)) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    if len(a) == 0:
        return {f"p{q}": float("nan") for q in qs} | {"max": float("nan"), "n": 0}
    out = {f"p{q}": float(np.percentile(a, q)) for q in qs}
    out["max"] = float(a.max())
    out["n"] = int(len(a))
    return out


# -- processes and sockets -------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout} s")


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_times(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process (all threads) from /proc, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / _CLK_TCK, int(fields[12]) / _CLK_TCK


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all threads) from /proc, in seconds."""
    return sum(cpu_times(pid))


def system_busy_seconds() -> float:
    """CPU seconds spent busy on all CPUs since boot (/proc/stat), to tell others' load."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = v
    return (user + nice + system + irq + softirq + steal) / _CLK_TCK


def raise_nofile(wanted: int) -> int:
    """Raise the soft open-files limit towards `wanted` (at most the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


MOSQUITTO_BENCH_CONF = """\
listener {port} 127.0.0.1
allow_anonymous true
persistence false
log_dest none
# Nothing may be dropped during a ceiling run: unlimited queue and in-flight window.
max_queued_messages 0
max_queued_bytes 0
max_inflight_messages 0
max_inflight_bytes 0
set_tcp_nodelay true
"""


@contextlib.contextmanager
def own_mosquitto(stock: bool = False) -> Iterator[tuple[int, subprocess.Popen]]:
    """A Mosquitto of our own on a free port of 127.0.0.1; yields (port, process). `stock`:
    as users start it, `mosquitto -p PORT` with no configuration (loopback only, 1,000
    queued messages and 20 in flight a client), instead of MOSQUITTO_BENCH_CONF."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="gmv-bench-mosq-") as tmp:
        conf = Path(tmp) / "mosquitto.conf"
        if not stock:
            conf.write_text(MOSQUITTO_BENCH_CONF.format(port=port))
        argv = [MOSQUITTO, "-p", str(port)] if stock else [MOSQUITTO, "-c", str(conf)]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_for_port(port)
            yield port, proc
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# -- machine description ---------------------------------------------------------------------

def machine_info() -> dict[str, object]:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for name in ("numpy", "orjson", "websockets", "aiomqtt", "paho.mqtt"):
        with contextlib.suppress(Exception):
            module = __import__(name, fromlist=["__version__"])
            versions[name] = getattr(module, "__version__", "?")
    mosquitto = "?"
    with contextlib.suppress(Exception):
        out = subprocess.run([MOSQUITTO, "-h"], capture_output=True, text=True, timeout=5)
        mosquitto = (out.stdout + out.stderr).splitlines()[0].strip()
    with contextlib.suppress(OSError), open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    return {"nproc": os.cpu_count(), "cpu_model": model, "sources": source_digests(),
            "python": sys.version.split()[0], "implementation": platform.python_implementation(),
            "kernel": platform.release(), "mosquitto": mosquitto, "loadavg_at_start": load,
            **versions}


def write_json(path: str | os.PathLike, document: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2
                                        | orjson.OPT_SERIALIZE_NUMPY) + b"\n")
