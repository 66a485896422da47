"""The host pool: POSIX shared-memory segments in /dev/shm plus an allocator per segment.

NOTE [Pool reservation]
  Creating a file in /dev/shm and mapping it reserves nothing: a pool larger than the
  free space of /dev/shm maps fine and then kills whoever touches a page past the end
  with SIGBUS. So every page is allocated (and zeroed) up front, and a too-small
  /dev/shm is an error at start instead: first through the mapping with
  ``MADV_POPULATE_WRITE``, which fails with an error instead of SIGBUS and allocates
  huge pages where the mapping was advised to (NOTE [Huge pages] in storm_service/shm.py;
  ``posix_fallocate`` allocates without a mapping, so never huge pages under
  ``huge=advise``), then ``posix_fallocate`` for whatever a kernel before 5.14 left.
  Clients map with ``MAP_POPULATE``, so that no offload pays first-touch faults
  (measured 5-8x slower than warm copies).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from storm_service.allocator import ExtentAllocator
from storm_service.shm import SEGMENT_PREFIX, SHM_DIR, advise_huge_pages, huge_page_bytes, huge_page_policy
from storm_service.units import format_bytes

__all__ = ["Pool", "PoolError", "Segment", "sweep_segments"]

log = logging.getLogger("stormd.pool")

ALIGNMENT = 512
_MADV_POPULATE_WRITE = 23  # Linux 5.14; Python's mmap module does not export it


class PoolError(RuntimeError):
    """The pool cannot be created (no room in /dev/shm, a name clash, a bad size)."""


@dataclass
class Segment:
    name: str
    size_bytes: int
    _mm: mmap.mmap

    @property
    def path(self) -> str:
        return os.path.join(SHM_DIR, self.name)

    @classmethod
    def create(cls, name: str, size_bytes: int, mode: int = 0o600, gid: int = -1, huge: str = "never") -> Segment:
        """Create and reserve a fresh segment (see NOTE [Pool reservation]).

        ``huge`` is the huge-page policy of SHM_DIR (``huge_page_policy()``): where it
        allows, the mapping is advised to use huge pages before any page exists.
        """
        path = os.path.join(SHM_DIR, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            os.fchown(fd, -1, gid)
            os.fchmod(fd, mode)  # the umask may have narrowed it; --group widens it on purpose
            os.ftruncate(fd, size_bytes)
            mm = mmap.mmap(fd, size_bytes, flags=mmap.MAP_SHARED)
            try:
                advise_huge_pages(mm, huge)
                _reserve(fd, mm, size_bytes)
            except BaseException:
                mm.close()
                raise
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        return cls(name=name, size_bytes=size_bytes, _mm=mm)

    @property
    def address(self) -> int:
        """Where the daemon's mapping starts."""
        window = (ctypes.c_char * 1).from_buffer(self._mm)
        address = ctypes.addressof(window)
        del window  # the export would keep the mapping from closing
        return address

    def close(self) -> None:
        """Unmap and unlink. A client that still maps the segment keeps its pages until it unmaps."""
        try:
            self._mm.close()
        except BufferError:
            log.warning("segment %s still has exported views; leaving it mapped", self.name)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class Pool:
    """The segments and their allocators. An extent is ``(segment index, offset, length)``."""

    def __init__(self, segments: list[Segment]) -> None:
        self.segments = segments
        self.allocators = [ExtentAllocator(s.size_bytes, ALIGNMENT) for s in segments]

    @classmethod
    def create(
        cls,
        pool_size: int,
        segment_size: int,
        mode: int = 0o600,
        gid: int = -1,
        announce: Callable[[list[str]], None] = lambda names: None,
    ) -> Pool:
        """Create every segment; ``announce`` gets their names before any file exists.

        The daemon records the names in its lock file through ``announce``, so that a
        daemon killed while creating the pool still leaves nothing a later sweep misses.
        """
        if pool_size < ALIGNMENT:
            raise PoolError(f"--pool-size {pool_size} is smaller than {ALIGNMENT} bytes")
        shm = os.statvfs(SHM_DIR)
        if pool_size > shm.f_bavail * shm.f_frsize:
            raise PoolError(
                f"cannot reserve {format_bytes(pool_size)} in {SHM_DIR}: "
                f"{format_bytes(shm.f_bavail * shm.f_frsize)} free; "
                "lower --pool-size or enlarge /dev/shm (docker: --shm-size)"
            )
        sizes = []
        remaining = pool_size
        while remaining > 0:
            size = min(remaining, segment_size)
            sizes.append(size - size % ALIGNMENT or ALIGNMENT)
            remaining -= size
        names = [SEGMENT_PREFIX + secrets.token_hex(12) for _ in sizes]
        announce(names)
        huge = huge_page_policy(SHM_DIR)
        segments: list[Segment] = []
        try:
            for name, size in zip(names, sizes, strict=True):
                segments.append(Segment.create(name, size, mode, gid, huge))
        except BaseException:
            for segment in segments:
                segment.close()
            raise
        log.info(
            "huge pages back %s of the pool (%s policy %s)",
            format_bytes(huge_page_bytes([(segment.address, segment.size_bytes) for segment in segments])),
            SHM_DIR,
            huge,
        )
        return cls(segments)

    @property
    def size_bytes(self) -> int:
        return sum(a.size_bytes for a in self.allocators)

    @property
    def used_bytes(self) -> int:
        return sum(a.used_bytes for a in self.allocators)

    @property
    def free_bytes(self) -> int:
        return self.size_bytes - self.used_bytes

    @property
    def largest_free_bytes(self) -> int:
        return max(a.free_stats().largest_free_bytes for a in self.allocators)

    def allocate(self, size_bytes: int) -> tuple[int, int, int] | None:
        """Return ``(segment, offset, length)`` of a new extent, or None when nothing fits."""
        for index, allocator in enumerate(self.allocators):
            offset = allocator.allocate(size_bytes)
            if offset is not None:
                return index, offset, allocator.length_of(offset)
        return None

    def free(self, segment: int, offset: int) -> int:
        return self.allocators[segment].free(offset)

    def describe(self) -> list[dict[str, object]]:
        return [{"name": s.name, "size_bytes": s.size_bytes} for s in self.segments]

    def close(self) -> None:
        for segment in self.segments:
            segment.close()


def _reserve(fd: int, mm: mmap.mmap, size_bytes: int) -> None:
    """Allocate every page of the segment, or raise PoolError (NOTE [Pool reservation])."""
    try:
        mm.madvise(_MADV_POPULATE_WRITE)
    except OSError as e:
        if e.errno != errno.EINVAL:  # EINVAL: a kernel before 5.14; posix_fallocate does it all
            raise _no_room(size_bytes, e) from e
    try:
        os.posix_fallocate(fd, 0, size_bytes)
    except OSError as e:
        raise _no_room(size_bytes, e) from e


def _no_room(size_bytes: int, error: OSError) -> PoolError:
    free = os.statvfs(SHM_DIR)
    reason = "no space left" if error.errno == errno.EFAULT else error.strerror  # EFAULT: a fault would SIGBUS
    return PoolError(
        f"cannot reserve {format_bytes(size_bytes)} in {SHM_DIR}: "
        f"{format_bytes(free.f_bavail * free.f_frsize)} free ({reason}); "
        "lower --pool-size or enlarge /dev/shm (docker: --shm-size)"
    )


def sweep_segments(names: object) -> list[str]:
    """Unlink STORM segments a dead daemon left behind; returns the names removed."""
    removed = []
    for name in names if isinstance(names, list) else []:
        if not isinstance(name, str) or not name.startswith(SEGMENT_PREFIX) or "/" in name:
            continue
        try:
            os.unlink(os.path.join(SHM_DIR, name))
            removed.append(name)
        except FileNotFoundError:
            pass
    return removed
