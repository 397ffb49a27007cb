"""Playback clock: where a replay should be at wall time `now`, with pause, speed and seek.

Pure: every method takes `now` (monotonic seconds) as data. The position is anchored at the
last change (anchor_minute at anchor_time) and moves at `speed` simulated minutes per 60 s
of wall time, so the schedule stays absolute between changes: a replay of N minutes at speed
S ends N / S minutes after it starts, plus exactly the time spent paused, however the
publishing in between is delayed. `speed=None` is "max": every minute is due at once.
"""

from __future__ import annotations

import math


class PlaybackClock:
    def __init__(self, now: float, *, speed: float | None, minute: float = 0.0) -> None:
        self._check(speed)
        self.speed = speed
        self.paused = False
        self._anchor_minute = float(minute)
        self._anchor_time = now
        self._moved = False  # by a pause, resume, speed change or seek since it was made

    @staticmethod
    def _check(speed: float | None) -> None:
        if speed is not None and not 0 < speed < math.inf:
            raise ValueError(f"speed={speed}: must be positive, or None for max")

    def position(self, now: float) -> float:
        """Simulated minutes since the window start (fractional)."""
        if self.paused:
            return self._anchor_minute
        if self.speed is None:
            return math.inf
        return self._anchor_minute + (now - self._anchor_time) * self.speed / 60.0

    def due(self, minute: float, now: float) -> float:
        """Seconds from `now` until `minute` is due: 0 if the position has reached it (also
        while paused, so a seek made before a pause still catches up), inf if paused before."""
        if self.paused:
            return 0.0 if minute <= self._anchor_minute else math.inf
        if self.speed is None:
            return 0.0
        return max(0.0, (minute - self._anchor_minute) * 60.0 / self.speed
                   - (now - self._anchor_time))

    def start(self, now: float) -> None:
        """Start the clock at `now` instead of when it was made (a replay waits for its
        aggregators first), unless a command has already moved it."""
        if not self._moved:
            self._anchor_time = now

    def _reanchor(self, now: float, minute: float | None = None) -> None:
        position = self.position(now)
        self._anchor_minute = position if minute is None else float(minute)
        self._anchor_time = now
        self._moved = True

    def pause(self, now: float) -> None:
        if not self.paused:
            self._reanchor(now)
            self.paused = True

    def resume(self, now: float) -> None:
        if self.paused:
            self._anchor_time = now
            self.paused = False
            self._moved = True

    def set_speed(self, speed: float | None, now: float) -> None:
        self._check(speed)
        if self.speed is not None or self.paused:
            self._reanchor(now)
        self.speed = speed
        self._moved = True

    def seek(self, minute: float, now: float) -> None:
        self._reanchor(now, minute)
