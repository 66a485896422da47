"""The disk tier: which activations go to disk, when, and how they come back before they are wanted.

NOTE [Disk tier]
  With ``--spill-dir``, host memory is a cache in front of spill files. The loop calls
  :meth:`DiskTier.balance` after every message and :meth:`DiskTier.poll` when the I/O
  threads report (storm_service/disk/io.py); neither waits for a disk.

  Spill. Past the high-water mark (``--spill-high-water`` of the pool in use), committed
  extents are written out until the pool is back under it, counting what is already on
  its way. The victim is the activation wanted last: within a session its oldest
  (backward runs in reverse), across sessions the one with the most time to its next use
  (NOTE [Time to next use] in profile.py). Extents being written (WRITING), answered by a
  fetch (pinned, below) or read back already are never victims. The host space is freed
  only once the write is complete; a fetch meanwhile reads the host copy and keeps it.
  An offload refused for want of room, or an extent a fetch waits for that finds none
  (the free space may be there in pieces too small), moves the mark down by its size,
  more at each refusal, until it fits or ROOM_S pass without one.

  Restore. A fetch is answered for the longest run of its extents, from the first, that
  is in host memory; the client asks again for the rest. With ``wait`` (backward waits
  for the first extent) the first one on disk is read back at once, past the high water
  if need be, and the server parks the request (storm_service/disk/parking.py: nothing
  else waits) until it is back, for at most PARK_S: then it is answered with what there
  is, maybe nothing, so that the client's transfer thread can send the frees that may be
  what makes room. Everything else comes back only below the high water: a prefetch's
  extents, and from a session's first fetch on its newest extents on disk, read ahead
  as backward will ask for them, up to a margin that doubles (to a quarter of the pool)
  each time a fetch has to wait. So reading ahead never makes the spiller write someone
  out. An extent read back lies somewhere new: the reply gives the place.

  Pinned. An extent a fetch answered for stays in host memory until it is freed: a
  client may read it in place. A client prefetching far ahead of backward would so fill
  the pool with extents it needs only later, leaving no room for the one backward waits
  for, which only backward's frees could make: a deadlock. So what fetches answer for,
  beyond the first extent of a waiting fetch, is bounded per session by half the room
  above the high water; past that a fetch answers for less and the client asks again.
  Extents read ahead keep their disk copy until a fetch answers for them: when room is
  wanted now, their host copies are dropped (``evicted_ahead``), wanted last first. The
  pool must still hold the pinned bytes and the largest extent side by side: a pool of
  a few extents can fragment past that (docs/operations.md says how to size it).

  Faults. A failed write (ENOSPC, EIO) leaves the extent in host memory, never to be
  tried again, and is counted; a failed read loses that extent only: its fetch gets
  ACTIVATION_LOST. Space a session freed while I/O used it is freed when the I/O ends.
  The spill files are anonymous (storm_service/disk/files.py), so a killed daemon leaves
  nothing on disk. Each tier is counted apart: host bytes against the session's quota as
  always, disk bytes against the same share of the disk as its quota is of the pool.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, cast

from storm_service.disk.files import SpillFile
from storm_service.disk.held import MIN_MARGIN_BYTES, Busy, Held
from storm_service.disk.io import DiskIO
from storm_service.disk.profile import StepProfile
from storm_service.disk.space import SpillSpace
from storm_service.errors import ActivationLostError
from storm_service.extents import Extent, Residence
from storm_service.pool import Pool
from storm_service.units import format_bytes

if TYPE_CHECKING:
    from storm_service.sessions import Session

__all__ = ["DiskTier"]

log = logging.getLogger("stormd.disk")

SPILL_IN_FLIGHT_BYTES = 256 << 20
"""Bytes being written at once, at most: enough to keep every file's queue full."""
SPILLS_PER_BALANCE = 64
"""Victims chosen per call, at most, so one call never holds the loop for long."""
ROOM_S = 1.0
"""How long the room asked for by a refused offload is kept free after the last refusal."""
_SPILL, _RESTORE = "spill", "restore"


class DiskTier:
    """Spill files, their allocators and I/O, and every session's place in them (NOTE [Disk tier])."""

    def __init__(self, pool: Pool, files: list[SpillFile], io: DiskIO, high_water: float) -> None:
        self.pool = pool
        self.files = files
        self.io = io
        self.high_water_bytes = int(high_water * pool.size_bytes)
        self._space = SpillSpace(files, pool.alignment)
        self._held: dict[int, Held] = {}
        self._wanted: dict[int, Extent] = {}
        """Extents a parked fetch waits for that found no host space yet, by handle, in order."""
        self._reading: set[int] = set()
        """Sessions in backward with extents on disk: read ahead at each balance."""
        self._spilling_bytes = 0
        self._over_quota: set[int] = set()
        """Sessions whose wanted extent waits for their own extents to go to disk (their quota is full)."""
        self._room_wanted = 0
        """Bytes under the high water the spiller frees for refused offloads (:meth:`refused`)."""
        self._room_until = 0.0
        self._max_margin = max(MIN_MARGIN_BYTES, pool.size_bytes // 4)
        self._pin_limit = max(pool.size_bytes - self.high_water_bytes, MIN_MARGIN_BYTES) // 2
        self._spill_busy, self._restore_busy = Busy(), Busy()
        self.spilled_total = self.restored_total = 0
        self.restore_hits = self.restore_waits = 0
        self.spill_errors = self.restore_errors = self.disk_full = self.evicted = 0

    # -- sessions' events -------------------------------------------------------------

    def committed(self, session: Session, extent: Extent) -> None:
        now = time.monotonic()
        held = self._held_by(session, now)
        held.profile.committed(now)
        extent.committed_at = now
        if extent.residence is Residence.HOST:
            held.resident[(now, extent.handle)] = extent

    def moved_in(self, session: Session, extent: Extent) -> None:
        """``extent`` (committed) came into host memory from the device tier: it may be spilled now."""
        self._held_by(session, time.monotonic()).resident[(extent.committed_at, extent.handle)] = extent

    def fetching(self, session: Session, extents: list[Extent], wait: bool = True) -> int:
        """How many of ``extents``, from the first, are in host memory: the fetch answers for those, and
        they stay there (pinned). With ``wait``, the first one on disk comes back at once; the others,
        or all of them for a prefetch, as reading ahead would. ACTIVATION_LOST for one whose read failed."""
        now = time.monotonic()
        held = self._held_by(session, now)
        held.profile.fetched(now)
        ready: int | None = None
        for index, extent in enumerate(extents):
            if extent.lost:
                raise ActivationLostError(f"fetch: handle {extent.handle} is lost: {extent.lost}")
            if extent.residence is Residence.DISK:
                # The first one the reply cannot answer for is wanted now: it may go past the high
                # water, and waits for room if there is none. The rest come back only below it, as
                # reading ahead does: the client asks for them again, and prefetches cannot crowd
                # out the offloads of a forward that runs meanwhile.
                if ready is None and wait and extent.handle not in self._wanted:
                    if not self._restore(held, extent):
                        self._wanted[extent.handle] = extent
                        self.refused(extent.length)
                elif self.pool.used_bytes + extent.length <= self._target:
                    self._restore(held, extent)
            if ready is None and extent.residence in (Residence.DISK, Residence.RESTORING):
                ready = index
        ready = len(extents) if ready is None else ready
        if ready == 0 and wait and not extents[0].waited:  # read back too late: read further ahead
            extents[0].waited = True
            held.margin_bytes = min(2 * held.margin_bytes, self._max_margin)
        for index, extent in enumerate(extents[:ready]):
            if extent.residence is Residence.DEVICE:
                continue  # the device tier's to pin
            if not extent.pinned:
                if held.pinned_bytes + extent.length > self._pin_limit and (index or not wait):
                    ready = index  # answered ahead of backward: bounded (NOTE [Disk tier])
                    break
                extent.pinned = True  # a client may read it in place: never a victim again
                held.resident.pop((extent.committed_at, extent.handle), None)
                held.pinned_bytes += extent.length
                self._not_ahead(held, extent)
                if extent.restored:
                    if extent.waited:
                        self.restore_waits += 1
                    else:
                        self.restore_hits += 1
        if held.on_disk:
            self._reading.add(session.id)
            self._read_ahead(held)
        return ready

    def release(self, session: Session, extent: Extent) -> int:
        """Free ``extent``'s space in every tier, now or when its I/O ends; returns its length."""
        held = self._held.get(session.id)
        if held is not None:
            held.resident.pop((extent.committed_at, extent.handle), None)
            if extent.pinned:
                held.pinned_bytes -= extent.length
            if extent.residence is Residence.HOST:
                self._not_ahead(held, extent)
            elif extent.residence is Residence.DISK:
                del held.on_disk[(extent.committed_at, extent.handle)]
        if extent.residence in (Residence.SPILLING, Residence.RESTORING):
            extent.freed = True
            return extent.length
        extent.freed = True
        self._wanted.pop(extent.handle, None)
        if extent.residence is Residence.DISK:
            self._free_disk(session, extent)
            return extent.length
        if extent.disk is not None:  # read ahead: its copy on disk was kept
            self._free_disk(session, extent)
        return self.pool.free(extent.slab, extent.offset)

    def closed(self, session: Session) -> None:
        """``session`` closed: nothing of it is spilled or read ahead any more (its extents are freed,
        or fenced: NOTE [Fencing] in storm_service/pidfds.py; those stay where they are)."""
        held = self._held.get(session.id)
        if held is not None:
            held.resident.clear()
        self._reading.discard(session.id)

    def forget(self, session: Session) -> None:
        """``session`` closed and holds nothing any more."""
        self._held.pop(session.id, None)
        self._reading.discard(session.id)

    # -- the loop -------------------------------------------------------------------------

    def poll(self) -> bool:
        """Take finished I/O; True if an extent came back (or was lost): parked fetches may go on."""
        back = False
        for tag, error in self.io.completed():
            kind, extent, held = cast(tuple[str, Extent, Held], tag)
            if kind == _SPILL:
                self._spilled(held, extent, error)
            else:
                self._restored(held, extent, error)
                back = True
        return back

    def balance(self) -> None:
        """Restore what parked fetches want, read ahead for sessions in backward, spill past the high water."""
        for handle, extent in list(self._wanted.items()):
            owner = self._held.get(extent.session_id)
            if owner is not None and extent.residence is Residence.DISK and not self._restore(owner, extent):
                self.refused(extent.length)
                break
            del self._wanted[handle]
        for session_id in list(self._reading):
            reading = self._held.get(session_id)
            if reading is None or not reading.on_disk:
                self._reading.discard(session_id)
            else:
                self._read_ahead(reading)
        if self._room_wanted and time.monotonic() > self._room_until:
            self._room_wanted = 0
        if self._over_quota:
            self._spill_over_quota()
        if self.pool.used_bytes - self._spilling_bytes > self._target:
            self._spill()

    def stuck(self, session: Session, extent: Extent) -> int:
        """0, or the bytes (the pool's, or ``session``'s quota) that ``session`` itself fills with what it
        has fetched and not freed, and reserved, leaving no room to read ``extent`` (on disk) back into.
        Nothing but its own frees could help then."""
        held = self._held.get(session.id)
        own = session.reserved_bytes + (held.pinned_bytes if held is not None else 0)
        limit = min(session.quota_bytes, self.pool.size_bytes)
        return limit if extent.residence is Residence.DISK and own + extent.length > limit else 0

    def refused(self, need_bytes: int) -> None:
        """An offload of ``need_bytes`` found no room: spill that much more, and more at each refusal,
        until one fits (the free space may be in pieces) or ROOM_S pass without a refusal."""
        self._room_wanted = min(self._room_wanted + need_bytes, self.pool.size_bytes)
        self._room_until = time.monotonic() + ROOM_S

    @property
    def _target(self) -> int:
        """Host bytes in use the spiller brings the pool back to."""
        return self.high_water_bytes - self._room_wanted

    # -- spill ----------------------------------------------------------------------------

    def _spill(self) -> None:
        now = time.monotonic()
        excess = self.pool.used_bytes - self._spilling_bytes - self._target
        for _ in range(SPILLS_PER_BALANCE):
            if excess <= 0 or self._spilling_bytes >= SPILL_IN_FLIGHT_BYTES:
                return
            held, share_full = self._victim(now)
            if held is None:  # nothing to write out: drop what was read ahead, if room is wanted now
                freed = self._evict() if self._room_wanted else 0
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

    def _spill_one(self, held: Held, extent: Extent) -> bool:
        """Start writing ``extent`` out; False when the spill files have no room for it."""
        where = self._space.allocate(extent.length)
        if where is None:
            return False
        del held.resident[(extent.committed_at, extent.handle)]
        extent.residence, extent.disk = Residence.SPILLING, where
        held.spilling_bytes += extent.length
        self._spilling_bytes += extent.length
        self._spill_busy.start()
        self.io.write(
            where[0], where[1], self.pool.view(extent.slab, extent.offset, extent.length), (_SPILL, extent, held)
        )
        return True

    def _spill_over_quota(self) -> None:
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

    def _full(self, excess: int) -> None:
        """No disk room for a victim: the spill files, or its session's share of them, are full."""
        self.disk_full += 1
        if self.disk_full & (self.disk_full - 1) == 0:  # 1st, 2nd, 4th...: a full disk cannot flood the log
            log.warning("the disk tier is full: %s past the high water stay in host memory", format_bytes(excess))

    def _spilled(self, held: Held, extent: Extent, error: OSError | None) -> None:
        self._spill_busy.end()
        held.spilling_bytes -= extent.length
        self._spilling_bytes -= extent.length
        session = held.session
        if error is not None or extent.freed or extent.pinned:
            self._release_disk_space(extent)
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

    # -- restore --------------------------------------------------------------------------

    def _read_ahead(self, held: Held) -> None:
        session = held.session
        while held.on_disk and held.ahead_bytes < held.margin_bytes:
            extent = held.on_disk.peekitem(-1)[1]
            if self.pool.used_bytes + extent.length > self._target:
                return
            if session.held_bytes + extent.length > session.quota_bytes or not self._restore(held, extent):
                return

    def _restore(self, held: Held, extent: Extent) -> bool:
        """Start reading ``extent`` (on disk) into new host space; False when no space is free, or when
        it would take its session past its quota (its own extents are then spilled first)."""
        session = held.session
        over = session.held_bytes + extent.length - session.quota_bytes
        if over > 0 and session.quota_bytes < self.pool.size_bytes:
            held.quota_room = max(held.quota_room, over)
            self._over_quota.add(session.id)
            return False
        where = self.pool.allocate(session.tenant.name, extent.length)
        if where is None:
            return False
        del held.on_disk[(extent.committed_at, extent.handle)]
        held.quota_room = 0
        self._over_quota.discard(session.id)
        extent.slab, extent.offset, _ = where
        extent.residence = Residence.RESTORING
        if not extent.pinned:
            held.ahead_bytes += extent.length
            extent.ahead = True
        extent.restored = True
        session.used_bytes += extent.length
        session.tenant.held_bytes += extent.length
        assert extent.disk is not None
        self._restore_busy.start()
        self.io.read(
            extent.disk[0],
            extent.disk[1],
            self.pool.view(extent.slab, extent.offset, extent.length),
            (_RESTORE, extent, held),
        )
        return True

    def _restored(self, held: Held, extent: Extent, error: OSError | None) -> None:
        """A read finished. The disk copy of an extent read ahead is kept until a fetch answers for it,
        so that room a waiting fetch needs can be had back by dropping the host copy (:meth:`_evict`)."""
        self._restore_busy.end()
        extent.residence = Residence.HOST
        if error is not None:
            self.restore_errors += 1
            extent.lost = f"reading it back from the disk tier failed: {error}"
            log.warning("restore of handle %d (session %d) failed: %s", extent.handle, held.session.id, error)
        else:
            self.restored_total += extent.size_bytes
        if extent.freed:
            self._free_disk(held.session, extent)
            self.pool.free(extent.slab, extent.offset)
        elif error is not None or not extent.ahead:
            self._free_disk(held.session, extent)
        else:
            held.ahead[(extent.committed_at, extent.handle)] = extent

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

    def _not_ahead(self, held: Held, extent: Extent) -> None:
        """``extent`` (in host memory) is answered for or freed: no longer read ahead, and a fetch's
        answer makes its disk copy useless."""
        if extent.ahead:
            extent.ahead = False
            held.ahead_bytes -= extent.length
            held.ahead.pop((extent.committed_at, extent.handle), None)
            if extent.pinned and extent.disk is not None:
                self._free_disk(held.session, extent)

    # -- disk space -----------------------------------------------------------------------

    def _release_disk_space(self, extent: Extent) -> None:
        if extent.disk is not None:
            self._space.free(extent.disk)
            extent.disk = None

    def _free_disk(self, session: Session, extent: Extent) -> None:
        """Free the disk copy of an extent that was on disk (counted in the session's disk bytes)."""
        self._release_disk_space(extent)
        session.disk_bytes -= extent.length

    def _disk_quota(self, session: Session) -> int:
        """The bytes ``session`` may hold on disk: the share of the disk its quota is of the pool."""
        return self.size_bytes * min(session.quota_bytes, self.pool.size_bytes) // self.pool.size_bytes

    def _held_by(self, session: Session, now: float) -> Held:
        held = self._held.get(session.id)
        if held is None:
            held = self._held[session.id] = Held(session, StepProfile(now))
        return held

    # -- stats ----------------------------------------------------------------------------

    @property
    def size_bytes(self) -> int:
        return self._space.size_bytes

    @property
    def used_bytes(self) -> int:
        return self._space.used_bytes

    def stats(self) -> dict[str, Any]:
        """What ``stats`` reports of the disk tier (docs/operations.md lists the fields)."""
        spill_s, restore_s = self._spill_busy.seconds, self._restore_busy.seconds
        return {
            "disk_bytes": self.size_bytes,
            "disk_used_bytes": self.used_bytes,
            "disk_files": [{"dir": f.dir, "size_bytes": f.size_bytes, "direct": f.direct} for f in self.files],
            "spilling_bytes": self._spilling_bytes,
            "spilled_total_bytes": self.spilled_total,
            "restored_total_bytes": self.restored_total,
            "spill_bytes_per_s": round(self.spilled_total / spill_s) if spill_s else 0,
            "restore_bytes_per_s": round(self.restored_total / restore_s) if restore_s else 0,
            "restore_hits": self.restore_hits,
            "restore_waits": self.restore_waits,
            "spill_errors": self.spill_errors,
            "restore_errors": self.restore_errors,
            "disk_full": self.disk_full,
            "evicted_ahead": self.evicted,
            "high_water_bytes": self.high_water_bytes,
        }

    def close(self) -> None:
        """Wait for I/O in flight, then close the files (before the pool's slabs close)."""
        self.io.close()
        for spill_file in self.files:
            spill_file.close()
