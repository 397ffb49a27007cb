"""The playback clock: absolute schedule through pauses, speed changes and seeks."""

from __future__ import annotations

import math

import pytest

from simulator.playback import PlaybackClock


def test_position_advances_at_speed():
    """At speed 60, one wall second is one simulated minute."""
    clock = PlaybackClock(100.0, speed=60)
    assert clock.position(100.0) == 0 and clock.position(110.0) == 10


def test_due_is_absolute_from_the_start():
    """Minute 30 at speed 60 is due 30 s after the start, however late we ask."""
    clock = PlaybackClock(0.0, speed=60)
    assert clock.due(30, now=0.0) == 30 and clock.due(30, now=25.5) == 4.5
    assert clock.due(30, now=40.0) == 0


def test_pause_stops_time_and_resume_adds_only_the_pause():
    """A 7 s pause moves every later deadline by exactly 7 s."""
    clock = PlaybackClock(0.0, speed=60)
    clock.pause(10.0)
    assert clock.position(15.0) == 10 and clock.due(11, 15.0) == math.inf
    assert clock.due(10, 15.0) == 0  # what was reached before the pause is still due
    clock.resume(17.0)
    assert clock.position(17.0) == 10
    assert clock.due(20, now=17.0) == 10  # minute 20 at 27 s = 20 s + the 7 s pause


def test_speed_change_keeps_the_position_and_changes_the_rate():
    """Doubling the speed at minute 10 makes minute 30 due 10 s later, not 20."""
    clock = PlaybackClock(0.0, speed=60)
    clock.set_speed(120, now=10.0)
    assert clock.position(10.0) == 10 and clock.due(30, now=10.0) == 10


def test_total_wall_time_is_n_over_s_plus_pauses_whatever_the_changes():
    """N minutes at speed S, with speed changes that return to S, end on N/S plus pauses."""
    clock = PlaybackClock(0.0, speed=120)
    clock.set_speed(240, now=30.0)   # minute 60
    clock.set_speed(120, now=45.0)   # minute 120
    clock.pause(60.0)                # minute 150
    clock.resume(75.0)
    end = 75.0 + clock.due(240, 75.0)
    assert end == pytest.approx(240 / 120 * 60 - 15 + 15)  # 15 s faster, 15 s paused


def test_seek_jumps_and_keeps_going_from_there():
    """Seeking to minute 500 makes it the position now; later minutes follow at speed."""
    clock = PlaybackClock(0.0, speed=60)
    clock.seek(500, now=5.0)
    assert clock.position(5.0) == 500 and clock.due(510, now=5.0) == 10


def test_max_speed_makes_everything_due_now():
    """Speed None ("max") never waits; switching to a finite speed continues from there."""
    clock = PlaybackClock(0.0, speed=None)
    assert clock.due(10_000, 0.0) == 0 and clock.position(1.0) == math.inf
    clock.seek(42, now=3.0)
    clock.set_speed(60, now=3.0)
    assert clock.position(4.0) == 43


def test_bad_speed_is_refused_by_name():
    """A zero or negative speed names itself."""
    with pytest.raises(ValueError, match="speed=0"):
        PlaybackClock(0.0, speed=0)
