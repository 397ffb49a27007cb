"""A log line per interval, not per event: a flood of bad messages must not flood the log.
Pure: the caller passes the time."""

from __future__ import annotations

import math

LOG_INTERVAL = 10.0  # seconds


class LogThrottle:
    """Counts events and says when to log them: the first at once, then at most one line
    per `interval` seconds, with the count since the last line."""

    def __init__(self, interval: float = LOG_INTERVAL) -> None:
        self.interval = interval
        self._count = 0
        self._next = -math.inf

    def due(self, now: float) -> int:
        """Count one event; how many to report now, or 0 to stay quiet."""
        self._count += 1
        if now < self._next:
            return 0
        count, self._count, self._next = self._count, 0, now + self.interval
        return count
