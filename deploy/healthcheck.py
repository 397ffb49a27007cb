"""Health check of a gmv container (docker-compose.yml): exit 0 if healthy, else 1 and one line.

    python healthcheck.py http://127.0.0.1:9100/metrics     the URL answers 200 within 3 s
    python healthcheck.py --mqtt [PORT]                      this container holds an established
                                                             TCP connection to a port PORT
                                                             (default 1883), an MQTT broker's

The second is for `gmv simulate`, which serves nothing: it is healthy while it holds its
broker connection. Standard library only, since it runs in the image as it is.
"""

from __future__ import annotations

import sys
import urllib.request
from pathlib import Path

ESTABLISHED = "01"  # the `st` column of /proc/net/tcp


def http_ok(url: str, timeout: float = 3.0) -> str | None:
    """None if `url` answers 200, else why not."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            response.read(1 << 16)
            return None if response.status == 200 else f"{url}: HTTP {response.status}"
    except OSError as exc:  # URLError, HTTPError, timeouts, refused connections
        return f"{url}: {exc}"


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
    if argv[:1] == ["--mqtt"] and len(argv) <= 2:
        problem = connected_to(int(argv[1]) if len(argv) == 2 else 1883)
    elif len(argv) == 1 and argv[0].startswith("http"):
        problem = http_ok(argv[0])
    else:
        print("usage: healthcheck.py URL | --mqtt [PORT]", file=sys.stderr)
        return 2
    if problem:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
