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

__all__ = ["Extent", "ExtentState"]


class ExtentState(enum.Enum):
    WRITING = "writing"
    COMMITTED = "committed"


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

    def location(self) -> dict[str, int]:
        return {
            "handle": self.handle,
            "slab": self.slab,
            "offset": self.offset,
            "size_bytes": self.size_bytes,
        }
