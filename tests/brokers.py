"""Mosquitto processes of a test's own: persistence on, on a free port, stopped however we like.

The session-wide `mosquitto` fixture (conftest.py) is a broker nobody may stop. Fault tests
need one they can SIGTERM (Mosquitto then saves its persistence database), SIGKILL (it
saves nothing) and start again on the same port with the same config and data directory,
so that clients with persistent sessions find their sessions and queued messages again.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ticker.shell.mqtt import BrokerSettings

from .conftest import MOSQUITTO, free_port, wait_for_port


@dataclass
class MosquittoProcess:
    """One broker config and data directory; `start`, `stop`, `kill` and `restart` its process.

    `max_queued_messages` is per client and counts messages *beyond* those in flight;
    0 means no maximum in Mosquitto 2.x. `autosave_interval=0` (the default here) saves the
    persistence database only on a clean shutdown (SIGTERM) or on SIGUSR1, so a SIGKILL loses
    everything since the broker started: the worst case a real deployment can meet.
    """

    directory: Path
    port: int = field(default_factory=free_port)
    max_queued_messages: int = 1_000_000
    max_inflight_messages: int = 100
    autosave_interval: int = 0
    proc: subprocess.Popen | None = None
    starts: int = 0
    last_stderr: str = ""

    def __post_init__(self) -> None:
        self.data = self.directory / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.conf = self.directory / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {self.data}/\n"
            f"autosave_interval {self.autosave_interval}\n"
            f"max_queued_messages {self.max_queued_messages}\n"
            f"max_inflight_messages {self.max_inflight_messages}\n"
            # Started as root, Mosquitto drops to the `mosquitto` user unless told otherwise,
            # and then cannot write its database into our (root-owned) directory.
            f"user {pwd.getpwuid(os.getuid()).pw_name}\n"
            "log_dest none\n")

    @property
    def settings(self) -> BrokerSettings:
        return BrokerSettings("127.0.0.1", self.port)

    @property
    def url(self) -> str:
        return self.settings.url

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def database(self) -> Path:
        return self.data / "mosquitto.db"

    def start(self, timeout: float = 10.0) -> None:
        assert not self.running, "already running"
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        self.starts += 1
        try:
            wait_for_port(self.port, timeout)
        except TimeoutError:
            self._reap(signal.SIGKILL)
            raise

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM: Mosquitto writes its persistence database, then exits."""
        return self._reap(signal.SIGTERM, timeout)

    def kill(self, timeout: float = 10.0) -> int:
        """SIGKILL: whatever was only in the broker's memory is gone."""
        return self._reap(signal.SIGKILL, timeout)

    def save(self) -> None:
        """SIGUSR1: write the persistence database now, keep running."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGUSR1)

    def restart(self, *, kill: bool = False) -> None:
        (self.kill if kill else self.stop)()
        self.start()

    def _reap(self, sig: int, timeout: float = 10.0) -> int:
        proc, self.proc = self.proc, None
        assert proc is not None, "not started"
        if proc.poll() is None:
            proc.send_signal(sig)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait(timeout)
        if proc.stderr is not None:
            self.last_stderr = proc.stderr.read().decode(errors="replace")
            proc.stderr.close()
        return code

    def close(self) -> None:
        if self.proc is not None:
            self.kill()


@contextlib.contextmanager
def mosquitto_process(directory: Path, **options) -> Iterator[MosquittoProcess]:
    """A started `MosquittoProcess` in `directory`, killed at the end whatever happened."""
    directory.mkdir(parents=True, exist_ok=True)
    broker = MosquittoProcess(directory, **options)
    broker.start()
    try:
        yield broker
    finally:
        broker.close()


def database_size(broker: MosquittoProcess) -> int:
    """Bytes of the persistence database on disk (0 if it was never written)."""
    with contextlib.suppress(FileNotFoundError):
        return os.stat(broker.database).st_size
    return 0


@contextlib.contextmanager
def stock_mosquitto() -> Iterator[BrokerSettings]:
    """Mosquitto as users have it: `mosquitto -p PORT`, no config file, so its defaults hold
    (1,000 queued messages and 20 in flight a client, no persistence; loopback only)."""
    port = free_port()
    proc = subprocess.Popen([MOSQUITTO, "-p", str(port)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        yield BrokerSettings("127.0.0.1", port)
    finally:
        proc.kill()
        proc.wait(10)
