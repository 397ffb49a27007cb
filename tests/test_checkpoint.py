"""Checkpoints: a restored state equals the saved one, watermarks included; writes are atomic;
a damaged, forged or unreachable checkpoint is one clear line, never a traceback or a silent
wrong total. Faults are caused for real: edited files, a full tmpfs, a read-only mount."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import orjson
import pytest

from ticker.shell import checkpoint
from ticker.core.errors import ConfigError
from ticker.core.state import AggregateState
from ticker.core.wire import Limits

from .test_state import LIMITS, batch

ROOT = Path(__file__).resolve().parent.parent



def totals(state: AggregateState) -> dict:
    """The snapshot without the state id, which is new for every state made."""
    return {k: v for k, v in state.snapshot().items() if k != "state"}

def filled_state() -> AggregateState:
    state = AggregateState(LIMITS)
    state.apply(batch(0, 1, [100, 200], [1, 4], [1, 2], [0, 1]))
    state.apply(batch(2, 3, [7], [2]))  # seq 1 is missing: a gap
    state.apply(batch(0, 2, [5], [0], producer="other"))
    state.apply(batch(0, 2, [5], [0], producer="other"))  # duplicate
    state.reject("bad_json")
    return state


def saved(tmp_path: Path) -> Path:
    path = tmp_path / "agg.ckpt"
    checkpoint.save(path, checkpoint.export(filled_state()))
    return path


def refused(path: Path, call: Callable[[Path], object] | None = None) -> str:
    """The ConfigError that `call` (by default a load) gives on `path`, checked to be one
    line naming the path."""
    with pytest.raises(ConfigError) as caught:
        (call or (lambda p: checkpoint.load(p, LIMITS)))(path)
    message = str(caught.value)
    assert message.startswith(f"--checkpoint={path}: ") and "\n" not in message
    return message


def run_python(code: str, *args: str, drop_root_reads: bool = False) -> str:
    """Run `code` in a child Python at the repository root and return what it prints.
    `drop_root_reads`: the child may not read what its file modes deny, even as root."""
    prefix: list[str] = []
    if drop_root_reads and os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("root reads any file, and setpriv is missing to drop that capability")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    return subprocess.run([*prefix, sys.executable, "-c", code, *args], cwd=ROOT, check=True,
                          capture_output=True, text=True, timeout=60).stdout


@contextmanager
def mounted(target: Path, *args: str) -> Iterator[Path]:
    """Mount a file system on `target` for the block, or skip the test where we may not."""
    target.mkdir(exist_ok=True)
    result = subprocess.run(["mount", *args, str(target)], capture_output=True, text=True) \
        if shutil.which("mount") else None
    if result is None or result.returncode:
        pytest.skip(f"cannot mount here (needs root): {result and result.stderr.strip()}")
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True)


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs: a disk that really fills up (ENOSPC)."""
    with mounted(tmp_path / "tiny", "-t", "tmpfs", "-o", "size=64k", "tmpfs") as directory:
        yield directory


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory holding a checkpoint, then bind-mounted read-only on itself (EROFS)."""
    directory = tmp_path / "ro"
    directory.mkdir()
    saved(directory)
    with mounted(directory, "--bind", str(directory)):
        subprocess.run(["mount", "-o", "remount,bind,ro", str(directory)], check=True)
        yield directory


def forge(path: Path, edit: Callable[[dict, bytearray], object]) -> None:
    """Rewrite the checkpoint with `edit(header, array_bytes)` applied and a valid checksum,
    as a writer's bug or a careful hand edit would."""
    data = path.read_bytes()
    size = int.from_bytes(data[8:12], "little")
    header, arrays = orjson.loads(data[12:12 + size]), bytearray(data[12 + size:-32])
    edit(header, arrays)
    body = checkpoint.MAGIC + len(new := orjson.dumps(header)).to_bytes(4, "little") + new
    body += bytes(arrays)
    path.write_bytes(body + hashlib.sha256(body).digest())


def cents(arrays: bytearray, start: int = 0) -> np.ndarray:
    """A writable view of the int64 array starting `start` cells into the array bytes."""
    return np.frombuffer(arrays, "<i8", len(arrays) // 8)[start:]


def test_restored_state_equals_the_saved_one(tmp_path):
    """Every array, total, counter and watermark survives a save and load."""
    state, path = filled_state(), tmp_path / "agg.ckpt"
    checkpoint.save(path, checkpoint.export(state))
    restored = checkpoint.load(path, LIMITS)
    assert restored is not None
    assert restored.snapshot() == state.snapshot()
    for name in checkpoint._ARRAYS:
        assert np.array_equal(getattr(restored, name), getattr(state, name))
    assert restored.watermarks.gaps == 1 and restored.duplicates == 1


def test_restored_watermarks_drop_redelivered_batches_and_accept_the_missing_one(tmp_path):
    """After a restore, batches already applied are duplicates and the gap can still close."""
    restored = checkpoint.load(saved(tmp_path), LIMITS)
    assert not restored.apply(batch(0, 1, [100, 200], [1, 4]))
    assert not restored.apply(batch(2, 3, [7], [2]))
    assert restored.apply(batch(1, 3, [9], [2]))
    assert restored.watermarks.gaps == 0 and restored.gmv_cents == 100 + 200 + 7 + 5 + 9


def test_no_checkpoint_file_means_a_fresh_start(tmp_path):
    """A path that does not exist yet gives None, not an error."""
    assert checkpoint.load(tmp_path / "none.ckpt", LIMITS) is None


def test_export_is_a_copy_not_a_view(tmp_path):
    """Bytes exported before more batches arrive still hold the older totals."""
    state = filled_state()
    data = checkpoint.export(state)
    state.apply(batch(3, 3, [1000], [3]))
    path = tmp_path / "agg.ckpt"
    checkpoint.save(path, data)
    assert checkpoint.load(path, LIMITS).gmv_cents == state.gmv_cents - 1000


def test_a_checkpoint_ends_with_the_sha256_of_everything_before_it(tmp_path):
    """The documented layout: magic, and a trailer anyone can check with sha256sum."""
    data = saved(tmp_path).read_bytes()
    assert data.startswith(b"GMVCKPT4")
    assert hashlib.sha256(data[:-32]).digest() == data[-32:]


@pytest.mark.parametrize("damage", [
    lambda data: data[:20] + bytes([data[20] ^ 1]) + data[21:],  # in the JSON header
    lambda data: data[:-300] + bytes([data[-300] ^ 4]) + data[-299:],  # in an int64 array
    lambda data: data[:-35] + bytes([data[-35] ^ 0x80]) + data[-34:],  # in brand_overseas
    lambda data: data[:-1] + bytes([data[-1] ^ 1]),  # in the checksum
    lambda data: data[:-100],  # truncated
    lambda data: data[:10],  # truncated to less than a checksum
    lambda data: data + b"\0",  # grown
    lambda data: checkpoint.MAGIC + np.random.default_rng(1).bytes(2000),
], ids=["header", "cents", "flags", "checksum", "truncated", "short", "grown", "random-body"])
def test_a_damaged_checkpoint_is_a_checksum_mismatch(tmp_path, damage):
    """One changed, missing or extra byte anywhere after the magic is refused by the checksum."""
    path = saved(tmp_path)
    path.write_bytes(damage(path.read_bytes()))
    assert refused(path).endswith(": checksum mismatch (the file was changed or damaged)")


@pytest.mark.parametrize("edit, reason", [
    (lambda h, a: h.update(gmv_cents=h["gmv_cents"] + 1),
     r"gmv_by_brand sums to 312, the header's gmv_cents is 313"),
    (lambda h, a: h.update(orders=h["orders"] - 1),
     r"orders_by_brand sums to 4, the header's orders is 3"),
    (lambda h, a: cents(a, 5 + 5).__setitem__(1, cents(a, 10)[1] + 1),  # gmv_by_minute[1]
     r"gmv_by_minute sums to 313, the header's gmv_cents is 312"),
    (lambda h, a: (cents(a).__setitem__(0, -5), cents(a).__setitem__(1, cents(a)[1] + 10)),
     r"gmv_by_brand has a negative value"),
    (lambda h, a: a.__setitem__(-1, 2), r"brand_overseas has a value other than 0 and 1"),
    (lambda h, a: h["arrays"]["gmv_by_brand"].__setitem__(0, "<i4"),
     r"gmv_by_brand has dtype '<i4', expected '<i8'"),
    (lambda h, a: h["arrays"]["brand_overseas"].__setitem__(0, "|b1"),
     r"brand_overseas has dtype '\|b1', expected '\|u1'"),
    (lambda h, a: h["arrays"].pop("brand_overseas"), r"the header lists arrays \{"),
    (lambda h, a: h["arrays"].__setitem__("gmv_by_brand", 5), r"gmv_by_brand as 5, not \["),
    (lambda h, a: a.extend(bytes(8)), r"\d+ bytes, the header announces \d+"),
    (lambda h, a: h.update(orders=True), r"orders=True in the header: not a count"),
    (lambda h, a: h.update(gmv_cents=312.0), r"gmv_cents=312.0 in the header: not a count"),
    (lambda h, a: h.pop("batches"), r"bad header scalars \(KeyError: 'batches'\)"),
    (lambda h, a: h.update(duplicates="many"), r"bad header scalars \(ValueError: "),
], ids=["gmv_cents", "orders", "minute-cell", "negative", "flag-2", "dtype-i4", "dtype-bool",
        "array-missing", "array-spec", "extra-bytes", "bool-total", "float-total",
        "scalar-missing", "scalar-type"])
def test_a_forged_checkpoint_with_a_valid_checksum_is_caught_by_the_cross_checks(
        tmp_path, edit, reason):
    """An edit that recomputes the checksum still fails on types, ranges or unequal sums."""
    path = saved(tmp_path)
    forge(path, edit)
    assert re.search(reason, refused(path))


def test_a_checkpoint_rewritten_unchanged_by_the_forger_loads(tmp_path):
    """The forge helper itself writes a loadable file, so the refusals above are the edits'."""
    path = saved(tmp_path)
    forge(path, lambda header, arrays: None)
    assert totals(checkpoint.load(path, LIMITS)) == totals(filled_state())


@pytest.mark.parametrize("content, reason", [
    (b"", r"not a gmv checkpoint \(0 bytes, not starting with GMVCKPT4\)"),
    (b"not a checkpoint", r"not a gmv checkpoint \(16 bytes"),
    (np.random.default_rng(0).bytes(5000), r"not a gmv checkpoint \(5000 bytes"),
    (b"GMVCKPT3" + bytes(100), r"written by an older version of gmv \(GMVCKPT3, this one "
                               r"reads GMVCKPT4\); run that version, or move the file away"),
    (b"GMVCKPT5" + bytes(100), r"written by a newer version of gmv \(GMVCKPT5"),
], ids=["empty", "text", "random", "older", "newer"])
def test_a_file_that_is_not_a_checkpoint_of_this_version_is_refused_by_name(
        tmp_path, content, reason):
    """Empty, foreign or other-version files say what they are instead of crashing."""
    path = tmp_path / "agg.ckpt"
    path.write_bytes(content)
    assert re.search(reason, refused(path))


def test_checkpoint_for_other_dimensions_is_refused_by_name(tmp_path):
    """A checkpoint from a run with another brand count is a clear settings error."""
    other = Limits(n_brands=9, n_minutes=10, n_countries=3, n_platforms=2)
    assert refused(saved(tmp_path), lambda p: checkpoint.load(p, other)).endswith(
        ": gmv_by_brand has shape (5,), the settings give (9,) (other --brands or --reference?)")


def test_a_directory_at_the_checkpoint_path_is_refused_by_load_and_prepare(tmp_path):
    """A directory where the file should be is the OS's reason on one line."""
    path = tmp_path / "agg.ckpt"
    path.mkdir()
    assert refused(path).endswith(": cannot read it: Is a directory")
    assert refused(path, checkpoint.prepare).endswith(": cannot read it: Is a directory")


def test_an_unreadable_checkpoint_is_refused_by_load_and_prepare(tmp_path):
    """A checkpoint whose mode denies reading fails with 'Permission denied' (as root, in a
    child that gives up the capability to read past file modes)."""
    path = saved(tmp_path)
    path.chmod(0)
    printed = run_python(
        "import sys; from pathlib import Path\n"
        "from ticker.shell import checkpoint; from ticker.core.errors import ConfigError\n"
        "from tests.test_state import LIMITS\n"
        "for check in (lambda p: checkpoint.load(p, LIMITS), checkpoint.prepare):\n"
        "    try: check(Path(sys.argv[1]))\n"
        "    except ConfigError as exc: print(exc)\n", str(path), drop_root_reads=True)
    assert printed == f"--checkpoint={path}: cannot read it: Permission denied\n" * 2


def test_each_save_rewrites_the_previous_checkpoints_file_in_place(tmp_path):
    """From the second save on, the new checkpoint is written into the file of the one
    before it (kept as `.agg.ckpt.spare` by a hard link), not into a new file; every save
    loads as itself, and a `.kept` link left by a crash between the renames is cleared."""
    path, spare = tmp_path / "agg.ckpt", tmp_path / ".agg.ckpt.spare"
    states = [AggregateState(LIMITS) for _ in range(4)]
    for n, state in enumerate(states):
        state.apply(batch(0, 0, [100 * (n + 1)], [n]))
    checkpoint.save(path, checkpoint.export(states[0]))
    assert [p.name for p in tmp_path.iterdir()] == ["agg.ckpt"]
    files = [path.stat().st_ino]
    for state in states[1:]:
        checkpoint.save(path, checkpoint.export(state))
        assert spare.stat().st_ino == files[-1]  # the replaced one's file, the next spare
        files.append(path.stat().st_ino)
        assert checkpoint.load(path, LIMITS).gmv_cents == state.gmv_cents
    assert files[2] == files[0] and files[3] == files[1]  # two files, taking turns
    os.link(spare, tmp_path / ".agg.ckpt.kept")
    checkpoint.save(path, checkpoint.export(states[0]))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".agg.ckpt.spare", "agg.ckpt"]
    assert checkpoint.load(path, LIMITS).gmv_cents == 100


def test_saves_through_a_symlinked_checkpoint_never_write_into_its_target(tmp_path):
    """A checkpoint path that is a symlink is replaced by the first save, as a rename does;
    the file it pointed to is never rewritten as a spare."""
    target, path = tmp_path / "elsewhere.ckpt", tmp_path / "agg.ckpt"
    checkpoint.save(target, checkpoint.export(filled_state()))
    before = target.read_bytes()
    path.symlink_to(target)
    for _ in range(3):
        checkpoint.save(path, checkpoint.export(AggregateState(LIMITS)))
    assert target.read_bytes() == before and not path.is_symlink()
    assert checkpoint.load(path, LIMITS).gmv_cents == 0


def test_a_hard_link_to_an_old_checkpoint_keeps_what_it_held(tmp_path):
    """A checkpoint someone has hard-linked (`ln agg.ckpt backup`) is not rewritten as the
    spare: the other name keeps that checkpoint's bytes through later saves."""
    path = saved(tmp_path)
    before = path.read_bytes()
    os.link(path, tmp_path / "backup")
    for _ in range(3):
        checkpoint.save(path, checkpoint.export(AggregateState(LIMITS)))
    assert (tmp_path / "backup").read_bytes() == before
    assert checkpoint.load(path, LIMITS).gmv_cents == 0


def test_prepare_accepts_a_new_or_existing_checkpoint_and_leaves_nothing(tmp_path):
    """A writable directory passes, with or without a checkpoint, and no probe file stays."""
    checkpoint.prepare(tmp_path / "agg.ckpt")
    checkpoint.prepare(saved(tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == ["agg.ckpt"]


def test_prepare_refuses_a_missing_directory_unless_told_to_create_it(tmp_path):
    """A missing directory is named (caught before the broker); create_dir makes it."""
    path = tmp_path / "state" / "gmv" / "agg.ckpt"
    assert refused(path, checkpoint.prepare).endswith(
        f": directory {path.parent}: No such file or directory")
    checkpoint.prepare(path, create_dir=True)
    assert path.parent.is_dir() and not path.exists()


def test_prepare_refuses_a_directory_that_is_a_file(tmp_path):
    """A file where the directory should be is 'Not a directory', with or without create_dir."""
    (tmp_path / "state").write_text("")
    path = tmp_path / "state" / "agg.ckpt"
    assert refused(path, checkpoint.prepare).endswith(": Not a directory")
    assert refused(path, lambda p: checkpoint.prepare(p, create_dir=True)).endswith(
        f": directory {path.parent}: Not a directory")


def test_prepare_refuses_a_read_only_file_system(read_only_dir):
    """A read-only mount shows in the pre-flight check, not at the first checkpoint."""
    assert refused(read_only_dir / "agg.ckpt", checkpoint.prepare).endswith(
        f": cannot write in {read_only_dir}: Read-only file system")


def test_prepare_refuses_a_disk_without_room_for_the_next_checkpoint(tiny_disk):
    """On a 64 KiB disk holding a 40 kB checkpoint, the next save (beside it) cannot fit."""
    path = tiny_disk / "agg.ckpt"
    checkpoint.prepare(path)
    checkpoint.save(path, bytes(40_000))
    assert refused(path, checkpoint.prepare).endswith(
        f": cannot write in {tiny_disk}: No space left on device")
    assert [p.name for p in tiny_disk.iterdir()] == ["agg.ckpt"]


def test_save_on_a_full_disk_raises_one_line_and_keeps_the_previous_checkpoint(tiny_disk):
    """ENOSPC mid-write is a ConfigError; the old checkpoint is intact, no temp file stays."""
    path = tiny_disk / "agg.ckpt"
    checkpoint.save(path, checkpoint.export(filled_state()))
    before = path.read_bytes()
    assert refused(path, lambda p: checkpoint.save(p, bytes(100_000))).endswith(
        ": cannot save: No space left on device")
    assert path.read_bytes() == before
    assert [p.name for p in tiny_disk.iterdir()] == ["agg.ckpt"]


def test_save_on_a_read_only_file_system_raises_one_line(read_only_dir):
    """EROFS is a ConfigError naming the path; the checkpoint there is unchanged."""
    path = read_only_dir / "agg.ckpt"
    before = path.read_bytes()
    assert refused(path, lambda p: checkpoint.save(p, b"new")).endswith(
        ": cannot save: Read-only file system")
    assert path.read_bytes() == before


def test_save_past_the_file_size_limit_raises_one_line_and_leaves_no_temp_file(tmp_path):
    """A write the kernel refuses mid-file (EFBIG under RLIMIT_FSIZE, a fault any user can
    cause) is a ConfigError and leaves the previous checkpoint alone."""
    path = saved(tmp_path)
    before = path.read_bytes()
    printed = run_python(
        "import resource, sys; from pathlib import Path\n"
        "from ticker.shell import checkpoint; from ticker.core.errors import ConfigError\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, 10_000))\n"
        "try: checkpoint.save(Path(sys.argv[1]), bytes(100_000))\n"
        "except ConfigError as exc: print(exc)\n", str(path))
    assert printed == f"--checkpoint={path}: cannot save: File too large\n"
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["agg.ckpt"]


def take_lock(path: Path) -> None:
    with checkpoint.lock(path):
        pass


def test_a_second_holder_of_the_lock_fails_at_once_naming_the_first(tmp_path):
    """While another process holds the lock, taking it fails with that process's pid; once
    it exits, the lock is free again and holds our pid."""
    path = tmp_path / "agg.ckpt"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from pathlib import Path; from ticker.shell import checkpoint\n"
         "with checkpoint.lock(Path(sys.argv[1])):\n"
         "    print('locked', flush=True); sys.stdin.read()\n", str(path)],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        assert refused(path, take_lock).endswith(
            f": in use by another gmv aggregate (pid {holder.pid})")
    finally:
        holder.communicate(timeout=10)
    with checkpoint.lock(path):
        assert (tmp_path / "agg.ckpt.lock").read_text() == f"{os.getpid()}\n"
    take_lock(path)  # released on leaving the block


def test_backup_copies_the_checkpoint_so_a_reset_can_be_undone(tmp_path):
    """`backup` puts the current checkpoint at PATH.before-reset; moving it back after a
    reset restores the totals."""
    path = saved(tmp_path)
    copy = checkpoint.backup(path)
    assert copy == tmp_path / "agg.ckpt.before-reset"
    assert copy.read_bytes() == path.read_bytes()
    checkpoint.save(path, checkpoint.export(AggregateState(LIMITS)))  # the reset
    assert checkpoint.load(path, LIMITS).gmv_cents == 0
    copy.replace(path)
    assert totals(checkpoint.load(path, LIMITS)) == totals(filled_state())


def test_backup_without_a_checkpoint_is_none(tmp_path):
    """Nothing to back up gives None and writes nothing."""
    assert checkpoint.backup(tmp_path / "agg.ckpt") is None
    assert list(tmp_path.iterdir()) == []


def big_brand_state() -> AggregateState:
    state = AggregateState(LIMITS, big_brand_cents=100)
    state.apply(batch(0, 2, [150, 30], [1, 2]))
    state.apply(batch(1, 7, [80, 120], [2, 3]))
    return state


def test_a_checkpoint_round_trip_keeps_the_big_brands_crossing_minutes(tmp_path):
    """The minute each big brand crossed the line survives a save and a load."""
    path = tmp_path / "agg.ckpt"
    checkpoint.save(path, checkpoint.export(big_brand_state()))
    restored = checkpoint.load(path, LIMITS, big_brand_cents=100)
    assert restored.big_brand_minutes == [2, 7, 7]
    assert totals(restored) == totals(big_brand_state())


def test_a_checkpoint_from_before_crossing_minutes_loads_them_at_its_latest_minute(tmp_path):
    """A checkpoint written before the crossing minutes were kept (or for another line)
    loads; its big brands count as crossing at the latest minute, the earliest it can vouch
    for."""
    path = tmp_path / "agg.ckpt"
    checkpoint.save(path, checkpoint.export(big_brand_state()))
    forge(path, lambda header, arrays: [header.pop("big_brand_minutes"),
                                        header.pop("big_brand_cents")])
    assert checkpoint.load(path, LIMITS, big_brand_cents=100).big_brand_minutes == [7, 7, 7]
    checkpoint.save(path, checkpoint.export(big_brand_state()))
    assert checkpoint.load(path, LIMITS, big_brand_cents=50).big_brand_minutes == [7, 7, 7]


@pytest.mark.parametrize("minutes", [[7, 2], [-1], [10], "2,7", [2.0], [0] * 1001])
def test_forged_crossing_minutes_are_refused(tmp_path, minutes):
    """Crossing minutes that are unsorted, outside the window, not integers or too many are
    a clear refusal."""
    path = tmp_path / "agg.ckpt"
    checkpoint.save(path, checkpoint.export(big_brand_state()))
    forge(path, lambda header, arrays: header.update(big_brand_minutes=minutes))
    with pytest.raises(ConfigError, match="big_brand_minutes: not a sorted list"):
        checkpoint.load(path, LIMITS, big_brand_cents=100)
