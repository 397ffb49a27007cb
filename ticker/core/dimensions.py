"""What the small integer ids on the wire mean, shared by every producer and consumer.

Country is the brand's home country; China (id 0) is domestic, the rest sell to China.
The order of the overseas list follows the 2020 release (United States first; facts G02, G03).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

COUNTRIES: tuple[tuple[str, str], ...] = (
    ("CN", "China"),
    ("US", "United States"),
    ("AU", "Australia"),
    ("CA", "Canada"),
    ("FR", "France"),
    ("DE", "Germany"),
    ("IT", "Italy"),
    ("JP", "Japan"),
    ("KR", "South Korea"),
    ("NZ", "New Zealand"),
    ("GB", "United Kingdom"),
    ("XX", "Other countries"),
)
PLATFORMS: tuple[str, ...] = ("Tmall/Taobao", "AliExpress", "Lazada")

BEIJING = timezone(timedelta(hours=8), "Asia/Shanghai")

# RMB 100M, the "big brand" line of the 2020 release, written there as USD 15.11M (facts G01);
# the same figure as simulator/scenario.py's BIG_BRAND_CENTS. An aggregator setting.
BIG_BRAND_CENTS = 15_110_000_00
MAX_CURVE_BUCKETS = 720


def curve_bucket_minutes(window_minutes: int) -> int:
    """The width of the cumulative curve's buckets: an hour, or a whole number of hours so
    that a window has at most MAX_CURVE_BUCKETS buckets."""
    hours = -(-window_minutes // 60)
    return 60 * max(1, -(-hours // MAX_CURVE_BUCKETS))


@dataclass(frozen=True)
class Window:
    """The festival's time window: simulated minute m is `start + m minutes`."""

    start: datetime
    minutes: int
    label: str

    def time_of(self, minute: int) -> datetime:
        return self.start + timedelta(minutes=minute)

    def as_dict(self) -> dict[str, object]:
        return {"start": self.start.isoformat(), "minutes": self.minutes, "label": self.label}


FESTIVAL_2020 = Window(datetime(2020, 11, 1, tzinfo=BEIJING), 11 * 24 * 60,
                       "11.11 Global Shopping Festival 2020")
