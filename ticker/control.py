"""Replay control commands: parsed and authorised in one place. Pure.

Commands travel as JSON on `{prefix}/control`, each carrying the operator's token:
`{"v": 1, "token": T, "cmd": "pause" | "resume" | "speed" | "seek" | "reset", ...}` with
`"speed": S` for speed (a number or "max") and `"to": "MM-DD HH:MM"` for seek. Whoever
obeys (the replay, the aggregator for `reset`) checks the token itself; the ticker server
checks it too before forwarding an operator's command from the page.
"""

from __future__ import annotations

import hmac
import math
from dataclasses import dataclass
from datetime import datetime

import orjson

from .dimensions import Window

COMMANDS = ("pause", "resume", "speed", "seek", "reset")


class ControlError(ValueError):
    """A command that is malformed or not authorised; the message says why."""


@dataclass(frozen=True)
class Command:
    cmd: str
    speed: float | None = None   # for "speed"; None means max
    to: str | None = None        # for "seek", "MM-DD HH:MM"

    def encode(self, token: str) -> bytes:
        body: dict[str, object] = {"v": 1, "token": token, "cmd": self.cmd}
        if self.cmd == "speed":
            body["speed"] = "max" if self.speed is None else self.speed
        if self.cmd == "seek":
            body["to"] = self.to
        return orjson.dumps(body)


def parse_command(doc: object, token: str | None) -> Command:
    """A validated command from a decoded JSON object, if `token` matches."""
    if not isinstance(doc, dict):
        raise ControlError("a command is a JSON object")
    given = doc.get("token")
    if token is None:
        raise ControlError("control is disabled here (no control token configured)")
    if not isinstance(given, str) or not hmac.compare_digest(given.encode(), token.encode()):
        raise ControlError("bad token")
    cmd = doc.get("cmd")
    if cmd not in COMMANDS:
        raise ControlError(f"unknown cmd {cmd!r}; expected one of {', '.join(COMMANDS)}")
    if cmd == "speed":
        speed = doc.get("speed")
        if speed == "max":
            return Command("speed", None)
        if type(speed) not in (int, float) or not 0 < speed < math.inf:
            raise ControlError(f"speed={speed!r}: must be a positive number or 'max'")
        return Command("speed", float(speed))
    if cmd == "seek":
        to = doc.get("to")
        if not isinstance(to, str):
            raise ControlError("seek needs \"to\": \"MM-DD HH:MM\"")
        return Command("seek", to=to)
    return Command(cmd)


def decode_command(payload: bytes, token: str | None) -> Command:
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise ControlError("not JSON") from None
    return parse_command(doc, token)


def minute_of(text: str, window: Window) -> int:
    """'MM-DD HH:MM' (Beijing time, in the window's year) as a window minute."""
    try:
        when = datetime.strptime(f"{window.start.year}-{text.strip()}", "%Y-%m-%d %H:%M")
    except ValueError:
        raise ControlError(f"{text!r}: expected MM-DD HH:MM, e.g. 11-11 00:30") from None
    minute = int((when.replace(tzinfo=window.start.tzinfo) - window.start).total_seconds()
                 // 60)
    if not 0 <= minute < window.minutes:
        end = window.time_of(window.minutes - 1).strftime("%m-%d %H:%M")
        raise ControlError(f"{text!r} is outside the window "
                           f"{window.start.strftime('%m-%d %H:%M')} to {end}")
    return minute
