"""`gmv` command line: demo, simulate, aggregate, serve. The only place that calls asyncio.run.

A bad setting exits 2 with one line naming it; Ctrl-C stops cleanly with exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import ssl
import sys
import time
import uuid
from contextlib import AsyncExitStack
from pathlib import Path
from urllib.parse import urlsplit

import orjson

from simulator.publisher import PublishReport, publish_scenario
from simulator.scenario import Scenario, scenario_for_year, scenario_names

from .aggregator import Aggregator
from .dimensions import Window
from .errors import ConfigError
from .mqtt import BrokerSettings, ReliablePublisher, Topics, connect, watch_totals
from .server import TickerServer
from .wire import Limits

DEMO_MINUTES = 10  # the default demo replays the whole window in about this many minutes


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        raise ConfigError(message)


def _speed(text: str) -> float | str | None:
    if text in ("max", "auto"):
        return None if text == "max" else text
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number or 'max', not {text!r}")
    return value


def _positive(kind: type, upper: float = float("inf")):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not 0 < value <= upper:
            raise argparse.ArgumentTypeError(f"must be a number in (0, {upper:g}], not {text!r}")
        return value
    return parse


def _origin(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path \
            or parts.query or parts.fragment or parts.username:
        raise argparse.ArgumentTypeError(
            f"must be scheme://host[:port] as browsers send it, not {text!r}")
    return text


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0-65535, not {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gmv", description="Live GMV ticker for sales festivals.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def common(p: argparse.ArgumentParser, *, broker_required: bool) -> None:
        p.add_argument("--broker", required=broker_required, metavar="mqtt://HOST:PORT",
                       help="MQTT broker URL" + ("" if broker_required else
                                                 " (default: start an embedded broker)"))
        p.add_argument("--prefix", default="gmv/v1", help="topic prefix (default gmv/v1)")
        p.add_argument("--username", help="MQTT user name")
        p.add_argument("--password-file", metavar="PATH",
                       help="file holding the MQTT password (or set GMV_MQTT_PASSWORD)")
        p.add_argument("--ca-file", metavar="PATH",
                       help="CA certificate(s) for mqtts:// (default: the system's)")

    def simulation(p: argparse.ArgumentParser, default_speed: str) -> None:
        p.add_argument("--scenario", choices=scenario_names(), default="2020",
                       help="festival year to replay (default 2020)")
        p.add_argument("--speed", type=_speed, default=_speed(default_speed),
                       help=f"simulated time per wall time, 'max', or 'auto': the whole window "
                            f"in {DEMO_MINUTES} minutes (default {default_speed})")
        p.add_argument("--seed", type=int, default=2020)
        p.add_argument("--order-scale", type=_positive(float, 1.0),
                       default=0.001, help="fraction of the real order count (default 0.001)")
        p.add_argument("--batch-orders", type=_positive(int, 1_000_000),
                       default=10_000, help="orders per batch at most (default 10000)")
        p.add_argument("--encoding", choices=("binary", "json"), default="binary")

    def serving(p: argparse.ArgumentParser, default_port: int) -> None:
        p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
        p.add_argument("--port", type=_port, default=default_port,
                       help=f"HTTP/websocket port (default {default_port})")
        p.add_argument("--allowed-origin", action="append", metavar="ORIGIN", type=_origin,
                       help="accept websockets only from this Origin (repeatable), "
                            "e.g. https://screens.example.com (default: any)")

    demo = commands.add_parser("demo", help="broker, simulator, aggregator and ticker in one")
    common(demo, broker_required=False)
    simulation(demo, "auto")
    serving(demo, 8080)

    sim = commands.add_parser("simulate", help="publish a festival's orders to the broker")
    common(sim, broker_required=True)
    simulation(sim, "max")
    sim.add_argument("--producer", default=None, help="producer id (default: sim-RANDOM)")
    sim.add_argument("--json", action="store_true", help="print the final report as JSON")

    agg = commands.add_parser("aggregate", help="consume orders into numpy totals")
    common(agg, broker_required=True)
    agg.add_argument("--shard", default="0", help="shard name (default 0)")
    agg.add_argument("--scenario", choices=scenario_names(), default="2020",
                     help="festival whose window and brand reference data to use (default 2020)")
    agg.add_argument("--seed", type=int, default=2020, help="the simulator's seed (brand data)")
    agg.add_argument("--brands", type=_positive(int, 2**32 - 1), default=250_000,
                     help="brand ids accepted: 0..N-1 (default 250000)")
    agg.add_argument("--checkpoint", metavar="PATH", type=Path,
                     help="checkpoint file: restored on start, written atomically; batches are "
                          "acknowledged only once checkpointed (default: in memory only)")
    agg.add_argument("--checkpoint-interval", type=_positive(float, 3600), default=1.0,
                     help="seconds between checkpoints at most (default 1)")
    agg.add_argument("--max-unacked", type=_positive(int, 65535), default=16,
                     help="checkpoint when this many batches await acknowledgement; keep it "
                          "below the broker's max_inflight_messages (default 16)")

    srv = commands.add_parser("serve", help="serve the ticker page and websocket")
    common(srv, broker_required=True)
    serving(srv, 8080)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(asctime)s %(name)s %(levelname)s %(message)s")
        if not args.verbose:  # paho logs socket errors that we report ourselves, once
            logging.getLogger("mqtt").setLevel(logging.CRITICAL)
        broker = _broker(args)
        run = {"demo": _demo, "simulate": _simulate, "aggregate": _aggregate,
               "serve": _serve}[args.command]
        return asyncio.run(run(args, broker))
    except ConfigError as exc:
        print(f"gmv: error: {exc}", file=sys.stderr)
        return 2
    except ConnectionError as exc:
        print(f"gmv: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("gmv: stopped", file=sys.stderr)
        return 0


def _broker(args: argparse.Namespace) -> BrokerSettings | None:
    password = os.environ.get("GMV_MQTT_PASSWORD")
    if args.password_file:
        try:
            password = Path(args.password_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"--password-file={args.password_file}: {exc.strerror}") from None
    if password and not args.username:
        raise ConfigError("--password-file (or GMV_MQTT_PASSWORD) needs --username")
    if args.ca_file:
        try:
            ssl.create_default_context(cafile=args.ca_file)
        except FileNotFoundError:
            raise ConfigError(f"--ca-file={args.ca_file}: no such file") from None
        except (ssl.SSLError, OSError):
            raise ConfigError(f"--ca-file={args.ca_file}: not a PEM CA certificate") from None
    if not args.broker:
        if args.username or password or args.ca_file:
            raise ConfigError("--username, --password-file and --ca-file need --broker")
        return None
    broker = BrokerSettings.from_url(args.broker, username=args.username, password=password,
                                     ca_file=args.ca_file)
    if args.ca_file and not broker.tls:
        raise ConfigError(f"--ca-file needs an mqtts:// broker, not {broker.url}")
    return broker


def _scenario(args: argparse.Namespace) -> Scenario:
    scenario = scenario_for_year(int(args.scenario), seed=args.seed,
                                 order_scale=getattr(args, "order_scale", 0.001))
    if getattr(args, "speed", None) == "auto":
        args.speed = scenario.window.minutes / DEMO_MINUTES
    return scenario


def _limits(window: Window, brands: int = 250_000) -> Limits:
    return Limits(n_brands=brands, n_minutes=window.minutes,
                  n_countries=12, n_platforms=3, max_order_cents=10**10)


def _progress(every: float = 2.0):
    last = [time.monotonic()]

    def show(report: PublishReport) -> None:
        now = time.monotonic()
        if now - last[0] >= every:
            last[0] = now
            print(f"  minute {report.minutes:,}: {report.orders:,} orders, "
                  f"{_usd(report.gmv_cents)} published", file=sys.stderr)
    return show


def _usd(cents: int) -> str:
    return f"${cents // 100:,}.{cents % 100:02d}"


async def _simulate(args: argparse.Namespace, broker: BrokerSettings) -> int:
    scenario = _scenario(args)
    producer = args.producer or f"sim-{uuid.uuid4().hex[:8]}"
    async with ReliablePublisher(broker) as publisher:
        report = await publish_scenario(
            publisher, scenario, Topics(args.prefix), producer=producer, speed=args.speed,
            batch_orders=args.batch_orders, binary=args.encoding == "binary",
            progress=_progress())
    if args.json:
        print(orjson.dumps(dataclasses.asdict(report)).decode())
    else:
        print(f"published {report.orders:,} orders in {report.batches:,} batches, "
              f"GMV {_usd(report.gmv_cents)} ({report.gmv_cents} cents), "
              f"in {report.seconds:.1f} s as {producer}")
    return 0


async def _aggregate(args: argparse.Namespace, broker: BrokerSettings) -> int:
    await _check_broker(broker)
    scenario = _scenario(args)
    first_time = scenario.catalog.first_time if args.brands == scenario.n_brands else None
    aggregator = Aggregator(broker, Topics(args.prefix), _limits(scenario.window, args.brands),
                            scenario.window, shard=args.shard, checkpoint_path=args.checkpoint,
                            checkpoint_interval=args.checkpoint_interval,
                            max_unacked=args.max_unacked, first_time=first_time)
    resumed = (f", resuming {aggregator.state.orders:,} orders from {args.checkpoint}"
               if aggregator.restored else "")
    print(f"aggregating {Topics(args.prefix).all_orders} from {broker.url} as shard "
          f"{args.shard}{resumed}", file=sys.stderr, flush=True)
    await aggregator.run()
    return 0


async def _serve(args: argparse.Namespace, broker: BrokerSettings) -> int:
    await _check_broker(broker)
    server = TickerServer(allowed_origins=args.allowed_origin)
    async with await _listen(server, args.host, args.port) as ws_server, \
            asyncio.TaskGroup() as tg:
        tg.create_task(watch_totals(broker, Topics(args.prefix), server.receive_totals),
                       name="watch-totals")
        tg.create_task(server.run_pusher(), name="pusher")
        print(f"ticker at http://{args.host}:{_bound_port(ws_server)}/", flush=True)
    return 0


async def _demo(args: argparse.Namespace, broker: BrokerSettings | None) -> int:
    topics = Topics(args.prefix)
    async with AsyncExitStack() as stack:
        if broker is None:
            from .embedded_broker import EmbeddedBroker
            embedded = await stack.enter_async_context(EmbeddedBroker())
            broker = BrokerSettings("127.0.0.1", embedded.port)
        else:
            await _check_broker(broker)
        server = TickerServer(allowed_origins=args.allowed_origin)
        ws_server = await stack.enter_async_context(await _listen(server, args.host, args.port))
        scenario = _scenario(args)
        aggregator = Aggregator(broker, topics, _limits(scenario.window), scenario.window,
                                first_time=scenario.catalog.first_time)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(aggregator.run(), name="aggregator")
            tg.create_task(watch_totals(broker, topics, server.receive_totals), name="watch")
            tg.create_task(server.run_pusher(), name="pusher")
            await aggregator.ready.wait()
            speed = "max" if args.speed is None else f"{args.speed:g}x"
            print(f"GMV ticker: open http://{args.host}:{_bound_port(ws_server)}/ "
                  f"(broker {broker.url}, speed {speed}; Ctrl-C stops)", flush=True)
            async with ReliablePublisher(broker) as publisher:
                report = await publish_scenario(
                    publisher, scenario, topics, producer=f"demo-{uuid.uuid4().hex[:8]}",
                    speed=args.speed, batch_orders=args.batch_orders,
                    binary=args.encoding == "binary")
            print(f"replay done in {report.seconds:.1f} s: {report.orders:,} orders, "
                  f"GMV {_usd(report.gmv_cents)}; the ticker stays up until Ctrl-C", flush=True)
    return 0


async def _check_broker(broker: BrokerSettings) -> None:
    async with connect(broker):
        pass


async def _listen(server: TickerServer, host: str, port: int):
    try:
        return await server.serve(host, port)
    except OSError as exc:
        raise ConfigError(f"--port={port}: cannot listen on {host}:{port} ({exc.strerror})") \
            from None


def _bound_port(ws_server) -> int:
    return ws_server.sockets[0].getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
