"""stormd as a client sees it: a real daemon process, real ipc:// sockets, real /dev/shm.

What the daemon answers to each request is tested in process, through ``Server.dispatch``
(tests/unit/test_dispatch.py); here is what needs the process around it: shared memory
read across processes, the serving loop's own checks on a real connection, expiry on
the clock, signals, start-up and shutdown, the endpoint lock, stormctl and permissions.
Tests that leave the daemon as they found it share one (``shared_daemon``); the others
start their own.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from client.transport import Channel
from helpers import BAD_FRAMES, DaemonProcess, StartDaemon, mapped_segments, storm_segments, wait_for
from storm_service.errors import ShuttingDownError, StormError, UnknownSessionError
from storm_service.fdpass import request_slab
from storm_service.protocol import MAX_MESSAGE_BYTES, Op, Reply, decode_reply, encode_request

RAW_IDS = iter(range(10**12, 10**13))  # far from the channels' ids, so raw requests never look like replays


def _unmapped(names: set[str]) -> set[str]:
    """Those of ``names`` that no live process maps (other test sessions' daemons map theirs)."""
    return names - mapped_segments()


def _register(channel: Channel, **fields: Any) -> dict[str, Any]:
    return channel.call(Op.REGISTER, pid=os.getpid(), **fields)


@contextlib.contextmanager
def _raw_socket(daemon: DaemonProcess) -> Iterator[zmq.Socket]:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(daemon.endpoint)
    try:
        yield sock
    finally:
        sock.close()


def _exchange(sock: zmq.Socket, *frames: bytes, timeout_s: float = 5.0) -> Reply:
    sock.send_multipart(list(frames))
    assert sock.poll(int(timeout_s * 1000)), f"no reply within {timeout_s} s"
    return decode_reply(sock.recv())


def _ctl(endpoint: str, *args: str, timeout_s: float = 30) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "client.ctl", "--endpoint", endpoint, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)


def _stormd(endpoint: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a daemon expected to fail at start, to completion."""
    command = [sys.executable, "-m", "storm_service.daemon", "--endpoint", endpoint, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


# -- the data path ------------------------------------------------------------------


def test_fetch_returns_bytes_offloaded(shared_daemon: DaemonProcess) -> None:
    daemon = shared_daemon
    channel = daemon.channel()
    session = _register(channel, name="roundtrip")
    token = session["token"]
    sizes = [1000, 70_000, 3]
    extents = channel.call(Op.OFFLOAD, token, sizes=sizes, layer_id=0)["extents"]
    payloads = [os.urandom(size) for size in sizes]
    lent = request_slab(session["fd_socket"], token, extents[0]["slab"], 5)
    fd, size_bytes = lent.fd, lent.size_bytes
    with open(fd, "r+b") as f, mmap.mmap(f.fileno(), size_bytes) as pool:
        for extent, payload in zip(extents, payloads, strict=True):
            assert extent["slab"] == extents[0]["slab"] and extent["size_bytes"] == len(payload)
            pool[extent["offset"] : extent["offset"] + len(payload)] = payload
        handles = [e["handle"] for e in extents]
        reserved = daemon.stats()  # allocated, not yet committed: reserved, not used
        assert (reserved["reserved_bytes"], reserved["used_bytes"]) == (1024 + 70_144 + 512, 0)
        assert reserved["sessions"][0]["reserved_bytes"] == 1024 + 70_144 + 512
        assert channel.call(Op.COMMIT, token, handles=handles) == {"committed": 3}
        assert (daemon.stats()["reserved_bytes"], daemon.stats()["used_bytes"]) == (0, 1024 + 70_144 + 512)
        fetched = channel.call(Op.FETCH, token, handles=handles[::-1])["extents"]
        assert fetched == extents[::-1]
        for extent, payload in zip(fetched[::-1], payloads, strict=True):
            assert pool[extent["offset"] : extent["offset"] + extent["size_bytes"]] == payload
    assert daemon.stats()["used_bytes"] == 1024 + 70_144 + 512
    freed = channel.call(Op.FREE, token, handles=handles)
    assert freed == {"freed": 3, "freed_bytes": 1024 + 70_144 + 512}
    stats = daemon.stats()
    assert (stats["used_bytes"], stats["extents"], stats["free_bytes"]) == (0, 0, stats["pool_bytes"])
    assert stats["largest_free_bytes"] == stats["pool_bytes"] // stats["slabs"]  # a whole slab: extents never span two
    channel.call(Op.UNREGISTER, token)
    channel.close()


# -- bad input ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["garbage", "multi-frame", "just-over-max"])
def test_bad_input_gets_an_error_reply_and_is_counted(shared_daemon: DaemonProcess, name: str) -> None:
    """Over a real connection: a message of two frames (refused by the serving loop, not by
    dispatch), bytes that are not msgpack, and a frame just over the largest message.
    Every other bad input is refused by dispatch alone (tests/unit/test_dispatch.py)."""
    daemon = shared_daemon
    frames, code, request_id = BAD_FRAMES[name]
    errors = Counter(daemon.stats()["errors"])  # the shared daemon's count so far
    with _raw_socket(daemon) as sock:
        reply = _exchange(sock, *frames)
        assert (reply.ok, reply.code, reply.id) == (False, code, request_id)
        assert reply.message
        assert _exchange(sock, encode_request(8, Op.PING)).ok  # the same connection still works
    assert Counter(daemon.stats()["errors"]) - errors == {code: 1}


def test_frame_over_maxmsgsize_drops_only_that_connection(shared_daemon: DaemonProcess) -> None:
    daemon = shared_daemon
    with _raw_socket(daemon) as sock:
        sock.send(b"\x00" * (2 * MAX_MESSAGE_BYTES))
        # ZMQ_MAXMSGSIZE: the daemon's ROUTER disconnects the peer; no reply ever comes.
        assert not sock.poll(500)
        # The DEALER reconnects by itself, and the fresh connection is served.
        assert _exchange(sock, encode_request(next(RAW_IDS), Op.PING)).ok
    channel = daemon.channel()
    assert channel.call(Op.PING)["pid"] == daemon.proc.pid
    channel.close()


# -- dead clients -----------------------------------------------------------------------


def test_silent_session_expires_and_its_memory_returns(daemon_factory: StartDaemon) -> None:
    daemon = daemon_factory(heartbeat_timeout="1s")
    channel = daemon.channel()
    token = _register(channel)["token"]
    channel.call(Op.OFFLOAD, token, sizes=[1 << 20])
    assert daemon.stats()["reserved_bytes"] == 1 << 20
    stats = wait_for(lambda: (s := daemon.stats())["expired_sessions"] and s, 10, "the session to expire")
    assert (stats["sessions"], stats["used_bytes"], stats["expired_sessions"]) == ([], 0, 1)
    with pytest.raises(UnknownSessionError):
        channel.call(Op.HEARTBEAT, token)
    assert "expired" in daemon.log()
    channel.close()


def test_heartbeats_keep_a_session_alive(daemon_factory: StartDaemon) -> None:
    daemon = daemon_factory(heartbeat_timeout="1s")
    channel = daemon.channel()
    token = _register(channel)["token"]
    until = time.monotonic() + 2.0  # twice the timeout
    while time.monotonic() < until:
        assert channel.call(Op.HEARTBEAT, token) == {"used_bytes": 0}
        time.sleep(0.2)  # the client's heartbeat interval, not a readiness wait
    assert daemon.stats()["expired_sessions"] == 0
    channel.close()


def test_dead_client_process_expires_before_the_heartbeat_timeout(daemon_factory: StartDaemon) -> None:
    daemon = daemon_factory(heartbeat_timeout="60s")
    child = subprocess.Popen(["sleep", "60"])
    channel = daemon.channel()
    pid_ns = os.stat("/proc/self/ns/pid").st_ino
    token = channel.call(Op.REGISTER, pid=child.pid, pid_ns=pid_ns)["token"]
    channel.call(Op.OFFLOAD, token, sizes=[4096])
    child.kill()
    child.wait()
    stats = wait_for(lambda: (s := daemon.stats())["expired_sessions"] and s, 5, "the dead client's session to expire")
    assert (stats["sessions"], stats["used_bytes"]) == ([], 0)
    channel.close()


# -- start and stop -------------------------------------------------------------------


@pytest.mark.parametrize("how", ["sigterm", "stormctl"])
def test_shutdown_exits_zero_and_leaves_nothing(daemon: DaemonProcess, how: str) -> None:
    channel = daemon.channel()
    session = _register(channel)
    channel.call(Op.OFFLOAD, session["token"], sizes=[4096])
    channel.close()
    assert os.path.exists(session["fd_socket"])
    before = storm_segments()
    if how == "sigterm":
        assert daemon.stop() == 0
    else:
        result = _ctl(daemon.endpoint, "shutdown")
        assert (result.returncode, "is shutting down" in result.stdout) == (0, True), result.stderr
        assert daemon.proc.wait(timeout=10) == 0
    assert storm_segments() <= before  # slabs are memfds: nothing in /dev/shm, ever
    assert os.listdir(daemon.socket_dir) == ["stormd.log"]  # no sockets, no lock file
    assert "stopped" in daemon.log()


def test_requests_during_shutdown_are_answered_or_dropped(daemon: DaemonProcess) -> None:
    channel = daemon.channel()
    token = _register(channel)["token"]
    ids = [channel.send(Op.HEARTBEAT, token) for _ in range(20)]
    daemon.proc.send_signal(signal.SIGTERM)
    ids += [channel.send(Op.STATS, token) for _ in range(20)]
    outcomes: set[str] = set()
    for request_id in ids:
        started = time.monotonic()
        try:
            channel.wait(request_id, Op.STATS, timeout_s=3)
            outcomes.add("ok")
        except ShuttingDownError:
            outcomes.add("shutting-down")
        except StormError as e:  # the daemon exited first: a typed error, never a hang
            outcomes.add(type(e).__name__)
        assert time.monotonic() - started < 4, "a request outlived its timeout"
    assert outcomes <= {"ok", "shutting-down", "StormUnavailableError", "StormTimeoutError"}
    assert daemon.proc.wait(timeout=10) == 0
    channel.close()


def test_second_daemon_on_the_same_endpoint_refuses_to_start(shared_daemon: DaemonProcess) -> None:
    daemon = shared_daemon
    with open(daemon.socket_path + ".lock") as f:
        record = json.load(f)
    result = _stormd(daemon.endpoint, "--pool-size", "1MiB")
    assert result.returncode != 0
    assert "already serves" in result.stderr and f"pid {daemon.proc.pid}" in result.stderr
    assert "reserved" not in result.stderr  # refused before it made a pool
    with open(daemon.socket_path + ".lock") as f:
        assert json.load(f) == record  # the first daemon's record is untouched
    channel = daemon.channel()
    assert channel.call(Op.PING)["pid"] == daemon.proc.pid  # the first one still owns the endpoint
    channel.close()


def test_pool_larger_than_memory_fails_at_start() -> None:
    socket_dir = tempfile.mkdtemp(prefix="stormt-", dir="/tmp")
    before = storm_segments()
    try:
        result = _stormd(f"ipc://{socket_dir}/stormd.sock", "--pool-size", "100TiB")
        assert result.returncode != 0
        assert "MemAvailable" in result.stderr
        assert not _unmapped(storm_segments() - before)
        assert os.listdir(socket_dir) == []  # no socket, no lock file
    finally:
        shutil.rmtree(socket_dir, ignore_errors=True)


def test_killed_daemon_leaves_no_memory_and_the_next_replaces_its_sockets(daemon_factory: StartDaemon) -> None:
    before = storm_segments()
    first = daemon_factory()
    channel = first.channel()
    session = _register(channel)
    channel.call(Op.OFFLOAD, session["token"], sizes=[4096])
    channel.close()
    first.kill()
    assert storm_segments() <= before  # the slabs were memfds: the kernel freed them with the daemon
    second = daemon_factory(endpoint=first.endpoint)
    assert "removed a stale socket" in second.log()
    assert second.channel().call(Op.PING)["pid"] == second.proc.pid


# -- stormctl and permissions -----------------------------------------------------------


def test_stormctl_stats_json_prints_one_object(shared_daemon: DaemonProcess) -> None:
    daemon = shared_daemon
    channel = daemon.channel()
    session = _register(channel, name="ctl")
    channel.call(Op.OFFLOAD, session["token"], sizes=[4096])
    result = _ctl(daemon.endpoint, "stats", "--json")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip().splitlines()) == 1
    stats = json.loads(result.stdout)
    assert stats["pool_bytes"] == 256 << 20 and stats["reserved_bytes"] == 4096  # the module daemon's pool
    assert stats["free_bytes"] == stats["pool_bytes"] - 4096
    assert stats["largest_free_bytes"] == stats["pool_bytes"] // stats["slabs"]
    [listed] = stats["sessions"]
    assert (listed["id"], listed["pid"], listed["reserved_bytes"]) == (session["session_id"], os.getpid(), 4096)
    channel.call(Op.UNREGISTER, session["token"])
    channel.close()


def test_stormctl_ping_without_a_daemon_names_the_endpoint() -> None:
    endpoint = f"ipc:///tmp/stormt-none-{os.getpid()}/stormd.sock"
    result = _ctl(endpoint, "--timeout", "0.5", "ping")
    assert result.returncode == 1
    assert endpoint in result.stderr


def test_socket_directory_and_files_are_private(daemon_factory: StartDaemon) -> None:
    parent = tempfile.mkdtemp(prefix="stormt-", dir="/tmp")
    try:
        socket_dir = os.path.join(parent, "run")  # missing: the daemon creates it
        daemon = daemon_factory(endpoint=f"ipc://{socket_dir}/stormd.sock")
        channel = daemon.channel()
        _register(channel)
        channel.close()
        assert stat.S_IMODE(os.stat(socket_dir).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(f"{socket_dir}/stormd.sock.fds").st_mode) == 0o600
        assert stat.S_IMODE(os.stat(f"{socket_dir}/stormd.sock").st_mode) == 0o600
        assert stat.S_IMODE(os.stat(f"{socket_dir}/stormd.sock.lock").st_mode) == 0o600
        assert daemon.stop() == 0
    finally:
        shutil.rmtree(parent, ignore_errors=True)
