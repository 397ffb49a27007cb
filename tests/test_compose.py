"""docker-compose.yml is checked here, since this machine has no Docker engine to run it."""

from __future__ import annotations

from pathlib import Path

import yaml

from gmv.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent


def test_compose_has_broker_and_the_three_parts():
    """The compose file runs a broker plus aggregator, ticker server and simulator."""
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert {"broker", "aggregator", "ticker", "simulator"} <= services.keys()
    broker_conf = services["broker"]["volumes"][0].split(":")[0]
    assert (ROOT / broker_conf).is_file()


def test_every_compose_command_is_a_valid_gmv_command():
    """Each service's command parses with the real CLI parser and points at the broker."""
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    parser = build_parser()
    for name, service in services.items():
        if "command" not in service:
            continue
        args = parser.parse_args(service["command"])
        assert args.broker == "mqtt://broker:1883", name
        assert service["depends_on"][0] == "broker"
