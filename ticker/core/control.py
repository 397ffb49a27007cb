"""Replay control commands: parsed, signed and verified in one place. Pure: `now` is passed in.

Commands travel as JSON on `{prefix}/control`, signed and never carrying the token:
`{"v": 1, "cmd": "pause" | "resume" | "speed" | "seek" | "reset", "speed": S, "to": T,
"ts": seconds since the epoch, "nonce": 32 hex digits, "mac": HMAC-SHA256}` with `"speed"`
(a number or "max") only for speed and `"to": "MM-DD HH:MM"` only for seek. The MAC is keyed by
the operator's token and covers the canonical encoding of every other field (`_canonical`).
Whoever sends a command (`gmv control`, the ticker server for an operator on the page, the
replay for `reset`) calls `sign`; whoever obeys (the replay, the aggregator for `reset`) keeps a
`Verifier`, which refuses a command older than `max_age` or one it has seen before.

The replay that gets a command answers it on `{prefix}/answers`: `{"v": 1, "kind": "answer",
"nonce": N, "cmd": C, "ok": true | false, "detail": "paused at 11-11 00:31" | the reason,
"by": producer, "mac": …}`, MAC'd with its token, so the sender (`gmv control`, the ticker
server) knows what happened. A sender believes an `ok` only if its MAC checks with its own
token; a refusal it cannot check (a wrong token) is still shown, as unverified.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import math
import re
import secrets
from dataclasses import dataclass
from datetime import datetime

import orjson

from ticker.core.dimensions import Window

COMMANDS = ("pause", "resume", "speed", "seek", "reset")
MAX_COMMAND_BYTES = 4096
_NONCE = re.compile(r"[0-9a-f]{32}")
_MAC = re.compile(r"[0-9a-f]{64}")


class ControlError(ValueError):
    """A command that is malformed or not authorised; the message says why."""


@dataclass(frozen=True)
class Command:
    """One replay command, as checked by `parse_command`."""

    cmd: str
    speed: float | None = None   # for "speed"; None means max
    to: str | None = None        # for "seek", "MM-DD HH:MM"

    def fields(self) -> dict[str, object]:
        """The command as JSON fields: `cmd`, plus `speed` or `to` where they apply."""
        body: dict[str, object] = {"cmd": self.cmd}
        if self.cmd == "speed":
            body["speed"] = "max" if self.speed is None else self.speed
        if self.cmd == "seek":
            body["to"] = self.to
        return body


def parse_command(doc: object) -> Command:
    """The command a decoded JSON object asks for (`cmd`, `speed`, `to`), checked; no
    authentication here."""
    if not isinstance(doc, dict):
        raise ControlError("a command is a JSON object")
    cmd = doc.get("cmd")
    if cmd not in COMMANDS:
        raise ControlError(f"unknown cmd {_short(cmd)}; expected one of {', '.join(COMMANDS)}")
    if cmd == "speed":
        speed = doc.get("speed")
        if speed == "max":
            return Command("speed", None)
        if not isinstance(speed, (int, float)) or isinstance(speed, bool) \
                or not 0 < speed < math.inf:
            raise ControlError(f"speed={_short(speed)}: must be a positive number or 'max'")
        return Command("speed", float(speed))
    if cmd == "seek":
        to = doc.get("to")
        if not isinstance(to, str):
            raise ControlError("seek needs \"to\": \"MM-DD HH:MM\"")
        return Command("seek", to=to)
    return Command(cmd)


def sign(command: Command, key: str, *, now: float, nonce: str | None = None) -> bytes:
    """The command as a signed message for the control topic: the time `now` (seconds since
    the epoch), a fresh nonce, and a MAC keyed by `key` (the token, which is not sent)."""
    if not key:
        raise ValueError("key='': must not be empty")
    if nonce is None:
        nonce = secrets.token_hex(16)
    elif not _NONCE.fullmatch(nonce):
        raise ValueError(f"nonce={nonce!r}: must be 32 lowercase hex digits")
    body = {"v": 1, **command.fields(), "ts": float(now), "nonce": nonce}
    return orjson.dumps({**body, "mac": _mac(key, body)})


class Verifier:
    """Checks signed commands for one key: authentic, at most `max_age` seconds from now
    either way, and never seen before."""

    def __init__(self, key: str, *, max_age: float = 30.0, max_nonces: int = 10_000) -> None:
        if not key:
            raise ValueError("key='': must not be empty")
        if not 0 < max_age < math.inf:
            raise ValueError(f"max_age={max_age}: must be a positive number of seconds")
        if max_nonces <= 0:
            raise ValueError(f"max_nonces={max_nonces}: must be positive")
        self.key, self.max_age, self.max_nonces = key, max_age, max_nonces
        self._seen: set[str] = set()
        self._expiry: list[tuple[float, str]] = []  # heap: when each seen nonce goes stale

    def verify(self, payload: bytes, now: float) -> Command:
        """The command in `payload` if it is authentic, fresh and new; ControlError if not."""
        if len(payload) > MAX_COMMAND_BYTES:
            raise ControlError(f"command of {len(payload)} bytes: at most {MAX_COMMAND_BYTES}")
        try:
            doc = orjson.loads(payload)
        except orjson.JSONDecodeError:
            raise ControlError("not JSON") from None
        if not isinstance(doc, dict):
            raise ControlError("a command is a JSON object")
        if any(isinstance(value, (dict, list)) for value in doc.values()):
            raise ControlError("a command's fields are plain values")  # and encode canonically
        mac = doc.pop("mac", None)
        if not isinstance(mac, str) or not _MAC.fullmatch(mac):
            raise ControlError("no mac")
        if not hmac.compare_digest(mac, _mac(self.key, doc)):
            raise ControlError("bad mac")
        if doc.get("v") != 1:
            raise ControlError(f"v={_short(doc.get('v'))}: expected 1")
        ts, nonce = doc.get("ts"), doc.get("nonce")
        if not isinstance(ts, (int, float)) or isinstance(ts, bool) \
                or not isinstance(nonce, str) or not _NONCE.fullmatch(nonce):
            raise ControlError("a command needs \"ts\" and a 32-hex-digit \"nonce\"")
        if abs(now - ts) > self.max_age:
            raise ControlError(f"stale: sent {now - ts:.0f} s ago" if ts < now
                               else f"stale: dated {ts - now:.0f} s ahead")
        command = parse_command(doc)
        self._forget_stale(now)
        if nonce in self._seen:
            raise ControlError("replayed")
        # Full: refuse rather than forget a nonce that is still fresh, which would let a
        # captured command be replayed. Only holders of the key can fill the store, and
        # room comes back within max_age.
        if len(self._seen) >= self.max_nonces:
            raise ControlError(f"more than {self.max_nonces} commands in {self.max_age:g} s")
        self._seen.add(nonce)
        heapq.heappush(self._expiry, (ts + self.max_age, nonce))
        return command

    def obeyed(self, nonce: str) -> bool:
        """Whether a command with this nonce passed `verify` and is still fresh: a copy of it,
        or anything else sent under its nonce, is not to be answered (its answer went out)."""
        return nonce in self._seen

    def _forget_stale(self, now: float) -> None:
        """Drop the nonces whose commands can no longer pass the age check."""
        while self._expiry and self._expiry[0][0] < now:
            self._seen.discard(heapq.heappop(self._expiry)[1])


class FailureLimiter:
    """A token bucket over failed attempts: `burst` at once, then one per `refill` seconds.
    While it is empty, attempts are refused before they are checked."""

    def __init__(self, *, burst: int = 5, refill: float = 1.0) -> None:
        if burst <= 0:
            raise ValueError(f"burst={burst}: must be positive")
        if not 0 < refill < math.inf:
            raise ValueError(f"refill={refill}: must be a positive number of seconds")
        self.burst, self.refill = burst, refill
        self._level, self._at = float(burst), -math.inf

    def retry_in(self, now: float) -> float:
        """Seconds until an attempt may be checked again (0: now)."""
        self._fill(now)
        return 0.0 if self._level >= 1 else (1 - self._level) * self.refill

    def failed(self, now: float) -> None:
        """Take one failure out of the bucket."""
        self._fill(now)
        self._level = max(self._level - 1, 0.0)

    def _fill(self, now: float) -> None:
        if now > self._at:
            self._level = min(self.burst, self._level + (now - self._at) / self.refill)
            self._at = now


@dataclass(frozen=True)
class Answer:
    """A replay's answer to one command (its nonce): obeyed or refused, and what it did or
    why not. `verified`: the MAC checked with the reader's token."""

    nonce: str
    cmd: str
    ok: bool
    detail: str
    by: str
    verified: bool = False

    def line(self) -> str:
        what = "done" if self.ok else "refused"
        return f"{self.cmd} {what} by replay {self.by}: {self.detail}" + \
            ("" if self.verified else " (unverified: this token does not match the replay's)")


def nonce_of(payload: bytes) -> str | None:
    """The nonce of a command message, if it has a well-formed one (to address an answer,
    even to a command that fails to verify)."""
    try:
        doc = orjson.loads(payload) if len(payload) <= MAX_COMMAND_BYTES else None
    except orjson.JSONDecodeError:
        return None
    nonce = doc.get("nonce") if isinstance(doc, dict) else None
    return nonce if isinstance(nonce, str) and _NONCE.fullmatch(nonce) else None


def sign_answer(answer: Answer, key: str) -> bytes:
    # "kind" under the MAC: an answer can never pass for a command, nor a command for one.
    body = {"v": 1, "kind": "answer", "nonce": answer.nonce, "cmd": answer.cmd,
            "ok": answer.ok, "detail": answer.detail[:200], "by": answer.by[:64]}
    return orjson.dumps({**body, "mac": _mac(key, body)})


def read_answer(payload: bytes, key: str) -> Answer:
    """An answer message, checked for shape; `verified` if its MAC checks with `key`.
    ControlError if it is not an answer."""
    try:
        doc = orjson.loads(payload) if len(payload) <= MAX_COMMAND_BYTES else None
    except orjson.JSONDecodeError:
        doc = None
    if not isinstance(doc, dict) or doc.get("v") != 1 or doc.get("kind") != "answer":
        raise ControlError("not a version 1 answer")
    mac = doc.pop("mac", None)
    nonce, cmd, ok, detail, by = (doc.get(k) for k in ("nonce", "cmd", "ok", "detail", "by"))
    if not (isinstance(nonce, str) and _NONCE.fullmatch(nonce) and isinstance(cmd, str)
            and isinstance(ok, bool) and isinstance(detail, str) and isinstance(by, str)):
        raise ControlError("an answer needs nonce, cmd, ok, detail and by")
    verified = isinstance(mac, str) and hmac.compare_digest(mac, _mac(key, doc))
    return Answer(nonce, cmd[:16], ok, detail[:200], by[:64], verified)


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


def _canonical(fields: dict[str, object]) -> bytes:
    """One encoding per meaning: keys sorted, orjson's number forms. The MAC covers what the
    receiver parsed, so what it checks is what it obeys."""
    return orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)


def _mac(key: str, fields: dict[str, object]) -> str:
    return hmac.new(key.encode(), _canonical(fields), hashlib.sha256).hexdigest()


def _short(value: object) -> str:
    """A value for an error message, cut short: it may come from anyone."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
