"""The client's view of the daemon's pool: mapped segments and typed views of extents."""

from __future__ import annotations

import logging
import mmap
import os
from dataclasses import dataclass

import torch

__all__ = ["MappedSegment", "PinnedMemoryBuffer"]

log = logging.getLogger("storm.client")

SHM_DIR = "/dev/shm"
_PIN_CHUNK_BYTES = 64 << 30


class MappedSegment:
    """One pool segment mapped into this process, pre-populated (no first-touch faults).

    Where CUDA exists the mapping is page-locked with cudaHostRegister, so that copies
    between the device and the pool are asynchronous DMA.
    """

    def __init__(self, name: str, size_bytes: int, *, pin: bool) -> None:
        if "/" in name or not name:
            raise ValueError(f"segment name {name!r} is not a plain /dev/shm name")
        self.name = name
        self.size_bytes = size_bytes
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR | os.O_CLOEXEC)
        try:
            actual = os.fstat(fd).st_size
            if actual < size_bytes:
                raise ValueError(f"segment {name} is {actual} bytes, the daemon announced {size_bytes}")
            self._mm: mmap.mmap | None = mmap.mmap(fd, size_bytes, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        finally:
            os.close(fd)
        self.bytes = torch.frombuffer(self._mm, dtype=torch.uint8)  # (size_bytes,)
        self.pinned = False
        if pin:
            self._register()

    def _register(self) -> None:
        cudart = torch.cuda.cudart()
        base = self.bytes.data_ptr()
        for offset in range(0, self.size_bytes, _PIN_CHUNK_BYTES):
            length = min(_PIN_CHUNK_BYTES, self.size_bytes - offset)
            err = cudart.cudaHostRegister(base + offset, length, 0)
            if int(err) != 0:
                raise RuntimeError(f"cudaHostRegister of segment {self.name} at offset {offset} failed: {err}")
        self.pinned = True

    @property
    def mmap(self) -> mmap.mmap:
        if self._mm is None:
            raise ValueError(f"segment {self.name} is closed")
        return self._mm

    def view(self, offset: int, size_bytes: int) -> torch.Tensor:
        """The bytes ``[offset, offset + size_bytes)`` as a uint8 tensor (no copy)."""
        if offset < 0 or offset + size_bytes > self.size_bytes:
            raise ValueError(f"extent [{offset}, {offset + size_bytes}) is outside segment {self.name}")
        return self.bytes[offset : offset + size_bytes]

    def close(self) -> None:
        if self._mm is None:
            return
        if self.pinned:
            cudart = torch.cuda.cudart()
            base = self.bytes.data_ptr()
            for offset in range(0, self.size_bytes, _PIN_CHUNK_BYTES):
                cudart.cudaHostUnregister(base + offset)
        del self.bytes
        try:
            self._mm.close()
        except BufferError:
            # A caller still holds a view; the mapping goes when the last view does.
            log.debug("segment %s still has views; leaving it to the garbage collector", self.name)
        self._mm = None


@dataclass
class PinnedMemoryBuffer:
    """A typed tensor view of one extent of the pool (pinned where CUDA exists).

    ``tensor`` aliases the shared segment: writes land in the daemon's pool directly.
    """

    segment: MappedSegment
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
