"""The disk tier's restore side: reading extents back into host memory (NOTE [Disk tier] in tier.py).

An extent on disk is read into new host space, at once for a fetch that waits, ahead of
backward for the rest. One that would take its session past its quota waits for the
spiller to write out the session's own extents first. An extent read ahead keeps its
disk copy until a fetch answers for it, so that its host copy can be dropped again
(spill.py) when room is wanted now.
"""

from __future__ import annotations

import logging

from storm_service.disk.held import Busy, Held
from storm_service.disk.io import DiskIO
from storm_service.disk.space import SpillSpace
from storm_service.disk.spill import Spiller
from storm_service.extents import Extent, Residence
from storm_service.pool import Pool

__all__ = ["Restorer"]

log = logging.getLogger("stormd.disk")

_RESTORE = "restore"
"""The kind in a read's I/O tag ``(kind, extent, held)``."""


class Restorer:
    """Reads extents back from the spill files and takes the finished reads."""

    def __init__(self, pool: Pool, io: DiskIO, space: SpillSpace, spiller: Spiller) -> None:
        self.pool = pool
        self.io = io
        self._space = space
        self._spiller = spiller
        self.busy = Busy()
        self.restored_total = self.restore_errors = 0

    def read_ahead(self, held: Held, target: int) -> None:
        """Read ``held``'s newest extents on disk back, up to its margin, while the host bytes in use
        stay within ``target`` and its session within its quota."""
        session = held.session
        while held.on_disk and held.ahead_bytes < held.margin_bytes:
            extent = held.on_disk.peekitem(-1)[1]
            if self.pool.used_bytes + extent.length > target:
                return
            if session.held_bytes + extent.length > session.quota_bytes or not self.restore(held, extent):
                return

    def restore(self, held: Held, extent: Extent) -> bool:
        """Start reading ``extent`` (on disk) into new host space; False when no space is free, or when
        it would take its session past its quota (its own extents are then spilled first)."""
        session = held.session
        over = session.held_bytes + extent.length - session.quota_bytes
        if over > 0 and session.quota_bytes < self.pool.size_bytes:
            self._spiller.want_quota_room(held, over)
            return False
        where = self.pool.allocate(session.tenant.name, extent.length)
        if where is None:
            return False
        del held.on_disk[(extent.committed_at, extent.handle)]
        self._spiller.quota_met(held)
        extent.slab, extent.offset, _ = where
        extent.residence = Residence.RESTORING
        if not extent.pinned:
            held.ahead_bytes += extent.length
            extent.ahead = True
        extent.restored = True
        session.used_bytes += extent.length
        session.tenant.held_bytes += extent.length
        assert extent.disk is not None
        self.busy.start()
        self.io.read(
            extent.disk[0],
            extent.disk[1],
            self.pool.view(extent.slab, extent.offset, extent.length),
            (_RESTORE, extent, held),
        )
        return True

    def restored(self, held: Held, extent: Extent, error: OSError | None) -> None:
        """A read finished. The disk copy of an extent read ahead is kept until a fetch answers for it,
        so that room a waiting fetch needs can be had back by dropping the host copy (spill.py)."""
        self.busy.end()
        extent.residence = Residence.HOST
        if error is not None:
            self.restore_errors += 1
            extent.lost = f"reading it back from the disk tier failed: {error}"
            log.warning("restore of handle %d (session %d) failed: %s", extent.handle, held.session.id, error)
        else:
            self.restored_total += extent.size_bytes
        if extent.freed:
            self._space.drop(held.session, extent)
            self.pool.free(extent.slab, extent.offset)
        elif error is not None or not extent.ahead:
            self._space.drop(held.session, extent)
        else:
            held.ahead[(extent.committed_at, extent.handle)] = extent

    def not_ahead(self, held: Held, extent: Extent) -> None:
        """``extent`` (in host memory) is answered for or freed: no longer read ahead, and a fetch's
        answer makes its disk copy useless."""
        if extent.ahead:
            extent.ahead = False
            held.ahead_bytes -= extent.length
            held.ahead.pop((extent.committed_at, extent.handle), None)
            if extent.pinned and extent.disk is not None:
                self._space.drop(held.session, extent)
