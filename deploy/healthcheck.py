"""Health check of a gmv container (docker-compose.yml): exit 0 if healthy, else 1 and one line.

    python healthcheck.py URL [NAME=VALUE ...]   the URL answers 200 within 3 s, and in its
                                                 Prometheus text each metric NAME (without
                                                 labels) has VALUE, e.g.
                                                 gmv_aggregator_broker_connected=1
    python healthcheck.py --mqtt [PORT]          this container holds an established TCP
                                                 connection to port PORT (default 1883), an
                                                 MQTT broker's

The second is for `gmv simulate`, which serves nothing: it is healthy while it holds its
broker connection. Standard library only, since it runs in the image as it is.
"""

from __future__ import annotations

import sys
import urllib.request
from pathlib import Path

ESTABLISHED = "01"  # the `st` column of /proc/net/tcp


def http_ok(url: str, expect: dict[str, float], timeout: float = 3.0) -> str | None:
    """None if `url` answers 200 with every expected metric value, else why not."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body = response.read(1 << 22).decode("utf-8", "replace")
    except OSError as exc:  # URLError, HTTPError, timeouts, refused connections
        return f"{url}: {exc}"
    values = {}
    for line in body.splitlines():
        name, _, value = line.partition(" ")
        if name in expect:
            try:
                values[name] = float(value.split()[0])
            except (ValueError, IndexError):
                pass
    for name, wanted in expect.items():
        if (got := values.get(name)) != wanted:
            return f"{url}: {name} is {'missing' if got is None else f'{got:g}'}, not {wanted:g}"
    return None


def connected_to(port: int, tables: tuple[str, ...] = ("/proc/net/tcp", "/proc/net/tcp6")) \
        -> str | None:
    """None if a TCP connection to remote `port` is established, else why not."""
    for table in tables:
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) > 3 and fields[3] == ESTABLISHED \
                    and int(fields[2].rsplit(":", 1)[1], 16) == port:
                return None
    return f"no established connection to port {port}"


def main(argv: list[str]) -> int:
    try:
        if argv[:1] == ["--mqtt"] and len(argv) <= 2:
            problem = connected_to(int(argv[1]) if len(argv) == 2 else 1883)
        elif argv and argv[0].startswith(("http://", "https://")):
            expect = {name: float(value) for name, _, value in
                      (arg.partition("=") for arg in argv[1:])}
            problem = http_ok(argv[0], expect)
        else:
            raise ValueError
    except ValueError:
        print("usage: healthcheck.py URL [NAME=VALUE ...] | --mqtt [PORT]", file=sys.stderr)
        return 2
    if problem:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
