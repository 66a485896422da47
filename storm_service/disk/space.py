"""Spill space: an extent allocator per spill file, extents spread over the files in turn."""

from __future__ import annotations

from storm_service.allocator import ExtentAllocator
from storm_service.disk.files import SpillFile

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

    def free(self, where: tuple[int, int]) -> None:
        self._files[where[0]].free(where[1])

    @property
    def size_bytes(self) -> int:
        return sum(space.size_bytes for space in self._files)

    @property
    def used_bytes(self) -> int:
        return sum(space.used_bytes for space in self._files)
