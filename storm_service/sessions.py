"""Sessions (one per registered client) and the extents they hold (NOTE [Extent lifetime] in extents.py).

NOTE [Layer stats cap]
  A session's ``layer_bytes`` (pool bytes per layer id, reported by stats) keeps at most
  ``MAX_SESSION_LAYERS`` layer ids apart, so that a stats reply always decodes (NOTE
  [Decoder limits] in ``storm_service/protocol.py``). An extent whose layer id is new
  while that many others hold bytes is counted under ``OVERFLOW_LAYER_ID`` instead; the
  offload itself is never refused: training must not fail because of stats. Each extent
  remembers the key it was counted under, so its bytes leave that same key when freed,
  and a layer id whose bytes are all freed gives its place back.

NOTE [Register nonce]
  A client may send a ``nonce`` (a random string, MIN_NONCE_LEN to MAX_NONCE_LEN
  characters) with ``register``, so that a retried register does not open a second
  session. The table maps ``(pid, nonce)`` to the session that register opened; a register
  naming a pair already mapped gets that session back, unchanged (the retry's other
  fields are not compared). The pid is part of the key so that a forked child that
  inherited its parent's nonce still gets a session of its own. An entry lives exactly as
  long as its session (``close`` drops it), so the map holds at most one entry per live
  session and cannot outgrow the session table; a retry that arrives after its session
  ended opens a new one. A nonce finds a session's token, so it is as secret as one, and
  is never logged.

NOTE [Bounded work per request]
  No request, and no expiry, may hold the serving loop for long: every other client
  waits behind it. Allocating and freeing one extent cost O(log n) (NOTE [Indexed free
  space] in allocator.py), a batch at most MAX_BATCH of them, and a session holds at
  most ``--max-extents``. Closing a session (unregister, expiry) ends it at once (its
  token and handles stop working, its tenant's session count drops) but returns its
  extents to the pool RECLAIM_SLICE at a time between requests (:meth:`SessionTable.reclaim`),
  so that closing a session of a million extents (seconds of frees) never delays a
  bystander's ping by more than one slice. Until then those bytes are counted in
  ``reclaiming_bytes`` and still in the pool's and the tenant's totals.
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections import deque
from typing import TYPE_CHECKING

from storm_service.device.backend import CPU
from storm_service.endpoints import pid_alive, pid_namespace
from storm_service.errors import (
    ForbiddenError,
    PoolFullError,
    QuotaExceededError,
    UnknownHandleError,
    UnknownSessionError,
)
from storm_service.extents import Extent, ExtentState, Residence
from storm_service.pidfds import close_pidfd, exited
from storm_service.pool import Pool
from storm_service.protocol import MAX_SESSION_LAYERS, OVERFLOW_LAYER_ID
from storm_service.session import Session
from storm_service.tenants import Limits, TenantUsage

if TYPE_CHECKING:
    from storm_service.device.tier import DeviceTier
    from storm_service.disk.tier import DiskTier

__all__ = ["RECLAIM_SLICE", "SessionTable"]

RECLAIM_SLICE = 256
"""Extents of closed sessions freed between two requests (NOTE [Bounded work per request])."""


class SessionTable:
    """Every live session and every extent, with ownership checks on each access."""

    def __init__(
        self, pool: Pool, limits: Limits | None = None, tier: DiskTier | None = None, device: DeviceTier | None = None
    ) -> None:
        self.pool = pool
        self.limits = limits or Limits()
        self.tier = tier
        """The disk tier, with ``--spill-dir`` (storm_service/disk/tier.py)."""
        self.device = device
        """The device tier, with ``--device-pool`` (storm_service/device/tier.py)."""
        self.sessions: dict[int, Session] = {}
        self.tenants: dict[str, TenantUsage] = {}
        """Every tenant with an open session or bytes still in the pool."""
        self._closed: deque[Session] = deque()
        self._fenced: list[Session] = []
        """Expired sessions whose process may still run: their extents stay allocated (NOTE [Fencing] in pidfds.py)."""
        """Closed sessions whose extents are not all back in the pool yet (NOTE [Bounded work per request])."""
        self._by_token: dict[str, Session] = {}
        self._by_nonce: dict[tuple[int, str], Session] = {}
        """At most one entry per live session (NOTE [Register nonce])."""
        self.extents: dict[int, Extent] = {}
        self._session_ids = itertools.count(1)
        self._handles = itertools.count(1)
        self.expired_total = 0
        self.reserved_bytes = 0
        """Bytes of host extents allocated but not yet committed (NOTE [Extent lifetime])."""
        self.own_pid_ns = pid_namespace()

    def open(
        self,
        pid: int,
        name: str,
        quota_bytes: int,
        rank: int | None = None,
        world_size: int | None = None,
        pid_ns: int | None = None,
        nonce: str | None = None,
        tenant: str = "unknown",
        operator: bool = False,
    ) -> Session:
        """A new session of ``tenant``; with a ``nonce``, findable by :meth:`by_nonce` until it closes.

        SessionLimitError when the daemon has ``max_sessions`` open, or the tenant
        ``max_tenant_sessions``.
        """
        usage = self.tenants.get(tenant) or TenantUsage(tenant, operator)
        self.limits.admit(len(self.sessions) + len(self._fenced), usage)
        self.tenants[tenant] = usage
        usage.sessions += 1
        session = Session(
            id=next(self._session_ids),
            token=secrets.token_urlsafe(24),
            pid=pid,
            name=name,
            rank=rank,
            world_size=world_size,
            quota_bytes=quota_bytes,
            pid_ns=pid_ns,
            last_seen=time.monotonic(),
            tenant=usage,
            nonce=nonce,
        )
        self.sessions[session.id] = session
        self._by_token[session.token] = session
        if nonce is not None:
            self._by_nonce[(pid, nonce)] = session
        return session

    def by_nonce(self, pid: int, nonce: str) -> Session | None:
        """The live session a register from ``pid`` with ``nonce`` opened, if any (NOTE [Register nonce])."""
        return self._by_nonce.get((pid, nonce))

    def by_token(self, token: str | None) -> Session:
        session = self._by_token.get(token) if token is not None else None
        if session is None:
            raise UnknownSessionError("the token names no live session (expired, unregistered, or never registered)")
        return session

    def owned(self, session: Session, handle: int, op: str) -> Extent:
        extent = self.extents.get(handle)
        if extent is None:
            raise UnknownHandleError(f"{op}: handle {handle} names no extent")
        if extent.session_id != session.id:
            raise ForbiddenError(f"{op}: handle {handle} belongs to another session")
        return extent

    def reserve(self, session: Session, sizes: list[int], layer_id: int | None, device: str = CPU) -> list[Extent]:
        """One new WRITING extent per size, in order, all or nothing; each in the device tier where
        ``device`` (the tensors' device) gains by it and it has room, else in the host pool.

        The quotas are checked first, against the sizes as the allocator rounds them: past
        the session's, its cap on extents or its tenant's, QuotaExceededError (a quota as
        large as the memory tiers never binds before they do).
        Then each size is allocated; when one does not fit, the extents already placed go
        back to the pool and PoolFullError is raised. Either way a refused reservation
        leaves the pool and the session as they were.
        """
        # Every allocator of a pool rounds to the same alignment: the first one's rounding is the pool's.
        round_up = self.pool.round_up
        need = sum(round_up(size) for size in sizes)
        if session.held_bytes + need > session.quota_bytes < self.memory_bytes:
            raise QuotaExceededError(
                f"offload: {need} bytes requested, {session.quota_bytes - session.held_bytes} "
                f"left of a {session.quota_bytes}-byte quota"
            )
        self.limits.check_offload(len(session.handles), len(sizes), need, session.tenant)
        placed: list[tuple[int, int, int]] = []
        for size in sizes:
            where = self._place(session, device, size)
            if where is None:
                for slab, offset, _ in placed:
                    self._unplace(slab, offset)
                if self.tier is not None:
                    self.tier.refused(need)
                raise PoolFullError(
                    f"offload: {need} bytes requested, {self.pool.free_bytes} free "
                    f"(largest free extent {self.pool.largest_free_bytes})"
                )
            placed.append(where)
        return [
            self._add_extent(session, slab, offset, length, size, layer_id)
            for (slab, offset, length), size in zip(placed, sizes, strict=True)
        ]

    def _place(self, session: Session, device: str, size: int) -> tuple[int, int, int] | None:
        if self.device is not None:
            where = self.device.place(session, device, size, self.own_pid_ns)
            if where is not None:
                return where
        return self.pool.allocate(session.tenant.name, size)

    def _unplace(self, slab: int, offset: int) -> None:
        if self.device is not None and self.device.holds(slab):
            self.device.unplace(slab, offset)
        else:
            self.pool.free(slab, offset)

    def _add_extent(
        self, session: Session, slab: int, offset: int, length: int, size_bytes: int, layer_id: int | None
    ) -> Extent:
        if layer_id is not None and layer_id not in session.layer_bytes:
            kept_apart = len(session.layer_bytes) - (OVERFLOW_LAYER_ID in session.layer_bytes)
            if kept_apart >= MAX_SESSION_LAYERS:
                layer_id = OVERFLOW_LAYER_ID
        extent = Extent(next(self._handles), session.id, slab, offset, size_bytes, length, layer_id)
        if self.device is not None and self.device.holds(slab):
            extent.residence = Residence.DEVICE
            session.device_bytes += length
        else:
            self.reserved_bytes += length
        self.extents[extent.handle] = extent
        session.handles.add(extent.handle)
        session.reserved_bytes += length
        session.tenant.held_bytes += length
        session.peak_bytes = max(session.peak_bytes, session.held_bytes)
        if layer_id is not None:
            session.layer_bytes[layer_id] = session.layer_bytes.get(layer_id, 0) + length
        return extent

    def commit(self, session: Session, extent: Extent) -> int:
        """Mark an extent's bytes written; returns its size if this committed it (else 0)."""
        if extent.state is not ExtentState.WRITING:
            return 0
        extent.state = ExtentState.COMMITTED
        extent.committed_at = time.monotonic()
        session.reserved_bytes -= extent.length
        session.used_bytes += extent.length
        session.offloaded_bytes += extent.size_bytes
        if self.tier is not None:
            self.tier.committed(session, extent)  # it may set committed_at: before the device tier keys by it
        if self.device is not None:
            self.device.committed(session, extent)
        if extent.residence is not Residence.DEVICE:
            self.reserved_bytes -= extent.length
        return extent.size_bytes

    def release(self, session: Session, extent: Extent) -> int:
        """Free one extent back to the pool; returns its length."""
        del self.extents[extent.handle]
        in_host = extent.residence is not Residence.DISK
        if extent.residence is Residence.DEVICE:
            session.device_bytes -= extent.length
        if extent.state is ExtentState.WRITING:
            if extent.residence is not Residence.DEVICE:
                self.reserved_bytes -= extent.length
            session.reserved_bytes -= extent.length
        elif in_host:
            session.used_bytes -= extent.length
        session.handles.discard(extent.handle)
        if in_host:
            session.tenant.held_bytes -= extent.length
        if extent.layer_id is not None:
            left = session.layer_bytes.get(extent.layer_id, 0) - extent.length
            if left > 0:
                session.layer_bytes[extent.layer_id] = left
            else:
                session.layer_bytes.pop(extent.layer_id, None)
        if extent.residence is Residence.DEVICE:
            assert self.device is not None
            return self.device.release(extent)
        if self.tier is not None:
            return self.tier.release(session, extent)
        return self.pool.free(extent.slab, extent.offset)

    def close(self, session: Session, fence: bool = False) -> int:
        """End a session now; its extents go back to the pool through :meth:`reclaim`.

        With ``fence`` (expiry), extents, and a pidfd of a process that still runs, they stay
        allocated until it exits (NOTE [Fencing] in pidfds.py); a fenced session still counts
        against the caps on sessions, so that expiring ones cannot pile up without bound.
        Returns the bytes it held (NOTE [Bounded work per request]).
        """
        del self.sessions[session.id]
        del self._by_token[session.token]
        if session.nonce is not None:
            del self._by_nonce[(session.pid, session.nonce)]
        if self.tier is not None:
            self.tier.closed(session)
        if fence and session.handles and session.pidfd is not None and not exited(session.pidfd):
            self._fenced.append(session)
        else:
            session.tenant.sessions -= 1
            self._closed.append(session)
        return session.held_bytes

    def release_fenced(self) -> list[Session]:
        """Reclaim the extents of fenced sessions whose process has exited; returns those sessions."""
        gone = [s for s in self._fenced if s.pidfd is None or exited(s.pidfd)]
        for session in gone:
            self._fenced.remove(session)
            session.tenant.sessions -= 1
            self._closed.append(session)
        return gone

    @property
    def fenced_bytes(self) -> int:
        """Bytes of expired sessions kept while their process may run (NOTE [Fencing] in pidfds.py)."""
        return sum(session.held_bytes for session in self._fenced)

    def reclaim(self, budget: int | None = RECLAIM_SLICE) -> int:
        """Free up to ``budget`` extents of closed sessions (all of them with None); returns how many."""
        freed = 0
        closed = self._closed
        while closed and (budget is None or freed < budget):
            session = closed[0]
            if not session.handles:
                closed.popleft()
                close_pidfd(session.pidfd)
                session.pidfd = None
                if self.tier is not None:
                    self.tier.forget(session)
                if self.device is not None:
                    self.device.forget(session)
                self._forget_tenant(session.tenant)
                continue
            self.release(session, self.extents[session.handles.pop()])
            freed += 1
        return freed

    @property
    def reclaiming(self) -> bool:
        """Whether closed sessions still hold extents (NOTE [Bounded work per request])."""
        return bool(self._closed)

    @property
    def reclaiming_bytes(self) -> int:
        return sum(session.held_bytes for session in self._closed)

    def _forget_tenant(self, tenant: TenantUsage) -> None:
        if tenant.sessions == 0 and tenant.held_bytes == 0 and self.tenants.get(tenant.name) is tenant:
            del self.tenants[tenant.name]

    def step(self) -> None:
        """What the loop does between messages: a slice of closed sessions' extents back (NOTE [Bounded work
        per request]), and a step of moves off the devices of the device tier."""
        if self._closed:
            self.reclaim()
        if self.device is not None:
            self.device.balance(self.sessions)

    @property
    def busy(self) -> bool:
        """Whether :meth:`step` has work left: the loop should not sleep."""
        return bool(self._closed) or (self.device is not None and self.device.pending)

    def shutdown(self) -> None:
        """End every session, give everything back, then close the tiers (the daemon stops)."""
        for session in list(self.sessions.values()):
            self.close(session)
        self.reclaim(None)
        if self.tier is not None:
            self.tier.close()
        if self.device is not None:
            self.device.close()

    @property
    def fds_bound(self) -> int:
        """The most fds the memory tiers hold: host slabs' memfds, and the device tier's."""
        return len(self.pool.slabs) + (self.device.fds_bound if self.device is not None else 0)

    @property
    def memory_bytes(self) -> int:
        """Bytes of every memory tier: the host pool and the device tier (what a default quota is)."""
        return self.pool.size_bytes + (self.device.size_bytes if self.device is not None else 0)

    @property
    def used_bytes(self) -> int:
        """Bytes of committed extents in the pool: what the pool has allocated, less what is reserved."""
        return self.pool.used_bytes - self.reserved_bytes

    def stale(self, timeout_s: float, caught_up_at: float) -> list[Session]:
        """Sessions that sent nothing in the ``timeout_s`` before ``caught_up_at``, or whose process is gone.

        ``caught_up_at`` is when the serving loop last found no message waiting (NOTE
        [Liveness after the queue] in server.py): a session whose message was still
        queued behind a long request then has been heard from by that time.
        """
        own_ns = pid_namespace()
        silent_since = caught_up_at - timeout_s
        return [
            s
            for s in self.sessions.values()
            if s.last_seen < silent_since
            or (s.pid_ns is not None and s.pid_ns == own_ns and not pid_alive(s.pid))
            or (s.pidfd is not None and exited(s.pidfd))
        ]
