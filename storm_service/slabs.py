"""Slabs: the daemon's host memory, one sealed memfd each, lent to one tenant at a time.

NOTE [Slabs]
  The pool is a set of slabs, each an anonymous memory file (``memfd_create``): no name
  in /dev/shm, so nobody can open it by path, and nothing is left behind when the daemon
  dies. A slab is sized once, pre-faulted (NOTE [Pool reservation] in pool.py), and
  sealed against shrinking and growing (``F_SEAL_SHRINK | F_SEAL_GROW``, then
  ``F_SEAL_SEAL`` so that no holder can change the seals): no client that holds its fd
  can ``ftruncate`` it and kill the others with SIGBUS. A client gets a slab's fd only
  over the fd socket (NOTE [Lending by descriptor] in lending.py), and only while its
  tenant holds the slab.

  A slab belongs to at most one tenant (``tenant``), has its own allocator, and goes
  back to the free list when its last extent is freed. A mapping cannot be revoked, so
  a slab that moves to another tenant is not zeroed in place: :meth:`Slab.renew` swaps
  its file for a fresh one (new id, fresh zero pages) and closes the old one. Processes
  of the former tenant that mapped the old file keep only their own old bytes; its RAM
  returns when the last of them unmaps it. A free slab is handed back to the tenant that
  last held it where possible (its processes still map it: no renewal, no new fd).
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os

from storm_service.allocator import ExtentAllocator
from storm_service.shm import SLAB_SEALS, advise_huge_pages, memfd_huge_policy
from storm_service.units import format_bytes

__all__ = ["ALIGNMENT", "Slab", "SlabError", "sealed_memfd"]

ALIGNMENT = 512
_MADV_POPULATE_WRITE = 23  # Linux 5.14; Python's mmap module does not export it


class SlabError(RuntimeError):
    """A slab cannot be created (no memory, a bad size)."""


class Slab:
    """One sealed, pre-faulted memfd of ``size_bytes`` and the allocator of its extents.

    ``backed=False`` makes a slab without memory (``fd`` -1): allocators deal in offsets
    only, so the daemon's logic runs in tests over pools larger than the machine.
    """

    def __init__(self, slab_id: int, size_bytes: int, *, backed: bool = True, alignment: int = ALIGNMENT) -> None:
        self.id = slab_id
        self.size_bytes = size_bytes
        self.backed = backed
        self.fd = sealed_memfd(f"storm-slab-{slab_id}", size_bytes) if backed else -1
        self.allocator = ExtentAllocator(size_bytes, alignment)
        self._mapping: mmap.mmap | None = None
        self.tenant: str | None = None
        """The tenant that holds it now; None while it is free."""
        self.last_tenant: str | None = None
        """The tenant whose bytes it may still hold (its processes may map it)."""

    def view(self, offset: int, length: int) -> memoryview:
        """The daemon's own view of ``length`` bytes at ``offset`` (mapped on first use), for disk I/O."""
        if self._mapping is None:
            assert self.backed, "a slab without memory has no bytes to view"
            self._mapping = mmap.mmap(self.fd, self.size_bytes, flags=mmap.MAP_SHARED)
        return memoryview(self._mapping)[offset : offset + length]

    def renew(self, slab_id: int) -> None:
        """Swap the file for a fresh, zeroed one under a new id (NOTE [Slabs]); only while free."""
        assert self.allocator.live_count == 0, "renew a slab with live extents"
        fd = sealed_memfd(f"storm-slab-{slab_id}", self.size_bytes) if self.backed else -1
        self.close()
        self.id, self.fd, self.last_tenant = slab_id, fd, None

    def close(self) -> None:
        if self._mapping is not None:
            self._mapping.close()
            self._mapping = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def sealed_memfd(label: str, size_bytes: int) -> int:
    """A memfd of ``size_bytes``, every page allocated, sealed against resizing (NOTE [Slabs])."""
    fd = os.memfd_create(label, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size_bytes)
        with mmap.mmap(fd, size_bytes, flags=mmap.MAP_SHARED) as mm:
            advise_huge_pages(mm, memfd_huge_policy())
            _populate(fd, mm, size_bytes)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SLAB_SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _populate(fd: int, mm: mmap.mmap, size_bytes: int) -> None:
    """Allocate every page now: a fault later could find no memory (NOTE [Pool reservation] in pool.py)."""
    try:
        mm.madvise(_MADV_POPULATE_WRITE)
    except OSError as e:
        if e.errno != errno.EINVAL:  # EINVAL: a kernel before 5.14; posix_fallocate does it all
            raise SlabError(f"cannot reserve a slab of {format_bytes(size_bytes)}: {e.strerror}") from e
    try:
        os.posix_fallocate(fd, 0, size_bytes)
    except OSError as e:
        raise SlabError(f"cannot reserve a slab of {format_bytes(size_bytes)}: {e.strerror}") from e
