"""Slabs and how the pool lends them (NOTE [Slabs] in slabs.py, NOTE [Lending slabs] in pool.py)."""

from __future__ import annotations

import fcntl
import mmap
import os

import pytest

from storm_service.pool import Pool
from storm_service.shm import SLAB_SEALS
from storm_service.slabs import ALIGNMENT, Slab

MiB = 1 << 20


def _bytes(slab: Slab, offset: int, size_bytes: int) -> bytes:
    with mmap.mmap(slab.fd, slab.size_bytes) as view:
        return view[offset : offset + size_bytes]


def _write(slab: Slab, offset: int, data: bytes) -> None:
    with mmap.mmap(slab.fd, slab.size_bytes) as view:
        view[offset : offset + len(data)] = data


def test_a_slab_is_a_sealed_memfd_that_nobody_can_resize() -> None:
    slab = Slab(1, MiB)
    try:
        assert fcntl.fcntl(slab.fd, fcntl.F_GET_SEALS) & SLAB_SEALS == SLAB_SEALS
        for size in (0, 2 * MiB):
            with pytest.raises(PermissionError):
                os.ftruncate(slab.fd, size)
        assert os.readlink(f"/proc/self/fd/{slab.fd}").startswith("/memfd:storm-slab-1")
    finally:
        slab.close()


def test_extents_of_a_tenant_lie_only_in_its_slabs() -> None:
    pool = Pool([Slab(i, MiB, backed=False) for i in (1, 2, 3)])
    a = [pool.allocate("uid 1", MiB // 2) for _ in range(3)]
    b = pool.allocate("uid 2", MiB // 2)
    assert None not in a and b is not None
    slabs_of_a = {where[0] for where in a if where is not None}
    assert len(slabs_of_a) == 2 and b[0] not in slabs_of_a
    assert pool.allocate("uid 3", MiB) is None  # every slab is lent: nothing for a third tenant
    assert pool.allocate("uid 2", MiB // 2) is not None  # but its own slab still has room


def test_an_emptied_slab_returns_to_the_same_tenant_without_renewal() -> None:
    pool = Pool([Slab(1, MiB, backed=False)])
    slab_id, offset, _ = pool.allocate("uid 1", ALIGNMENT) or (0, 0, 0)
    assert pool.free(slab_id, offset) == ALIGNMENT and pool.free_slabs == 1
    assert (pool.allocate("uid 1", ALIGNMENT) or (0,))[0] == slab_id and pool.renewed == 0


def test_a_slab_moving_to_another_tenant_is_a_fresh_file_of_zeros() -> None:
    pool = Pool([Slab(1, MiB)])
    try:
        slab_id, offset, length = pool.allocate("uid 1", 4096) or (0, 0, 0)
        old = pool.slabs[slab_id]
        _write(old, offset, b"\xab" * length)
        kept = os.dup(old.fd)  # a process of the former tenant that still maps the slab
        pool.free(slab_id, offset)
        new_id, new_offset, _ = pool.allocate("uid 2", 4096) or (0, 0, 0)
        assert new_id != slab_id and pool.renewed == 1
        assert _bytes(pool.slabs[new_id], new_offset, 4096) == bytes(4096)
        with mmap.mmap(kept, MiB) as former:  # the former tenant sees only its own old bytes
            assert former[offset : offset + 4096] == b"\xab" * 4096
        os.close(kept)
    finally:
        pool.close()
