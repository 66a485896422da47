"""Property and unit tests of :class:`storm_service.allocator.ExtentAllocator`.

The invariants checked are those of NOTE [Extent allocator invariants] in
``storm_service/allocator.py``.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storm_service.allocator import ExtentAllocator

ALIGN = 512
SIZE = 64 * ALIGN + 100  # not a multiple of the alignment: the tail is unusable

# An op is ("alloc", size_bytes) or ("free", index into the live extents, modulo their count).
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("alloc"), st.integers(min_value=1, max_value=20 * ALIGN)),
        st.tuples(st.just("free"), st.integers(min_value=0, max_value=1_000)),
    ),
    max_size=120,
)


def _check_invariants(alloc: ExtentAllocator, live: dict[int, int]) -> None:
    live_extents = alloc.live_extents()
    free_extents = alloc.free_extents()
    assert dict(live_extents) == live

    # Live extents: aligned, inside the range, never overlapping.
    previous_end = 0
    for offset, length in live_extents:
        assert offset % ALIGN == 0 and length % ALIGN == 0 and length > 0
        assert offset >= previous_end, f"extent at {offset} overlaps the one ending at {previous_end}"
        assert offset + length <= alloc.size_bytes
        previous_end = offset + length

    # Free extents: sorted, inside the range, never adjacent (coalesced), never overlapping live ones.
    for (offset, length), (next_offset, _) in itertools.pairwise(free_extents):
        assert offset + length < next_offset, f"free extents at {offset} and {next_offset} were not merged"
    intervals = sorted(live_extents + free_extents)
    covered = 0
    for offset, length in intervals:
        assert offset == covered, "live and free extents must tile the range exactly"
        covered = offset + length
    assert covered == alloc.size_bytes

    # Accounting.
    free_total = sum(length for _, length in free_extents)
    assert alloc.used_bytes == sum(live.values())
    assert alloc.used_bytes + alloc.free_bytes == alloc.size_bytes
    assert free_total == alloc.free_bytes
    stats = alloc.free_stats()
    assert stats.free_bytes == free_total
    assert stats.largest_free_bytes == max((length for _, length in free_extents), default=0)
    assert stats.free_extents == len(free_extents)
    assert alloc.live_count == len(live)


@settings(max_examples=300, deadline=None)
@given(ops=_ops)
def test_random_allocate_free_keeps_invariants(ops: list[tuple[str, int]]) -> None:
    alloc = ExtentAllocator(SIZE, ALIGN)
    live: dict[int, int] = {}
    for kind, value in ops:
        if kind == "alloc":
            offset = alloc.allocate(value)
            if offset is None:
                # Nothing fits: every free extent is too small for the rounded request.
                assert alloc.free_stats().largest_free_bytes < alloc.round_up(value)
            else:
                assert offset not in live
                live[offset] = alloc.round_up(value)
                assert alloc.length_of(offset) == live[offset]
        elif live:
            offset = sorted(live)[value % len(live)]
            assert alloc.free(offset) == live.pop(offset)
        _check_invariants(alloc, live)

    # Every freed byte comes back: one free extent spanning the whole range.
    for offset in list(live):
        alloc.free(offset)
        del live[offset]
        _check_invariants(alloc, live)
    assert alloc.free_extents() == [(0, alloc.size_bytes)]
    assert alloc.used_bytes == 0


@settings(max_examples=100, deadline=None)
@given(sizes=st.lists(st.integers(min_value=1, max_value=4 * ALIGN), min_size=1, max_size=40), data=st.data())
def test_freeing_in_any_order_restores_one_extent(sizes: list[int], data: st.DataObject) -> None:
    alloc = ExtentAllocator(SIZE, ALIGN)
    offsets = [o for o in (alloc.allocate(s) for s in sizes) if o is not None]
    for offset in data.draw(st.permutations(offsets)):
        alloc.free(offset)
    assert alloc.free_extents() == [(0, alloc.size_bytes)]
    assert alloc.free_stats().largest_free_bytes == alloc.size_bytes


def test_size_is_rounded_down_to_the_alignment() -> None:
    alloc = ExtentAllocator(SIZE, ALIGN)
    assert alloc.size_bytes == 64 * ALIGN
    assert alloc.free_extents() == [(0, 64 * ALIGN)]


def test_allocation_rounds_up_to_the_alignment() -> None:
    alloc = ExtentAllocator(8 * ALIGN, ALIGN)
    first = alloc.allocate(1)
    second = alloc.allocate(ALIGN + 1)
    assert (first, second) == (0, ALIGN)
    assert alloc.length_of(0) == ALIGN and alloc.length_of(ALIGN) == 2 * ALIGN
    assert alloc.used_bytes == 3 * ALIGN


def test_best_fit_picks_the_smallest_hole_that_fits() -> None:
    alloc = ExtentAllocator(16 * ALIGN, ALIGN)
    # Layout: [a:4][b:1][c:2][d:1][e:8] -> free a (4 blocks) and c (2 blocks).
    a, _b, c, _d, _e = (alloc.allocate(n * ALIGN) for n in (4, 1, 2, 1, 8))
    assert alloc.free_bytes == 0
    alloc.free(a)
    alloc.free(c)
    assert alloc.allocate(2 * ALIGN) == c  # the 2-block hole, not the first (4-block) one
    assert alloc.allocate(3 * ALIGN) == a  # now only the 4-block hole fits


def test_best_fit_breaks_ties_by_lowest_offset() -> None:
    alloc = ExtentAllocator(6 * ALIGN, ALIGN)
    x, _, y, _ = (alloc.allocate(n * ALIGN) for n in (2, 1, 2, 1))
    alloc.free(y)
    alloc.free(x)
    assert alloc.allocate(ALIGN) == x


def test_exhausted_pool_returns_none() -> None:
    alloc = ExtentAllocator(4 * ALIGN, ALIGN)
    assert alloc.allocate(4 * ALIGN) == 0
    assert alloc.allocate(1) is None
    alloc.free(0)
    assert alloc.allocate(4 * ALIGN + 1) is None  # larger than the whole range
    assert alloc.used_bytes == 0


def test_fragmented_pool_returns_none_when_no_single_hole_fits() -> None:
    alloc = ExtentAllocator(4 * ALIGN, ALIGN)
    offsets = [alloc.allocate(ALIGN) for _ in range(4)]
    alloc.free(offsets[0])
    alloc.free(offsets[2])
    assert alloc.free_bytes == 2 * ALIGN
    assert alloc.allocate(2 * ALIGN) is None


def test_free_merges_with_both_neighbours() -> None:
    alloc = ExtentAllocator(3 * ALIGN, ALIGN)
    a, b, c = (alloc.allocate(ALIGN) for _ in range(3))
    alloc.free(a)
    alloc.free(c)
    assert alloc.free_extents() == [(0, ALIGN), (2 * ALIGN, ALIGN)]
    alloc.free(b)
    assert alloc.free_extents() == [(0, 3 * ALIGN)]


def test_double_free_raises_key_error() -> None:
    alloc = ExtentAllocator(4 * ALIGN, ALIGN)
    offset = alloc.allocate(100)
    assert offset is not None
    alloc.free(offset)
    with pytest.raises(KeyError, match="no live extent"):
        alloc.free(offset)
    assert alloc.free_extents() == [(0, 4 * ALIGN)]


def test_free_of_an_offset_never_allocated_raises_key_error() -> None:
    alloc = ExtentAllocator(4 * ALIGN, ALIGN)
    alloc.allocate(ALIGN)
    with pytest.raises(KeyError):
        alloc.free(ALIGN)  # inside the free range, not a live extent


@pytest.mark.parametrize("size_bytes", [0, -1])
def test_non_positive_allocation_raises(size_bytes: int) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        ExtentAllocator(4 * ALIGN, ALIGN).allocate(size_bytes)


@pytest.mark.parametrize("alignment", [0, -512, 3, 384, 1000])
def test_alignment_must_be_a_power_of_two(alignment: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        ExtentAllocator(1 << 20, alignment)


def test_range_smaller_than_the_alignment_raises() -> None:
    with pytest.raises(ValueError, match="smaller than the alignment"):
        ExtentAllocator(100, ALIGN)
