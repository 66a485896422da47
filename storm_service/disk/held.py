"""What the disk tier keeps per session, and the clocks its rates are measured with."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sortedcontainers import SortedDict

from storm_service.profile import StepProfile

if TYPE_CHECKING:
    from storm_service.session import Session

__all__ = ["MIN_MARGIN_BYTES", "Busy", "Held"]

MIN_MARGIN_BYTES = 16 << 20
"""The least a session reads ahead (NOTE [Disk tier] in tier.py)."""


@dataclass
class Held:
    """One session's extents as the disk tier sees them. Keys of the sorted maps are
    ``(committed_at, handle)``: commit order, the reverse of the order backward asks."""

    session: Session
    profile: StepProfile
    resident: SortedDict = field(default_factory=SortedDict)
    """Extents in host memory that may be spilled (an extent the device tier moved to the host
    memory comes in late, in its place: NOTE [Device tier] in storm_service/device/tier.py)."""
    on_disk: SortedDict = field(default_factory=SortedDict)
    """Its extents on disk only."""
    ahead: SortedDict = field(default_factory=SortedDict)
    """Extents read ahead: in host memory, and still on disk."""
    spilling_bytes: int = 0
    pinned_bytes: int = 0
    """Bytes answered for by a fetch and not freed yet."""
    ahead_bytes: int = 0
    """Bytes read back (or being read) ahead of any fetch."""
    margin_bytes: int = MIN_MARGIN_BYTES
    """How far it reads ahead now."""
    quota_room: int = 0
    """Bytes of its own to write out before the extent it waits for fits in its quota."""


class Busy:
    """Wall-clock time during which at least one I/O of a kind was in flight, for rates."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.since = 0.0
        self.seconds = 0.0

    def start(self) -> None:
        if self.in_flight == 0:
            self.since = time.monotonic()
        self.in_flight += 1

    def end(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self.seconds += time.monotonic() - self.since
