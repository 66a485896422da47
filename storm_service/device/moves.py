"""Moving activations off a device into the host pool, a piece per loop step (NOTE [Device tier] in tier.py).

A move copies one extent into new host space at most ``budget`` bytes per call, so that
no step of the loop copies more than EVICT_BYTES_PER_BALANCE, however large the
extent; the extent stays where it is, and is read there, until its last piece is over.
A move whose extent is fetched (pinned: a client may read it in place) or freed
meanwhile is dropped, and its host space given back.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sortedcontainers import SortedDict

from storm_service.device.backend import DeviceError
from storm_service.extents import Extent, Residence
from storm_service.pool import Pool
from storm_service.profile import StepProfile
from storm_service.slabs import Slab
from storm_service.units import format_bytes

if TYPE_CHECKING:
    from storm_service.device.tier import Device
    from storm_service.disk.tier import DiskTier
    from storm_service.session import Session

__all__ = ["Move", "Mover", "victims"]

log = logging.getLogger("stormd.device")


@dataclass
class Move:
    """One extent on its way to the host pool."""

    extent: Extent
    session: Session
    host_slab: int
    host_offset: int
    done: int = 0
    """Bytes copied so far."""


def victims(
    resident: dict[int, SortedDict], sessions: dict[int, Session], profiles: dict[int, StepProfile], now: float
) -> Iterator[Extent]:
    """Extents to move, the one wanted last first: the sessions ranked once by when their oldest is
    wanted (NOTE [Time to next use] in storm_service/profile.py), then each session's oldest first.
    Extents of sessions no longer open (closed: freed soon; fenced: they stay) are left out."""
    for session_id in list(resident):
        if session_id not in sessions:
            del resident[session_id]

    def wanted_in(session_id: int) -> float:
        oldest = resident[session_id].peekitem(0)[1]
        profile = profiles.get(session_id)
        return profile.time_to_use(oldest.committed_at, now) if profile is not None else float("inf")

    for session_id in sorted(resident, key=wanted_in, reverse=True):
        while session_id in resident:  # the caller takes each yielded extent off ``resident``
            yield resident[session_id].peekitem(0)[1]


class Mover:
    """Copies extents off devices into the host pool, a piece at a time; counts what it moved."""

    def __init__(self, host: Pool[Slab]) -> None:
        self.host = host
        self.disk: DiskTier | None = None
        """The disk tier, told of the extents that come into host memory."""
        self.evicted_bytes = self.evictions = self.errors = 0

    def begin(self, device: Device, session: Session, extent: Extent) -> bool:
        """Start moving ``extent`` into new host space; False when the host has no room for it."""
        where = self.host.allocate(session.tenant.name, extent.length)
        if where is None:
            return False
        device.move = Move(extent, session, where[0], where[1])
        return True

    def copy(self, device: Device, budget: int) -> int:
        """Copy the next piece of ``device``'s move, at most ``budget`` bytes; finish it after its last."""
        move = device.move
        assert move is not None
        extent = move.extent
        piece = min(budget, extent.length - move.done)
        source = device.pool.slabs[extent.slab].memory
        try:
            source.read(extent.offset + move.done, self.host.view(move.host_slab, move.host_offset + move.done, piece))
        except DeviceError as e:  # it stays where it is, and is not tried again
            self.drop(device)
            self.errors += 1
            if self.errors & (self.errors - 1) == 0:  # 1st, 2nd, 4th...
                log.warning(
                    "moving %s off device %s failed (it stays there): %s",
                    format_bytes(extent.length),
                    device.backend.name,
                    e,
                )
            return piece
        move.done += piece
        if move.done == extent.length:
            self._moved(device, move)
        return piece

    def drop(self, device: Device) -> None:
        """Give back the host space of ``device``'s move; its extent stays on the device."""
        move = device.move
        assert move is not None
        device.move = None
        self.host.free(move.host_slab, move.host_offset)

    def _moved(self, device: Device, move: Move) -> None:
        extent, session = move.extent, move.session
        device.move = None
        device.pool.free(extent.slab, extent.offset)
        extent.slab, extent.offset, extent.residence = move.host_slab, move.host_offset, Residence.HOST
        session.device_bytes -= extent.length
        self.evicted_bytes += extent.length
        self.evictions += 1
        if self.disk is not None:
            self.disk.moved_in(session, extent)
