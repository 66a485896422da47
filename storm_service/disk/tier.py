"""The disk tier: which activations go to disk, when, and how they come back before they are wanted.

NOTE [Disk tier]
  With ``--spill-dir``, host memory is a cache in front of spill files. The loop calls
  :meth:`DiskTier.balance` after every message and :meth:`DiskTier.poll` when the I/O
  threads report (storm_service/disk/io.py); neither waits for a disk.

  Spill. Past the high-water mark (``--spill-high-water`` of the pool in use), committed
  extents are written out until the pool is back under it, counting what is already on
  its way. The victim is the activation wanted last: within a session its oldest
  (backward runs in reverse), across sessions the one with the most time to its next use
  (NOTE [Time to next use] in storm_service/profile.py). Extents being written (WRITING), answered by a
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

import time
from typing import TYPE_CHECKING, Any, cast

from storm_service.disk.files import SpillFile
from storm_service.disk.held import MIN_MARGIN_BYTES, Held
from storm_service.disk.io import DiskIO
from storm_service.disk.restore import Restorer
from storm_service.disk.space import SpillSpace
from storm_service.disk.spill import SPILL, Spiller
from storm_service.errors import ActivationLostError
from storm_service.extents import Extent, Residence
from storm_service.pool import Pool
from storm_service.profile import StepProfile

if TYPE_CHECKING:
    from storm_service.session import Session

__all__ = ["DiskTier"]

ROOM_S = 1.0
"""How long the room asked for by a refused offload is kept free after the last refusal."""


class DiskTier:
    """Spill files, their allocators and I/O, and every session's place in them (NOTE [Disk tier]).

    The sessions' events and the loop's calls come here; writing out is the spiller's
    (spill.py), reading back the restorer's (restore.py)."""

    def __init__(self, pool: Pool, files: list[SpillFile], io: DiskIO, high_water: float) -> None:
        self.pool = pool
        self.files = files
        self.io = io
        self.high_water_bytes = int(high_water * pool.size_bytes)
        self._space = SpillSpace(files, pool.alignment)
        self._held: dict[int, Held] = {}
        self._spiller = Spiller(pool, io, self._space, self._held)
        self._restorer = Restorer(pool, io, self._space, self._spiller)
        self._wanted: dict[int, Extent] = {}
        """Extents a parked fetch waits for that found no host space yet, by handle, in order."""
        self._reading: set[int] = set()
        """Sessions in backward with extents on disk: read ahead at each balance."""
        self._room_wanted = 0
        """Bytes under the high water the spiller frees for refused offloads (:meth:`refused`)."""
        self._room_until = 0.0
        self._max_margin = max(MIN_MARGIN_BYTES, pool.size_bytes // 4)
        self._pin_limit = max(pool.size_bytes - self.high_water_bytes, MIN_MARGIN_BYTES) // 2
        self.restore_hits = self.restore_waits = 0

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
                    if not self._restorer.restore(held, extent):
                        self._wanted[extent.handle] = extent
                        self.refused(extent.length)
                elif self.pool.used_bytes + extent.length <= self._target:
                    self._restorer.restore(held, extent)
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
                self._restorer.not_ahead(held, extent)
                if extent.restored:
                    if extent.waited:
                        self.restore_waits += 1
                    else:
                        self.restore_hits += 1
        if held.on_disk:
            self._reading.add(session.id)
            self._restorer.read_ahead(held, self._target)
        return ready

    def release(self, session: Session, extent: Extent) -> int:
        """Free ``extent``'s space in every tier, now or when its I/O ends; returns its length."""
        held = self._held.get(session.id)
        if held is not None:
            held.resident.pop((extent.committed_at, extent.handle), None)
            if extent.pinned:
                held.pinned_bytes -= extent.length
            if extent.residence is Residence.HOST:
                self._restorer.not_ahead(held, extent)
            elif extent.residence is Residence.DISK:
                del held.on_disk[(extent.committed_at, extent.handle)]
        if extent.residence in (Residence.SPILLING, Residence.RESTORING):
            extent.freed = True
            return extent.length
        extent.freed = True
        self._wanted.pop(extent.handle, None)
        if extent.residence is Residence.DISK:
            self._space.drop(session, extent)
            return extent.length
        if extent.disk is not None:  # read ahead: its copy on disk was kept
            self._space.drop(session, extent)
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
            if kind == SPILL:
                self._spiller.spilled(held, extent, error)
            else:
                self._restorer.restored(held, extent, error)
                back = True
        return back

    def balance(self) -> None:
        """Restore what parked fetches want, read ahead for sessions in backward, spill past the high water."""
        for handle, extent in list(self._wanted.items()):
            owner = self._held.get(extent.session_id)
            if owner is not None and extent.residence is Residence.DISK and not self._restorer.restore(owner, extent):
                self.refused(extent.length)
                break
            del self._wanted[handle]
        for session_id in list(self._reading):
            reading = self._held.get(session_id)
            if reading is None or not reading.on_disk:
                self._reading.discard(session_id)
            else:
                self._restorer.read_ahead(reading, self._target)
        if self._room_wanted and time.monotonic() > self._room_until:
            self._room_wanted = 0
        self._spiller.spill_over_quota()
        self._spiller.spill(self._target, evict=bool(self._room_wanted))

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
        spiller, restorer = self._spiller, self._restorer
        spill_s, restore_s = spiller.busy.seconds, restorer.busy.seconds
        return {
            "disk_bytes": self.size_bytes,
            "disk_used_bytes": self.used_bytes,
            "disk_files": [{"dir": f.dir, "size_bytes": f.size_bytes, "direct": f.direct} for f in self.files],
            "spilling_bytes": spiller.spilling_bytes,
            "spilled_total_bytes": spiller.spilled_total,
            "restored_total_bytes": restorer.restored_total,
            "spill_bytes_per_s": round(spiller.spilled_total / spill_s) if spill_s else 0,
            "restore_bytes_per_s": round(restorer.restored_total / restore_s) if restore_s else 0,
            "restore_hits": self.restore_hits,
            "restore_waits": self.restore_waits,
            "spill_errors": spiller.spill_errors,
            "restore_errors": restorer.restore_errors,
            "disk_full": spiller.disk_full,
            "evicted_ahead": spiller.evicted,
            "high_water_bytes": self.high_water_bytes,
        }

    def close(self) -> None:
        """Wait for I/O in flight, then close the files (before the pool's slabs close)."""
        self.io.close()
        for spill_file in self.files:
            spill_file.close()
