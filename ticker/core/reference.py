"""Reference data: what a deployment's ids mean, read from its files (docs/reference-data.md).

Pure: bytes in, a checked `Reference` out (ticker/shell/reference.py reads the files). Two
plain-text files, both diff-friendly and readable by any tool:

* a TOML header (`tomllib` reads it): `format`, `version`, the number of `brands`, the
  `countries` as {code, name} by id (the first is the home market: a brand of any other is
  overseas), the `platforms` by id, a `label`, and optionally `brands_file`;
* the brands file, CSV (RFC 4180, UTF-8) with the header row `id,name,country,first_time`:
  one row per brand that differs from the default (home country, not first-time, no name),
  `country` by code, `first_time` 0 or 1 (1: overseas and new to the festival).

Without `brands_file` the header declares dimensions only, and which brands are first-time
is unknown (`first_time` is None). Every error is one `ConfigError` line naming the file and
the line; the sizes are bounded (`MAX_*` here, the files' bytes in the shell).
"""

from __future__ import annotations

import csv
import io
import json
import re
import tomllib
from dataclasses import dataclass

import numpy as np

from ticker.core.dimensions import MAX_BRANDS, MAX_COUNTRIES, MAX_PLATFORMS, Dimensions
from ticker.core.errors import ConfigError

FORMAT, VERSION = "gmv-reference", 1
COLUMNS = ("id", "name", "country", "first_time")
MAX_HEADER_BYTES = 1 << 20          # the TOML header: 256 countries and platforms fit in 40 KB
MAX_BRANDS_BYTES = 1 << 30          # the brands CSV, after decompression: 10M rows of ~100 B
MAX_NAME = 100                      # characters of a brand, country or platform name
MAX_LABEL = 200
CODE = re.compile(r"[A-Za-z0-9_-]{1,8}")  # a country code: "US", "XX", "EU-27"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_HEADER_KEYS = {"format", "version", "label", "brands", "brands_file", "countries",
                "platforms"}


@dataclass(frozen=True)
class Header:
    """The TOML header, checked: the dimensions, the label and the brands file's name."""

    dimensions: Dimensions
    label: str
    brands_file: str | None  # relative to the header's directory; None: no brand data


@dataclass(frozen=True, eq=False)
class Reference:
    """Dimensions and per-brand data: `country` (uint8) and `first_time` (bool, None when
    unknown) by brand id, and the names given (others are shown as "US brand 00042")."""

    dimensions: Dimensions
    label: str
    country: np.ndarray
    first_time: np.ndarray | None
    names: dict[int, str]

    def __post_init__(self) -> None:
        n = self.dimensions.n_brands
        if self.country.shape != (n,) or self.country.dtype != np.uint8:
            raise ValueError(f"country: must be uint8 of shape ({n},)")
        if int(self.country.max(initial=0)) >= len(self.dimensions.countries):
            raise ValueError("country: an id past the declared countries")
        if self.first_time is not None and (self.first_time.shape != (n,)
                                            or self.first_time.dtype != bool):
            raise ValueError(f"first_time: must be bool of shape ({n},)")

    @property
    def n_brands(self) -> int:
        return self.dimensions.n_brands

    def brand_name(self, brand: int) -> str:
        """The brand's name from the file; without one its country code and id, as
        "US brand 00042"; "Brand 42" for an id past the brands declared."""
        name = self.names.get(brand)
        if name:
            return name
        if not 0 <= brand < self.n_brands:
            return f"Brand {brand}"
        return f"{self.dimensions.countries[int(self.country[brand])][0]} brand {brand:05d}"


def parse_header(data: bytes, file: str) -> Header:
    """The checked header; ConfigError names `file` and what is wrong."""
    if len(data) > MAX_HEADER_BYTES:
        raise ConfigError(f"{file}: {len(data):,} bytes, a header has at most "
                          f"{MAX_HEADER_BYTES:,}")
    try:
        doc = tomllib.loads(_text(data, file))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: not TOML ({exc})") from None
    if doc.get("format") != FORMAT or type(doc.get("version")) is not int \
            or doc["version"] != VERSION:
        raise ConfigError(f"{file}: format={_short(doc.get('format'))}, version="
                          f"{_short(doc.get('version'))}: expected format = \"{FORMAT}\", "
                          f"version = {VERSION} (docs/reference-data.md)")
    if unknown := sorted(set(doc) - _HEADER_KEYS):
        raise ConfigError(f"{file}: unknown key {unknown[0]!r} (known: "
                          f"{', '.join(sorted(_HEADER_KEYS))})")
    brands = doc.get("brands")
    if type(brands) is not int or not 1 <= brands <= MAX_BRANDS:
        raise ConfigError(f"{file}: brands={_short(brands)}: must be an integer from 1 to "
                          f"{MAX_BRANDS:,}")
    countries = doc.get("countries")
    if not isinstance(countries, list) or not 1 <= len(countries) <= MAX_COUNTRIES:
        raise ConfigError(f"{file}: countries: must be a list of 1 to {MAX_COUNTRIES} "
                          "{ code = ..., name = ... } (the first is the home market)")
    pairs: list[tuple[str, str]] = []
    for i, entry in enumerate(countries):
        where = f"{file}: countries[{i}]"
        if not isinstance(entry, dict) or set(entry) != {"code", "name"}:
            raise ConfigError(f"{where}: must be {{ code = \"US\", name = \"United States\" }}")
        code, name = entry["code"], entry["name"]
        if not isinstance(code, str) or not CODE.fullmatch(code):
            raise ConfigError(f"{where}: code={_short(code)}: must be 1-8 of A-Z a-z 0-9 _ -")
        if any(code == seen for seen, _ in pairs):
            raise ConfigError(f"{where}: code {code!r} is declared twice")
        pairs.append((code, _name(name, where)))
    platforms = doc.get("platforms")
    if not isinstance(platforms, list) or not 1 <= len(platforms) <= MAX_PLATFORMS:
        raise ConfigError(f"{file}: platforms: must be a list of 1 to {MAX_PLATFORMS} names")
    names = tuple(_name(p, f"{file}: platforms[{i}]") for i, p in enumerate(platforms))
    label = doc.get("label", "")
    if not isinstance(label, str) or len(label) > MAX_LABEL:
        raise ConfigError(f"{file}: label: must be a string of at most {MAX_LABEL} characters")
    brands_file = doc.get("brands_file")
    if brands_file is not None and not (isinstance(brands_file, str) and brands_file
                                        and not _CONTROL.search(brands_file)):
        raise ConfigError(f"{file}: brands_file={_short(brands_file)}: must be a file name")
    return Header(Dimensions(tuple(pairs), names, brands), label, brands_file)


def parse_brands(header: Header, data: bytes | None, file: str) -> Reference:
    """The reference of `header` with the brands CSV `data` (None: no brands file, the
    first-time brands unknown); ConfigError names `file` and the line."""
    dims = header.dimensions
    n = dims.n_brands
    country = np.zeros(n, np.uint8)
    if data is None:
        return Reference(dims, header.label, country, None, {})
    if len(data) > MAX_BRANDS_BYTES:
        raise ConfigError(f"{file}: {len(data):,} bytes, a brands file has at most "
                          f"{MAX_BRANDS_BYTES:,}")
    first_time = np.zeros(n, bool)
    seen = np.zeros(n, np.uint32)  # the line that listed each brand, 0: none
    names: dict[int, str] = {}
    codes = {code: i for i, (code, _) in enumerate(dims.countries)}
    home = dims.countries[0][0]
    reader = csv.reader(io.StringIO(_text(data, file), newline=""), strict=True)
    try:
        head = next(reader, None)
        if head is None or tuple(head) != COLUMNS:
            raise ConfigError(f"{file}, line 1: the header row must be {','.join(COLUMNS)}, "
                              f"not {_short(','.join(head or []))}")
        for row in reader:
            line = reader.line_num
            where = f"{file}, line {line}"
            if not row:
                continue  # an empty line
            if len(row) != len(COLUMNS):
                raise ConfigError(f"{where}: {len(row)} fields, expected {len(COLUMNS)} "
                                  f"({','.join(COLUMNS)})")
            text, name, code, flag = row
            if not (text.isascii() and text.isdecimal()) or len(text) > 10 \
                    or not 0 <= int(text) < n:
                raise ConfigError(f"{where}: id={_short(text)}: must be a brand id 0 to "
                                  f"{n - 1:,} (brands = {n:,} in the header)")
            brand = int(text)
            if seen[brand]:
                raise ConfigError(f"{where}: brand {brand} is listed twice (first on line "
                                  f"{seen[brand]})")
            seen[brand] = min(line, 2**32 - 1)
            if code not in codes:
                raise ConfigError(f"{where}: country={_short(code)} is not one of the "
                                  f"{len(codes)} countries in the header")
            if flag not in ("0", "1"):
                raise ConfigError(f"{where}: first_time={_short(flag)}: must be 0 or 1")
            if flag == "1" and codes[code] == 0:
                raise ConfigError(f"{where}: first_time=1 for a brand of {home}, the home "
                                  "market: a first-time brand is an overseas one")
            if name:
                names[brand] = _name(name, where)
            country[brand] = codes[code]
            first_time[brand] = flag == "1"
    except csv.Error as exc:
        raise ConfigError(f"{file}, line {reader.line_num}: not CSV ({exc})") from None
    return Reference(dims, header.label, country, first_time, names)


def parse(header_data: bytes, header_file: str, brands_data: bytes | None,
          brands_file: str) -> Reference:
    return parse_brands(parse_header(header_data, header_file), brands_data, brands_file)


def dump(reference: Reference, brands_file: str | None, comment: str = "") -> tuple[str, str]:
    """The header (TOML) and brands (CSV) text of `reference`, which `parse` reads back:
    one CSV row per brand that is not of the home market, first-time or named."""
    dims = reference.dimensions
    lines = [f"# {line}".rstrip() for line in comment.splitlines()]
    lines += [f"format = {_toml(FORMAT)}", f"version = {VERSION}",
              f"label = {_toml(reference.label)}", f"brands = {dims.n_brands}"]
    if brands_file is not None:
        lines.append(f"brands_file = {_toml(brands_file)}")
    lines.append("platforms = [" + ", ".join(_toml(p) for p in dims.platforms) + "]")
    lines.append("countries = [")
    lines += [f"    {{ code = {_toml(code)}, name = {_toml(name)} }},"
              for code, name in dims.countries]
    lines.append("]")
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    flags = reference.first_time if reference.first_time is not None \
        else np.zeros(dims.n_brands, bool)
    listed = (reference.country != 0) | flags
    listed[[b for b, name in reference.names.items() if name]] = True
    for brand in np.flatnonzero(listed).tolist():
        writer.writerow((brand, reference.names.get(brand, ""),
                         dims.countries[int(reference.country[brand])][0],
                         int(flags[brand])))
    return "\n".join(lines) + "\n", out.getvalue()


def _text(data: bytes, file: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{file}: not UTF-8 (byte {exc.start:,})") from None
    return text.removeprefix("\ufeff")  # a spreadsheet's byte-order mark


def _name(value: object, where: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME or _CONTROL.search(value) \
            or value != value.strip():
        raise ConfigError(f"{where}: name={_short(value)}: must be 1 to {MAX_NAME} "
                          "characters, no control characters or surrounding spaces")
    return value


def _toml(text: str) -> str:
    """A TOML basic string (JSON's escapes are TOML's)."""
    return json.dumps(text, ensure_ascii=False)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
