"""`gmv` command line: parse and check the settings, then run one command of `app.py`.

The only place that calls asyncio.run. A bad setting exits 2 with one line naming it, an
unreachable broker exits 1 with one line, and Ctrl-C stops cleanly with exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import ssl
import sys
from pathlib import Path
from urllib.parse import urlsplit

from simulator.scenario import scenario_names

from gmv import app
from ticker.core.dimensions import BIG_BRAND_CENTS, MAX_BRANDS
from ticker.core.errors import ConfigError
from ticker.core.partitions import MAX_PARTITIONS, Shard
from ticker.shell.mqtt import BrokerSettings
from ticker.core.wire import PRODUCER_ID


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
        if value is None or not 0 < value <= upper or not math.isfinite(value):
            if math.isinf(upper):
                raise argparse.ArgumentTypeError(f"must be a finite number above 0, not {text!r}")
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


def _shard(text: str) -> Shard:
    try:
        return Shard.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def partitions(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--partitions", type=_positive(int, MAX_PARTITIONS), metavar="P",
                        help="brand partitions in all: orders are split by brand %% P "
                             f"(default: {default})")


def _natural(text: str) -> int:
    if not (text.isascii() and text.isdecimal()):
        raise argparse.ArgumentTypeError(f"must be a whole number 0 or more, not {text!r}")
    return int(text)


def _producer(text: str) -> str:
    if not PRODUCER_ID.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"must be 1-64 of A-Z a-z 0-9 - _ . : @ (one MQTT topic level), not {text!r}")
    return text


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0-65535, not {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gmv", description="Live GMV ticker for sales festivals.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def broker(p: argparse.ArgumentParser, *, required: bool, embedded: str = "") -> None:
        p.add_argument("--broker", required=required, metavar="mqtt://HOST:PORT",
                       help="MQTT broker URL (mqtts:// for TLS)" + embedded)
        p.add_argument("--prefix", default="gmv/v1", help="topic prefix (default gmv/v1)")
        p.add_argument("--username", help="MQTT user name")
        p.add_argument("--password-file", metavar="PATH",
                       help="file holding the MQTT password (or set GMV_MQTT_PASSWORD)")
        p.add_argument("--ca-file", metavar="PATH",
                       help="CA certificate(s) for mqtts:// (default: the system's)")

    def control(p: argparse.ArgumentParser) -> None:
        p.add_argument("--control-token-file", metavar="PATH",
                       help="file holding the replay control token (or set GMV_CONTROL_TOKEN)")
        # Refused with a reason: a token on the command line shows in `ps`.
        p.add_argument("--control-token", help=argparse.SUPPRESS)

    def playing(p: argparse.ArgumentParser, default_speed: str) -> None:
        p.add_argument("--speed", type=_speed, default=_speed(default_speed),
                       help="simulated time per wall time, 'max', or 'auto': the whole window "
                            f"in {app.DEMO_MINUTES} minutes (default {default_speed})")
        p.add_argument("--from", dest="from_", metavar="'MM-DD HH:MM'",
                       help="start there (everything before is published at once)")
        p.add_argument("--to", metavar="'MM-DD HH:MM'",
                       help="the last minute to play (default: the window's last)")
        p.add_argument("--loop", action="store_true",
                       help="at the end, start again at --from (the totals reset)")
        p.add_argument("--seed", type=_natural, default=2020)
        p.add_argument("--order-scale", type=_positive(float, 1.0), default=0.001,
                       help="fraction of the real order count, every GMV total exact (default "
                            "0.001; 1: the real 2.3 billion orders of 2020; below about 5e-06, "
                            "for 2020, orders pass the aggregator's USD 100M each)")
        p.add_argument("--batch-orders", type=_positive(int, 1_000_000), default=None,
                       help=f"orders per batch at most (default {app.BATCH_ORDERS:,}; "
                            f"{app.MAX_SPEED_BATCH_ORDERS:,} for binary at --speed max)")
        p.add_argument("--encoding", choices=("binary", "json"), default="binary")
        p.add_argument("--producer", type=_producer, default=None,
                       help="producer id (default: the --username, else sim-RANDOM)")
        p.add_argument("--window", type=_positive(int, 100_000), default=200,
                       help="messages published ahead of what the aggregators have applied "
                            "(default 200; keep it below the broker's queue limit, "
                            "Mosquitto's is 1000)")
        partitions(p, "as many as the running shards have")
        p.add_argument("--json", action="store_true", help="print the final report as JSON")
        control(p)

    def scenario(p: argparse.ArgumentParser, what: str) -> None:
        p.add_argument("--scenario", choices=scenario_names(), default="2020",
                       help=f"festival year {what} (default 2020)")

    def serving(p: argparse.ArgumentParser) -> None:
        p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
        p.add_argument("--port", type=_port, default=8080, help="HTTP/websocket port (8080)")
        p.add_argument("--allowed-origin", action="append", metavar="ORIGIN", type=_origin,
                       help="accept websockets only from this Origin (repeatable), "
                            "e.g. https://screens.example.com (default: any)")
        p.add_argument("--max-viewers", type=_positive(int, 1_000_000), default=10_000,
                       help="open websockets at most; more get HTTP 503 (default 10000)")
        reference(p, "brand, country and platform names on the page" if p.prog.endswith(
            " serve") else "the aggregator's brands, countries, platforms and first-time "
            "brands, and the page's names (default: the scenario's own, "
            "data/reference-2020.toml at seed 2020)")

    def reference(p: argparse.ArgumentParser, what: str) -> None:
        p.add_argument("--reference", metavar="FILE", type=Path,
                       help=f"reference data (docs/reference-data.md): {what}")

    demo = commands.add_parser("demo", help="broker, simulator, aggregator and ticker in one")
    broker(demo, required=False, embedded=" (default: an embedded broker)")
    scenario(demo, "to replay")
    playing(demo, "auto")
    serving(demo)

    sim = commands.add_parser("simulate", help="publish a festival's orders to the broker")
    broker(sim, required=True)
    scenario(sim, "to replay")
    playing(sim, "max")

    replay = commands.add_parser(
        "replay", help="replay a year, a curve CSV or a recording (standalone without --broker)")
    replay.add_argument("source", help="a year 2009-2021, a curve .csv or a `gmv record` file")
    broker(replay, required=False, embedded=" (default: run everything here, like demo)")
    playing(replay, "auto")
    serving(replay)

    record = commands.add_parser("record", help="write the raw order stream to a file")
    record.add_argument("file", type=Path, help="recording to write")
    broker(record, required=True)
    scenario(record, "whose window the stream belongs to")
    record.add_argument("--idle-exit", type=_positive(float), metavar="S",
                        help="stop after S seconds without a message, counted from the first "
                             "(default: run until ^C)")

    ctl = commands.add_parser("control", help="pause, resume, seek or set the speed of a replay")
    ctl.add_argument("cmd", choices=("pause", "resume", "speed", "seek"))
    ctl.add_argument("value", nargs="?", help="the speed (a number or 'max') or 'MM-DD HH:MM'")
    ctl.add_argument("--wait", type=_positive(float), default=5.0, metavar="S",
                     help="seconds to wait for the replay's answer (default 5); exit 1 if "
                          "none comes or it refuses")
    broker(ctl, required=True)
    control(ctl)

    agg = commands.add_parser("aggregate", help="consume orders into numpy totals")
    broker(agg, required=True)
    scenario(agg, "whose window and brand reference data to use")
    agg.add_argument("--shard", type=_shard, default=Shard(), metavar="K/N",
                     help="shard K of N: owns the partitions p with p %% N == K; N is `gmv "
                          "serve --shards N` (default 0/1)")
    partitions(agg, "N; shard K of N owns the partitions p with p %% N == K")
    agg.add_argument("--seed", type=_natural, default=2020,
                     help="the simulator's seed (brand data)")
    agg.add_argument("--brands", type=_positive(int, MAX_BRANDS), default=None,
                     help="brand ids accepted without --reference: 0..N-1 (default 250000)")
    reference(agg, "the brands, countries and platforms accepted and which brands are "
                   "first-time (default: none; countries and platforms 0-255 are accepted "
                   "and the first-time count is unknown)")
    saving = agg.add_mutually_exclusive_group()
    saving.add_argument("--checkpoint", metavar="PATH", type=Path,
                        help="checkpoint file: restored on start, written atomically; batches "
                             "are acknowledged only once checkpointed (default: "
                             "~/.local/state/gmv/aggregator-PREFIX-SHARD.ckpt, or under "
                             "$GMV_STATE_DIR)")
    saving.add_argument("--no-checkpoint", action="store_true",
                        help="keep the totals in memory only: a restart starts from zero")
    agg.add_argument("--big-brand-cents", type=_positive(int, 2**53 - 1),
                     default=BIG_BRAND_CENTS, metavar="CENTS",
                     help="the GMV line of a big brand, in US cents (default 1511000000: RMB "
                          "100M as the 2020 release wrote it, USD 15.11M)")
    agg.add_argument("--max-producers", type=_positive(int, 1_000_000), default=1_000,
                     help="producer ids to keep sequences for; batches of more are rejected "
                          "(default 1000)")
    agg.add_argument("--checkpoint-interval", type=_positive(float, 3600), default=1.0,
                     help="seconds between checkpoints at most (default 1)")
    agg.add_argument("--max-unacked", type=_positive(int, 65535), default=16,
                     help="checkpoint when this many batches await acknowledgement; keep it "
                          "below the broker's max_inflight_messages (default 16)")
    agg.add_argument("--metrics-port", type=_port, default=0, metavar="PORT",
                     help="serve Prometheus metrics at http://HOST:PORT/metrics "
                          "(docs/metrics.md; default 0: none)")
    agg.add_argument("--metrics-host", default="127.0.0.1", metavar="HOST",
                     help="address for --metrics-port (default 127.0.0.1)")
    control(agg)

    bench = commands.add_parser("bench", help="load-test the pipeline through a real broker")
    broker(bench, required=False, embedded=" (default: start a Mosquitto of its own)")
    bench.add_argument("--broker-pid", type=int, help="the broker's pid, to report its CPU")
    bench.add_argument("--rate", type=_positive(float), default=583_000,
                       help="orders/s offered, the peak with --shape festival (default 583000)")
    bench.add_argument("--shape", choices=("constant", "festival"), default="constant",
                       help="constant rate, or a festival's curve squeezed into the duration "
                            "(2020's; with --source festival, its --scenario's)")
    bench.add_argument("--source", choices=("pool", "festival"), default="pool",
                       help="pool: batches of one busy 2020 minute, re-stamped (default); "
                            "festival: the scenario's orders from its first minute, generated "
                            "live (with --shape festival: every minute, spread over the "
                            "duration)")
    bench.add_argument("--scenario", choices=scenario_names(), default="2020",
                       help="festival year of --source festival (default 2020)")
    bench.add_argument("--order-scale", type=_positive(float, 1.0), default=None,
                       help="order scale of --source festival (default 1; with --shape "
                            "festival: the one whose busiest second offers --rate)")
    bench.add_argument("--duration", type=_positive(float, 7 * 86_400), default=60.0,
                       help="seconds of load (default 60)")
    bench.add_argument("--orders", type=_positive(int), help="stop after this many orders")
    bench.add_argument("--batch-orders", type=_positive(int, 300_000), default=10_000,
                       help="orders per batch (default 10000)")
    bench.add_argument("--encoding", choices=("binary", "json"), default="binary")
    bench.add_argument("--qos", type=int, choices=(0, 1), default=1)
    bench.add_argument("--producers", type=_positive(int, 16), default=1,
                       help="producer processes (default 1)")
    bench.add_argument("--shards", type=_positive(int, 16), default=1,
                       help="aggregator shards, one brand partition each (default 1)")
    bench.add_argument("--inflight", type=_positive(int, 65535), default=64,
                       help="unacknowledged QoS 1 batches per producer (default 64)")
    bench.add_argument("--drain-timeout", type=_positive(float), default=30.0,
                       help="seconds to wait for the aggregator to catch up (default 30)")
    bench.add_argument("--json", metavar="PATH", help="also write the report as JSON")

    srv = commands.add_parser("serve", help="serve the ticker page and websocket")
    broker(srv, required=True)
    srv.add_argument("--shards", type=_positive(int, 4096), default=1,
                     help="aggregator shards 0..N-1 to merge; totals from any other shard id "
                          "are ignored and flagged (default 1)")
    scenario(srv, "to compare with the year before")
    srv.add_argument("--seed", type=_natural, default=2020, help=argparse.SUPPRESS)
    serving(srv)
    control(srv)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(asctime)s %(name)s %(levelname)s %(message)s")
        if not args.verbose:  # paho logs socket errors that we report ourselves, once
            logging.getLogger("mqtt").setLevel(logging.CRITICAL)
        broker = _broker(args)
        if hasattr(args, "control_token"):
            args.control_token = _control_token(args)
        return asyncio.run(app.run(args, broker))
    except (ConfigError, ConnectionError, KeyboardInterrupt, asyncio.CancelledError,
            BaseExceptionGroup) as exc:
        # A task group wraps what its tasks raise: report the first thing that went wrong.
        cause = _first(exc)
        if isinstance(cause, (KeyboardInterrupt, asyncio.CancelledError)):  # Ctrl-C, SIGTERM
            print("gmv: stopped", file=sys.stderr)
            return 0
        if not isinstance(cause, (ConfigError, ConnectionError)):
            raise
        print(f"gmv: error: {cause}", file=sys.stderr)
        return 2 if isinstance(cause, ConfigError) else 1


def _first(exc: BaseException) -> BaseException:
    """The first error in a (nested) exception group that is a user's or a broker's, if any."""
    if not isinstance(exc, BaseExceptionGroup):
        return exc
    causes = [_first(e) for e in exc.exceptions]
    return next((c for c in causes if isinstance(c, (ConfigError, ConnectionError))), causes[0])


def _control_token(args: argparse.Namespace) -> str | None:
    if args.control_token is not None:
        raise ConfigError("--control-token: put the token in a file (--control-token-file) or "
                          "in GMV_CONTROL_TOKEN; a command line shows in ps")
    if args.control_token_file:
        try:
            token = Path(args.control_token_file).read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--control-token-file={args.control_token_file}: "
                              f"{getattr(exc, 'strerror', None) or exc}") from None
        if not token:
            raise ConfigError(f"--control-token-file={args.control_token_file}: empty")
        return token
    return os.environ.get("GMV_CONTROL_TOKEN") or None


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


if __name__ == "__main__":
    sys.exit(main())
