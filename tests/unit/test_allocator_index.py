"""The indexed allocator against a model that scans every block (NOTE [Indexed free space]).

The model keeps one flag per alignment block and finds best fit by walking the range,
the slow and obvious way. Random allocate and free sequences must give the same offsets
as the model, and the allocator's free extents must be exactly the model's maximal free
runs (coalescing), with the byte accounting agreeing at every step.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from storm_service.allocator import ExtentAllocator

ALIGN = 512
BLOCKS = 96


class _BlockModel:
    """One flag per block: True while a live extent covers it."""

    def __init__(self, blocks: int) -> None:
        self.used = [False] * blocks

    def free_runs(self) -> list[tuple[int, int]]:
        """``(first block, block count)`` of every maximal run of free blocks, by offset."""
        runs: list[tuple[int, int]] = []
        start = None
        for index, used in enumerate([*self.used, True]):
            if not used and start is None:
                start = index
            elif used and start is not None:
                runs.append((start, index - start))
                start = None
        return runs

    def best_fit(self, blocks: int) -> int | None:
        fits = [(length, start) for start, length in self.free_runs() if length >= blocks]
        return min(fits)[1] if fits else None

    def mark(self, start: int, blocks: int, used: bool) -> None:
        for index in range(start, start + blocks):
            assert self.used[index] is not used, f"block {index} is already {'used' if used else 'free'}"
            self.used[index] = used


_ops = st.lists(
    st.one_of(
        st.tuples(st.just("alloc"), st.integers(min_value=1, max_value=12 * ALIGN)),
        st.tuples(st.just("free"), st.integers(min_value=0, max_value=10_000)),
    ),
    max_size=200,
)


@settings(max_examples=300, deadline=None)
@given(ops=_ops)
def test_offsets_and_free_space_match_a_block_model(ops: list[tuple[str, int]]) -> None:
    alloc = ExtentAllocator(BLOCKS * ALIGN, ALIGN)
    model = _BlockModel(BLOCKS)
    live: dict[int, int] = {}
    for kind, value in ops:
        if kind == "alloc":
            blocks = alloc.round_up(value) // ALIGN
            expected = model.best_fit(blocks)
            offset = alloc.allocate(value)
            assert offset == (None if expected is None else expected * ALIGN)
            if offset is not None:
                model.mark(offset // ALIGN, blocks, True)
                live[offset] = blocks * ALIGN
        elif live:
            offset = sorted(live)[value % len(live)]
            assert alloc.free(offset) == live[offset]
            model.mark(offset // ALIGN, live.pop(offset) // ALIGN, False)
        runs = model.free_runs()
        assert alloc.free_extents() == [(start * ALIGN, length * ALIGN) for start, length in runs]
        assert alloc.used_bytes == sum(live.values()) == sum(model.used) * ALIGN
        assert alloc.free_bytes == alloc.size_bytes - alloc.used_bytes
        stats = alloc.free_stats()
        assert stats.free_extents == len(runs)
        assert stats.largest_free_bytes == max((length for _, length in runs), default=0) * ALIGN
        assert alloc.live_count == len(live)


@settings(max_examples=50, deadline=None)
@given(keep=st.lists(st.booleans(), min_size=2, max_size=400), data=st.data())
def test_interleaved_frees_coalesce_into_one_extent(keep: list[bool], data: st.DataObject) -> None:
    """Fragment the range in any pattern, then free the rest in any order: one free extent is left."""
    alloc = ExtentAllocator(len(keep) * ALIGN, ALIGN)
    offsets = [alloc.allocate(ALIGN) for _ in keep]
    assert offsets == [i * ALIGN for i in range(len(keep))]
    for offset, kept in zip(offsets, keep, strict=True):
        if not kept:
            alloc.free(offset)
    held = [offset for offset, kept in zip(offsets, keep, strict=True) if kept]
    assert alloc.free_stats().free_extents == sum(1 for i, k in enumerate(keep) if not k and (i == 0 or keep[i - 1]))
    for offset in data.draw(st.permutations(held)):
        alloc.free(offset)
    assert alloc.free_extents() == [(0, alloc.size_bytes)]
    assert alloc.used_bytes == 0 and alloc.live_count == 0


def test_a_fragmented_range_still_finds_the_one_hole_that_fits() -> None:
    """Thousands of one-block holes and one two-block hole: best fit picks the two-block hole."""
    blocks = 20_001
    alloc = ExtentAllocator(blocks * ALIGN, ALIGN)
    offsets = [alloc.allocate(ALIGN) for _ in range(blocks)]
    for offset in offsets[::2]:
        alloc.free(offset)
    alloc.free(offsets[5_001])  # joins the holes at 5000 and 5002 into one of three blocks
    assert alloc.free_stats().free_extents == 10_000
    assert alloc.allocate(2 * ALIGN) == 5_000 * ALIGN
    assert alloc.allocate(2 * ALIGN) is None
    assert alloc.allocate(ALIGN) == 0


def test_a_range_of_the_largest_size_places_extents_up_to_its_end() -> None:
    """A segment may be MAX_SIZE_BYTES (2**48) long: its last offset still fits the size index."""
    size = 1 << 48
    alloc = ExtentAllocator(size, ALIGN)
    first = alloc.allocate(size - ALIGN)
    last = alloc.allocate(ALIGN)
    assert (first, last) == (0, size - ALIGN)
    alloc.free(first)
    assert alloc.allocate(ALIGN) == 0
    assert alloc.free_stats().largest_free_bytes == size - 2 * ALIGN
