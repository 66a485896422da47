"""Connections to the ZeroMQ endpoint: counted per peer from the socket's monitor, and
refused past a cap, so that no peer can make the daemon run out of file descriptors.

NOTE [Connection caps]
  Each connection costs the daemon an fd, and libzmq 4.3 aborts the process when an ipc
  accept fails with EMFILE (an assertion in ipc_listener.cpp), so a peer that opened
  connections until the open-files limit would end every session. libzmq accepts by
  itself and has no cap, so the daemon reads its ROUTER's monitor: each
  ``EVENT_ACCEPTED`` carries the new connection's fd, each ``EVENT_DISCONNECTED`` the fd
  of one that closed. For every accepted fd the loop asks the kernel who is at the other
  end: the uid (``SO_PEERCRED``) over ipc://; over tcp:// there is no uid, so connections
  count per remote address. A connection past ``--max-connections-per-uid`` for its peer,
  or past the total cap, is shut down (``shutdown(2)``: the fd is libzmq's, never ours
  to close; libzmq reads end of file and closes it itself), and the refusal is logged on
  the 1st, 2nd, 4th, 8th... time. Connections already open are never dropped, so a flood
  cannot push out a client that was there first. A client refused this way sees its
  requests time out; its DEALER reconnects and is judged again.

  The total cap keeps accept away from EMFILE. Between an accept and its judgement libzmq
  holds the fd, and how many such fds there can be is bounded by the monitor's queue:
  libzmq's I/O thread waits when the queue is full (its monitor sends block) and accepts
  nothing meanwhile. So the total is the open-files limit less that queue
  (EVENTS_QUEUED), the slabs' fds, a pidfd per session and RESERVED_FDS for everything
  else. Where that leaves less than a quarter of the limit (a hard limit below about
  3100 with the defaults), the daemon allows a quarter and warns at start that a flood
  can then still reach EMFILE.

  Counts are kept by fd with the socket's inode: an fd number that comes back for a new
  connection replaces its old entry, and before a peer is refused its entries are checked
  with ``fstat`` (all entries before the total cap refuses, at most every PRUNE_EVERY_S),
  so a lost event never locks a peer out. Unbinding (the memory guard's reset) closes
  every connection without an event: :meth:`ConnectionCaps.reset` then starts from zero.
  Because the I/O thread holds the monitor's lock while it waits on a full queue
  (libzmq issue 3575), the queue is drained right before the monitor is stopped.
"""

from __future__ import annotations

import logging
import os
import resource
import socket
import struct
import time
from collections import Counter

import zmq

from storm_service.endpoints import ipc_path
from storm_service.fdpass import peer_credentials

__all__ = ["EVENTS_QUEUED", "RESERVED_FDS", "ConnectionCaps", "total_connections"]

log = logging.getLogger("stormd.connections")

EVENTS_QUEUED = 1024
"""Monitor events queued at most: libzmq's side of the queue holds 1000, ours the rest."""
RESERVED_FDS = 256
"""Fds the daemon keeps for everything but connections, slabs and pidfds (the fd socket's
connections, libzmq's own, the log, metrics)."""
PRUNE_EVERY_S = 1.0
"""Least time between two checks of every entry against fstat, at the total cap."""
_LIBZMQ_MONITOR_HWM = 1000
_EVENT = struct.Struct("=HI")  # monitor event, version 1: event number (u16), value (u32)


def total_connections(slabs: int, max_sessions: int) -> int:
    """The connections the daemon keeps open in all, from its open-files limit (NOTE [Connection caps])."""
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    room = limit - EVENTS_QUEUED - RESERVED_FDS - slabs - max_sessions
    if room < limit // 4:
        log.warning(
            "the open-files limit %d leaves room for %d connections beside the daemon's own fds; allowing %d, "
            "which a flood of connections can push past the limit: raise the hard limit (LimitNOFILE, ulimit -Hn) "
            "or lower --max-sessions",
            limit,
            room,
            limit // 4,
        )
    return max(room, limit // 4)


class ConnectionCaps:
    """Counts a ROUTER's connections per peer from its monitor, and shuts down those past a cap."""

    def __init__(self, router: zmq.Socket, context: zmq.Context, endpoint: str, per_peer: int, total: int) -> None:
        self.per_peer = per_peer
        """Connections one peer (a uid; a remote address over tcp://) keeps open; 0: no cap."""
        self.total = total
        self.refused = 0
        """Connections shut down at accept so far."""
        self._router = router
        address = f"inproc://stormd-monitor-{id(self)}"
        router.monitor(address, zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        monitor = context.socket(zmq.PAIR)
        monitor.setsockopt(zmq.LINGER, 0)
        monitor.setsockopt(zmq.RCVHWM, EVENTS_QUEUED - _LIBZMQ_MONITOR_HWM)  # libzmq adds the two
        monitor.connect(address)
        self.monitor = monitor
        """The PAIR the events arrive on: the loop polls it."""
        self._closed = False
        path = ipc_path(endpoint)
        self._local: str | int | None = path if path is not None else _port(endpoint)
        """What getsockname() gives for a connection to our endpoint: the ipc path, or the tcp port."""
        self._open: dict[int, tuple[str, int]] = {}
        """fd -> (peer, inode) of each connection counted."""
        self._per: Counter[str] = Counter()
        self._next_prune = 0.0
        log.info("connections: at most %s per uid, %d in all", per_peer or "any number", total)

    @property
    def open_connections(self) -> int:
        """Connections counted now, of every peer."""
        return len(self._open)

    def serve(self) -> None:
        """Judge every event queued, without waiting."""
        monitor = self.monitor
        while True:
            try:
                frame = monitor.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            while monitor.getsockopt(zmq.RCVMORE):
                monitor.recv()  # the endpoint's name
            event, fd = _EVENT.unpack(frame)
            if event == zmq.EVENT_ACCEPTED:
                self._accepted(fd)
            elif event == zmq.EVENT_DISCONNECTED:
                self._forget(fd)

    def drain(self) -> int:
        """Drop the events queued, unread; returns how many messages that was."""
        dropped = 0
        while True:
            try:
                self.monitor.recv(zmq.NOBLOCK)
            except zmq.Again:
                return dropped
            dropped += 1

    def reset(self) -> None:
        """Drop what is queued and every count: after an unbind, no connection is left."""
        self.drain()
        self._open.clear()
        self._per.clear()

    def close(self) -> None:
        if self._closed:
            return
        self.reset()  # a full queue would hold libzmq's monitor lock (NOTE [Connection caps])
        self._router.disable_monitor()
        self.monitor.close(linger=0)
        self._closed = True

    def _accepted(self, fd: int) -> None:
        try:
            conn = socket.socket(fileno=fd)
        except OSError:  # closed since, or its number reused by something that is not a socket
            return
        try:
            found = self._inspect(conn)
            if found is None or self._open.get(fd) == found:
                return  # not a connection to us, or a newer one on this fd judged at the older one's event
            self._forget(fd)
            peer = found[0]
            refusal = self._refusal(peer)
            if refusal is None:
                self._open[fd] = found
                self._per[peer] += 1
                return
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                return
        finally:
            conn.detach()  # libzmq's fd: never closed here
        self.refused += 1
        if self.refused & (self.refused - 1) == 0:  # the 1st, 2nd, 4th, 8th...: a flood cannot flood the log
            log.warning("refused a connection from %s: %s [%d refused so far]", peer, refusal, self.refused)

    def _refusal(self, peer: str) -> str | None:
        """Why a new connection of ``peer`` is refused, or None to keep it."""
        if self.per_peer and self._per[peer] >= self.per_peer:
            self._prune([fd for fd, (owner, _) in self._open.items() if owner == peer])
            if self._per[peer] >= self.per_peer:
                return f"it has {self._per[peer]} open, at most {self.per_peer} (--max-connections-per-uid)"
        if len(self._open) >= self.total:
            now = time.monotonic()
            if now >= self._next_prune:
                self._next_prune = now + PRUNE_EVERY_S
                self._prune(list(self._open))
            if len(self._open) >= self.total:
                return f"{len(self._open)} connections are open, at most {self.total} (from the open-files limit)"
        return None

    def _prune(self, fds: list[int]) -> None:
        """Forget entries whose fd no longer holds the connection they counted."""
        for fd in fds:
            try:
                inode = os.fstat(fd).st_ino
            except OSError:
                inode = -1
            if inode != self._open[fd][1]:
                self._forget(fd)

    def _forget(self, fd: int) -> None:
        counted = self._open.pop(fd, None)
        if counted is not None:
            self._per[counted[0]] -= 1
            if not self._per[counted[0]]:
                del self._per[counted[0]]

    def _inspect(self, conn: socket.socket) -> tuple[str, int] | None:
        """``(peer, inode)`` of ``conn`` if it is a connection to our endpoint, else None."""
        try:
            if self._local is not None and _local_address(conn) != self._local:
                return None
            if conn.family == socket.AF_UNIX:
                _, uid, _ = peer_credentials(conn)
                peer = f"uid {uid}"
            else:
                peer = f"address {conn.getpeername()[0]}"
            return peer, os.fstat(conn.fileno()).st_ino
        except OSError:
            return None


def _local_address(conn: socket.socket) -> str | int:
    name = conn.getsockname()
    return name if conn.family == socket.AF_UNIX else name[1]


def _port(endpoint: str) -> int | None:
    text = endpoint.rsplit(":", 1)[-1]
    return int(text) if text.isdigit() else None
