"""The daemon's ops: one handler per op, in two tables that :meth:`Server.dispatch` looks up.

* :data:`SESSIONLESS_OPS` holds a handler ``(context, request, peer) -> result`` for each
  op that needs no session token (``protocol.SESSIONLESS_OPS``: ping, register, stats,
  shutdown); ``peer`` is the sender as the transport attests it (NOTE [Peer credentials]
  in tenants.py).
* :data:`SESSION_OPS` holds a handler ``(context, request, session) -> result`` for each
  op that acts for the caller's session: every other op, plus stats, which with a token
  adds the caller's own summary. Dispatch has already found the session by its token
  (or answered UNKNOWN_SESSION), so a session handler's session is never None.

A token sent with an op that has no session handler (ping, register, shutdown) is still
checked and refreshes its session's liveness; the handler does not see it.

Handlers get an :class:`OpContext`: the daemon's state without its sockets (settings,
pool, session table, stop event, counters, optional metrics). The server owns one and
passes it to every call, so a test can drive any handler, or ``dispatch``, without a
socket. A handler returns the ``result`` map of an ok reply and raises a
:class:`~storm_service.errors.RemoteError` to refuse; dispatch maps it to an error reply.
Handlers never block and never touch a socket.

NOTE [Stats between tenants]
  ``stats`` lists sessions (pid, name, rank, bytes) only to their own tenant: an
  operator (the daemon's uid, or root) sees every session; any other caller sees its own
  tenant's sessions, and of the others only ``tenants``, each tenant's totals (sessions
  and bytes), and the daemon-wide counts. Tokens, nonces and handles are never shown.
"""

from __future__ import annotations

import heapq
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from storm_service.config import DaemonConfig
from storm_service.device.backend import CPU
from storm_service.endpoints import pid_namespace
from storm_service.errors import (
    ActivationLostError,
    ForbiddenError,
    NotCommittedError,
    PoolFullError,
    QuotaExceededError,
    RemoteError,
    SessionLimitError,
)
from storm_service.extents import Extent, ExtentState
from storm_service.pool import Pool
from storm_service.protocol import MAX_LISTED_SESSIONS, MAX_SIZE_BYTES, Op, Request
from storm_service.session import Session
from storm_service.sessions import SessionTable
from storm_service.tenants import Peer
from storm_service.units import format_bytes

if TYPE_CHECKING:
    from storm_service.metrics import Metrics

__all__ = ["SESSIONLESS_OPS", "SESSION_OPS", "OpContext", "Parked", "SessionHandler", "SessionlessHandler"]

log = logging.getLogger("stormd.server")


@dataclass
class OpContext:
    """What a handler may read and change: the daemon's state, without its sockets."""

    config: DaemonConfig
    pool: Pool
    sessions: SessionTable
    stop: threading.Event
    """Set (by a signal, ``stormctl shutdown`` or the caller) to end the serving loop."""
    started: float = field(default_factory=time.time)
    """Wall-clock start time, for ``uptime_s``."""
    requests: Counter[str] = field(default_factory=Counter)
    """Requests decoded, per op (counted by dispatch)."""
    errors: Counter[str] = field(default_factory=Counter)
    """Error replies, per code (counted by dispatch)."""
    dropped_replies: int = 0
    """Replies the loop could not send (their client left, or stopped reading)."""
    connection_resets: int = 0
    """Times the memory guard dropped every connection (NOTE [Buffered messages] in memory_guard.py)."""
    refused_registers: int = 0
    """Registers refused by a cap on sessions."""
    metrics: Metrics | None = None
    """The Prometheus registry when ``--metrics-port`` is set."""
    pause: Callable[[Session], None] = lambda session: None
    """Called by a handler every PAUSE_EVERY items of a batch: the server answers other sessions'
    queued messages there (NOTE [Serving around a long request] in server.py)."""
    answer_now: bool = False
    """Set while a parked fetch is answered for the last time: with what is in host memory, maybe nothing."""
    fd_socket: str = ""
    """Where clients get slab fds (NOTE [Lending by descriptor] in lending.py); set once bound."""


SessionlessHandler = Callable[[OpContext, Request, Peer], dict[str, Any]]
PAUSE_EVERY = 128
"""Items of a batch handled between two pauses (about 1 ms: NOTE [Serving around a long request])."""
SessionHandler = Callable[[OpContext, Request, Session], dict[str, Any]]


# -- sessionless ops ---------------------------------------------------------------


def handle_ping(context: OpContext, request: Request, peer: Peer) -> dict[str, Any]:
    return {"pid": os.getpid(), "uptime_s": round(time.time() - context.started, 3)}


def handle_register(context: OpContext, request: Request, peer: Peer) -> dict[str, Any]:
    """Open a session of the peer's tenant, or with a known ``(pid, nonce)`` answer for its
    session again (NOTE [Register nonce]); SESSION_LIMIT past a cap on sessions."""
    args = request.args
    nonce: str | None = args.get("nonce")
    session = context.sessions.by_nonce(args["pid"], nonce) if nonce is not None else None
    if session is not None and session.tenant.name == peer.tenant:
        session.last_seen = time.monotonic()
        log.info("session %d registered again (a retried register: same pid and nonce)", session.id)
        return _registration(context, session)
    config = context.config
    memory = context.sessions.memory_bytes
    limit = config.max_quota or memory
    quota = min(args.get("quota_bytes", config.quota or memory), limit)
    try:
        session = context.sessions.open(
            pid=args["pid"],
            name=args.get("name", ""),
            quota_bytes=quota,
            rank=args.get("rank"),
            world_size=args.get("world_size"),
            pid_ns=args.get("pid_ns"),
            nonce=nonce,
            tenant=peer.tenant,
            operator=peer.is_operator,
        )
    except SessionLimitError as e:
        context.refused_registers += 1
        refused = context.refused_registers
        if refused & (refused - 1) == 0:  # the 1st, 2nd, 4th, 8th...: a flood of registers cannot flood the log
            log.warning(
                "refused a register from %s (pid %s): %s [%d refused so far]", peer.tenant, peer.pid, e, refused
            )
        raise
    log.info(
        "session %d registered: pid %d %s rank %s quota %s (%s)",
        session.id,
        session.pid,
        session.name or "unnamed",
        session.rank,
        format_bytes(quota),
        session.tenant.name,
    )
    return _registration(context, session)


def _registration(context: OpContext, session: Session) -> dict[str, Any]:
    """The register result for ``session``: the same for its first register and any replay."""
    return {
        "session_id": session.id,
        "token": session.token,
        "fd_socket": context.fd_socket,
        "alignment": context.pool.alignment,
        "disk_tier": context.sessions.tier is not None,
        "device_tier": _device_refusal(context, session) == "",
        "device_tier_refused": _device_refusal(context, session),
        "quota_bytes": session.quota_bytes,
        "heartbeat_interval_s": context.config.heartbeat_timeout / 3,
        "heartbeat_timeout_s": context.config.heartbeat_timeout,
        "daemon_pid": os.getpid(),
        "pid_ns": pid_namespace(),
    }


def _device_refusal(context: OpContext, session: Session) -> str:
    """Why ``session`` gets no device memory ('' when it may: NOTE [Device tier] in storm_service/device/tier.py)."""
    device = context.sessions.device
    return device.refusal(session, context.sessions.own_pid_ns) if device is not None else ""


def handle_stats(context: OpContext, request: Request, peer: Peer) -> dict[str, Any]:
    """Pool occupancy, and sessions as the caller may see them (NOTE [Stats between tenants])."""
    return _stats(context, None if peer.is_operator else peer.tenant)


def _stats(context: OpContext, tenant: str | None) -> dict[str, Any]:
    """What stats answers; ``tenant`` limits the sessions listed to that tenant's (None: all)."""
    pool, sessions = context.pool, context.sessions
    visible = [s for s in sessions.sessions.values() if tenant is None or s.tenant.name == tenant]
    return (
        {
            "daemon_pid": os.getpid(),
            "uptime_s": round(time.time() - context.started, 3),
            "pool_bytes": pool.size_bytes,
            "used_bytes": sessions.used_bytes,
            "reserved_bytes": sessions.reserved_bytes,
            "reclaiming_bytes": sessions.reclaiming_bytes,
            "free_bytes": pool.free_bytes,
            "largest_free_bytes": pool.largest_free_bytes,
            "slabs": len(pool.slabs),
            "free_slabs": pool.free_slabs,
            "fenced_bytes": sessions.fenced_bytes,
            "disk_tier": sessions.tier is not None,
            "device_tier": sessions.device is not None,
            "extents": len(sessions.extents),
            "sessions": [s.summary() for s in _listed(visible)],
            "tenants": _tenant_totals(sessions),
            "live_sessions": len(sessions.sessions),
            "expired_sessions": sessions.expired_total,
            "requests": dict(context.requests),
            "errors": dict(context.errors),
            "dropped_replies": context.dropped_replies,
            "connection_resets": context.connection_resets,
            "refused_registers": context.refused_registers,
        }
        | (sessions.tier.stats() if sessions.tier is not None else {})
        | (sessions.device.stats() if sessions.device is not None else {})
    )


def _tenant_totals(table: SessionTable) -> list[dict[str, Any]]:
    """Each tenant's open sessions and bytes; past MAX_LISTED_SESSIONS tenants, those holding the most."""
    totals: dict[str, dict[str, Any]] = {}
    for usage in table.tenants.values():
        totals[usage.name] = {"tenant": usage.name, "sessions": usage.sessions, "used_bytes": 0, "reserved_bytes": 0}
    for session in table.sessions.values():
        entry = totals[session.tenant.name]
        entry["used_bytes"] += session.used_bytes
        entry["reserved_bytes"] += session.reserved_bytes
    listed = heapq.nsmallest(MAX_LISTED_SESSIONS, totals.values(), key=lambda t: -t["used_bytes"] - t["reserved_bytes"])
    return sorted(listed, key=lambda t: str(t["tenant"]))


def _listed(sessions: list[Session]) -> list[Session]:
    """Every session, or past MAX_LISTED_SESSIONS those holding the most bytes; in id order."""
    if len(sessions) <= MAX_LISTED_SESSIONS:
        return sessions
    largest = heapq.nsmallest(MAX_LISTED_SESSIONS, sessions, key=lambda s: (-s.held_bytes, s.id))
    return sorted(largest, key=lambda s: s.id)


def handle_shutdown(context: OpContext, request: Request, peer: Peer) -> dict[str, Any]:
    """Stop the daemon; only for its operators (its uid, or root), FORBIDDEN for anyone else."""
    if not peer.is_operator:
        log.warning("refused a shutdown from %s (pid %s)", peer.tenant, peer.pid)
        raise ForbiddenError(f"shutdown: only uid {os.getuid()} (the daemon's) or root may stop it, not {peer.tenant}")
    log.info("shutdown requested over the control socket by %s (pid %s)", peer.tenant, peer.pid)
    context.stop.set()
    return {"stopping": True}


# -- session ops -------------------------------------------------------------------


def handle_unregister(context: OpContext, request: Request, session: Session) -> dict[str, Any]:
    freed = context.sessions.close(session)
    log.info("session %d unregistered; freeing %s", session.id, format_bytes(freed))
    return {"freed_bytes": freed}


def handle_heartbeat(context: OpContext, request: Request, session: Session) -> dict[str, Any]:
    return {"used_bytes": session.used_bytes}


def handle_offload(context: OpContext, request: Request, session: Session) -> dict[str, Any]:
    """Reserve PAUSE_EVERY sizes at a time, pausing between; all or nothing: when a part is refused
    (its message gives that part's numbers), the parts already reserved go back."""
    sizes, layer_id, device = request.args["sizes"], request.args.get("layer_id"), request.args.get("device", CPU)
    extents: list[Extent] = []
    locations: list[dict[str, int]] = []
    try:
        for start in range(0, len(sizes), PAUSE_EVERY):
            if start:
                context.pause(session)
            part = context.sessions.reserve(session, sizes[start : start + PAUSE_EVERY], layer_id, device)
            extents += part
            locations += [e.location() for e in part]
    except RemoteError:
        for extent in extents:
            context.sessions.release(session, extent)
        raise
    return {"extents": locations}


def _owned_all(context: OpContext, request: Request, session: Session) -> list[Extent]:
    # Validate the whole batch before changing anything, so a bad handle changes nothing.
    handles = dict.fromkeys(request.args["handles"])
    return [context.sessions.owned(session, handle, request.op.value) for handle in handles]


def handle_commit(context: OpContext, request: Request, session: Session) -> dict[str, Any]:
    extents = _owned_all(context, request, session)
    committed = sum(context.sessions.commit(session, extent) for extent in extents)
    args = request.args
    session.dedup_saved_bytes = min(session.dedup_saved_bytes + args.get("dedup_saved_bytes", 0), MAX_SIZE_BYTES)
    session.span_saved_bytes = min(session.span_saved_bytes + args.get("span_saved_bytes", 0), MAX_SIZE_BYTES)
    if context.metrics is not None:
        context.metrics.offloaded.inc(committed)
    return {"committed": len(extents)}


class Parked(Exception):
    """A fetch waits for extents the disk tier is reading back: the server answers it again once
    they are in host memory (NOTE [Disk tier] in storm_service/disk/tier.py)."""


def handle_fetch(context: OpContext, request: Request, session: Session) -> dict[str, Any]:
    """Where each extent's bytes are now: with a disk tier, for the run of extents from the first that
    is in host memory (the client asks again for the rest), parked while that is none (NOTE [Disk tier])."""
    extents = _owned_all(context, request, session)
    for extent in extents:
        if extent.state is not ExtentState.COMMITTED:
            raise NotCommittedError(f"fetch: handle {extent.handle} was never committed")
        if extent.lost:
            raise ActivationLostError(f"fetch: handle {extent.handle} is lost: {extent.lost}")
    tier = context.sessions.tier
    if tier is not None:
        wait = bool(request.args.get("wait", 1))
        ready = tier.fetching(session, extents, wait)
        filled = tier.stuck(session, extents[0]) if ready == 0 and wait else 0
        if filled:
            what = "pool" if filled == context.pool.size_bytes else "quota"
            error = PoolFullError if what == "pool" else QuotaExceededError
            raise error(
                f"fetch: no room to read handle {extents[0].handle} back from disk: this session's extents fetched "
                f"and not freed, and reserved, fill its {format_bytes(filled)} {what}; free some"
            )
        if ready == 0 and wait and not context.answer_now:
            raise Parked
        extents = extents[:ready]
    if context.sessions.device is not None:
        context.sessions.device.fetching(session, extents)
    fetched = sum(e.size_bytes for e in extents)
    session.fetched_bytes += fetched
    if context.metrics is not None:
        context.metrics.fetched.inc(fetched)
    return {"extents": [e.location() for e in extents]}


def handle_free(context: OpContext, request: Request, session: Session) -> dict[str, Any]:
    extents = _owned_all(context, request, session)
    freed = 0
    for index, extent in enumerate(extents):
        if index and index % PAUSE_EVERY == 0:
            context.pause(session)
        freed += context.sessions.release(session, extent)
    return {"freed": len(extents), "freed_bytes": freed}


def handle_session_stats(context: OpContext, request: Request, session: Session) -> dict[str, Any]:
    """:func:`handle_stats` as the session's tenant sees it, plus ``session``: the caller's own
    summary with its ``layer_bytes``."""
    layer_bytes = {str(k): v for k, v in sorted(session.layer_bytes.items())}
    stats = _stats(context, None if session.tenant.operator else session.tenant.name)
    return stats | {"session": session.summary() | {"layer_bytes": layer_bytes}}


SESSIONLESS_OPS: dict[Op, SessionlessHandler] = {
    Op.PING: handle_ping,
    Op.REGISTER: handle_register,
    Op.STATS: handle_stats,
    Op.SHUTDOWN: handle_shutdown,
}
"""Handlers of the ops that need no token: exactly ``protocol.SESSIONLESS_OPS``."""

SESSION_OPS: dict[Op, SessionHandler] = {
    Op.UNREGISTER: handle_unregister,
    Op.HEARTBEAT: handle_heartbeat,
    Op.OFFLOAD: handle_offload,
    Op.COMMIT: handle_commit,
    Op.FETCH: handle_fetch,
    Op.FREE: handle_free,
    Op.STATS: handle_session_stats,
}
"""Handlers of the ops that act for the caller's session (stats is in both tables)."""
