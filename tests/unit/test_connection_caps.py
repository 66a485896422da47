"""ConnectionCaps over a real ROUTER on an ipc:// endpoint (NOTE [Connection caps]).

Clients are plain Unix sockets: a connection the caps refuse sees end of file, one they
keep sees only the greeting. Events are judged in the order connections were accepted,
so once a later connection's end of file is seen, an earlier one still open was kept.
"""

from __future__ import annotations

import os
import resource
import socket
import tempfile
from collections.abc import Iterator

import pytest
import zmq

from helpers import wait_for
from storm_service.connections import EVENTS_QUEUED, RESERVED_FDS, ConnectionCaps, total_connections


class _Endpoint:
    """A ROUTER bound on a private ipc path, with caps of 2 connections per peer and 4 in all."""

    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="stormcc-", dir="/tmp")
        self.path = os.path.join(self.directory, "s.sock")
        self.context = zmq.Context()
        self.router = self.context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.caps = ConnectionCaps(self.router, self.context, f"ipc://{self.path}", per_peer=2, total=4)
        self.router.bind(f"ipc://{self.path}")
        self.clients: list[socket.socket] = []

    def connect(self) -> socket.socket:
        conn = socket.socket(socket.AF_UNIX)
        conn.settimeout(10)
        conn.connect(self.path)
        self.clients.append(conn)
        return conn

    def wait_open(self, count: int) -> None:
        wait_for(lambda: (self.caps.serve(), self.caps.open_connections == count)[1], 10, f"{count} open")

    def wait_refused(self, conn: socket.socket, refused: int) -> None:
        wait_for(lambda: (self.caps.serve(), self.caps.refused == refused and _closed(conn))[1], 10, "the refusal")

    def close(self) -> None:
        for conn in self.clients:
            conn.close()
        self.caps.close()
        self.router.close()
        self.context.term()
        os.unlink(self.path)
        os.rmdir(self.directory)


@pytest.fixture
def endpoint() -> Iterator[_Endpoint]:
    endpoint = _Endpoint()
    yield endpoint
    endpoint.close()


def _closed(conn: socket.socket) -> bool:
    """Whether the other end shut the connection down (after reading what it sent)."""
    conn.setblocking(False)
    try:
        while conn.recv(4096):
            pass
    except BlockingIOError:
        return False
    except OSError:
        return True
    return True


def test_connections_past_a_peers_cap_are_shut_down_and_the_first_ones_kept(endpoint: _Endpoint) -> None:
    first, second, third = endpoint.connect(), endpoint.connect(), endpoint.connect()
    endpoint.wait_refused(third, 1)
    assert not _closed(first) and not _closed(second)
    assert endpoint.caps.open_connections == 2


def test_a_closed_connection_makes_room_for_its_peer(endpoint: _Endpoint) -> None:
    first, _ = endpoint.connect(), endpoint.connect()
    endpoint.wait_open(2)
    first.close()
    endpoint.wait_open(1)
    third, fourth = endpoint.connect(), endpoint.connect()
    endpoint.wait_refused(fourth, 1)
    assert not _closed(third)


def test_a_lost_disconnect_event_never_locks_a_peer_out(endpoint: _Endpoint) -> None:
    """Both connections close and their events are lost: the fds are checked before a refusal."""
    first, second = endpoint.connect(), endpoint.connect()
    endpoint.wait_open(2)
    first.close()
    second.close()
    lost = 0

    def lose_event() -> bool:
        nonlocal lost
        if endpoint.caps.monitor.poll(100):
            endpoint.caps.monitor.recv_multipart()
            lost += 1
        return lost == 2

    wait_for(lose_event, 10, "the two disconnects")
    others = [os.open(os.devnull, os.O_RDONLY) for _ in range(2)]  # the freed fd numbers hold other files now
    try:
        third, fourth, fifth = endpoint.connect(), endpoint.connect(), endpoint.connect()
        endpoint.wait_refused(fifth, 1)
        assert not _closed(third) and not _closed(fourth)
    finally:
        for fd in others:
            os.close(fd)


def test_the_total_cap_counts_every_peer(endpoint: _Endpoint) -> None:
    endpoint.caps.per_peer = 0
    conns = [endpoint.connect() for _ in range(5)]
    endpoint.wait_refused(conns[4], 1)
    assert not any(_closed(conn) for conn in conns[:4])


def test_the_total_leaves_room_for_the_daemons_own_fds(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(resource, "getrlimit", lambda which: (20000, 20000))
    assert total_connections(slabs=8, max_sessions=1024) == 20000 - EVENTS_QUEUED - RESERVED_FDS - 8 - 1024
    assert not caplog.records
    monkeypatch.setattr(resource, "getrlimit", lambda which: (2048, 2048))
    assert total_connections(slabs=8, max_sessions=1024) == 512  # a quarter: the room left is less
    assert "the open-files limit 2048 leaves room for -264 connections" in caplog.text
