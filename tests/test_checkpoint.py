"""Checkpoints: a restored state equals the saved one, watermarks included; writes are atomic."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from ticker import checkpoint
from ticker.errors import ConfigError
from ticker.state import AggregateState
from ticker.wire import Limits

from .test_state import LIMITS, batch


def filled_state() -> AggregateState:
    state = AggregateState(LIMITS)
    state.apply(batch(0, 1, [100, 200], [1, 4], [1, 2], [0, 1]))
    state.apply(batch(2, 3, [7], [2]))  # seq 1 is missing: a gap
    state.apply(batch(0, 2, [5], [0], producer="other"))
    state.apply(batch(0, 2, [5], [0], producer="other"))  # duplicate
    state.reject("bad_json")
    return state


def test_restored_state_equals_the_saved_one(tmp_path):
    """Every array, total, counter and watermark survives a save and load."""
    state, path = filled_state(), tmp_path / "agg.ckpt"
    checkpoint.save(path, checkpoint.export(state))
    restored = checkpoint.load(path, LIMITS)
    assert restored is not None
    assert restored.snapshot() == state.snapshot()
    for name in ("gmv_by_brand", "orders_by_brand", "gmv_by_minute", "orders_by_country",
                 "gmv_by_platform"):
        assert np.array_equal(getattr(restored, name), getattr(state, name))
    assert restored.watermarks.gaps == 1 and restored.duplicates == 1


def test_restored_watermarks_drop_redelivered_batches_and_accept_the_missing_one(tmp_path):
    """After a restore, batches already applied are duplicates and the gap can still close."""
    path = tmp_path / "agg.ckpt"
    checkpoint.save(path, checkpoint.export(filled_state()))
    restored = checkpoint.load(path, LIMITS)
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


def test_failed_write_leaves_the_previous_checkpoint_and_no_temp_file(tmp_path, monkeypatch):
    """If fsync fails mid-write, the old checkpoint is intact and nothing is left behind."""
    path = tmp_path / "agg.ckpt"
    checkpoint.save(path, checkpoint.export(filled_state()))
    before = path.read_bytes()

    def broken_fsync(fd):  # a fault we cannot cause for real: the disk failing
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        checkpoint.save(path, b"new")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agg.ckpt"]


def test_checkpoint_for_other_dimensions_is_refused_by_name(tmp_path):
    """A checkpoint from a run with another brand count is a clear settings error."""
    path = tmp_path / "agg.ckpt"
    checkpoint.save(path, checkpoint.export(filled_state()))
    other = Limits(n_brands=9, n_minutes=10, n_countries=3, n_platforms=2)
    with pytest.raises(ConfigError, match=r"--checkpoint=.*gmv_by_brand has shape \(5,\)"):
        checkpoint.load(path, other)


def test_garbage_file_is_refused_by_name(tmp_path):
    """A file that is not a checkpoint names the setting instead of crashing."""
    path: Path = tmp_path / "agg.ckpt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="--checkpoint=.*not a readable checkpoint"):
        checkpoint.load(path, LIMITS)
