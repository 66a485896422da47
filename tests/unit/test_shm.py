"""Huge pages for shared memory (NOTE [Huge pages]): the kernel's policy and what backs a mapping."""

from __future__ import annotations

import ctypes
import mmap
import os

import pytest

from storm_service.shm import advise_huge_pages, huge_mapped_bytes, huge_page_bytes, huge_policy_of

SMAPS = """\
7f0000000000-7f0000400000 rw-s 00000000 00:1a 12 /dev/shm/storm-a
Size:               4096 kB
ShmemPmdMapped:     2048 kB
FilePmdMapped:         0 kB
7f0000400000-7f0000600000 rw-p 00000000 00:00 0
Size:               2048 kB
AnonHugePages:      2048 kB
ShmemPmdMapped:        0 kB
7f0000600000-7f0000a00000 rw-s 00000000 00:1a 13 /dev/shm/storm-b
ShmemPmdMapped:     4096 kB
"""


@pytest.mark.parametrize(
    ("shmem_enabled", "options", "policy"),
    [
        ("always within_size advise [never] deny force", "rw,relatime,size=24683664k", "never"),
        ("always within_size advise [never] deny force", "rw,relatime,size=64m,huge=advise", "advise"),
        ("always within_size advise [never] deny force", "rw,huge=within_size", "within_size"),
        ("always within_size advise never [deny] force", "rw,huge=always", "never"),
        ("always within_size advise never deny [force]", "rw,relatime", "always"),
        ("[always] within_size advise never deny force", "rw,huge=never", "never"),
    ],
)
def test_the_mount_option_decides_unless_shmem_enabled_denies_or_forces(shmem_enabled, options, policy) -> None:
    assert huge_policy_of(shmem_enabled, options) == policy


def test_huge_mapped_bytes_add_up_the_areas_a_range_overlaps() -> None:
    base = 0x7F0000000000
    assert huge_mapped_bytes(SMAPS, [(base, 4 << 20)]) == 2 << 20
    assert huge_mapped_bytes(SMAPS, [(base + (4 << 20), 2 << 20)]) == 2 << 20  # anonymous THP counts too
    assert huge_mapped_bytes(SMAPS, [(base, 4 << 20), (base + (6 << 20), 4 << 20)]) == 6 << 20
    assert huge_mapped_bytes(SMAPS, [(0x1000, 4096)]) == 0


def test_a_mapping_is_advised_only_where_the_policy_allows() -> None:
    mm = mmap.mmap(-1, 4 << 20, flags=mmap.MAP_SHARED)
    try:
        assert not advise_huge_pages(mm, "never")
        kernel_has_thp = os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled")
        assert advise_huge_pages(mm, "advise") is kernel_has_thp
    finally:
        mm.close()


def test_huge_page_bytes_of_a_small_page_mapping_is_zero() -> None:
    mm = mmap.mmap(-1, 1 << 20, flags=mmap.MAP_SHARED)
    window = (ctypes.c_char * 1).from_buffer(mm)
    try:
        assert huge_page_bytes([(ctypes.addressof(window), 1 << 20)]) == 0
    finally:
        del window
        mm.close()
