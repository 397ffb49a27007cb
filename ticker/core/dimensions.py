"""What the small integer ids on the wire mean, shared by every producer and consumer.

Country is the brand's home country; id 0 is the home market (China by default: domestic),
the rest sell to it from abroad. COUNTRIES and PLATFORMS are the default id tables (the 2020
festival's; the order of the overseas list follows the 2020 release, United States first;
facts G02, G03). A deployment declares its own in a reference file (docs/reference-data.md,
`Dimensions`); without one an aggregator accepts up to DEFAULT_COUNTRIES countries and
DEFAULT_PLATFORMS platforms (all a uint8 column holds), named from these tables and
"Country 12", "Platform 3" past them.
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

# Without a reference file: every id a uint8 column holds; brands as `gmv aggregate --brands`.
DEFAULT_COUNTRIES = 256
DEFAULT_PLATFORMS = 256
DEFAULT_BRANDS = 250_000
# A reference file declares at most this many (the aggregator keeps 17 bytes a brand: 170 MB).
MAX_BRANDS = 10_000_000
MAX_COUNTRIES = MAX_PLATFORMS = 256  # uint8 columns on the wire


@dataclass(frozen=True)
class Dimensions:
    """What the ids mean: `countries` as (code, name) by id, the first the home market;
    `platforms` names by id; `n_brands` brand ids 0 .. n_brands - 1."""

    countries: tuple[tuple[str, str], ...] = COUNTRIES
    platforms: tuple[str, ...] = PLATFORMS
    n_brands: int = DEFAULT_BRANDS

    def __post_init__(self) -> None:
        if not 1 <= len(self.countries) <= MAX_COUNTRIES:
            raise ValueError(f"{len(self.countries)} countries: must be 1 to {MAX_COUNTRIES}")
        if not 1 <= len(self.platforms) <= MAX_PLATFORMS:
            raise ValueError(f"{len(self.platforms)} platforms: must be 1 to {MAX_PLATFORMS}")
        if type(self.n_brands) is not int or not 1 <= self.n_brands <= MAX_BRANDS:
            raise ValueError(f"n_brands={self.n_brands!r}: must be 1 to {MAX_BRANDS:,}")

    def country(self, country_id: int) -> tuple[str, str]:
        """(code, name) of a country id; past the declared ones ("C12", "Country 12")."""
        if 0 <= country_id < len(self.countries):
            return self.countries[country_id]
        return f"C{country_id}", f"Country {country_id}"

    def platform(self, platform_id: int) -> str:
        if 0 <= platform_id < len(self.platforms):
            return self.platforms[platform_id]
        return f"Platform {platform_id}"


DEFAULT_DIMENSIONS = Dimensions()

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
