"""The house shows the architecture: which package may import which, read from the sources."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# What the simulator may use of ticker/: the wire contract and the MQTT adapter.
CONTRACT = {"ticker.core.wire", "ticker.core.sequence", "ticker.core.partitions",
            "ticker.core.control", "ticker.core.dimensions", "ticker.core.errors",
            "ticker.core.logthrottle", "ticker.shell.mqtt"}
IO_MODULES = {"asyncio", "socket", "aiomqtt", "paho", "websockets", "os", "subprocess",
              "tempfile", "pathlib", "time"}


def imports(package: str) -> dict[str, set[str]]:
    """Each module of `package` and the modules of other packages it imports."""
    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:  # relative: same package
                names.add(node.module)
        found[str(path.relative_to(ROOT))] = names
    return found


def test_ticker_never_imports_the_simulator_or_the_composition_root():
    """ticker/ (aggregator and screen server) stands on its own: no simulator, no gmv."""
    for module, names in imports("ticker").items():
        bad = {n for n in names if n.split(".")[0] in {"simulator", "gmv"}}
        assert not bad, f"{module} imports {bad}"


def test_the_core_does_no_io_and_never_imports_a_shell():
    """ticker/core is pure: no shell, no sockets, files, clocks or event loop."""
    for module, names in imports("ticker/core").items():
        bad = {n for n in names if n.startswith("ticker.shell") or n.split(".")[0] in IO_MODULES}
        assert not bad, f"{module} imports {bad}"


def test_the_simulator_uses_only_the_wire_contract_and_the_mqtt_adapter():
    """simulator/ imports from ticker/ only the contract modules, never gmv."""
    for module, names in imports("simulator").items():
        bad = {n for n in names if n.split(".")[0] == "gmv"
               or (n.startswith("ticker") and n not in CONTRACT)}
        assert not bad, f"{module} imports {bad}"
