"""An extent allocator that deals in offsets only (no memory), so it is testable alone.

NOTE [Extent allocator invariants]
  * Every live extent starts at a multiple of ``alignment`` and its length is the
    request rounded up to ``alignment``; live extents never overlap.
  * Free extents are kept sorted by offset and are never adjacent: ``free`` merges a
    returned extent with both neighbours, so ``free_bytes + used_bytes == size_bytes``
    always and the pool returns to one free extent once everything is freed.
  * Allocation is best fit (the smallest free extent that holds the request, lowest
    offset on ties), which keeps large holes whole for large activations.
``tests/unit/test_allocator.py`` checks these with hypothesis.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

__all__ = ["ExtentAllocator", "FreeStats"]


@dataclass(frozen=True)
class FreeStats:
    free_bytes: int
    largest_free_bytes: int
    free_extents: int


class ExtentAllocator:
    """Hands out aligned ``[offset, offset + length)`` extents of a range of ``size_bytes``."""

    def __init__(self, size_bytes: int, alignment: int = 512) -> None:
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"alignment must be a power of two, got {alignment}")
        if size_bytes < alignment:
            raise ValueError(f"size_bytes {size_bytes} is smaller than the alignment {alignment}")
        self.alignment = alignment
        self.size_bytes = size_bytes - size_bytes % alignment
        self._free_offsets: list[int] = [0]
        self._free_len: dict[int, int] = {0: self.size_bytes}
        self._live: dict[int, int] = {}
        self.used_bytes = 0

    def round_up(self, size_bytes: int) -> int:
        return -(-size_bytes // self.alignment) * self.alignment

    def allocate(self, size_bytes: int) -> int | None:
        """Return the offset of a new extent of at least ``size_bytes``, or None if none fits."""
        if size_bytes <= 0:
            raise ValueError(f"allocate: size_bytes must be positive, got {size_bytes}")
        need = self.round_up(size_bytes)
        best = -1
        best_len = 0
        for offset in self._free_offsets:
            length = self._free_len[offset]
            if length >= need and (best < 0 or length < best_len):
                best, best_len = offset, length
                if length == need:
                    break
        if best < 0:
            return None
        del self._free_len[best]
        index = bisect.bisect_left(self._free_offsets, best)
        if best_len == need:
            del self._free_offsets[index]
        else:
            self._free_offsets[index] = best + need
            self._free_len[best + need] = best_len - need
        self._live[best] = need
        self.used_bytes += need
        return best

    def free(self, offset: int) -> int:
        """Return the extent at ``offset`` to the free list; returns its length in bytes."""
        length = self._live.pop(offset, None)
        if length is None:
            raise KeyError(f"free: no live extent at offset {offset}")
        self.used_bytes -= length
        index = bisect.bisect_left(self._free_offsets, offset)
        start, end = offset, offset + length
        if index < len(self._free_offsets) and self._free_offsets[index] == end:
            end += self._free_len.pop(end)
            del self._free_offsets[index]
        if index > 0:
            before = self._free_offsets[index - 1]
            if before + self._free_len[before] == start:
                self._free_len[before] += end - start
                return length
        self._free_offsets.insert(index, start)
        self._free_len[start] = end - start
        return length

    def length_of(self, offset: int) -> int:
        return self._live[offset]

    @property
    def free_bytes(self) -> int:
        return self.size_bytes - self.used_bytes

    @property
    def live_count(self) -> int:
        return len(self._live)

    def free_stats(self) -> FreeStats:
        lengths = self._free_len.values()
        return FreeStats(
            free_bytes=self.free_bytes,
            largest_free_bytes=max(lengths, default=0),
            free_extents=len(self._free_len),
        )

    def live_extents(self) -> list[tuple[int, int]]:
        """``(offset, length)`` of every live extent, sorted by offset."""
        return sorted(self._live.items())

    def free_extents(self) -> list[tuple[int, int]]:
        """``(offset, length)`` of every free extent, sorted by offset."""
        return [(offset, self._free_len[offset]) for offset in self._free_offsets]
