"""Connections cannot make the daemon run out of file descriptors (NOTE [Connection caps]).

Each daemon here runs with an open-files limit of 2048 (soft and hard), and a flood opens
2200 connections to its socket: more than the limit, which used to make libzmq abort the
daemon at accept. Past its cap a peer's new connections are shut down at once and logged,
while a bystander that connected first keeps offloading and fetching throughout.
Flooding as a second uid forks a child that drops to ``nobody`` (root only).
"""

from __future__ import annotations

import itertools
import os
import re
import resource
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import zmq

from client import StormSystem
from client.transport import Channel
from helpers import DaemonProcess, run_as, wait_for
from storm_service.errors import SessionLimitError, StormError
from storm_service.lending import MAX_UID_CONNECTIONS
from storm_service.protocol import Op

NOBODY = 65534
FD_LIMIT = 2048
FLOOD = 2200
_IDS = itertools.count(1)


def _limited_daemon(directory: str, soft: int, hard: int, *args: str) -> DaemonProcess:
    """stormd started with an open-files limit of ``soft`` (hard ``hard``), ready."""
    endpoint = f"ipc://{directory}/stormd.sock"
    log_path = os.path.join(directory, "stormd.log")
    command = [sys.executable, "-m", "storm_service.daemon", "--endpoint", endpoint, "--pool-size", "8MiB", *args]
    environ = {k: v for k, v in os.environ.items() if not k.startswith("STORM_")}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            command,
            stdout=log,
            stderr=log,
            env=environ,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)),
        )
    daemon = DaemonProcess(endpoint=endpoint, socket_dir=directory, proc=proc, log_path=log_path)

    def answers() -> bool:
        assert proc.poll() is None, daemon.log()
        try:
            daemon.stats()
            return True
        except StormError:
            return False

    wait_for(answers, 30, "the daemon to answer")
    return daemon


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A socket directory that the group nogroup may enter when run as root (the daemon then
    serves with ``--group nogroup``)."""
    path = Path(tempfile.mkdtemp(prefix="stormfd-", dir="/tmp"))
    if os.getuid() == 0:
        os.chown(path, 0, NOBODY)
        path.chmod(0o750)
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


@pytest.fixture
def stopped() -> Iterator[list[DaemonProcess]]:
    """Daemons to stop at the end; each must then exit 0."""
    daemons: list[DaemonProcess] = []
    yield daemons
    for daemon in daemons:
        if daemon.proc.poll() is None:
            daemon.proc.send_signal(signal.SIGTERM)
        daemon.proc.wait(30)
        assert daemon.proc.returncode == 0, daemon.log()


@pytest.fixture
def flood_room() -> Iterator[None]:
    """This process's open-files limit raised to hold FLOOD sockets (skip if the hard limit is lower)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < FLOOD + 256:
        pytest.skip(f"the open-files hard limit {hard} is too low to open {FLOOD} connections")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, FLOOD + 256), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _flood(path: str, count: int, kept_at_most: int) -> dict[str, int]:
    """Open ``count`` connections to the socket at ``path``; then wait until the daemon has
    closed all but ``kept_at_most`` of them (or 30 s passed). Returns how many it closed."""
    conns: list[socket.socket] = []
    try:
        for _ in range(count):
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            conns.append(conn)
            conn.connect(path)  # blocks while the listen backlog is full
        return {"closed": _count_closed(conns, count - kept_at_most)}
    finally:
        for conn in conns:
            conn.close()


def _count_closed(conns: list[socket.socket], expected: int) -> int:
    """Read every connection until ``expected`` of them saw end of file; returns how many did."""
    by_fd = {conn.fileno(): conn for conn in conns}
    poller = select.poll()
    for fd in by_fd:
        poller.register(fd, select.POLLIN)
    closed = 0

    def more_closed() -> bool:
        nonlocal closed
        for fd, _ in poller.poll(100):
            try:
                data = by_fd[fd].recv(4096)  # the daemon's ZMTP greeting, then end of file
            except OSError:
                data = b""
            if not data:
                poller.unregister(fd)
                closed += 1
        return closed >= expected

    try:
        wait_for(more_closed, 30, f"{expected} connections closed by the daemon")
    except AssertionError:
        pass  # the caller compares the count
    return closed


def _bystander(endpoint: str, flood: Callable[[], Any]) -> Any:
    """Offload and fetch with a StormSystem connected before ``flood`` starts (in a thread), and
    keep doing so until it returns (10 round trips at least); returns what ``flood`` returned."""
    result: list[Any] = []
    errors: list[BaseException] = []
    rounds = 0
    with StormSystem(endpoint, timeout_s=30) as system:
        kept = torch.randn(4096)
        system.fetch(system.offload(kept))  # the channels of this thread and the heartbeat are open

        def run() -> None:
            try:
                result.append(flood())
            except BaseException as e:  # reported below, in the test's thread
                errors.append(e)

        flooding = threading.Thread(target=run)
        flooding.start()
        while flooding.is_alive() or rounds < 10:
            handle = system.offload(kept)
            assert torch.equal(system.fetch(handle), kept)
            system.free(handle)
            rounds += 1
        flooding.join()
    if errors:
        raise errors[0]
    return result[0]


@pytest.mark.parametrize("flooder", ["another uid", "the same uid"])
def test_a_connection_flood_is_refused_past_the_uids_cap_and_the_bystander_served(
    flood_room: None, socket_dir: Path, stopped: list[DaemonProcess], flooder: str
) -> None:
    if flooder == "another uid" and os.getuid() != 0:
        pytest.skip("needs root to flood as a second uid")
    group = ["--group", "nogroup"] if os.getuid() == 0 else []
    daemon = _limited_daemon(
        str(socket_dir), FD_LIMIT, FD_LIMIT, "--max-sessions", "16", "--max-connections-per-uid", "64", *group
    )
    stopped.append(daemon)
    if flooder == "another uid":
        flood = lambda: run_as(NOBODY, NOBODY, lambda: _flood(daemon.socket_path, FLOOD, 64))  # noqa: E731
    else:
        flood = lambda: _flood(daemon.socket_path, FLOOD, 64)  # noqa: E731

    outcome = _bystander(daemon.endpoint, flood)

    assert daemon.proc.poll() is None, daemon.log()
    uid = NOBODY if flooder == "another uid" else os.getuid()
    if flooder == "another uid":
        assert outcome["closed"] == FLOOD - 64  # every connection past its cap, and no other
    else:
        assert FLOOD - 64 <= outcome["closed"] < FLOOD  # the bystander's own connections count too
    assert f"refused a connection from uid {uid}: it has 64 open, at most 64 (--max-connections-per-uid)" in (
        daemon.log()
    )
    assert daemon.stats()["sessions"] == []  # the bystander's session closed: nothing left behind


def test_a_connection_flood_past_the_total_cap_leaves_the_daemon_serving(
    flood_room: None, socket_dir: Path, stopped: list[DaemonProcess]
) -> None:
    """With no cap per uid, the total cap (from the open-files limit) refuses the flood."""
    daemon = _limited_daemon(
        str(socket_dir), FD_LIMIT, FD_LIMIT, "--max-sessions", "16", "--max-connections-per-uid", "0"
    )
    stopped.append(daemon)
    [total] = [int(n) for n in re.findall(r"connections: at most any number per uid, (\d+) in all", daemon.log())]
    assert total < FD_LIMIT - 1024  # room for the accepted connections not yet judged (NOTE [Connection caps])

    outcome = _bystander(daemon.endpoint, lambda: _flood(daemon.socket_path, FLOOD, total))

    assert daemon.proc.poll() is None, daemon.log()
    assert outcome["closed"] >= FLOOD - total
    assert f"connections are open, at most {total} (from the open-files limit)" in daemon.log()


def test_many_connections_and_registers_leave_the_daemon_serving(
    socket_dir: Path, stopped: list[DaemonProcess]
) -> None:
    """More connections than the soft open-files limit it was started with, each registering."""
    daemon = _limited_daemon(
        str(socket_dir),
        256,
        4096,
        "--max-sessions",
        "64",
        "--max-tenant-sessions",
        "64",
        "--max-connections-per-uid",
        "0",
    )
    stopped.append(daemon)
    context = zmq.Context()
    context.max_sockets = 2048
    channels: list[Channel] = []
    try:
        with open(f"/proc/{daemon.proc.pid}/limits") as f:
            [limit] = [line.split()[3:5] for line in f if line.startswith("Max open files")]
        assert limit == ["4096", "4096"]
        channels = [Channel(context, daemon.endpoint, _IDS) for _ in range(600)]
        requests = [c.send(Op.REGISTER, pid=os.getpid()) for c in channels]
        outcomes: dict[str, int] = {}
        for channel, request_id in zip(channels, requests, strict=True):
            try:
                channel.wait(request_id, Op.REGISTER, timeout_s=30)
                outcome = "registered"
            except SessionLimitError:
                outcome = "refused"
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
        assert outcomes == {"registered": 64, "refused": 536}
        assert daemon.proc.poll() is None
        bystander = Channel(context, daemon.endpoint, _IDS)
        assert bystander.call(Op.PING, timeout_s=10)["pid"] == daemon.proc.pid
        channels.append(bystander)
        assert "refused a register from uid" in daemon.log()
    finally:
        for channel in channels:
            channel.close()
        context.term()


def _hold_fd_socket(path: str, count: int, hold_s: float) -> int:
    """Open ``count`` connections to the fd socket, send nothing, and after a moment count those the
    daemon closed at once; keep the rest open for ``hold_s``. Returns how many were closed."""
    conns = []
    for _ in range(count):
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        conn.connect(path)
        conns.append(conn)
    time.sleep(0.3)
    closed = 0
    for conn in conns:
        conn.setblocking(False)
        try:
            closed += conn.recv(1) == b""
        except BlockingIOError:
            pass
    time.sleep(hold_s)
    for conn in conns:
        conn.close()
    return closed


def test_one_uid_holding_the_fd_socket_idle_does_not_lock_other_clients_out(
    socket_dir: Path, stopped: list[DaemonProcess]
) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to hold the fd socket as a second uid")
    daemon = _limited_daemon(str(socket_dir), FD_LIMIT, FD_LIMIT, "--group", "nogroup")
    stopped.append(daemon)
    fd_socket = daemon.socket_path + ".fds"
    held: list[int] = []
    holder = threading.Thread(
        target=lambda: held.append(run_as(NOBODY, NOBODY, lambda: _hold_fd_socket(fd_socket, 64, 1.2)))
    )
    holder.start()
    try:
        wait_for(lambda: "fd socket: refused a connection of uid 65534" in daemon.log(), 10, "the holder's refusals")
        with StormSystem(daemon.endpoint, timeout_s=2) as system:  # needs the fd socket while it is held
            kept = torch.randn(1024)
            assert torch.equal(system.fetch(system.offload(kept)), kept)
    finally:
        holder.join()
    assert held == [64 - MAX_UID_CONNECTIONS], "every connection past the uid's cap closed, and no other"
