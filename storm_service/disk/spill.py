"""The disk tier's spill side: making room in host memory (NOTE [Disk tier] in tier.py).

Extents are written out, the one wanted last first (NOTE [Time to next use] in
storm_service/profile.py), until the pool is back under the tier's target, counting what is already
being written; a session whose quota keeps out the extent it waits for has its own
written first. When nothing is left to write out and room is wanted now, the host copy
of an extent read ahead is dropped instead: its disk copy was kept.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from storm_service.disk.held import Busy, Held
from storm_service.disk.io import DiskIO
from storm_service.disk.space import SpillSpace
from storm_service.extents import Extent, Residence
from storm_service.pool import Pool
from storm_service.units import format_bytes

if TYPE_CHECKING:
    from storm_service.session import Session

__all__ = ["SPILL", "SPILLS_PER_BALANCE", "SPILL_IN_FLIGHT_BYTES", "Spiller"]

log = logging.getLogger("stormd.disk")

SPILL_IN_FLIGHT_BYTES = 256 << 20
"""Bytes being written at once, at most: enough to keep every file's queue full."""
SPILLS_PER_BALANCE = 64
"""Victims chosen per call, at most, so one call never holds the loop for long."""
SPILL = "spill"
"""The kind in a write's I/O tag ``(kind, extent, held)``."""


class Spiller:
    """Writes extents out and takes the finished writes; drops extents read ahead for room wanted now."""

    def __init__(self, pool: Pool, io: DiskIO, space: SpillSpace, held: dict[int, Held]) -> None:
        self.pool = pool
        self.io = io
        self._space = space
        self._held = held
        """The tier's sessions, by id (the tier's own map)."""
        self._over_quota: set[int] = set()
        """Sessions whose wanted extent waits for their own extents to go to disk (their quota is full)."""
        self.spilling_bytes = 0
        self.busy = Busy()
        self.spilled_total = self.spill_errors = self.disk_full = self.evicted = 0

    def spill(self, target: int, evict: bool) -> None:
        """Write out victims until the host bytes in use, less those being written, are down to
        ``target``; with ``evict`` (room is wanted now), drop what was read ahead once none is left."""
        now = time.monotonic()
        excess = self.pool.used_bytes - self.spilling_bytes - target
        for _ in range(SPILLS_PER_BALANCE):
            if excess <= 0 or self.spilling_bytes >= SPILL_IN_FLIGHT_BYTES:
                return
            held, share_full = self._victim(now)
            if held is None:  # nothing to write out: drop what was read ahead, if room is wanted now
                freed = self._evict() if evict else 0
                if not freed:
                    if share_full:
                        self._full(excess)
                    return
                excess -= freed
                continue
            extent = held.resident.peekitem(0)[1]
            if not self._spill_one(held, extent):
                self._full(excess)
                return
            excess -= extent.length

    def want_quota_room(self, held: Held, over_bytes: int) -> None:
        """``held``'s session waits for an extent that would take it ``over_bytes`` past its quota:
        write that much of its own out first (:meth:`spill_over_quota`)."""
        held.quota_room = max(held.quota_room, over_bytes)
        self._over_quota.add(held.session.id)

    def quota_met(self, held: Held) -> None:
        """The extent ``held``'s session waited for fits in its quota now."""
        held.quota_room = 0
        self._over_quota.discard(held.session.id)

    def spill_over_quota(self) -> None:
        """Write out the oldest extents of sessions whose wanted extent would take them past their quota."""
        for session_id in list(self._over_quota):
            held = self._held.get(session_id)
            if held is None or held.quota_room <= 0:
                self._over_quota.discard(session_id)
                continue
            while held.resident and held.spilling_bytes < held.quota_room:
                if not self._spill_one(held, held.resident.peekitem(0)[1]):
                    return
            if not held.resident:
                self._over_quota.discard(session_id)

    def spilled(self, held: Held, extent: Extent, error: OSError | None) -> None:
        """A write finished: the extent is on disk only, or (failed, freed or pinned meanwhile) in host memory."""
        self.busy.end()
        held.spilling_bytes -= extent.length
        self.spilling_bytes -= extent.length
        session = held.session
        if error is not None or extent.freed or extent.pinned:
            self._space.release(extent)
            extent.residence = Residence.HOST
            if error is not None:
                self.spill_errors += 1
                log.warning("spill of %s failed (it stays in host memory): %s", format_bytes(extent.length), error)
            if extent.freed:
                self.pool.free(extent.slab, extent.offset)
            return
        self.pool.free(extent.slab, extent.offset)
        extent.residence = Residence.DISK
        session.used_bytes -= extent.length
        session.tenant.held_bytes -= extent.length
        session.disk_bytes += extent.length
        held.on_disk[(extent.committed_at, extent.handle)] = extent
        self.spilled_total += extent.size_bytes

    def _spill_one(self, held: Held, extent: Extent) -> bool:
        """Start writing ``extent`` out; False when the spill files have no room for it."""
        where = self._space.allocate(extent.length)
        if where is None:
            return False
        del held.resident[(extent.committed_at, extent.handle)]
        extent.residence, extent.disk = Residence.SPILLING, where
        held.spilling_bytes += extent.length
        self.spilling_bytes += extent.length
        self.busy.start()
        self.io.write(
            where[0], where[1], self.pool.view(extent.slab, extent.offset, extent.length), (SPILL, extent, held)
        )
        return True

    def _victim(self, now: float) -> tuple[Held | None, bool]:
        """The session whose oldest spillable extent is wanted last (NOTE [Time to next use]), and
        whether a session was passed over because its share of the disk is used up."""
        best, best_time, share_full = None, float("-inf"), False
        for held in self._held.values():
            if not held.resident:
                continue
            extent = held.resident.peekitem(0)[1]
            session = held.session
            if session.disk_bytes + held.spilling_bytes + extent.length > self._disk_quota(session):
                share_full = True
                continue
            when = held.profile.time_to_use(extent.committed_at, now)
            if when > best_time:
                best, best_time = held, when
        return best, share_full

    def _disk_quota(self, session: Session) -> int:
        """The bytes ``session`` may hold on disk: the share of the disk its quota is of the pool."""
        return self._space.size_bytes * min(session.quota_bytes, self.pool.size_bytes) // self.pool.size_bytes

    def _full(self, excess: int) -> None:
        """No disk room for a victim: the spill files, or its session's share of them, are full."""
        self.disk_full += 1
        if self.disk_full & (self.disk_full - 1) == 0:  # 1st, 2nd, 4th...: a full disk cannot flood the log
            log.warning("the disk tier is full: %s past the high water stay in host memory", format_bytes(excess))

    def _evict(self) -> int:
        """Drop the host copy of one extent read ahead (the one wanted last), for room a waiting
        fetch or a refused offload needs; returns its length (0: none was read ahead)."""
        for held in self._held.values():
            if held.ahead:
                key, extent = held.ahead.popitem(0)
                extent.ahead = False
                held.ahead_bytes -= extent.length
                self.pool.free(extent.slab, extent.offset)
                extent.residence = Residence.DISK
                held.session.used_bytes -= extent.length
                held.session.tenant.held_bytes -= extent.length
                held.on_disk[key] = extent
                self.evicted += 1
                return extent.length
        return 0
