"""The shared-memory layout both sides agree on: names, pin chunks, huge pages.

A wire module: the client imports it, so it imports nothing from the rest of the daemon
and nothing from torch. The client hands :class:`ChunkPins` the CUDA calls as small
wrappers of ``cudaHostRegister`` and ``cudaHostUnregister`` that return the CUDA error
code as an int (0 is success); the daemon never pins (NOTE [Lazy pinning]).

NOTE [Lazy pinning]
  Page-locking is per process mapping: a registration in the daemon helps no client, and
  costs the daemon a CUDA context. So each client registers its own mapping, and only
  what it uses: a segment is split into chunks of ``PIN_CHUNK_BYTES`` (aligned, at most
  1 GiB), and before a copy touches an extent the chunks it covers are registered, once.
  ``cudaHostRegister`` runs at about 1-2 GB/s on 4 KiB pages, so registering a whole
  pool up front would take seconds per 10 GiB (and a single call of 512 GiB or more
  fails, vLLM PR #51081); a chunk costs a fraction of a second, on the transfer thread,
  while the heartbeat runs. A copy is split at chunk boundaries, so that every piece lies
  in one registration: a range that spans registered and unregistered memory is refused
  by the driver (CUDA_ERROR_INVALID_VALUE), and one that spans two registrations is
  refused by some copy paths. On close the registered chunks, and only they, are
  unregistered. A chunk that fails to register stays pageable, and so do the chunks
  after it: copies still work, synchronously and slower.

NOTE [Huge pages]
  Pinning and mapping cost per page, so a pool backed by 2 MiB pages pins and maps
  about as many times faster as it has fewer pages. Files in /dev/shm get transparent
  huge pages when the tmpfs is mounted with ``huge=always``, ``within_size`` or
  ``advise`` (the last only for mappings advised with ``MADV_HUGEPAGE``), unless
  ``shmem_enabled`` says ``deny`` (or ``force``). Both sides advise their mappings
  where the policy allows it, and report how much of a mapping huge pages back.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import re
import threading
from collections.abc import Callable, Sequence

__all__ = [
    "PIN_CHUNK_BYTES",
    "SEGMENT_PREFIX",
    "SHM_DIR",
    "SLAB_SEALS",
    "ChunkPins",
    "PinError",
    "advise_huge_pages",
    "huge_page_bytes",
    "huge_mapped_bytes",
    "huge_page_policy",
    "huge_policy_of",
    "memfd_huge_policy",
]

SHM_DIR = "/dev/shm"
SEGMENT_PREFIX = "storm-"
"""Segments an earlier daemon put in SHM_DIR, and only they, have names that start with this."""
SLAB_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
"""The seals of every slab (NOTE [Slabs] in storm_service/slabs.py); a client refuses a slab without them."""
PIN_CHUNK_BYTES = 256 << 20
"""Size of one registration (NOTE [Lazy pinning]): a multiple of 2 MiB pages, at most 1 GiB."""
MAX_PIN_CHUNK_BYTES = 1 << 30
_PAGE_BYTES = 4096

SHMEM_ENABLED = "/sys/kernel/mm/transparent_hugepage/shmem_enabled"
HUGE_POLICIES = ("always", "within_size", "advise")
"""Policies under which a shared-memory mapping may be backed by huge pages."""


class PinError(RuntimeError):
    """Registering or unregistering host memory with CUDA failed."""


class ChunkPins:
    """The page-locked chunks of one mapping, registered as copies reach them (NOTE [Lazy pinning]).

    ``register(address, length_bytes)`` and ``unregister(address)`` make one CUDA call
    each and return its error code. Safe to call from any thread.
    """

    def __init__(
        self,
        base: int,
        size_bytes: int,
        register: Callable[[int, int], int],
        unregister: Callable[[int], int],
        *,
        chunk_bytes: int = PIN_CHUNK_BYTES,
        what: str = "mapping",
    ) -> None:
        if not 0 < chunk_bytes <= MAX_PIN_CHUNK_BYTES or chunk_bytes % _PAGE_BYTES:
            raise ValueError(f"a pin chunk must be a multiple of {_PAGE_BYTES} bytes up to 1 GiB, got {chunk_bytes}")
        self.base = base
        self.size_bytes = size_bytes
        self.chunk_bytes = chunk_bytes
        self.what = what
        self._register = register
        self._unregister = unregister
        self._registered: set[int] = set()
        self._lock = threading.Lock()

    @property
    def registered(self) -> list[int]:
        """Indices of the registered chunks, ascending."""
        with self._lock:
            return sorted(self._registered)

    @property
    def pinned_bytes(self) -> int:
        return sum(self.chunk(index)[1] for index in self.registered)

    def chunk(self, index: int) -> tuple[int, int]:
        """``(offset, length_bytes)`` of chunk ``index``: the last one may be shorter."""
        start = index * self.chunk_bytes
        return start, min(self.chunk_bytes, self.size_bytes - start)

    def chunks(self, offset: int, size_bytes: int) -> range:
        """Indices of the chunks that ``[offset, offset + size_bytes)`` touches."""
        if offset < 0 or size_bytes < 0 or offset + size_bytes > self.size_bytes:
            raise ValueError(f"extent [{offset}, {offset + size_bytes}) is outside {self.what} of {self.size_bytes}")
        if size_bytes == 0:
            return range(0)
        return range(offset // self.chunk_bytes, (offset + size_bytes - 1) // self.chunk_bytes + 1)

    def pieces(self, offset: int, size_bytes: int) -> list[tuple[int, int]]:
        """The extent cut at chunk boundaries: ``(start within the extent, length_bytes)`` each."""
        cuts = []
        for index in self.chunks(offset, size_bytes):
            start = max(offset, index * self.chunk_bytes)
            stop = min(offset + size_bytes, (index + 1) * self.chunk_bytes)
            cuts.append((start - offset, stop - start))
        return cuts

    def ensure(self, offset: int, size_bytes: int) -> None:
        """Register every chunk the extent touches that is not registered yet.

        Raises PinError naming ``what``, the chunk and the CUDA error; the chunks
        registered before it stay registered (and are unregistered by :meth:`release`).
        """
        with self._lock:
            for index in self.chunks(offset, size_bytes):
                if index in self._registered:
                    continue
                start, length = self.chunk(index)
                err = self._register(self.base + start, length)
                if err != 0:
                    raise PinError(
                        f"pin {self.what}: cudaHostRegister of {length} bytes at offset {start} "
                        f"(of {self.size_bytes}) failed with CUDA error {err}"
                    )
                self._registered.add(index)

    def release(self) -> None:
        """Unregister exactly the registered chunks.

        Every chunk is tried even when one fails; then PinError names ``what``, the
        offsets that failed and their CUDA error codes.
        """
        with self._lock:
            indices, self._registered = sorted(self._registered), set()
        failed = []
        for index in indices:
            start, _ = self.chunk(index)
            err = self._unregister(self.base + start)
            if err != 0:
                failed.append(f"offset {start}: CUDA error {err}")
        if failed:
            raise PinError(f"unpin {self.what}: cudaHostUnregister failed at {', '.join(failed)}")


def huge_policy_of(shmem_enabled: str, mount_options: str) -> str:
    """The huge-page policy of a tmpfs file (NOTE [Huge pages]): never, always, within_size or advise.

    ``shmem_enabled`` is the text of SHMEM_ENABLED (the selected value in brackets);
    ``mount_options`` the options field of the tmpfs's line in /proc/mounts.
    """
    selected = re.search(r"\[(\w+)\]", shmem_enabled)
    override = selected.group(1) if selected else ""
    if override == "deny":
        return "never"
    if override == "force":
        return "always"
    for option in mount_options.split(","):
        name, _, value = option.partition("=")
        if name == "huge" and value in HUGE_POLICIES:
            return value
    return "never"


def huge_page_policy(path: str = SHM_DIR) -> str:
    """The huge-page policy of files under ``path`` on this host; ``never`` where unknown."""
    try:
        with open(SHMEM_ENABLED) as f:
            shmem_enabled = f.read()
        with open("/proc/self/mounts") as f:
            mounts = [line.split() for line in f]
    except OSError:
        return "never"
    target = os.path.realpath(path)
    best, options = "", ""
    for fields in mounts:
        if len(fields) < 4 or fields[2] != "tmpfs":
            continue
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, options = point, fields[3]
    return huge_policy_of(shmem_enabled, options) if best else "never"


def memfd_huge_policy() -> str:
    """The huge-page policy of memfds (the kernel's internal tmpfs): ``shmem_enabled`` alone decides."""
    try:
        with open(SHMEM_ENABLED) as f:
            selected = re.search(r"\[(\w+)\]", f.read())
    except OSError:
        return "never"
    policy = selected.group(1) if selected else "never"
    return "always" if policy == "force" else policy if policy in HUGE_POLICIES else "never"


def advise_huge_pages(mm: mmap.mmap, policy: str) -> bool:
    """``madvise(MADV_HUGEPAGE)`` on a shared mapping where ``policy`` allows huge pages."""
    if policy not in HUGE_POLICIES:
        return False
    try:
        mm.madvise(mmap.MADV_HUGEPAGE)
    except (OSError, AttributeError):  # a kernel without transparent huge pages
        return False
    return True


_HUGE_LINES = ("ShmemPmdMapped:", "FilePmdMapped:", "AnonHugePages:", "Shared_Hugetlb:", "Private_Hugetlb:")


def huge_mapped_bytes(smaps: str, ranges: Sequence[tuple[int, int]]) -> int:
    """Bytes of the ``(address, size_bytes)`` ranges that huge pages back.

    ``smaps`` is the text of /proc/self/smaps; the lines that count huge pages (shared
    memory and files mapped with 2 MiB entries, anonymous THP, hugetlbfs) of every area
    that overlaps a range are added up.
    """
    total = 0
    inside = False
    for line in smaps.splitlines():
        area = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
        if area:
            start, stop = int(area.group(1), 16), int(area.group(2), 16)
            inside = any(start < address + size and address < stop for address, size in ranges)
        elif inside and line.startswith(_HUGE_LINES):
            total += int(line.split()[1]) * 1024
    return total


def huge_page_bytes(ranges: Sequence[tuple[int, int]]) -> int:
    """How much of this process's mappings at ``(address, size_bytes)`` huge pages back (0 where unknown)."""
    try:
        with open("/proc/self/smaps") as f:
            return huge_mapped_bytes(f.read(), ranges)
    except OSError:
        return 0
