"""Reading a reference file (docs/reference-data.md): the TOML header and the brands CSV it
names, each bounded in size, parsed by ticker/core/reference.py. A `.gz` brands file is
decompressed, bounded too. Every failure is one ConfigError line naming the file."""

from __future__ import annotations

import zlib
from pathlib import Path

from ticker.core.errors import ConfigError
from ticker.core.reference import MAX_BRANDS_BYTES, MAX_HEADER_BYTES, Reference, \
    parse_brands, parse_header


def load(path: Path) -> Reference:
    """The reference whose header is at `path`; its brands file is found beside it."""
    header = parse_header(_read(path, MAX_HEADER_BYTES), str(path))
    if header.brands_file is None:
        return parse_brands(header, None, str(path))
    brands = path.parent / header.brands_file
    data = _read(brands, MAX_BRANDS_BYTES, named_by=path)
    if brands.suffix == ".gz":
        data = _gunzip(data, brands)
    return parse_brands(header, data, str(brands))


def _read(path: Path, limit: int, named_by: Path | None = None) -> bytes:
    by = f" (brands_file of {named_by})" if named_by else ""
    try:
        with path.open("rb") as file:
            data = file.read(limit + 1)
    except OSError as exc:
        raise ConfigError(f"{path}{by}: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise ConfigError(f"{path}{by}: larger than {limit:,} bytes")
    return data


def _gunzip(data: bytes, path: Path) -> bytes:
    inflate = zlib.decompressobj(wbits=zlib.MAX_WBITS | 16)
    try:
        out = inflate.decompress(data, MAX_BRANDS_BYTES + 1)
    except zlib.error as exc:
        raise ConfigError(f"{path}: not gzip ({exc})") from None
    if len(out) > MAX_BRANDS_BYTES or inflate.unconsumed_tail:
        raise ConfigError(f"{path}: more than {MAX_BRANDS_BYTES:,} bytes uncompressed")
    if not inflate.eof:
        raise ConfigError(f"{path}: truncated gzip")
    return out
