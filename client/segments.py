"""The client's view of the daemon's pool: the slabs lent to its tenant, mapped lazily, and typed views of extents.

NOTE [Detached views]
  Tensors may read the pool in place (NOTE [Aliased fetch] in client/engine/copies.py, and
  ``PinnedMemoryBuffer.as_tensor``), and one may outlive its session: autograd can hand
  an unpacked saved tensor back as a gradient, so ``leaf.grad`` lives in the pool. Two
  rules keep such a tensor valid and private. Every tensor over a mapping holds a buffer
  export of it (through a ctypes window), so the mapping is never unmapped under one.
  And when the slab is closed while some remain, the whole mapping is replaced in
  place, before the session is given up, by private anonymous memory, with the bytes
  of the extents that aliased tensors read copied over: the daemon may lend those
  extents to another session at once, and nothing it writes there can reach this
  process again. Other addresses of the old mapping read zeros from then on.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from storm_service.errors import ProtocolError
from storm_service.fdpass import LentSlab
from storm_service.shm import advise_huge_pages, memfd_huge_policy

__all__ = ["LentSlabs", "MappedSegment", "PinnedMemoryBuffer", "Segment", "SlabLookup"]

log = logging.getLogger("storm.client")

_PAGE_BYTES = mmap.PAGESIZE
# Linux's values on every architecture PyTorch ships for; Python's mmap module does not export them.
_MAP_FIXED = 0x10
_MAP_NORESERVE = 0x4000

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]


class MappedSegment:
    """One slab lent by the daemon, mapped into this process, pre-populated (no first-touch faults).

    ``fd`` is the slab's memfd as the daemon sent it, already checked (NOTE [Verifying
    the daemon] in storm_service/fdpass.py); it is closed once mapped. Huge pages back
    the mapping where the kernel's policy allows (NOTE [Huge pages] in
    storm_service/shm.py). With ``pin``, the CUDA copier page-locks the chunks its copies
    touch, as they touch them (NOTE [Lazy pinning]); the slab itself never calls CUDA.
    """

    def __init__(self, slab_id: int, fd: int, size_bytes: int, *, pin: bool, device: str | None = None) -> None:
        self.name = f"slab {slab_id}"
        self.size_bytes = size_bytes
        self.device = device
        """The device (a ``fake`` one) this slab is memory of (NOTE [Device tier]); None for the host pool."""
        self.pin = pin
        """Whether this process may page-lock the mapping (``STORM_PIN``)."""
        try:
            self._mm: mmap.mmap | None = mmap.mmap(fd, size_bytes, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        finally:
            os.close(fd)
        advise_huge_pages(self._mm, memfd_huge_policy())
        window = (ctypes.c_uint8 * size_bytes).from_buffer(self._mm)  # holds an export: NOTE [Detached views]
        self.address = ctypes.addressof(window)
        """Where the mapping starts in this process."""
        self.bytes = torch.frombuffer(window, dtype=torch.uint8)  # (size_bytes,)

    @property
    def mmap(self) -> mmap.mmap:
        if self._mm is None:
            raise ValueError(f"{self.name} is closed")
        return self._mm

    def view(self, offset: int, size_bytes: int) -> torch.Tensor:
        """The bytes ``[offset, offset + size_bytes)`` as a uint8 tensor (no copy)."""
        if offset < 0 or offset + size_bytes > self.size_bytes:
            raise ValueError(f"extent [{offset}, {offset + size_bytes}) is outside {self.name}")
        return self.bytes[offset : offset + size_bytes]

    def close(self, keep: Sequence[tuple[int, int]] = ()) -> None:
        """Unmap the slab, or detach it if tensors still read it (NOTE [Detached views]).

        ``keep`` lists the ``(offset, size_bytes)`` extents whose bytes live tensors need.
        Its pinned chunks must be unregistered first (the CUDA copier's ``close`` does).
        """
        if self._mm is None:
            return
        del self.bytes
        try:
            self._mm.close()
        except BufferError:
            self._detach(keep)
            log.debug("%s still has views; detached it from the pool", self.name)
        self._mm = None

    def _detach(self, keep: Sequence[tuple[int, int]]) -> None:
        """Replace the mapping in place with private memory holding the ``keep`` extents' bytes."""
        saved = [(start, ctypes.string_at(self.address + start, stop - start)) for start, stop in _page_ranges(keep)]
        address = _libc.mmap(
            self.address,
            self.size_bytes,
            mmap.PROT_READ | mmap.PROT_WRITE,
            mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE | _MAP_FIXED,
            -1,
            0,
        )
        if address != self.address:
            errno = ctypes.get_errno()
            raise OSError(errno, f"detaching {self.name}: mmap failed: {os.strerror(errno)}")
        for start, data in saved:
            ctypes.memmove(self.address + start, data, len(data))


class Segment(Protocol):
    """A lent slab as the copiers use it: :class:`MappedSegment` (host memory, or a ``fake`` device's),
    or a CUDA device slab (client/engine/ipc.py)."""

    @property
    def name(self) -> str: ...

    @property
    def size_bytes(self) -> int: ...

    @property
    def device(self) -> str | None: ...

    @property
    def pin(self) -> bool: ...

    @property
    def address(self) -> int | None:
        """Where its memory starts in this process (None once a device slab is closed)."""

    def view(self, offset: int, size_bytes: int) -> torch.Tensor: ...

    def close(self, keep: Sequence[tuple[int, int]] = ()) -> None: ...


class SlabLookup(Protocol):
    """What the transfer engine reads mapped slabs through: :class:`LentSlabs`, or a list in tests."""

    def __getitem__(self, slab_id: int, /) -> Segment: ...


class LentSlabs:
    """The slabs this process maps, by slab id, each mapped the first time an extent in it is used.

    ``lend(slab_id)`` asks the daemon for the slab (storm_service/fdpass.py); a CUDA device
    slab is opened by ``open_device`` (client/engine/ipc.py), which is None where this
    process has no CUDA. Safe to use from any thread.
    """

    def __init__(
        self,
        lend: Callable[[int], LentSlab],
        *,
        pin: bool,
        open_device: Callable[[LentSlab], Segment] | None = None,
    ) -> None:
        self._lend = lend
        self._pin = pin
        self._open_device = open_device
        self._mapped: dict[int, Segment] = {}
        self._lock = threading.Lock()

    def __getitem__(self, slab_id: int) -> Segment:
        segment = self._mapped.get(slab_id)
        if segment is not None:
            return segment
        with self._lock:
            segment = self._mapped.get(slab_id)
            if segment is None:
                segment = self._mapped[slab_id] = self._open(self._lend(slab_id))
            return segment

    def _open(self, lent: LentSlab) -> Segment:
        if lent.fd is not None:
            return MappedSegment(lent.slab_id, lent.fd, lent.size_bytes, pin=self._pin, device=lent.device)
        if self._open_device is None:
            raise ProtocolError(f"slab {lent.slab_id} is memory of GPU {lent.device}, and this process has no CUDA")
        return self._open_device(lent)

    def items(self) -> list[tuple[int, Segment]]:
        with self._lock:
            return list(self._mapped.items())

    def __iter__(self) -> Iterator[Segment]:
        return iter([segment for _, segment in self.items()])

    def close(self, viewed: Iterable[tuple[int, int, int]]) -> None:
        """Close every slab; ``viewed`` lists ``(slab id, offset, size_bytes)`` of the extents live tensors
        still read, whose bytes a host slab keeps (NOTE [Detached views])."""
        keep: dict[int, list[tuple[int, int]]] = {}
        for slab_id, offset, size_bytes in viewed:
            keep.setdefault(slab_id, []).append((offset, size_bytes))
        for slab_id, segment in self.items():
            segment.close(keep=keep.get(slab_id, []))


def _page_ranges(extents: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The extents widened to whole pages, sorted and merged: ``[(start, stop), ...]``."""
    ranges: list[tuple[int, int]] = []
    for offset, size_bytes in sorted(extents):
        start = offset - offset % _PAGE_BYTES
        stop = -(-(offset + size_bytes) // _PAGE_BYTES) * _PAGE_BYTES
        if ranges and start <= ranges[-1][1]:
            ranges[-1] = (ranges[-1][0], max(ranges[-1][1], stop))
        else:
            ranges.append((start, stop))
    return ranges


@dataclass
class PinnedMemoryBuffer:
    """A typed tensor view of one extent of the pool (pinned where CUDA exists).

    ``tensor`` aliases the lent slab: writes land in the daemon's pool directly.
    """

    segment: Segment
    offset: int
    size_bytes: int

    def as_tensor(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        numel = 1
        for dim in shape:
            numel *= dim
        nbytes = numel * dtype.itemsize
        if nbytes > self.size_bytes:
            raise ValueError(
                f"a {dtype} tensor of shape {shape} needs {nbytes} bytes; the extent has {self.size_bytes}"
            )
        return self.segment.view(self.offset, nbytes).view(dtype).view(shape)
