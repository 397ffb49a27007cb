"""Checkpoints: the aggregation state and its sequence watermarks in one file, atomically.

`save` writes to a temporary file in the same directory, fsyncs it, renames it over the old
checkpoint and fsyncs the directory, so a crash at any moment leaves either the old or the
new checkpoint, never a torn one. Arrays and watermarks travel together: a restored state
knows exactly which (producer, seq) it already holds, so redelivered batches are dropped.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np
import orjson

from .errors import ConfigError
from .state import AggregateState
from .wire import Limits

FORMAT = 1
_ARRAYS = ("gmv_by_brand", "orders_by_brand", "gmv_by_minute", "orders_by_minute",
           "gmv_by_country", "orders_by_country", "gmv_by_platform", "orders_by_platform")


def export(state: AggregateState) -> bytes:
    """The state as checkpoint bytes (a copy: the state may change right after)."""
    meta = {"format": FORMAT, **state.scalars()}
    buffer = io.BytesIO()
    np.savez(buffer, meta=np.frombuffer(orjson.dumps(meta), np.uint8),
             **{name: getattr(state, name) for name in _ARRAYS})
    return buffer.getvalue()


def save(path: Path, data: bytes) -> None:
    """Atomically replace `path` with `data` (tmp file, fsync, rename, fsync dir)."""
    directory = path.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load(path: Path, limits: Limits) -> AggregateState | None:
    """The state saved at `path`, or None if there is no checkpoint yet."""
    if not path.exists():
        return None
    try:
        with np.load(path) as npz:
            meta = orjson.loads(npz["meta"].tobytes())
            arrays = {name: npz[name] for name in _ARRAYS}
    except (OSError, ValueError, KeyError, orjson.JSONDecodeError) as exc:
        raise ConfigError(f"--checkpoint={path}: not a readable checkpoint ({exc})") from None
    if meta.get("format") != FORMAT:
        raise ConfigError(f"--checkpoint={path}: format {meta.get('format')}, expected {FORMAT}")
    state = AggregateState(limits)
    for name, array in arrays.items():
        if array.shape != getattr(state, name).shape:
            raise ConfigError(f"--checkpoint={path}: {name} has shape {array.shape}, the "
                              f"settings give {getattr(state, name).shape} (other --brands?)")
        getattr(state, name)[:] = array
    state.restore_scalars(meta)
    return state
