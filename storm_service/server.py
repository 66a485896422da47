"""The serving loop: a ZeroMQ ROUTER, request validation, and one handler per op.

Every frame is decoded and validated by :mod:`storm_service.protocol` before any
handler runs; exceptions are mapped to error codes in :meth:`Server.dispatch` alone.
The loop never blocks on a client: sends are non-blocking, and a reply that cannot be
routed (its client left) is dropped and counted.
"""

from __future__ import annotations

import heapq
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, cast

import zmq

from storm_service.config import DaemonConfig
from storm_service.errors import (
    ErrorCode,
    NotCommittedError,
    PoolFullError,
    QuotaExceededError,
    RemoteError,
    ShuttingDownError,
)
from storm_service.metrics import Metrics
from storm_service.pool import ALIGNMENT, Pool
from storm_service.protocol import (
    MAX_LISTED_SESSIONS,
    MAX_MESSAGE_BYTES,
    MUTATING_OPS,
    SESSIONLESS_OPS,
    Invalid,
    Op,
    Request,
    decode_request,
    encode_error,
    encode_ok,
)
from storm_service.runtime import AUTHORIZED_DIR, SERVER_SECRET_FILE, pid_namespace
from storm_service.sessions import Extent, ExtentState, Session, SessionTable
from storm_service.units import format_bytes

__all__ = ["Server"]

log = logging.getLogger("stormd.server")

_Handler = Callable[[Request, Session | None], dict[str, Any]]
TICK_S = 0.1
"""How often the loop wakes to check for stop requests and stale sessions."""
_NOBLOCK = int(zmq.NOBLOCK)
_MORE_NOBLOCK = int(zmq.SNDMORE | zmq.NOBLOCK)  # plain ints: zmq's flag enums cost a call each
MAX_BURST = 256
"""Messages answered with SHUTTING_DOWN when the loop stops."""


class Server:
    """Owns the ROUTER socket and the session table; :meth:`serve` runs until stopped."""

    def __init__(
        self,
        config: DaemonConfig,
        pool: Pool,
        context: zmq.Context | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self.config = config
        self.pool = pool
        self.sessions = SessionTable(pool)
        self.stop = stop or threading.Event()
        """Set (by a signal, ``stormctl shutdown`` or the caller) to end :meth:`serve`."""
        self.started = time.time()
        self.requests: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.dropped_replies = 0
        self._context = context or zmq.Context.instance()
        self._socket: zmq.Socket | None = None
        self._authenticator: Any = None
        self._next_housekeeping = 0.0
        self.metrics: Metrics | None = None
        self.handlers: dict[Op, _Handler] = {
            Op.PING: self.handle_ping,
            Op.REGISTER: self.handle_register,
            Op.UNREGISTER: self.handle_unregister,
            Op.HEARTBEAT: self.handle_heartbeat,
            Op.OFFLOAD: self.handle_offload,
            Op.COMMIT: self.handle_commit,
            Op.FETCH: self.handle_fetch,
            Op.FREE: self.handle_free,
            Op.STATS: self.handle_stats,
            Op.SHUTDOWN: self.handle_shutdown,
        }

    # -- socket and loop ---------------------------------------------------------

    def bind(self) -> None:
        socket = self._context.socket(zmq.ROUTER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unroutable replies raise instead of vanishing
        socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES + 1024)
        socket.setsockopt(zmq.SNDHWM, 10_000)
        socket.setsockopt(zmq.RCVHWM, 10_000)
        if self.config.curve_dir:
            self._enable_curve(socket)
        socket.bind(self.config.endpoint)
        self._socket = socket

    def _enable_curve(self, socket: zmq.Socket) -> None:
        """CURVE encryption, and ZAP admitting only the public keys in ``authorized/``."""
        from zmq.auth import load_certificate
        from zmq.auth.thread import ThreadAuthenticator

        public, secret = load_certificate(os.path.join(self.config.curve_dir, SERVER_SECRET_FILE))
        self._authenticator = ThreadAuthenticator(self._context)
        self._authenticator.start()
        self._authenticator.configure_curve(domain="*", location=os.path.join(self.config.curve_dir, AUTHORIZED_DIR))
        socket.curve_publickey = public
        socket.curve_secretkey = secret
        socket.curve_server = True

    def serve(self) -> None:
        """Serve until :attr:`stop` is set, then answer what is queued with SHUTTING_DOWN."""
        assert self._socket is not None, "bind() first"
        socket = self._socket
        # A blocking recv with RCVTIMEO costs one call per message; a Poller costs several.
        socket.setsockopt(zmq.RCVTIMEO, int(TICK_S * 1000))
        recv, answer, stop = socket.recv, self._answer, self.stop
        while not stop.is_set():
            try:
                identity = recv()
            except zmq.Again:
                pass
            else:
                answer(identity)
            now = time.monotonic()
            if now >= self._next_housekeeping:
                self._expire_stale(now)
                self._next_housekeeping = now + min(TICK_S * 5, self.config.heartbeat_timeout / 4)
        self._serve_burst()

    def close(self) -> None:
        if self._authenticator is not None:
            self._authenticator.stop()
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None
        for session in list(self.sessions.sessions.values()):
            self.sessions.close(session)

    def _serve_burst(self) -> None:
        """Answer what is already queued, without blocking (at shutdown: up to MAX_BURST)."""
        assert self._socket is not None
        for _ in range(MAX_BURST):
            if not cast(int, self._socket.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                return
            self._answer(self._socket.recv(zmq.NOBLOCK))

    def _answer(self, identity: bytes) -> None:
        """Read the rest of the message whose identity frame was just received, and reply.

        A ROUTER delivers a message whole, so the frames after the identity are already here.
        """
        socket = self._socket
        assert socket is not None
        body = socket.recv(_NOBLOCK)
        if socket.getsockopt(zmq.RCVMORE):
            reply, envelope = self._answer_multipart(identity, body)
        else:
            reply, envelope = self.dispatch(body), (identity,)
        try:
            for frame in envelope:
                socket.send(frame, _MORE_NOBLOCK)
            socket.send(reply, _NOBLOCK)
        except zmq.ZMQError as e:  # EHOSTUNREACH: the client left; EAGAIN: it stopped reading
            self.dropped_replies += 1
            log.debug("dropped a reply: %s", e)

    def _answer_multipart(self, identity: bytes, first: bytes) -> tuple[bytes, tuple[bytes, ...]]:
        """DEALER clients send ``[body]``; REQ clients add an empty delimiter, ``[b"", body]``."""
        assert self._socket is not None
        frames = [first]
        while self._socket.getsockopt(zmq.RCVMORE):
            frames.append(self._socket.recv(_NOBLOCK))
        if len(frames) == 2 and frames[0] == b"":
            return self.dispatch(frames[1]), (identity, b"")
        self.errors[ErrorCode.BAD_REQUEST] += 1
        return encode_error(None, ErrorCode.BAD_REQUEST, f"expected one frame, got {len(frames)}"), (identity,)

    def _expire_stale(self, now: float) -> None:
        for session in self.sessions.stale(self.config.heartbeat_timeout, now):
            freed = self.sessions.close(session)
            self.sessions.expired_total += 1
            log.warning(
                "session %d (pid %d, %s) expired after %.1f s of silence; freed %s",
                session.id,
                session.pid,
                session.name or "unnamed",
                now - session.last_seen,
                format_bytes(freed),
            )

    # -- dispatch: the one place where exceptions become error codes -----------

    def dispatch(self, frame: bytes) -> bytes:
        if self.metrics is None:
            return self._dispatch(frame)[0]
        started = time.perf_counter()
        reply, op = self._dispatch(frame)
        self.metrics.latency.labels(op).observe(time.perf_counter() - started)
        return reply

    def _dispatch(self, frame: bytes) -> tuple[bytes, str]:
        """The reply to one frame, and the op it named ("invalid" if none)."""
        request_id: int | None = None
        op = "invalid"
        try:
            request = decode_request(frame)
            op, request_id = request.op, request.id  # op: a StrEnum, usable as its name
            self.requests[op] += 1
            if op is not Op.PING and self.stop.is_set():
                raise ShuttingDownError(f"{op}: the daemon is shutting down")
            session = None
            mutating = op in MUTATING_OPS
            if request.token is not None or op not in SESSIONLESS_OPS:
                session = self.sessions.by_token(request.token)
                session.last_seen = time.monotonic()
                if mutating and request_id in session.replies:
                    return session.replies[request_id], op
            reply = encode_ok(request_id, self.handlers[op](request, session))
            if mutating and session is not None:
                session.remember(request_id, reply)
            return reply, op
        except Invalid as e:
            return self._error(e.request_id, e.code, e.message), op
        except RemoteError as e:
            return self._error(request_id, e.code, e.message), op
        except Exception as e:
            log.exception("internal error while serving request %s", request_id)
            return self._error(request_id, ErrorCode.INTERNAL, f"internal error: {type(e).__name__}: {e}"), op

    def _error(self, request_id: int | None, code: ErrorCode, message: str) -> bytes:
        self.errors[code.value] += 1
        log.debug("request %s failed: %s %s", request_id, code.value, message)
        return encode_error(request_id, code, message)

    # -- handlers ----------------------------------------------------------------

    def handle_ping(self, request: Request, session: Session | None) -> dict[str, Any]:
        return {"pid": os.getpid(), "uptime_s": round(time.time() - self.started, 3)}

    def handle_register(self, request: Request, session: Session | None) -> dict[str, Any]:
        args = request.args
        limit = self.config.max_quota or self.pool.size_bytes
        quota = min(args.get("quota_bytes", self.config.quota or self.pool.size_bytes), limit)
        session = self.sessions.open(
            pid=args["pid"],
            name=args.get("name", ""),
            quota_bytes=quota,
            rank=args.get("rank"),
            world_size=args.get("world_size"),
            pid_ns=args.get("pid_ns"),
        )
        log.info(
            "session %d registered: pid %d %s rank %s quota %s",
            session.id,
            session.pid,
            session.name or "unnamed",
            session.rank,
            format_bytes(quota),
        )
        return {
            "session_id": session.id,
            "token": session.token,
            "segments": self.pool.describe(),
            "alignment": ALIGNMENT,
            "quota_bytes": quota,
            "heartbeat_interval_s": self.config.heartbeat_timeout / 3,
            "heartbeat_timeout_s": self.config.heartbeat_timeout,
            "daemon_pid": os.getpid(),
            "pid_ns": pid_namespace(),
        }

    def handle_unregister(self, request: Request, session: Session | None) -> dict[str, Any]:
        assert session is not None
        freed = self.sessions.close(session)
        log.info("session %d unregistered; freed %s", session.id, format_bytes(freed))
        return {"freed_bytes": freed}

    def handle_heartbeat(self, request: Request, session: Session | None) -> dict[str, Any]:
        assert session is not None
        return {"used_bytes": session.used_bytes}

    def handle_offload(self, request: Request, session: Session | None) -> dict[str, Any]:
        assert session is not None
        sizes: list[int] = request.args["sizes"]
        alignment = ALIGNMENT
        need = sum(-(-size // alignment) * alignment for size in sizes)
        # A quota as large as the pool never binds before the pool does: that is POOL_FULL.
        if session.held_bytes + need > session.quota_bytes < self.pool.size_bytes:
            raise QuotaExceededError(
                f"offload: {need} bytes requested, {session.quota_bytes - session.held_bytes} "
                f"left of a {session.quota_bytes}-byte quota"
            )
        placed: list[tuple[int, int, int]] = []
        for size in sizes:
            where = self.pool.allocate(size)
            if where is None:
                for segment, offset, _ in placed:
                    self.pool.free(segment, offset)
                raise PoolFullError(
                    f"offload: {need} bytes requested, {self.pool.free_bytes} free "
                    f"(largest free extent {self.pool.largest_free_bytes})"
                )
            placed.append(where)
        layer_id = request.args.get("layer_id")
        extents = [
            self.sessions.add_extent(session, segment, offset, length, size, layer_id)
            for (segment, offset, length), size in zip(placed, sizes, strict=True)
        ]
        return {"extents": [e.location() for e in extents]}

    def _owned_all(self, request: Request, session: Session) -> list[Extent]:
        # Validate the whole batch before changing anything, so a bad handle changes nothing.
        handles = dict.fromkeys(request.args["handles"])
        return [self.sessions.owned(session, handle, request.op.value) for handle in handles]

    def handle_commit(self, request: Request, session: Session | None) -> dict[str, Any]:
        assert session is not None
        extents = self._owned_all(request, session)
        committed = sum(self.sessions.commit(session, extent) for extent in extents)
        if self.metrics is not None:
            self.metrics.offloaded.inc(committed)
        return {"committed": len(extents)}

    def handle_fetch(self, request: Request, session: Session | None) -> dict[str, Any]:
        assert session is not None
        extents = self._owned_all(request, session)
        for extent in extents:
            if extent.state is not ExtentState.COMMITTED:
                raise NotCommittedError(f"fetch: handle {extent.handle} was never committed")
        fetched = sum(e.size_bytes for e in extents)
        session.fetched_bytes += fetched
        if self.metrics is not None:
            self.metrics.fetched.inc(fetched)
        return {"extents": [e.location() for e in extents]}

    def handle_free(self, request: Request, session: Session | None) -> dict[str, Any]:
        assert session is not None
        extents = self._owned_all(request, session)
        freed = sum(self.sessions.release(session, extent) for extent in extents)
        return {"freed": len(extents), "freed_bytes": freed}

    def handle_stats(self, request: Request, session: Session | None) -> dict[str, Any]:
        pool = self.pool
        result: dict[str, Any] = {
            "daemon_pid": os.getpid(),
            "uptime_s": round(time.time() - self.started, 3),
            "pool_bytes": pool.size_bytes,
            "used_bytes": pool.used_bytes - self.sessions.reserved_bytes,
            "reserved_bytes": self.sessions.reserved_bytes,
            "free_bytes": pool.free_bytes,
            "largest_free_bytes": pool.largest_free_bytes,
            "segments": len(pool.segments),
            "extents": len(self.sessions.extents),
            "sessions": [s.summary() for s in self._listed_sessions()],
            "live_sessions": len(self.sessions.sessions),
            "expired_sessions": self.sessions.expired_total,
            "requests": dict(self.requests),
            "errors": dict(self.errors),
            "dropped_replies": self.dropped_replies,
        }
        if session is not None:
            result["session"] = session.summary() | {
                "layer_bytes": {str(k): v for k, v in sorted(session.layer_bytes.items())}
            }
        return result

    def _listed_sessions(self) -> list[Session]:
        """Every session, or past MAX_LISTED_SESSIONS those holding the most bytes; in id order."""
        sessions = self.sessions.sessions
        if len(sessions) <= MAX_LISTED_SESSIONS:
            return list(sessions.values())
        largest = heapq.nsmallest(MAX_LISTED_SESSIONS, sessions.values(), key=lambda s: (-s.held_bytes, s.id))
        return sorted(largest, key=lambda s: s.id)

    def handle_shutdown(self, request: Request, session: Session | None) -> dict[str, Any]:
        log.info("shutdown requested over the control socket")
        self.stop.set()
        return {"stopping": True}
