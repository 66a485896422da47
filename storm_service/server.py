"""The serving loop: a ZeroMQ ROUTER, and dispatch from a request frame to its reply frame.

Each request frame becomes its reply frame in :mod:`storm_service.dispatch` (validation,
replays, the op's handler from :mod:`storm_service.ops`, exceptions to error codes);
:meth:`Server.dispatch` does the same in process. The loop never blocks on a client: sends
are non-blocking, and a reply that cannot be routed (its client left) is dropped and
counted. Each message's sender is read from the transport (NOTE [Peer credentials] in
tenants.py), never from the message.

NOTE [Liveness after the queue]
  A session is expired for silence only if it sent nothing in the heartbeat timeout
  before the last moment the loop had answered everything queued (``_caught_up_at``:
  a receive found nothing waiting). Judged against the clock instead, a request that
  held the loop for longer than the timeout would make every client whose heartbeat
  waited behind it look silent. A session whose process is gone is expired at once,
  queue or not.

NOTE [Serving around a long request]
  A batch of 4096 extents costs tens of milliseconds of Python; served in one go it would
  hold every other client's reply, a ping included, for that long. So a handler working
  through a long batch pauses every PAUSE_EVERY items (``OpContext.pause``), and at each
  pause the server answers up to PAUSE_MESSAGES messages already queued, from anyone but
  the busy session: those are set aside (at most MAX_DEFERRED; past that the pause stops
  reading) and answered in order as soon as the long request's reply is sent, so one
  session's requests still run one at a time and in order. A pause never nests: what is
  answered at a pause runs to its end. Nothing expires at a pause, and the batch's items
  are its session's alone (others' requests get FORBIDDEN for them).

NOTE [Full collections when idle]
  CPython's full (generation 2) collection walks every object it tracks, one per extent,
  so with a few hundred thousand extents one that starts in the middle of a request holds
  the loop for tens of milliseconds (measured: bystanders' worst ping 60 to 190 ms with
  automatic collections, 22 to 24 ms without). ``stormd`` turns automatic full collections
  off (the younger generations still collect short-lived cycles such as an exception's)
  and the loop runs one itself when nothing is queued, at most every FULL_COLLECTION_S.

NOTE [Socket bounds]
  ``MAXMSGSIZE`` drops a peer that sends a frame longer than any request; the
  high-water marks (1000 messages per peer, libzmq's default) stop reading from a peer
  that sends faster than it is answered, and drop replies to one that stops reading
  (``dropped_replies``). Neither bounds bytes, nor a message that never ends: that is
  NOTE [Buffered messages] in memory_guard.py; nor connections: NOTE [Connection caps]
  in connections.py (the ROUTER's monitor, read by the loop with the fd socket).
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, cast

import zmq

from storm_service.config import DaemonConfig
from storm_service.connections import ConnectionCaps, total_connections
from storm_service.device.tier import DeviceTier
from storm_service.disk.parking import Parking, dispatch_until_answered
from storm_service.disk.tier import DiskTier
from storm_service.dispatch import Dispatcher
from storm_service.endpoints import AUTHORIZED_DIR, SERVER_SECRET_FILE, ipc_path, runtime_dir
from storm_service.errors import ErrorCode
from storm_service.fdpass import FD_SOCKET_SUFFIX, fd_socket_path
from storm_service.lending import Lender
from storm_service.memory_guard import EXTENT_COST_BYTES, SESSION_COST_BYTES, MemoryGuard
from storm_service.metrics import Metrics
from storm_service.ops import OpContext, Parked
from storm_service.pool import Pool
from storm_service.protocol import (
    MAX_MESSAGE_BYTES,
    encode_error,
)
from storm_service.session import Session
from storm_service.sessions import SessionTable
from storm_service.tenants import Limits, Peer
from storm_service.units import format_bytes

__all__ = ["Server"]

log = logging.getLogger("stormd.server")

TICK_S = 0.1
"""How often the loop wakes to check for stop requests and its memory."""
FULL_COLLECTION_S = 30.0
"""Least time between two full collections, run when nothing is queued (NOTE [Full collections when idle])."""
SOCKET_HWM = 1000
"""Messages queued per peer each way (NOTE [Socket bounds])."""
PAUSE_MESSAGES = 8
"""Other sessions' messages answered at each pause of a long request (NOTE [Serving around a long request])."""
MAX_DEFERRED = 32
"""The busy session's messages set aside at pauses, at most."""
_NOBLOCK = int(zmq.NOBLOCK)
_MORE_NOBLOCK = int(zmq.SNDMORE | zmq.NOBLOCK)  # plain ints: zmq's flag enums cost a call each
MAX_BURST = 256
"""Messages answered with SHUTTING_DOWN when the loop stops."""


class Server:
    """Owns the ROUTER socket and the daemon's state (:attr:`context`); :meth:`serve` runs until stopped."""

    def __init__(
        self,
        config: DaemonConfig,
        pool: Pool,
        zmq_context: zmq.Context | None = None,
        stop: threading.Event | None = None,
        after_bind: Callable[[], None] = lambda: None,
        tier: DiskTier | None = None,
        device: DeviceTier | None = None,
    ) -> None:
        self.config = config
        limits = Limits(config.max_sessions, config.max_tenant_sessions, config.max_extents, config.tenant_quota)
        self.context = OpContext(config, pool, SessionTable(pool, limits, tier, device), stop or threading.Event())
        if device is not None:
            device.mover.disk = tier
        """What every handler gets; :attr:`context.stop <OpContext.stop>` ends :meth:`serve`."""
        self._zmq = zmq_context or zmq.Context.instance()
        self._socket: zmq.Socket | None = None
        self._authenticator: Any = None
        self._after_bind = after_bind
        """Called after every bind (the daemon sets the socket file's owner and mode)."""
        self._ipc = config.endpoint.startswith("ipc://")
        self._guard: MemoryGuard | None = None
        self._caught_up_at = time.monotonic()
        """When a receive last found nothing waiting (NOTE [Liveness after the queue])."""
        self._next_expiry = 0.0
        self._next_guard = 0.0
        self._next_full_collection = 0.0
        self._dispatcher = Dispatcher(self.context)
        """Request frame to reply frame; its ``busy`` is the session whose long request is paused."""
        self._deferred: deque[tuple[tuple[bytes, ...], zmq.Frame]] = deque()
        """Its messages that arrived meanwhile: answered, in order, once its request is."""
        self.context.pause = self._serve_others
        self._poller = zmq.Poller()
        self._lender: Lender | None = None
        """The fd socket (NOTE [Lending by descriptor] in lending.py), polled with the ROUTER."""
        self._connections: ConnectionCaps | None = None
        """The ROUTER's monitor, polled with it: caps on connections (NOTE [Connection caps] in connections.py)."""
        self._parking = Parking(tier, self.context, self._answer_frame, self._send) if tier is not None else None
        """Fetches waiting for the disk tier, whose I/O threads wake the loop (storm_service/disk/parking.py)."""
        if self._parking is not None:
            self._poller.register(self._parking.wakeup_fd, zmq.POLLIN)

    @property
    def metrics(self) -> Metrics | None:
        """The Prometheus registry, once the daemon sets one (``--metrics-port``)."""
        return self.context.metrics

    @metrics.setter
    def metrics(self, metrics: Metrics | None) -> None:
        self.context.metrics = metrics

    # -- socket and loop ---------------------------------------------------------

    def bind(self) -> None:
        socket = self._zmq.socket(zmq.ROUTER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unroutable replies raise instead of vanishing
        socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES + 1024)
        socket.setsockopt(zmq.SNDHWM, SOCKET_HWM)
        socket.setsockopt(zmq.RCVHWM, SOCKET_HWM)
        if self.config.curve_dir:
            self._enable_curve(socket)
        total = total_connections(self.context.sessions.fds_bound, self.config.max_sessions)
        self._connections = ConnectionCaps(
            socket, self._zmq, self.config.endpoint, self.config.max_connections_per_uid, total
        )
        self._poller.register(self._connections.monitor, zmq.POLLIN)
        socket.bind(self.config.endpoint)
        self._socket = socket
        self._after_bind()
        self._guard = MemoryGuard(self.config.max_buffered)
        self._poller.register(socket, zmq.POLLIN)
        fd_path = fd_socket_path(self.config.endpoint) or os.path.join(
            runtime_dir(), "tcp-" + self.config.endpoint.rsplit(":", 1)[-1] + FD_SOCKET_SUFFIX
        )
        self._lender = Lender(fd_path, self.context.pool, self.context.sessions, self._poller)
        self._lender.secure(ipc_path(self.config.endpoint))
        self.context.fd_socket = fd_path

    def _enable_curve(self, socket: zmq.Socket) -> None:
        """CURVE encryption, and ZAP admitting only the public keys in ``authorized/``."""
        from zmq.auth import load_certificate
        from zmq.auth.thread import ThreadAuthenticator

        public, secret = load_certificate(os.path.join(self.config.curve_dir, SERVER_SECRET_FILE))
        self._authenticator = ThreadAuthenticator(self._zmq)
        self._authenticator.start()
        self._authenticator.configure_curve(domain="*", location=os.path.join(self.config.curve_dir, AUTHORIZED_DIR))
        socket.curve_publickey = public
        socket.curve_secretkey = secret
        socket.curve_server = True

    def serve(self) -> None:
        """Serve until ``context.stop`` is set, then answer what is queued with SHUTTING_DOWN."""
        assert self._socket is not None, "bind() first"
        socket, lender, poller, connections = self._socket, self._lender, self._poller, self._connections
        assert lender is not None and connections is not None
        answer, stop, sessions, parking = self._answer, self.context.stop, self.context.sessions, self._parking
        answered = 0
        while not stop.is_set():
            try:
                identity = socket.recv(_NOBLOCK)
            except zmq.Again:
                self._caught_up_at = time.monotonic()
                # While closed sessions hold extents or a device moves some, work between messages: never wait.
                ready = poller.poll(0 if sessions.busy else int(TICK_S * 1000))
                lender.serve({fd for fd, _ in ready if isinstance(fd, int)})
                connections.serve()
            else:
                answer(identity)
                answered += 1
                if answered % 16 == 0:  # under a steady stream of messages the fd socket is still served
                    lender.serve()
                    connections.serve()
            sessions.step()
            if parking is not None:
                parking.step()
            now = time.monotonic()
            if now >= self._next_guard:
                self._housekeep(now)
        self._serve_burst()

    def _housekeep(self, now: float) -> None:
        """Every tick: the memory guard; every few ticks: expiry (NOTE [Liveness after the queue])."""
        assert self._socket is not None
        self._next_guard = now + TICK_S
        self._guard_memory()
        if self.context.sessions.device is not None:
            self.context.sessions.device.housekeep()
        if self._parking is not None:
            self._parking.retry()  # fetches of extents freed or sessions closed meanwhile get their error
        if now >= self._next_expiry:
            if not cast(int, self._socket.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                self._caught_up_at = now
            self._expire_stale()
            self.context.sessions.step()  # a first slice of what expired is back before the next message
            self._next_expiry = now + min(TICK_S * 5, self.config.heartbeat_timeout / 4)
            if self._caught_up_at == now and now >= self._next_full_collection:
                gc.collect()
                self._next_full_collection = time.monotonic() + FULL_COLLECTION_S

    def _accounted_bytes(self) -> int:
        """A generous estimate of the memory the daemon's own state takes (NOTE [Buffered messages])."""
        sessions = self.context.sessions
        replies = sum(s.replies.bytes for s in sessions.sessions.values())
        return EXTENT_COST_BYTES * len(sessions.extents) + SESSION_COST_BYTES * len(sessions.sessions) + replies

    def _guard_memory(self) -> None:
        """Past the allowance, drop every connection to free what ZeroMQ buffers (NOTE [Buffered messages])."""
        assert self._socket is not None and self._guard is not None and self._connections is not None
        excess = self._guard.excess(self._accounted_bytes())
        if excess is None:
            return
        socket, connections = self._socket, self._connections
        socket.unbind(self.config.endpoint)
        settled = self._guard.settle(
            lambda: (socket.getsockopt(zmq.EVENTS), connections.drain()), self._accounted_bytes()
        )
        connections.reset()  # every connection closed, without an event (NOTE [Connection caps])
        socket.bind(self.config.endpoint)
        self._after_bind()
        self.context.connection_resets += 1
        log.warning(
            "anonymous memory %s was past its allowance of %s (a peer may be sending a message that never "
            "ends): dropped every connection; %s after they closed",
            format_bytes(excess[0]),
            format_bytes(excess[1]),
            format_bytes(settled),
        )

    def close(self) -> None:
        if self._authenticator is not None:
            self._authenticator.stop()
        if self._lender is not None:
            self._lender.close()
            self._lender = None
        if self._connections is not None:
            self._poller.unregister(self._connections.monitor)
            self._connections.close()
            self._connections = None
        if self._socket is not None:
            self._poller.unregister(self._socket)
            self._socket.close(linger=0)
            self._socket = None
        self.context.sessions.shutdown()

    def _serve_burst(self) -> None:
        """Answer what is already queued, without blocking (at shutdown: up to MAX_BURST)."""
        assert self._socket is not None
        for _ in range(MAX_BURST):
            if not cast(int, self._socket.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                return
            self._answer(self._socket.recv(zmq.NOBLOCK))

    def _answer(self, identity: bytes) -> None:
        """Read the rest of the message whose identity frame was just received, and reply, or set
        it aside (NOTE [Serving around a long request]); then answer what was set aside.

        A ROUTER delivers a message whole, so the frames after the identity are already here.
        """
        envelope, body = self._read_message(identity)
        if isinstance(body, bytes):  # the error reply to a message of the wrong shape
            self._send(envelope, body)
            return
        self._answer_frame(envelope, body)
        while self._deferred and self._dispatcher.busy is None:
            self._answer_frame(*self._deferred.popleft())

    def _answer_frame(self, envelope: tuple[bytes, ...], body: zmq.Frame) -> None:
        try:
            reply = self._dispatcher.reply(body.bytes, lambda: Peer.of_message(body, self._ipc))
        except Parked:
            assert self._parking is not None, "only the disk tier parks a fetch"
            self._parking.park(envelope, body)
            return
        if reply is None:
            self._deferred.append((envelope, body))
        else:
            self._send(envelope, reply)

    def _read_message(self, identity: bytes) -> tuple[tuple[bytes, ...], zmq.Frame | bytes]:
        """The reply envelope and the request frame; DEALER clients send ``[body]``, REQ clients
        ``[b"", body]``. For any other shape, the error reply instead of the frame."""
        assert self._socket is not None
        frames = [self._socket.recv(_NOBLOCK, copy=False)]
        while frames[-1].more:
            frames.append(self._socket.recv(_NOBLOCK, copy=False))
        if len(frames) == 1:
            return (identity,), frames[0]
        if len(frames) == 2 and frames[0].bytes == b"":
            return (identity, b""), frames[1]
        self.context.errors[ErrorCode.BAD_REQUEST] += 1
        return (identity,), encode_error(None, ErrorCode.BAD_REQUEST, f"expected one frame, got {len(frames)}")

    def _send(self, envelope: tuple[bytes, ...], reply: bytes) -> None:
        socket = self._socket
        assert socket is not None
        try:
            for frame in envelope:
                socket.send(frame, _MORE_NOBLOCK)
            socket.send(reply, _NOBLOCK)
        except zmq.ZMQError as e:  # EHOSTUNREACH: the client left; EAGAIN: it stopped reading
            self.context.dropped_replies += 1
            log.debug("dropped a reply: %s", e)

    def _serve_others(self, busy: Session) -> None:
        """A pause in ``busy``'s long request: answer what others sent (NOTE [Serving around a long request])."""
        socket = self._socket
        if socket is None or self._dispatcher.busy is not None:
            return
        self._dispatcher.busy = busy
        try:
            for _ in range(PAUSE_MESSAGES):
                if len(self._deferred) >= MAX_DEFERRED or not cast(int, socket.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                    break
                self._answer(socket.recv(_NOBLOCK))
        finally:
            self._dispatcher.busy = None

    def _expire_stale(self) -> None:
        sessions = self.context.sessions
        now = time.monotonic()
        for session in sessions.release_fenced():
            log.info("session %d's process exited; freeing its fenced %s", session.id, format_bytes(session.held_bytes))
        for session in sessions.stale(self.config.heartbeat_timeout, self._caught_up_at):
            freed = sessions.close(session, fence=True)
            sessions.expired_total += 1
            log.warning(
                "session %d (pid %d, %s) expired after %.1f s of silence or its process's exit; freeing %s",
                session.id,
                session.pid,
                session.name or "unnamed",
                now - session.last_seen,
                format_bytes(freed),
            )

    # -- in process ----------------------------------------------------------------

    def dispatch(self, frame: bytes, peer: Peer | None = None) -> bytes:
        """The reply frame to one request frame from ``peer`` (default: this process); never raises.

        Then frees one slice of closed sessions' extents, as the loop does after each
        message (NOTE [Bounded work per request] in sessions.py).
        """
        sender = peer or Peer.this_process()
        reply = dispatch_until_answered(
            lambda: self._dispatcher.reply(frame, lambda: sender), self._parking, self.config.heartbeat_timeout
        )
        assert reply is not None, "nothing is set aside without a socket"
        sessions = self.context.sessions
        if sessions.reclaiming:
            sessions.reclaim()
        return reply
