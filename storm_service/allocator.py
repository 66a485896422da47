"""An extent allocator that deals in offsets only (no memory), so it is testable alone.

NOTE [Extent allocator invariants]
  * Every live extent starts at a multiple of ``alignment`` and its length is the
    request rounded up to ``alignment``; live extents never overlap.
  * Free extents are never adjacent: ``free`` merges a returned extent with both
    neighbours, so ``free_bytes + used_bytes == size_bytes`` always and the range
    returns to one free extent once everything is freed.
  * Allocation is best fit (the smallest free extent that holds the request, lowest
    offset on ties), which keeps large holes whole for large activations.
``tests/unit/test_allocator.py`` and ``tests/unit/test_allocator_index.py`` check these
with hypothesis.

NOTE [Indexed free space]
  Every operation costs O(log n) in the number of free extents, whatever the
  fragmentation: the serving loop runs it per tensor, and a linear scan of a pool cut
  into a million holes took seconds per request. Free space is indexed three ways:
  * ``_by_size``: a sorted list of one int key per free extent, ``length << 48 |
    offset``; the first key at or past ``need << 48`` is the best fit (the smallest
    length that holds the request, then the lowest offset). A range is at most 2**48
    bytes (``MAX_SIZE_BYTES``), so offsets stay below 2**48; an int key compares faster
    than a tuple.
  * ``_free_at``: offset -> length, which finds the free neighbour that starts where a
    freed extent ends;
  * ``_free_until``: end -> offset, which finds the free neighbour that ends where a
    freed extent starts.
  So coalescing needs no ordered search at all, and best fit one bisection.
"""

from __future__ import annotations

from dataclasses import dataclass

from sortedcontainers import SortedList

__all__ = ["ExtentAllocator", "FreeStats"]

_SHIFT = 48
_OFFSET_MASK = (1 << _SHIFT) - 1


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
        if size_bytes > 1 << _SHIFT:  # every offset then fits below bit 48 (NOTE [Indexed free space])
            raise ValueError(f"size_bytes {size_bytes} is larger than {1 << _SHIFT}")
        self.alignment = alignment
        self.size_bytes = size_bytes - size_bytes % alignment
        self._by_size: SortedList = SortedList()
        self._free_at: dict[int, int] = {}
        self._free_until: dict[int, int] = {}
        self._live: dict[int, int] = {}
        self.used_bytes = 0
        self._add_free(0, self.size_bytes)

    def round_up(self, size_bytes: int) -> int:
        return -(-size_bytes // self.alignment) * self.alignment

    def allocate(self, size_bytes: int) -> int | None:
        """Return the offset of a new extent of at least ``size_bytes``, or None if none fits."""
        if size_bytes <= 0:
            raise ValueError(f"allocate: size_bytes must be positive, got {size_bytes}")
        need = self.round_up(size_bytes)
        by_size = self._by_size
        index = by_size.bisect_left(need << _SHIFT)
        if index == len(by_size):
            return None
        key = by_size.pop(index)
        offset, length = key & _OFFSET_MASK, key >> _SHIFT
        del self._free_at[offset]
        del self._free_until[offset + length]
        if length > need:
            self._add_free(offset + need, length - need)
        self._live[offset] = need
        self.used_bytes += need
        return offset

    def free(self, offset: int) -> int:
        """Return the extent at ``offset`` to free space; returns its length in bytes."""
        length = self._live.pop(offset, None)
        if length is None:
            raise KeyError(f"free: no live extent at offset {offset}")
        self.used_bytes -= length
        start, end = offset, offset + length
        after = self._free_at.get(end)
        if after is not None:
            self._remove_free(end, after)
            end += after
        before = self._free_until.get(start)
        if before is not None:
            self._remove_free(before, start - before)
            start = before
        self._add_free(start, end - start)
        return length

    def _add_free(self, offset: int, length: int) -> None:
        self._by_size.add(length << _SHIFT | offset)
        self._free_at[offset] = length
        self._free_until[offset + length] = offset

    def _remove_free(self, offset: int, length: int) -> None:
        self._by_size.remove(length << _SHIFT | offset)
        del self._free_at[offset]
        del self._free_until[offset + length]

    def length_of(self, offset: int) -> int:
        return self._live[offset]

    @property
    def free_bytes(self) -> int:
        return self.size_bytes - self.used_bytes

    @property
    def live_count(self) -> int:
        return len(self._live)

    def free_stats(self) -> FreeStats:
        by_size = self._by_size
        return FreeStats(
            free_bytes=self.free_bytes,
            largest_free_bytes=by_size[-1] >> _SHIFT if by_size else 0,
            free_extents=len(by_size),
        )

    def live_extents(self) -> list[tuple[int, int]]:
        """``(offset, length)`` of every live extent, sorted by offset."""
        return sorted(self._live.items())

    def free_extents(self) -> list[tuple[int, int]]:
        """``(offset, length)`` of every free extent, sorted by offset."""
        return sorted(self._free_at.items())
