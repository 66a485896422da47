"""Spill space: an extent allocator per spill file, extents spread over the files in turn."""

from __future__ import annotations

from typing import TYPE_CHECKING

from storm_service.allocator import ExtentAllocator
from storm_service.disk.files import SpillFile
from storm_service.extents import Extent

if TYPE_CHECKING:
    from storm_service.session import Session

__all__ = ["SpillSpace"]


class SpillSpace:
    """Where extents go on disk: ``(file index, offset)``, aligned as the pool and the files need."""

    def __init__(self, files: list[SpillFile], alignment: int) -> None:
        self._files = [ExtentAllocator(f.size_bytes, max(f.alignment, alignment)) for f in files]
        self._next = 0

    def allocate(self, length: int) -> tuple[int, int] | None:
        """``length`` bytes in the next file with room (so that writes spread over the disks), or None."""
        count = len(self._files)
        for step in range(count):
            index = (self._next + step) % count
            offset = self._files[index].allocate(length)
            if offset is not None:
                self._next = (index + 1) % count
                return index, offset
        return None

    def release(self, extent: Extent) -> None:
        """Free ``extent``'s place on disk, if it has one."""
        if extent.disk is not None:
            self._files[extent.disk[0]].free(extent.disk[1])
            extent.disk = None

    def drop(self, session: Session, extent: Extent) -> None:
        """Free the disk copy of an extent that was on disk (counted in the session's disk bytes)."""
        self.release(extent)
        session.disk_bytes -= extent.length

    @property
    def size_bytes(self) -> int:
        return sum(space.size_bytes for space in self._files)

    @property
    def used_bytes(self) -> int:
        return sum(space.used_bytes for space in self._files)
