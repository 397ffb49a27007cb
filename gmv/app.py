"""The `gmv` commands, wired from the parts: what runs where, in which task group.

demo / replay (standalone): broker (embedded unless --broker), aggregator, ticker server and
the replay in one process. simulate / replay --broker: the replay only. aggregate, serve,
record and control: one part each, against any broker.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import resource
import secrets
import signal
import sys
import time
import uuid
from contextlib import AsyncExitStack
from pathlib import Path

import aiomqtt
import numpy as np
import orjson

from simulator.curve_csv import CurveFileError, read_curve
from simulator.flow import FlowControl, usd as _usd
from simulator.history import curve, curve_like_for_like_2019, festival_years, festivals
from simulator.publisher import PublishReport, Replay, ScenarioSource, Source
from simulator.recording import CHATBOT, ORDERS, RecordingError, RecordingSource, \
    RecordingWriter
from simulator.scenario import Scenario, scenario_for_year
from simulator.slicing import BULK_ORDERS

from ticker.shell import checkpoint, metrics
from ticker.shell.aggregator import Aggregator
from ticker.core.control import Command, ControlError, minute_of, read_answer, sign
from ticker.core.dimensions import DEFAULT_BRANDS, DEFAULT_COUNTRIES, DEFAULT_PLATFORMS, Window
from ticker.core.errors import ConfigError
from ticker.core.partitions import Shard, partition_level
from ticker.core.feed import Comparison, Currency
from ticker.core.reference import Reference
from ticker.shell import reference as reference_file
from gmv.reference import demo_reference
from ticker.shell.mqtt import BrokerSettings, ReliablePublisher, Topics, ask, connect, \
    watch_control, watch_totals
from ticker.shell.server import TickerServer, raise_fd_limit
from ticker.core.wire import MAX_ORDER_CENTS, Limits

DEMO_MINUTES = 10  # 'auto' speed replays the whole window in about this many minutes
# Orders per batch at most without --batch-orders: small messages for a smooth screen, and
# at --speed max (binary) big ones, as the aggregator's cost is per message (the festival at
# order scale 1, docs/performance.md section 7). 100,000 (1.4 MB): the replay's window of 200
# stays under the 512 MiB deploy/mosquitto.conf queues a client, and 500,000 was no faster.
BATCH_ORDERS = 10_000
MAX_SPEED_BATCH_ORDERS = 100_000


async def run(args: argparse.Namespace, broker: BrokerSettings | None) -> int:
    # SIGTERM (docker stop, systemd) stops as cleanly as Ctrl-C: the aggregator's last
    # checkpoint is written on the way out.
    main = asyncio.current_task()
    assert main is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main.cancel)
    command = args.command
    if command in ("demo", "simulate", "replay"):
        return await play(args, broker, standalone=command == "demo" or broker is None)
    if command == "bench":
        from gmv.bench import run_bench
        return await run_bench(args, broker)
    return await {"aggregate": aggregate, "serve": serve, "record": record,
                  "control": control}[command](args, broker)


# --- what to play ----------------------------------------------------------------------------

def _scenario(name: str, args: argparse.Namespace) -> Scenario:
    return scenario_for_year(int(name), seed=getattr(args, "seed", 2020),
                             order_scale=getattr(args, "order_scale", 0.001))


def batch_orders(args: argparse.Namespace) -> int:
    """Orders per batch at most: `--batch-orders`, else the default for the speed and encoding."""
    if args.batch_orders is None:
        fast = args.speed is None and args.encoding == "binary"
        return MAX_SPEED_BATCH_ORDERS if fast else BATCH_ORDERS
    if args.encoding == "json" and args.batch_orders > BULK_ORDERS["json"]:
        raise ConfigError(f"--batch-orders={args.batch_orders}: JSON batches of more than "
                          f"{BULK_ORDERS['json']:,} orders can pass the aggregator's 4 MiB "
                          "limit; use --encoding binary or fewer orders")
    return args.batch_orders


def _source(args: argparse.Namespace) -> tuple[Source, Scenario | None]:
    """The replay's source and, when it is a scenario, the scenario (for brand data)."""
    name = getattr(args, "source", None) or args.scenario
    if name.isdigit():
        if int(name) not in festival_years():
            raise ConfigError(f"source={name}: no festival that year "
                              f"(have {festival_years()[0]}-{festival_years()[-1]})")
        scenario = _scenario(name, args)
        return ScenarioSource(scenario, batch_orders(args)), scenario
    path = Path(name)
    try:
        if path.suffix == ".csv":
            base = scenario_for_year(2020, seed=args.seed, order_scale=args.order_scale)
            scenario = dataclasses.replace(base, name=path.stem, curve=read_curve(path),
                                           big_brands=0, chatbot_queries=0, peak=None)
            return ScenarioSource(scenario, batch_orders(args)), scenario
        return RecordingSource(path), None
    except (CurveFileError, RecordingError) as exc:
        raise ConfigError(str(exc)) from None
    except ValueError as exc:  # a curve the scenario cannot play (it names the curve)
        raise ConfigError(f"{path}: {exc}") from None


def comparison_for(year: int) -> Comparison | None:
    """Last year's curve over the same window: 2020 against Nov 1-11 2019 (like for like)."""
    if year == 2020:
        previous, label = curve_like_for_like_2019(), "2019 (Nov 1–11)"
    elif year - 1 in festival_years() and year != 2009:
        previous, label = curve(year - 1), str(year - 1)
        if previous.window.minutes != curve(year).window.minutes:
            return None
    else:
        return None
    cumulative = np.concatenate(([0], np.cumsum(previous.minute_gmv_cents())))
    return Comparison(label, cumulative)


def screen_data(year: int | None, reference: Reference | None = None) -> dict:
    """What the screen server shows beside the totals: the brand names and the names of the
    countries and platforms of the reference data, if any; for a festival year, last year's
    curve and the year's exchange rate."""
    out: dict = {} if reference is None else {"brand_name": reference.brand_name,
                                               "dimensions": reference.dimensions}
    if year is None or year not in festival_years():
        return out
    fest = festivals()[year]
    return {**out, "comparison": comparison_for(year),
            "currency": Currency(fest.rmb_per_usd, fest.rate_basis)}


def _limits(window: Window, reference: Reference | None = None,
            brands: int | None = None) -> Limits:
    """The ids accepted: the reference's dimensions; without one, `brands` (250,000 by
    default) and every country and platform id a uint8 column holds."""
    if reference is None:
        return Limits(n_brands=brands or DEFAULT_BRANDS, n_minutes=window.minutes,
                      n_countries=DEFAULT_COUNTRIES, n_platforms=DEFAULT_PLATFORMS,
                      max_order_cents=MAX_ORDER_CENTS)
    dims = reference.dimensions
    if brands is not None and brands != dims.n_brands:
        raise ConfigError(f"--brands={brands}: the reference file declares "
                          f"{dims.n_brands:,} brands (leave --brands out)")
    return Limits(n_brands=dims.n_brands, n_minutes=window.minutes,
                  n_countries=len(dims.countries), n_platforms=len(dims.platforms),
                  max_order_cents=MAX_ORDER_CENTS)


def _reference(args: argparse.Namespace) -> Reference | None:
    """`--reference FILE`, read and checked (ConfigError names the file and the line)."""
    path = getattr(args, "reference", None)
    return reference_file.load(Path(path)) if path else None


# --- commands ---------------------------------------------------------------------------------

async def play(args: argparse.Namespace, broker: BrokerSettings | None, *,
               standalone: bool) -> int:
    source, scenario = _source(args)
    window = source.window
    if args.speed == "auto":
        args.speed = window.minutes / DEMO_MINUTES
    try:
        from_minute = minute_of(args.from_, window) if args.from_ else 0
    except ControlError as exc:
        raise ConfigError(f"--from: {exc}") from None
    try:
        last_minute = minute_of(args.to, window) if args.to else window.minutes - 1
    except ControlError as exc:
        raise ConfigError(f"--to: {exc}") from None
    if last_minute < from_minute:
        raise ConfigError(f"--to: {args.to!r} is before --from {args.from_!r}")
    token = args.control_token
    if standalone and token is None:
        token = secrets.token_urlsafe(12)  # the operator view needs one; printed below
    if args.loop and token is None:
        raise ConfigError("--loop needs a control token (--control-token-file or "
                          "GMV_CONTROL_TOKEN) to reset the aggregators between passes")
    topics = Topics(args.prefix)
    producer = args.producer or args.username or f"sim-{uuid.uuid4().hex[:8]}"
    exact: bool | None = None  # the verdict, once the replay has one
    try:
        async with AsyncExitStack() as stack:
            if broker is None:
                from ticker.shell.embedded_broker import EmbeddedBroker
                embedded = await stack.enter_async_context(EmbeddedBroker())
                broker = BrokerSettings("127.0.0.1", embedded.port)
            else:
                await _check_broker(broker)
            publisher = await stack.enter_async_context(ReliablePublisher(broker))
            flow = await stack.enter_async_context(
                FlowControl(broker, topics, producer, window=args.window,
                            partitions=args.partitions, say=_say))
            replay = Replay(publisher, source, topics, producer=producer, speed=args.speed,
                            from_minute=from_minute, last_minute=last_minute, loop=args.loop,
                            binary=args.encoding == "binary", control_token=token, flow=flow,
                            say=_say)
            if standalone:  # the aggregator (in memory: the replay starts from zero) and screen
                year = int(scenario.name) if scenario and scenario.name.isdigit() else None
                reference = _reference(args) or demo_reference(scenario)
                aggregator = Aggregator(
                    broker, topics, _limits(window, reference), window, control_token=token,
                    shard=Shard(partitions=args.partitions or 1),
                    first_time=reference.first_time if reference else None)
                server = _ticker_server(
                    args, token, send_control=lambda payload: publisher.send(topics.control,
                                                                             payload),
                    **screen_data(year, reference))
                ws_server = await stack.enter_async_context(
                    await _listen(server, args.host, args.port))
            # Standalone, the task group serves until Ctrl-C; publish-only, it ends with the
            # replay.
            async with asyncio.TaskGroup() as tg:
                listener = tg.create_task(watch_control(broker, topics, replay.obey),
                                          name="control") if token is not None else None
                if standalone:
                    tg.create_task(aggregator.run(), name="aggregator")
                    tg.create_task(watch_totals(broker, topics, server.receive_message,
                                                stats=server.broker_stats), name="watch")
                    # One /metrics for both parts (docs/metrics.md).
                    server.metrics.register(metrics.AggregatorCollector(aggregator))
                    tg.create_task(server.run_pusher(), name="pusher")
                    await aggregator.ready.wait()
                    url = f"http://{args.host}:{_bound_port(ws_server)}/"
                    speed = "max" if args.speed is None else f"{args.speed:g}x"
                    print(f"GMV ticker: open {url} (broker {broker.url}, {source.name} at "
                          f"{speed}; Ctrl-C stops)", flush=True)
                    print(f"operator view: {url}?operator=1 (token: {token})", flush=True)
                report = await replay.run(None if standalone else _progress())
                exact = report.verdict is not None and report.verdict.exact
                verdict = report.verdict.line() if report.verdict else "no verdict"
                if standalone:
                    print(f"replay done in {report.seconds:.1f} s: {report.orders:,} orders, "
                          f"GMV {_usd(report.gmv_cents)}; {verdict}; the ticker stays up "
                          "until Ctrl-C", flush=True)
                    tg.create_task(replay.linger(), name="status")
                else:
                    _print_report(report, args.json)
                    if listener is not None:
                        listener.cancel()
    except asyncio.CancelledError:
        if standalone and exact is not None:  # the demo ran its course: Ctrl-C ends it
            _say("stopped")
            return 0 if exact else 1
        raise
    return 0 if exact else 1


def _say(line: str) -> None:
    print(f"gmv: {line}", file=sys.stderr, flush=True)


async def aggregate(args: argparse.Namespace, broker: BrokerSettings) -> int:
    path = None if args.no_checkpoint else args.checkpoint or default_checkpoint(args)
    with contextlib.ExitStack() as held:
        if path is not None:
            # Before the broker session is touched: a bad path must not end the session (and
            # drop what the broker holds for us) before we find out.
            checkpoint.prepare(path, create_dir=args.checkpoint is None)
            held.enter_context(checkpoint.lock(path))
        scenario = _scenario(args.scenario, args)
        # Which brands are first-time is known only from a reference file: without one the
        # totals say null, and the page hides the figure.
        reference = _reference(args)
        first_time = reference.first_time if reference else None
        limits = dataclasses.replace(_limits(scenario.window, reference, args.brands),
                                     max_producers=args.max_producers)
        aggregator = Aggregator(broker, Topics(args.prefix), limits, scenario.window,
                                shard=shard_of(args), checkpoint_path=path,
                                checkpoint_interval=args.checkpoint_interval,
                                max_unacked=args.max_unacked, first_time=first_time,
                                control_token=args.control_token,
                                big_brand_cents=args.big_brand_cents)
        await _check_broker(broker)
        state = (f"checkpoint {path}" + (f", resuming {aggregator.state.orders:,} orders"
                                         if aggregator.restored else "")
                 if path else "in memory only (--no-checkpoint): a restart starts from zero")
        print(f"aggregating {args.prefix}/orders from {broker.url} as shard {aggregator.shard}; "
              f"{state}", file=sys.stderr, flush=True)
        async with metrics.serving(metrics.registry(metrics.AggregatorCollector(aggregator)),
                                   args.metrics_host, args.metrics_port) as endpoint:
            if endpoint is not None:
                print(f"metrics at http://{args.metrics_host}:{_bound_port(endpoint)}/metrics",
                      file=sys.stderr, flush=True)
            await aggregator.run()
    return 0


def default_checkpoint(args: argparse.Namespace) -> Path:
    """$GMV_STATE_DIR, else $XDG_STATE_HOME/gmv, else ~/.local/state/gmv: one file per topic
    prefix and shard, so every aggregator survives a restart without being told."""
    state_dir = os.environ.get("GMV_STATE_DIR") or os.path.join(
        os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"), "gmv")
    name = "".join(c if c.isalnum() or c in "-." else "_" for c in args.prefix)
    return Path(state_dir) / f"aggregator-{name}-{shard_of(args).key}.ckpt"


def shard_of(args: argparse.Namespace) -> Shard:
    """`--shard K/N` with `--partitions P` (default N)."""
    count = args.shard.count
    if args.partitions is not None and args.partitions < count:
        raise ConfigError(f"--partitions={args.partitions}: fewer than the {count} shards of "
                          f"--shard {args.shard.index}/{count}")
    return Shard(args.shard.index, count, args.partitions or count)


async def serve(args: argparse.Namespace, broker: BrokerSettings) -> int:
    reference = _reference(args)  # a bad file fails before the broker is touched
    await _check_broker(broker)
    topics = Topics(args.prefix)
    async with AsyncExitStack() as stack:
        publisher = await stack.enter_async_context(ReliablePublisher(broker))
        server = _ticker_server(
            args, args.control_token,
            send_control=lambda payload: publisher.send(topics.control, payload),
            expected_shards=args.shards, **screen_data(int(args.scenario), reference))
        ws_server = await stack.enter_async_context(await _listen(server, args.host, args.port))
        tg = await stack.enter_async_context(asyncio.TaskGroup())
        tg.create_task(watch_totals(broker, topics, server.receive_message,
                                    stats=server.broker_stats), name="watch-totals")
        tg.create_task(server.run_pusher(), name="pusher")
        print(f"ticker at http://{args.host}:{_bound_port(ws_server)}/", flush=True)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        print(f"open files: up to {soft:,} (hard limit {hard:,}), viewers: up to "
              f"{server.max_viewers:,}", file=sys.stderr, flush=True)
    return 0


def _ticker_server(args: argparse.Namespace, token: str | None, **options) -> TickerServer:
    """The screen server, after raising the open-files limit so that every viewer it admits
    has a descriptor (the default 1024 ran out at about 1,000 idle websockets)."""
    raise_fd_limit()
    return TickerServer(allowed_origins=args.allowed_origin, control_token=token,
                        max_viewers=args.max_viewers, **options)


async def record(args: argparse.Namespace, broker: BrokerSettings) -> int:
    """Write every order batch and chatbot count seen on the broker to a file."""
    topics = Topics(args.prefix)
    window = _scenario(args.scenario, args).window
    try:
        file = open(args.file, "wb")  # noqa: SIM115 - closed below, after the loop
    except OSError as exc:
        raise ConfigError(f"file={args.file}: {exc.strerror}") from None
    writer = RecordingWriter(file, window, 250_000)
    try:
        async with connect(broker) as client:
            await client.subscribe(f"{topics.prefix}/orders/+/+", qos=1)
            await client.subscribe(f"{topics.prefix}/chatbot/+/+", qos=1)
            print(f"recording {topics.prefix} from {broker.url} into {args.file}",
                  file=sys.stderr, flush=True)
            messages = aiter(client.messages)
            heard = False  # idle time counts from the first message: the producer may start later
            while True:
                try:
                    async with asyncio.timeout(args.idle_exit if heard else None):
                        message = await anext(messages)
                except TimeoutError:
                    break
                heard = True
                name, levels = topics.kind(message.topic.value)
                writer.write(CHATBOT if name == "chatbot" else ORDERS,
                             message.payload if isinstance(message.payload, bytes) else b"",
                             (partition_level(levels[1]) if levels[1:] else None) or 0)
    except aiomqtt.MqttError as exc:  # the broker went away: what came before is kept
        raise ConnectionError(f"lost the MQTT broker at {broker.url} ({exc}); {args.file} "
                              "holds what was recorded until then") from None
    finally:
        file.close()
        print(f"recorded {writer.messages:,} messages, {writer.orders:,} orders, "
              f"GMV {_usd(writer.gmv_cents)} ({writer.gmv_cents} cents); "
              f"skipped {writer.skipped} duplicate or invalid", flush=True)
    return 0


async def control(args: argparse.Namespace, broker: BrokerSettings) -> int:
    if args.control_token is None:
        raise ConfigError("--control-token-file (or GMV_CONTROL_TOKEN) is needed")
    if args.cmd in ("speed", "seek") and not args.value:
        raise ConfigError(f"{args.cmd} needs a value, e.g. "
                          + ("`gmv control speed 120`" if args.cmd == "speed"
                             else "`gmv control seek '11-11 00:30'`"))
    if args.cmd == "speed":
        speed = _speed_value(args.value)
        command = Command("speed", speed=speed)
    else:
        command = Command(args.cmd, to=args.value if args.cmd == "seek" else None)
    nonce = secrets.token_hex(16)
    topics = Topics(args.prefix)

    def answers_us(payload: bytes) -> bool:
        with contextlib.suppress(ControlError):
            return read_answer(payload, args.control_token).nonce == nonce
        return False

    found = await ask(broker, topics.control,
                      sign(command, args.control_token, now=time.time(), nonce=nonce),
                      topics.answers, answers_us, timeout=args.wait)
    if not found:
        raise ConnectionError(f"no replay answered {args.cmd} within {args.wait:g} s: is one "
                          f"running on {broker.url} under --prefix {args.prefix} with control "
                          "(a control token)?")
    answers = [read_answer(payload, args.control_token) for payload in found]
    # Answers that verify are the replays' word. Anyone who reads the control topic of a
    # broker without ACL can post an answer under our nonce; one that does not verify
    # counts only when no replay's does (a wrong token: the replay's "bad mac").
    verified = [a for a in answers if a.verified]
    if verified and len(verified) < len(answers):
        print(f"gmv: warning: ignored {len(answers) - len(verified)} answer(s) that do not "
              "verify with this token", file=sys.stderr, flush=True)
    answers = verified or answers[:10]
    for answer in answers:
        if answer.ok and answer.verified:
            print(answer.line(), flush=True)
        else:
            print(f"gmv: error: {answer.line()}", file=sys.stderr, flush=True)
    return 0 if all(a.ok and a.verified for a in answers) else 1


# --- helpers ----------------------------------------------------------------------------------

def _speed_value(text: str) -> float | None:
    if text == "max":
        return None
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise ConfigError(f"speed={text}: must be a positive number or 'max'")
    return value


def _progress(every: float = 2.0):
    last = [time.monotonic()]

    def show(report: PublishReport) -> None:
        now = time.monotonic()
        if now - last[0] >= every:
            last[0] = now
            print(f"  minute {report.minutes:,}: {report.orders:,} orders, "
                  f"{_usd(report.gmv_cents)} published", file=sys.stderr, flush=True)
    return show


def _print_report(report: PublishReport, as_json: bool) -> None:
    verdict = report.verdict
    if as_json:
        doc = dataclasses.asdict(report)
        if verdict is not None:
            doc["verdict"].update(exact=verdict.exact, line=verdict.line())
        print(orjson.dumps(doc).decode(), flush=True)
        return
    print(f"published {report.orders:,} orders in {report.batches:,} batches, "
          f"GMV {_usd(report.gmv_cents)} ({report.gmv_cents} cents), "
          f"{report.chatbot_queries:,} chatbot queries, in {report.seconds:.1f} s "
          f"as {report.producer}", flush=True)
    print(verdict.line() if verdict else "verdict: none (no flow control)", flush=True)


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
