"""An extent: a span of a slab that one session holds, and its state.

NOTE [Extent lifetime]
  offload allocates an extent in state WRITING and returns its handle; the client
  copies its bytes into the mapped slab and then commits (state COMMITTED). Only a
  committed extent can be fetched, so a reader never sees a half-written activation.
  free, unregister and session expiry return extents to the pool in either state, so
  an extent whose writer died before commit is reclaimed with the rest of its session.
  A WRITING extent is space reserved ahead of a copy: it counts in ``reserved_bytes``,
  and ``used_bytes`` counts committed extents only (bytes of activations held). The
  daemon never takes a WRITING extent back from a live session: its writer may still
  be copying into it, and the space could by then belong to another session.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["Extent", "ExtentState", "Residence"]


class ExtentState(enum.Enum):
    WRITING = "writing"
    COMMITTED = "committed"


class Residence(enum.Enum):
    """Where a committed extent's bytes are (NOTE [Disk tier] in storm_service/disk/tier.py)."""

    DEVICE = "device"
    """In the device tier (storm_service/device/tier.py): ``slab`` is a device slab."""
    HOST = "host"
    SPILLING = "spilling"
    """Being written to disk; the host copy is still the one read."""
    DISK = "disk"
    """On disk only; its host space is free."""
    RESTORING = "restoring"
    """Being read back into host space (``slab``/``offset`` name the new space)."""


@dataclass(slots=True)
class Extent:
    handle: int
    session_id: int
    slab: int
    """The id of the slab that holds it (NOTE [Lending slabs] in pool.py)."""
    offset: int
    size_bytes: int
    """Bytes requested by the client (the allocator's length may be larger)."""
    length: int
    layer_id: int | None
    """The ``layer_bytes`` key this extent counts under: the offload's, or the overflow key
    (NOTE [Layer stats cap] in sessions.py)."""
    state: ExtentState = ExtentState.WRITING
    residence: Residence = Residence.HOST
    disk: tuple[int, int] | None = None
    """``(spill file, offset)`` of its copy on disk, while it has one."""
    committed_at: float = 0.0
    """``time.monotonic()`` at commit: the step profile's clock (storm_service/profile.py)."""
    restored: bool = False
    """Read back from disk at least once: it is not spilled again (it is wanted soon)."""
    ahead: bool = False
    """Read back ahead of any fetch, not answered for yet (its session's ``ahead_bytes``)."""
    waited: bool = False
    """A fetch had to wait for it to come back from disk (a restore that was late)."""
    pinned: bool = False
    """A fetch answered for it: it stays in host memory until freed (a client may read it in place)."""
    freed: bool = False
    """Freed by its session while disk I/O still used its host space: that space is freed when the I/O ends."""
    lost: str = ""
    """Why its bytes cannot be read back (a read error), if they cannot."""

    def location(self) -> dict[str, int]:
        return {
            "handle": self.handle,
            "slab": self.slab,
            "offset": self.offset,
            "size_bytes": self.size_bytes,
        }
