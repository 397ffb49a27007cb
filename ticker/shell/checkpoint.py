"""Checkpoints: the aggregation state and its sequence watermarks in one file, atomically.

The aggregator acknowledges batches only once a checkpoint holding them is on disk, so this
module must never report success it did not achieve, and never restore a state it cannot
vouch for. Hence:

* `save` writes the new checkpoint into a spare file in the same directory, fsyncs it,
  renames it over the old checkpoint and fsyncs the directory: a crash at any moment
  leaves the old or the new checkpoint, never a torn one. The old one's file, kept by a
  hard link, is the next spare (`.NAME.spare`): rewriting pages the file system already
  holds is several times faster than filling a new file, and an aggregator of small
  batches saves every 16 of them (`benchmarks/checkpoint_save.py`, docs/performance.md
  section 4). A checkpoint that has another name (a symlink, a hard link) is never
  rewritten, and where hard links are refused each save writes a new spare. Any
  OS error (a full disk, a read-only mount) raises `ConfigError` with the OS's reason and
  removes the spare; only a failed fsync of the directory comes after the rename, and it
  raises too, so nothing unsure is acknowledged.
* Layout: `GMVCKPT4`, a 4-byte little-endian header length, a JSON header (the state's
  scalars and watermarks, and `"arrays": {name: [dtype, length]}`), the arrays raw and
  little-endian in that order, then the SHA-256 of everything before it (32 bytes;
  `head -c -32 FILE | sha256sum` checks it by hand). SHA-256 because CPUs hash it in
  hardware: about 2 ms for the 4.3 MB festival state, paid for by copying the arrays once
  instead of twice (export: 3.5 ms before the checksum, 2.3 ms with it).
* `load` refuses, with one line naming the file and what failed: a file that is not a
  checkpoint or is of another format version, a checksum mismatch, arrays other than the
  expected ones or of another dtype or of a length other than the settings give, negative
  counts, a `brand_overseas` flag other than 0/1, arrays whose sums differ from each other
  or from the header's `gmv_cents` and `orders`, and anything `restore_scalars` rejects.
  The checksum catches damage; the cross-checks catch a writer's bug or a hand edit.
* The header's `big_brand_minutes` (each big brand's crossing minute, the first 1,000) came in
  without a format change: a file without it, or saved with another `big_brand_cents`,
  loads with the brands above the line crossing at the latest minute (an upper bound).
* `prepare` runs before the aggregator touches the broker (whose persistent session is ended
  on a fresh start), so a path that cannot hold checkpoints fails while nothing is lost yet;
  `lock` keeps a second aggregator off the same file; `backup` keeps a copy before a reset.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np
import orjson

from ticker.core.errors import ConfigError
from ticker.core.dimensions import BIG_BRAND_CENTS
from ticker.core.partitions import Shard
from ticker.core.state import AggregateState
from ticker.core.wire import Limits

MAGIC = b"GMVCKPT4"
_DIGEST = 32  # SHA-256
_PREAMBLE = len(MAGIC) + 4  # magic and header length
# Each array, in file order, with the likely cause when its length differs from the settings.
_BRANDS = "other --brands or --reference?"
_COUNTRIES = "another --reference, or none where one was?"
_ARRAYS = {"gmv_by_brand": _BRANDS, "orders_by_brand": _BRANDS,
           "gmv_by_minute": "another --scenario?", "orders_by_minute": "another --scenario?",
           "gmv_by_country": _COUNTRIES, "orders_by_country": _COUNTRIES,
           "gmv_by_platform": _COUNTRIES, "orders_by_platform": _COUNTRIES,
           "brand_overseas": _BRANDS}
_TOTALS = {"gmv_cents": "gmv_by_", "orders": "orders_by_"}


def _le(dtype: np.dtype) -> str:
    return dtype.newbyteorder("<").str  # '<i8', '|u1'


def export(state: AggregateState) -> bytes:
    """The state as checkpoint bytes (a copy: the state may change right after)."""
    arrays = [getattr(state, name) for name in _ARRAYS]
    header = orjson.dumps({**state.scalars(), "arrays": {
        name: [_le(a.dtype), len(a)] for name, a in zip(_ARRAYS, arrays)}})
    # The arrays go into the hash and the join as buffers, copied once more only where not
    # contiguous (the brands' GMV and orders: interleaved in the state).
    parts: list[bytes | memoryview] = [
        MAGIC, len(header).to_bytes(4, "little"), header,
        *(np.ascontiguousarray(a, _le(a.dtype)).data for a in arrays)]
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return b"".join([*parts, digest.digest()])


def save(path: Path, data: bytes) -> None:
    """Atomically replace `path` with `data`, through the spare file; on any OS error raise
    ConfigError."""
    spare = path.with_name(f".{path.name}.spare")
    kept = path.with_name(f".{path.name}.kept")
    with _os_errors(path, "cannot save"):
        kept.unlink(missing_ok=True)  # left by a crash before it became the spare
        with suppress(OSError):  # none yet, or no hard links here: a new spare next time
            if _sole_name_of_a_file(path):  # never rewrite a file that others name
                os.link(path, kept)  # the checkpoint being replaced: the next spare
        try:
            _write_atomically(path, data, through=spare)
            if kept.exists():
                os.replace(kept, spare)
        finally:
            kept.unlink(missing_ok=True)


def _sole_name_of_a_file(path: Path) -> bool:
    """`path` is a regular file (not a symlink) with no other hard link."""
    st = os.lstat(path)
    return stat.S_ISREG(st.st_mode) and st.st_nlink == 1


def load(path: Path, limits: Limits, first_time: np.ndarray | None = None, *,
         big_brand_cents: int = BIG_BRAND_CENTS, shard: Shard = Shard()) \
        -> AggregateState | None:
    """The state saved at `path`, every check passed, or None if there is no checkpoint yet.
    A checkpoint written before the big brands' crossing minutes were kept (or with another
    `big_brand_cents`) loads, each brand above the line then crossing at the latest minute."""
    with _os_errors(path, "cannot read it"):
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
    state = AggregateState(limits, first_time, big_brand_cents=big_brand_cents, shard=shard)
    try:
        _restore(state, data)
    except ValueError as exc:
        raise ConfigError(f"--checkpoint={path}: {exc}") from None
    return state


def prepare(path: Path, *, create_dir: bool = False) -> None:
    """Fail now, before the broker is touched, if checkpoints cannot be read and saved at
    `path`; `create_dir` makes its directory (with parents) first."""
    directory = path.parent
    with _os_errors(path, f"directory {directory}"):
        if create_dir:
            with suppress(FileExistsError):  # there already, or a file in the way: see below
                directory.mkdir(parents=True)
        os.scandir(directory).close()  # the OS says why: missing, not a directory, no access
    with _os_errors(path, "cannot read it"):
        try:
            with path.open("rb") as file:  # a directory at `path` fails here too
                size = os.fstat(file.fileno()).st_size
        except FileNotFoundError:
            size = 0
    with _os_errors(path, f"cannot write in {directory}"):
        # `save` writes the next checkpoint beside the current one: reserve as much, so a
        # read-only or full file system shows here. An unnamed file leaves nothing behind.
        with tempfile.TemporaryFile(dir=directory) as probe:
            os.posix_fallocate(probe.fileno(), 0, max(size, 1))


@contextmanager
def lock(path: Path) -> Iterator[None]:
    """Hold `PATH.lock` exclusively for the block, so a second `gmv aggregate` on the same
    checkpoint fails at once, naming the pid of the first."""
    lock_path = path.with_name(path.name + ".lock")
    with _os_errors(path, f"cannot open {lock_path}"):
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        with _os_errors(path, f"cannot lock {lock_path}"):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = os.pread(fd, 20, 0).decode(errors="replace").strip() or "unknown"
                raise ConfigError(f"--checkpoint={path}: in use by another gmv aggregate "
                                  f"(pid {pid})") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        # Closing releases the lock. The file stays: unlinking it would let a newcomer lock
        # a fresh file while a waiter still holds the old one.
        os.close(fd)


def backup(path: Path) -> Path | None:
    """Copy the checkpoint at `path`, if there is one, atomically to `PATH.before-reset` and
    return that path: an operator's reset can then be undone by moving it back."""
    target = path.with_name(path.name + ".before-reset")
    with _os_errors(path, f"cannot copy it to {target}"):
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        _write_atomically(target, data)
    return target


@contextmanager
def _os_errors(path: Path, doing: str) -> Iterator[None]:
    """Turn an OSError into one line naming the checkpoint, what failed and the OS's reason."""
    try:
        yield
    except OSError as exc:
        raise ConfigError(f"--checkpoint={path}: {doing}: {exc.strerror or exc}") from None


def _write_atomically(path: Path, data: bytes, through: Path | None = None) -> None:
    """Write `data` into `through` (over whatever it held; by default a new temp file beside
    `path`), fsync it, rename it over `path` and fsync the directory; on failure remove it."""
    if through is None:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        through = Path(name)
    else:
        fd = os.open(through, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.truncate()
            file.flush()
            os.fsync(file.fileno())
        os.replace(through, path)
    except BaseException:
        through.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself is durable only once the directory is
    finally:
        os.close(dir_fd)


def _restore(state: AggregateState, data: bytes) -> None:
    """Fill the fresh `state` from checkpoint bytes; ValueError says what is wrong."""
    if not data.startswith(MAGIC[:-1]):
        raise ValueError(f"not a gmv checkpoint ({len(data)} bytes, not starting with "
                         f"{MAGIC.decode()})")
    if (magic := data[:len(MAGIC)]) != MAGIC:
        age = "an older" if magic < MAGIC else "a newer"
        raise ValueError(f"written by {age} version of gmv ({magic.decode(errors='replace')}, "
                         f"this one reads {MAGIC.decode()}); run that version, or move the "
                         f"file away to start from zero")
    body = memoryview(data)[:-_DIGEST]
    if len(data) < _PREAMBLE + _DIGEST or hashlib.sha256(body).digest() != data[-_DIGEST:]:
        raise ValueError("checksum mismatch (the file was changed or damaged)")

    # The checksum holds, so what follows was written whole; it may still not be ours to load.
    size = int.from_bytes(data[len(MAGIC):_PREAMBLE], "little")
    meta = orjson.loads(body[_PREAMBLE:_PREAMBLE + size])
    arrays = meta.get("arrays") if isinstance(meta, dict) else None
    if not isinstance(arrays, dict) or list(arrays) != list(_ARRAYS):
        raise ValueError(f"the header lists arrays {arrays!r}, expected {list(_ARRAYS)}")
    offset = _PREAMBLE + size
    for name, hint in _ARRAYS.items():
        target, spec = getattr(state, name), arrays[name]
        if not (isinstance(spec, list) and len(spec) == 2 and type(spec[1]) is int):
            raise ValueError(f"the header gives {name} as {spec!r}, not [dtype, length]")
        if spec[0] != _le(target.dtype):
            raise ValueError(f"{name} has dtype {spec[0]!r}, expected {_le(target.dtype)!r}")
        if spec[1] != len(target):
            raise ValueError(f"{name} has shape ({spec[1]},), the settings give "
                             f"{target.shape} ({hint})")
        offset += target.nbytes
    if offset != len(body):
        raise ValueError(f"{len(data)} bytes, the header announces {offset + _DIGEST}")

    offset = _PREAMBLE + size
    for name in _ARRAYS:
        target = getattr(state, name)
        target[:] = np.frombuffer(data, _le(target.dtype), len(target), offset)
        offset += target.nbytes
        if name == "brand_overseas" and (target > 1).any():
            raise ValueError("brand_overseas has a value other than 0 and 1")
        if target.min(initial=0) < 0:
            raise ValueError(f"{name} has a negative value")
    for total, prefix in _TOTALS.items():
        value = meta.get(total)
        if type(value) is not int or value < 0:
            raise ValueError(f"{total}={value!r} in the header: not a count")
        for name in (name for name in _ARRAYS if name.startswith(prefix)):
            # Summed as Python ints: numpy's int64 sum would wrap around silently.
            if (got := sum(getattr(state, name).tolist())) != value:
                raise ValueError(f"{name} sums to {got}, the header's {total} is {value}")
    state.check_shard(meta)  # before the rest: its reason is the operator's, not damage
    try:
        state.restore_scalars(meta)
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"bad header scalars ({type(exc).__name__}: {exc})") from None
