"""The daemon's side of the fd socket (storm_service/fdpass.py): slabs lent by descriptor.

NOTE [Lending by descriptor]
  A slab's fd goes only to a client of the tenant that holds the slab, over the fd
  socket, with ``SCM_RIGHTS``. The peer is identified there by ``SO_PEERCRED`` (its uid,
  and its pid as the daemon's pid namespace sees it: the kernel translates it), never by
  what a message claims. A session's first request on the fd socket binds it: the uid
  must be the session's tenant (the uid its register came from), and the daemon takes a
  pidfd of the process (NOTE [Fencing] in pidfds.py); every later request must come from
  the same uid. The socket is served from the daemon's loop without ever blocking it:
  accept and receive are non-blocking, each connection gets one request and is closed,
  at most MAX_CONNECTIONS are open and at most MAX_UID_CONNECTIONS of one uid (so that
  one user holding connections idle cannot lock the others out), and one that sends
  nothing within REQUEST_TIMEOUT_S is dropped, so no peer can stall the loop or hold
  the daemon's fds.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import time
from collections import Counter

import zmq

from storm_service.errors import ErrorCode, ForbiddenError, RemoteError
from storm_service.fdpass import (
    MAX_FD_MESSAGE_BYTES,
    decode_slab_request,
    encode_slab_error,
    encode_slab_reply,
    peer_credentials,
)
from storm_service.pidfds import open_pidfd
from storm_service.pool import Pool
from storm_service.session import Session
from storm_service.sessions import SessionTable

__all__ = ["MAX_CONNECTIONS", "MAX_UID_CONNECTIONS", "REQUEST_TIMEOUT_S", "Lender"]

log = logging.getLogger("stormd.lending")

MAX_CONNECTIONS = 64
"""Connections to the fd socket open at once; more are closed as they are accepted."""
MAX_UID_CONNECTIONS = 8
"""Connections of one uid open at once (a client needs one, for a moment, per slab it maps)."""
REQUEST_TIMEOUT_S = 2.0
"""How long a connection may take to send its request."""
ACCEPT_PAUSE_S = 0.1
"""How long accepting waits after an accept failed."""


class Lender:
    """The listening fd socket and its open connections, registered in the loop's poller."""

    def __init__(self, path: str, pool: Pool, sessions: SessionTable, poller: zmq.Poller) -> None:
        self.path = path
        self._pool = pool
        self._sessions = sessions
        self._poller = poller
        self._connections: dict[int, tuple[socket.socket, float, int]] = {}
        """fd -> (connection, when it is dropped, its peer's uid)."""
        self._per_uid: Counter[int] = Counter()
        self.lent = 0
        """Slab fds sent so far."""
        self.refused = 0
        """Connections closed as they were accepted, past a cap."""
        self.accept_errors = 0
        self._paused_until = 0.0
        """While set, accepting waits (the last accept failed: out of fds, say)."""
        if os.path.lexists(path) and stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)  # a dead daemon's: the endpoint lock says no live one serves here
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        listener.bind(path)
        listener.listen(MAX_CONNECTIONS)
        self._listener = listener
        poller.register(listener.fileno(), zmq.POLLIN)

    def secure(self, like: str | None) -> None:
        """Give the fd socket the owner group and mode of the endpoint's socket ``like`` (else 0600)."""
        if like is None:
            os.chmod(self.path, 0o600)
            return
        info = os.stat(like)
        os.chown(self.path, -1, info.st_gid)
        os.chmod(self.path, stat.S_IMODE(info.st_mode))

    def serve(self, ready: set[int] | None = None) -> None:
        """Accept, answer and drop what is ready (``ready``: fds the poller reported; None: try all)."""
        listener = self._listener.fileno()
        now = time.monotonic()
        if self._paused_until and now >= self._paused_until:
            self._paused_until = 0.0
            self._poller.register(listener, zmq.POLLIN)
        if not self._paused_until and (ready is None or listener in ready):
            self._accept()
        for fd, (conn, deadline, _) in list(self._connections.items()):
            if ready is None or fd in ready:
                self._answer(fd, conn)
            elif now > deadline:
                self._drop(fd)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as e:  # EMFILE and the like: the connection stays queued, tried again after a pause
                self.accept_errors += 1
                if self.accept_errors & (self.accept_errors - 1) == 0:  # 1st, 2nd, 4th...: no flood in the log
                    log.warning("fd socket: cannot accept [%d times so far]: %s", self.accept_errors, e)
                # The listener stays readable: unpolled for a moment, so that the loop does not spin on it.
                self._poller.unregister(self._listener.fileno())
                self._paused_until = time.monotonic() + ACCEPT_PAUSE_S
                return
            uid = peer_credentials(conn)[1]
            if len(self._connections) >= MAX_CONNECTIONS or self._per_uid[uid] >= MAX_UID_CONNECTIONS:
                self.refused += 1
                if self.refused & (self.refused - 1) == 0:  # 1st, 2nd, 4th...: a flood cannot flood the log
                    log.warning("fd socket: refused a connection of uid %d [%d refused so far]", uid, self.refused)
                conn.close()
                continue
            conn.setblocking(False)
            self._per_uid[uid] += 1
            self._connections[conn.fileno()] = (conn, time.monotonic() + REQUEST_TIMEOUT_S, uid)
            self._poller.register(conn.fileno(), zmq.POLLIN)

    def _answer(self, fd: int, conn: socket.socket) -> None:
        try:
            frame = conn.recv(MAX_FD_MESSAGE_BYTES + 1)
        except BlockingIOError:
            return
        except OSError:
            self._drop(fd)
            return
        if frame:
            try:
                reply, fds = self._handle(conn, frame)
            except RemoteError as e:
                reply, fds = encode_slab_error(e.code.value, e.message), []
            except ValueError as e:
                reply, fds = encode_slab_error(ErrorCode.BAD_REQUEST.value, str(e)), []
            try:
                socket.send_fds(conn, [reply], fds, socket.MSG_DONTWAIT)
            except OSError as e:  # the peer left, or stopped reading
                log.debug("fd socket: dropped a reply: %s", e)
        self._drop(fd)

    def _handle(self, conn: socket.socket, frame: bytes) -> tuple[bytes, list[int]]:
        token, slab_id = decode_slab_request(frame)
        session = self._sessions.by_token(token)
        pid, uid, _ = peer_credentials(conn)
        self._bind(session, pid, uid)
        if slab_id == 0:
            return encode_slab_reply(0, 0), []
        device = self._sessions.device
        if device is not None and device.holds(slab_id):
            size_bytes, fields, fds = device.lend(slab_id, session, pid)
            reply = encode_slab_reply(slab_id, size_bytes, fields)
        else:
            slab = self._pool.lent_to(slab_id)
            if slab is None or slab.tenant != session.tenant.name:
                raise ForbiddenError(f"slab {slab_id} is not lent to {session.tenant.name}")
            reply, fds = encode_slab_reply(slab.id, slab.size_bytes), [slab.fd]
        session.last_seen = time.monotonic()
        self.lent += 1
        return reply, fds

    def _bind(self, session: Session, pid: int, uid: int) -> None:
        """Tie ``session`` to the uid and process of its first request (NOTE [Lending by descriptor])."""
        if session.uid is None:
            tenant = session.tenant.name
            if tenant.startswith("uid ") and tenant != f"uid {uid}":
                log.warning("fd socket: uid %d (pid %d) presented a token of %s", uid, pid, tenant)
                raise ForbiddenError(f"the session belongs to {tenant}, not to uid {uid}")
            session.uid, session.pidfd, session.bound_pid = uid, open_pidfd(pid), pid
        elif session.uid != uid:
            raise ForbiddenError(f"the session belongs to uid {session.uid}, not to uid {uid}")

    def _drop(self, fd: int) -> None:
        conn, _, uid = self._connections.pop(fd)
        self._per_uid[uid] -= 1
        if not self._per_uid[uid]:
            del self._per_uid[uid]
        self._poller.unregister(fd)
        conn.close()

    def close(self) -> None:
        for fd in list(self._connections):
            self._drop(fd)
        if not self._paused_until:
            self._poller.unregister(self._listener.fileno())
        self._listener.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
