"""Shared fixtures: a real ``stormd`` process on a private ``ipc://`` endpoint.

``daemon_factory`` starts ``python -m storm_service.daemon`` in a fresh directory under
/tmp (ipc paths are limited to about 107 characters), waits for readiness by pinging
it over a :class:`client.transport.Channel` until a deadline (never a fixed sleep), and
at teardown stops every daemon it started and checks that none of them left a
``storm-*`` segment in /dev/shm (a daemon the test SIGKILLed is excused: see
``daemon_factory``).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import zmq

from client.transport import Channel, CurveKeys
from storm_service.errors import StormError
from storm_service.protocol import Op

SHM_DIR = "/dev/shm"
SEGMENT_PREFIX = "storm-"
READY_TIMEOUT_S = 20.0
"""Generous: a loaded 2-core CI box can take seconds to import and pre-fault the pool."""

# One id sequence for every channel of the test process, so that two channels used on
# one session never reuse a request id (the daemon would answer a replay).
_REQUEST_IDS = itertools.count(1)


def storm_segments() -> set[str]:
    """Names of every STORM segment now in /dev/shm."""
    return {name for name in os.listdir(SHM_DIR) if name.startswith(SEGMENT_PREFIX)}


def mapped_segments() -> set[str]:
    """STORM segments some live process maps (another test session's daemon, say)."""
    mapped: set[str] = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    path = line.rstrip("\n").rsplit(" ", 1)[-1]
                    if path.startswith(f"{SHM_DIR}/{SEGMENT_PREFIX}"):
                        mapped.add(os.path.basename(path))
        except OSError:
            continue
    return mapped


@dataclass
class DaemonProcess:
    """A running (or stopped) stormd subprocess and where it serves."""

    endpoint: str
    socket_dir: str
    proc: subprocess.Popen[bytes]
    log_path: str

    @property
    def socket_path(self) -> str:
        return self.endpoint[len("ipc://") :]

    def channel(self) -> Channel:
        """A connected channel to this daemon; the caller closes it."""
        return Channel(
            zmq.Context.instance(),
            self.endpoint,
            _REQUEST_IDS,
            alive=lambda: self.proc.poll() is None,
            curve=CurveKeys.from_env(),
        )

    def stats(self) -> dict[str, Any]:
        """One STATS call without a session token."""
        channel = self.channel()
        try:
            return channel.call(Op.STATS)
        finally:
            channel.close()

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self, timeout_s: float = 10) -> int:
        """SIGTERM the daemon and wait for it; returns its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"stormd did not stop within {timeout_s} s of SIGTERM; log:\n{self.log()}")

    def kill(self) -> None:
        """SIGKILL the daemon and reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


StartDaemon = Callable[..., DaemonProcess]


def recorded_segments(daemon: DaemonProcess) -> set[str] | None:
    """The segment names a daemon recorded in its endpoint lock file (NOTE [Endpoint lock]),
    or None when there is no readable record."""
    try:
        with open(daemon.socket_path + ".lock") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    names = record.get("segments") if isinstance(record, dict) else None
    return {n for n in names if isinstance(n, str)} if isinstance(names, list) else None


def _daemon_env() -> dict[str, str]:
    # Settings come from flags only; a developer's STORM_* variables must not leak in.
    return {k: v for k, v in os.environ.items() if not k.startswith("STORM_")}


def wait_ready(daemon: DaemonProcess, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Ping until the daemon answers; fail with its log if it exits or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    channel = daemon.channel()
    try:
        while True:
            if daemon.proc.poll() is not None:
                pytest.fail(f"stormd exited with {daemon.proc.returncode} before it was ready; log:\n{daemon.log()}")
            try:
                channel.call(Op.PING, timeout_s=0.2)
                return
            except StormError:
                if time.monotonic() > deadline:
                    pytest.fail(f"stormd did not answer a ping within {timeout_s} s; log:\n{daemon.log()}")
    finally:
        channel.close()


def _spawn_daemon(
    pool_size: str = "64MiB",
    heartbeat_timeout: str = "5s",
    extra_args: Sequence[str] = (),
    endpoint: str | None = None,
) -> DaemonProcess:
    """Start stormd without waiting for it to be ready."""
    socket_dir = tempfile.mkdtemp(prefix="stormt-", dir="/tmp")
    endpoint = endpoint or f"ipc://{socket_dir}/stormd.sock"
    log_path = os.path.join(socket_dir, "stormd.log")
    args = [
        sys.executable,
        "-m",
        "storm_service.daemon",
        "--endpoint",
        endpoint,
        "--pool-size",
        pool_size,
        "--heartbeat-timeout",
        heartbeat_timeout,
        "--pin",
        "off",
        *extra_args,  # later flags win, so extra_args may override the ones above
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=_daemon_env())
    return DaemonProcess(endpoint=endpoint, socket_dir=socket_dir, proc=proc, log_path=log_path)


@pytest.fixture
def daemon_factory() -> Iterator[StartDaemon]:
    """``start(pool_size=, heartbeat_timeout=, extra_args=, endpoint=)`` -> a ready daemon.

    At teardown every daemon still running gets SIGTERM (SIGKILL after 10 s, which fails
    the test). A daemon the test itself SIGKILLed leaves its segments by design (the next
    daemon on its endpoint sweeps them): those are removed here without blame. Any other
    segment one of these daemons created and left behind fails the test.
    """
    before = storm_segments()
    started: list[tuple[DaemonProcess, set[str] | None]] = []

    def start(
        pool_size: str = "64MiB",
        heartbeat_timeout: str = "5s",
        extra_args: Sequence[str] = (),
        endpoint: str | None = None,
    ) -> DaemonProcess:
        daemon = _spawn_daemon(pool_size, heartbeat_timeout, extra_args, endpoint)
        try:
            wait_ready(daemon)
        finally:
            # The record is written before bind, so it is there once the daemon answers.
            started.append((daemon, recorded_segments(daemon)))
        return daemon

    yield start

    stuck = []
    for daemon, _ in started:
        if daemon.proc.poll() is None:
            daemon.proc.send_signal(signal.SIGTERM)
            try:
                daemon.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                daemon.kill()
                stuck.append(daemon.endpoint)
    ours: set[str] = set()
    excused: set[str] = set()
    for daemon, recorded in started:
        ours |= recorded or set()
        if daemon.proc.returncode == -signal.SIGKILL and daemon.endpoint not in stuck:
            excused |= recorded or set()
    # Other test sessions may run (and kill) daemons beside this one, so a new segment is
    # blamed on ours only when one of our daemons recorded it; where a record is missing,
    # on any new segment that no live process maps (ours are all dead by now).
    new = storm_segments() - before
    if all(recorded is not None for _, recorded in started):
        leaked = sorted((new & ours) - excused)
    else:
        leaked = sorted(new - excused - mapped_segments())
    for name in [*leaked, *(new & excused)]:  # keep the host clean even when the checks below fail
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(SHM_DIR, name))
    for daemon, _ in started:
        shutil.rmtree(daemon.socket_dir, ignore_errors=True)
    assert not stuck, f"stormd did not stop within 10 s of SIGTERM: {stuck}"
    assert not leaked, f"daemons left segments in {SHM_DIR}: {leaked}"


@pytest.fixture(scope="module")
def module_daemon() -> Iterator[DaemonProcess]:
    """One daemon (256 MiB pool) for a whole test module of many short cases."""
    daemon = _spawn_daemon(pool_size="256MiB")
    try:
        wait_ready(daemon)
        yield daemon
    finally:
        exit_code = daemon.stop()
        shutil.rmtree(daemon.socket_dir, ignore_errors=True)
    assert exit_code == 0, f"stormd exited with {exit_code}"


@pytest.fixture
def daemon(daemon_factory: StartDaemon) -> DaemonProcess:
    """One daemon with the default settings (64 MiB pool, 5 s heartbeat timeout)."""
    return daemon_factory()
