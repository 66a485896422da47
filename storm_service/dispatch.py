"""From a request frame to its reply frame: the one place where exceptions become error codes.

Every frame is decoded and validated by :mod:`storm_service.protocol` before any handler
runs; the handlers live in :mod:`storm_service.ops`. A mutating request whose id its
session remembers is answered from that memory, not applied again (NOTE [Replay memory]
in replay.py). While a session's long request is paused (NOTE [Serving around a long
request] in server.py) its other requests are not answered here: the server sets them
aside until that request's reply is sent. A fetch that waits for the disk tier raises
:class:`~storm_service.ops.Parked` out of :meth:`Dispatcher.reply`: the only exception
that leaves it (storm_service/disk/parking.py answers it later).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from storm_service import ops
from storm_service.errors import ErrorCode, RemoteError, ShuttingDownError
from storm_service.ops import OpContext
from storm_service.protocol import MUTATING_OPS, SESSIONLESS_OPS, Invalid, Op, decode_request, encode_error, encode_ok
from storm_service.session import Session
from storm_service.tenants import Peer

__all__ = ["Dispatcher"]

log = logging.getLogger("stormd.server")


class Dispatcher:
    """Answers request frames against an :class:`OpContext`; never raises (every failure is an error reply)."""

    def __init__(self, context: OpContext) -> None:
        self.context = context
        self.busy: Session | None = None
        """The session whose long request is paused: its requests are set aside (NOTE [Serving around a
        long request])."""

    def reply(self, frame: bytes, peer: Callable[[], Peer]) -> bytes | None:
        """The reply frame to one request frame, or None when it is the busy session's and must wait;
        ``peer`` is called only by ops that need the sender. Raises Parked for a fetch that waits for
        the disk tier."""
        metrics = self.context.metrics
        if metrics is None:
            return self._dispatch(frame, peer)[0]
        started = time.perf_counter()
        reply, op = self._dispatch(frame, peer)
        if reply is not None:
            metrics.latency.labels(op).observe(time.perf_counter() - started)
        return reply

    def _dispatch(self, frame: bytes, peer: Callable[[], Peer]) -> tuple[bytes | None, str]:
        """The reply to one frame, and the op it named ("invalid" if none)."""
        context = self.context
        request_id: int | None = None
        op = "invalid"
        try:
            request = decode_request(frame)
            op, request_id = request.op, request.id  # op: a StrEnum, usable as its name
            if self.busy is not None and request.token == self.busy.token:
                return None, op
            context.requests[op] += 1
            if op is not Op.PING and context.stop.is_set():
                raise ShuttingDownError(f"{op}: the daemon is shutting down")
            if request.token is None and op in SESSIONLESS_OPS:
                return encode_ok(request_id, ops.SESSIONLESS_OPS[op](context, request, peer())), op
            session = context.sessions.by_token(request.token)  # UNKNOWN_SESSION when it names none
            session.last_seen = time.monotonic()
            mutating = op in MUTATING_OPS
            if mutating and (remembered := session.replies.get(request_id)) is not None:
                return remembered, op
            handler = ops.SESSION_OPS.get(op)
            if handler is None:  # ping, register, shutdown: the token was checked, the op ignores it
                result = ops.SESSIONLESS_OPS[op](context, request, peer())
            else:
                result = handler(context, request, session)
            reply = encode_ok(request_id, result)
            if mutating:
                session.replies.remember(request_id, reply)
            return reply, op
        except ops.Parked:
            raise
        except Invalid as e:
            return self._error(e.request_id, e.code, e.message), op
        except RemoteError as e:
            return self._error(request_id, e.code, e.message), op
        except Exception as e:
            log.exception("internal error while serving request %s", request_id)
            return self._error(request_id, ErrorCode.INTERNAL, f"internal error: {type(e).__name__}: {e}"), op

    def _error(self, request_id: int | None, code: ErrorCode, message: str) -> bytes:
        self.context.errors[code.value] += 1
        log.debug("request %s failed: %s %s", request_id, code.value, message)
        return encode_error(request_id, code, message)
