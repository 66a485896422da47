"""The protocol client: one DEALER socket per thread, replies matched by request id.

ZeroMQ sockets are not thread-safe, so a :class:`Channel` belongs to the thread that
created it; :class:`~client.system.StormSystem` keeps one per thread. Every wait is
bounded: a request that gets no reply within ``timeout_s`` raises
:class:`StormUnavailableError` (or :class:`StormTimeoutError` when the daemon is known
to be alive), and while waiting the channel polls the daemon's liveness so that a dead
daemon is reported within a tenth of a second where its pid can be checked.

This module imports no torch, so that ``stormctl`` starts fast.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import zmq

from storm_service.errors import ProtocolError, StormTimeoutError, StormUnavailableError, error_for_code
from storm_service.protocol import Op, Reply, decode_reply, encode_request

__all__ = ["Channel", "CurveKeys", "DEFAULT_TIMEOUT_S", "connect"]

log = logging.getLogger("storm.client")

DEFAULT_TIMEOUT_S = 2.0
_POLL_SLICE_S = 0.1


@dataclass(frozen=True)
class CurveKeys:
    """A client's CURVE identity and the daemon's public key (for ``tcp://`` endpoints)."""

    server_public: bytes
    public: bytes
    secret: bytes

    @classmethod
    def load(cls, server_file: str, client_file: str) -> CurveKeys | None:
        """Keys from zmq certificate files (``STORM_CURVE_SERVER_KEY``, ``STORM_CURVE_CLIENT_KEY``).

        None unless both are named.
        """
        if not server_file or not client_file:
            return None
        from zmq.auth import load_certificate

        server_public, _ = load_certificate(server_file)
        public, secret = load_certificate(client_file)
        if secret is None:
            raise ValueError(f"STORM_CURVE_CLIENT_KEY: {client_file} holds no secret key")
        return cls(server_public, public, secret)


class Channel:
    """A DEALER connection to the daemon, owned by one thread.

    ``send`` queues a request and returns its id; ``wait`` blocks for that id's reply;
    ``post`` sends a request whose reply is only checked for errors when it arrives
    (used for commits and frees that nothing waits on).
    """

    def __init__(
        self,
        context: zmq.Context,
        endpoint: str,
        request_ids: Iterator[int],
        *,
        alive: Callable[[], bool] | None = None,
        curve: CurveKeys | None = None,
    ) -> None:
        self.endpoint = endpoint
        self._ids = request_ids
        self._alive = alive
        self.on_async_error: Callable[[Exception], None] | None = None
        """Called with the error of a posted request when its reply arrives."""
        self._early: dict[int, Reply] = {}
        self._posted: dict[int, str] = {}
        self._socket = context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.RCVTIMEO, int(_POLL_SLICE_S * 1000))
        self._socket.setsockopt(zmq.SNDTIMEO, int(DEFAULT_TIMEOUT_S * 1000))  # a DEALER without peers blocks
        if curve is not None:
            self._socket.curve_serverkey = curve.server_public
            self._socket.curve_publickey = curve.public
            self._socket.curve_secretkey = curve.secret
        self._socket.connect(endpoint)

    def send(self, op: Op, token: str | None = None, **fields: Any) -> int:
        request_id = next(self._ids)
        try:
            self._socket.send(encode_request(request_id, op, token, **fields))
        except zmq.Again:
            raise StormUnavailableError(f"{op.value}: cannot send to {self.endpoint}: no connection") from None
        return request_id

    def post(self, op: Op, token: str | None = None, **fields: Any) -> int:
        request_id = self.send(op, token, **fields)
        self._posted[request_id] = op.value
        return request_id

    def call(
        self, op: Op, token: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S, **fields: Any
    ) -> dict[str, Any]:
        return self.wait(self.send(op, token, **fields), op, timeout_s)

    def wait(self, request_id: int, op: Op, timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
        """Block until the reply to ``request_id`` arrives; raise its error if it carries one."""
        reply = self._early.pop(request_id, None) if self._early else None
        deadline = time.monotonic() + timeout_s
        while reply is None:
            try:
                frame = self._socket.recv()  # blocks for at most one poll slice (RCVTIMEO)
            except zmq.Again:
                if time.monotonic() > deadline:
                    self._posted[request_id] = op.value  # a late reply is then read and dropped
                    raise self._no_reply(op, timeout_s) from None
                if self._alive is not None and not self._alive():
                    raise StormUnavailableError(f"{op.value}: the daemon at {self.endpoint} has exited") from None
                continue
            reply = self._take(frame, request_id)
        if not reply.ok:
            raise error_for_code(reply.code, reply.message)
        return reply.result

    def drain(self) -> None:
        """Read every reply already here without blocking (checks posted requests for errors)."""
        while cast(int, self._socket.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            self._take(self._socket.recv(), None)

    def settle(self, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        """Wait until every posted request has been answered."""
        deadline = time.monotonic() + timeout_s
        while self._posted:
            frame = self._recv()
            if frame is not None:
                self._take(frame, None)
            elif time.monotonic() > deadline:
                raise self._no_reply(Op(next(iter(self._posted.values()))), timeout_s)
            elif self._alive is not None and not self._alive():
                raise StormUnavailableError(f"the daemon at {self.endpoint} has exited")

    def close(self) -> None:
        self._socket.close(linger=0)

    def _recv(self) -> bytes | None:
        try:
            return self._socket.recv()
        except zmq.Again:
            return None

    def _take(self, frame: bytes, wanted: int | None) -> Reply | None:
        """Decode one frame; return it if it answers ``wanted``, else file it away."""
        try:
            reply = decode_reply(frame)
        except ProtocolError as e:
            log.warning("ignored a malformed reply: %s", e)
            return None
        if reply.id is None:
            # Only a frame the daemon could not read at all gets an id-less reply.
            raise ProtocolError(f"the daemon could not read a request: {reply.code}: {reply.message}")
        if reply.id == wanted:
            return reply
        op = self._posted.pop(reply.id, None)
        if op is None:
            self._early[reply.id] = reply
        elif not reply.ok:
            error = error_for_code(reply.code, f"{op} (posted): {reply.message}")
            log.error("%s", error)
            if self.on_async_error is not None:
                self.on_async_error(error)
        return None

    def _no_reply(self, op: Op, timeout_s: float) -> Exception:
        if self._alive is not None and self._alive():
            return StormTimeoutError(f"{op.value}: no reply from the daemon at {self.endpoint} within {timeout_s:g} s")
        return StormUnavailableError(f"{op.value}: no daemon answered at {self.endpoint} within {timeout_s:g} s")


@contextlib.contextmanager
def connect(endpoint: str) -> Iterator[Channel]:
    """A channel of its own (context included) for a few sessionless calls: ping, stats, shutdown.

    CURVE keys come from the client settings (``STORM_CURVE_SERVER_KEY``, ``STORM_CURVE_CLIENT_KEY``).
    """
    from client.settings import ClientSettings  # settings imports this module for its defaults

    context = zmq.Context()
    channel = Channel(context, endpoint, itertools.count(1), curve=ClientSettings.load().curve_keys())
    try:
        yield channel
    finally:
        channel.close()
        context.term()
