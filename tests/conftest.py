"""Shared fixtures: a real ``stormd`` process on a private ``ipc://`` endpoint.

``daemon_factory`` starts ``python -m storm_service.daemon`` in a fresh directory under
/tmp (ipc paths are limited to about 107 characters), waits for readiness by pinging
it over a :class:`client.transport.Channel` until a deadline (never a fixed sleep), and
at teardown stops every daemon it started and checks that none of them left a
``storm-*`` segment in /dev/shm (a daemon the test SIGKILLed is excused: see
``daemon_factory``). ``module_daemon`` is one daemon for a whole module, and
``shared_daemon`` lends it to a test that needs a real daemon but not a fresh one, and
checks afterwards that the test left nothing in it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from helpers import (
    SHM_DIR,
    DaemonProcess,
    StartDaemon,
    mapped_segments,
    recorded_segments,
    storm_segments,
    wait_for,
)
from storm_service.errors import StormError
from storm_service.protocol import Op

READY_TIMEOUT_S = 20.0
"""Generous: a loaded 2-core CI box can take seconds to import and pre-fault the pool."""


def _daemon_env() -> dict[str, str]:
    # Settings come from flags only; a developer's STORM_* variables must not leak in.
    return {k: v for k, v in os.environ.items() if not k.startswith("STORM_")}


def wait_ready(daemon: DaemonProcess, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Ping until the daemon answers; fail with its log if it exits or the deadline passes.

    On an ``ipc://`` endpoint the first ping waits for the socket file: a channel that
    connects before the daemon binds retries only every 100 ms (ZeroMQ's reconnect
    interval), which would add that much to every start.
    """
    deadline = time.monotonic() + timeout_s
    if daemon.endpoint.startswith("ipc://"):
        while not os.path.exists(daemon.socket_path) and daemon.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
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
        *extra_args,  # later flags win, so extra_args may override the ones above
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=_daemon_env())
    return DaemonProcess(endpoint=endpoint, socket_dir=socket_dir, proc=proc, log_path=log_path)


def _request_shutdown(daemon: DaemonProcess) -> bool:
    """Ask a running daemon on an ``ipc://`` endpoint to stop, over its socket; True once
    it said it is stopping. A SHUTDOWN request ends the serving loop at once, where a
    SIGTERM is only seen at the loop's next tick (0.1 s), and fixtures stop a daemon per
    test. Both paths end in the same shutdown, and test_daemon.py tests each of them."""
    if not daemon.endpoint.startswith("ipc://") or daemon.proc.poll() is not None:
        return False
    channel = daemon.channel()
    try:
        return bool(channel.call(Op.SHUTDOWN, timeout_s=1.0).get("stopping"))
    except StormError:
        return False
    finally:
        channel.close()


def _stop(daemon: DaemonProcess, timeout_s: float = 10) -> int:
    """Stop a daemon (over its socket where it answers, else by SIGTERM) and wait for it;
    returns its exit code, and fails the test if it has not exited within ``timeout_s``."""
    if not _request_shutdown(daemon):
        return daemon.stop(timeout_s)
    try:
        return daemon.proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        daemon.kill()
        pytest.fail(f"stormd did not stop within {timeout_s} s of a SHUTDOWN request; log:\n{daemon.log()}")


@pytest.fixture
def daemon_factory() -> Iterator[StartDaemon]:
    """``start(pool_size=, heartbeat_timeout=, extra_args=, endpoint=)`` -> a ready daemon.

    At teardown every daemon still running is told to stop (over its socket, else by
    SIGTERM; SIGKILL after 10 s, which fails the test). A daemon the test itself SIGKILLed
    leaves its segments by design (the next daemon on its endpoint sweeps them): those are
    removed here without blame. Any other segment one of these daemons created and left
    behind fails the test.
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
            if not _request_shutdown(daemon):
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
        exit_code = _stop(daemon)
        shutil.rmtree(daemon.socket_dir, ignore_errors=True)
    assert exit_code == 0, f"stormd exited with {exit_code}"


@pytest.fixture
def shared_daemon(module_daemon: DaemonProcess) -> Iterator[DaemonProcess]:
    """The module's daemon, for a test that needs a real daemon but not a fresh one.

    After the test the daemon must be alive and hold nothing (no session, nothing used
    or reserved) within 2 s, or the test fails; its leftovers are then given the time to
    expire (5 s heartbeat timeout), so that the next test starts clean either way. A test
    that fills the pool, expires sessions or stops the daemon starts its own instead."""
    yield module_daemon
    assert module_daemon.proc.poll() is None, f"the shared stormd exited; log:\n{module_daemon.log()}"

    def held() -> dict[str, Any]:
        stats = module_daemon.stats()
        return {key: stats[key] for key in ("sessions", "used_bytes", "reserved_bytes") if stats[key]}

    deadline = time.monotonic() + 2.0
    while (left := held()) and time.monotonic() < deadline:
        time.sleep(0.05)
    if left:
        wait_for(lambda: not held(), timeout_s=15, what="the shared daemon's leftovers to expire")
        pytest.fail(f"the test left this in the shared daemon: {left}")


@pytest.fixture
def daemon(daemon_factory: StartDaemon) -> DaemonProcess:
    """One daemon with the default settings (64 MiB pool, 5 s heartbeat timeout)."""
    return daemon_factory()
