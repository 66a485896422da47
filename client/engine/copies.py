"""Bytes between tensors and the pool: a CPU copier and a CUDA copier behind one interface.

This is the seam the other tiers plug into: a copier moves a batch of offloads into
their extents and a batch of fetches back, and says what ``take`` hands out.

NOTE [Aliased fetch]
  On the CPU, backward can read an activation where it lies in the pool: no copy back,
  and no private memory for it. The tensor gets a storage of its own over a ctypes
  window on the mapping, so its lifetime is the storage's: the window's finalizer runs
  when the last view of that storage is gone, and a ``free`` that comes while views are
  alive waits for it (the extent must not be reused under a live tensor). Views that
  outlive the session are detached from the pool (NOTE [Detached views] in
  client/segments.py).

The CUDA copier, its streams, events and pinning are in client/engine/cuda.py
(NOTE [Device hygiene]).
"""

from __future__ import annotations

import ctypes
import time
import weakref
from collections.abc import Callable
from typing import Any, Protocol, cast

import torch

from client.engine.cuda import CudaCopier
from client.engine.jobs import Fetch, Offload
from client.engine.link import D2H, H2D, Link
from client.engine.state import Slot
from client.segments import MappedSegment, SlabLookup

__all__ = ["Copier", "CpuCopier", "PoolViews", "copier_for"]


class PoolViews:
    """Typed views and aliased windows over the mapped segments."""

    def __init__(self, segments: SlabLookup) -> None:
        self.segments = segments

    def view(self, slot: Slot) -> torch.Tensor:
        handle = slot.handle
        raw = self.segments[slot.segment].view(slot.offset, handle.size_bytes)
        return raw.view(handle.dtype).view(handle.shape)

    def alias(self, slot: Slot, released: Callable[[Slot], None]) -> torch.Tensor:
        """A tensor over the slot's extent with a storage of its own (NOTE [Aliased fetch])."""
        handle = slot.handle
        # Only host tensors are fetched in place, and those never land in CUDA memory (the daemon's link
        # from ``cpu`` to a CUDA device is off): the segment maps host memory.
        segment = cast(MappedSegment, self.segments[slot.segment])
        window = (ctypes.c_uint8 * handle.size_bytes).from_buffer(segment.mmap, slot.offset)
        weakref.finalize(window, released, slot)
        return torch.frombuffer(window, dtype=torch.uint8).view(handle.dtype).view(handle.shape)


class Copier(Protocol):
    """How bytes move for one kind of device."""

    def prepare_fetch(self, slot: Slot) -> tuple[Any, Any]:
        """On the asking thread: the destination and its allocation's event (or None, None)."""

    def copy_out(self, jobs: list[Offload]) -> None:
        """Copy each placed job's tensor into its extent; returns once the sources may be dropped."""

    def copy_in(self, jobs: list[Fetch]) -> None:
        """Start copying each job's extent into its destination (if it has one)."""

    def before_free(self, slot: Slot) -> None:
        """Wait for what still reads the extent (an H2D copy in flight)."""


class CpuCopier:
    """One thread's memcpy into the pool; fetches read the pool in place or on the asking thread.

    With a ``link``, each batch takes as long as it would over that link (NOTE [Link emulator]).
    """

    def __init__(self, views: PoolViews, link: Link | None = None) -> None:
        self.views = views
        self.link = link

    def prepare_fetch(self, slot: Slot) -> tuple[Any, Any]:
        return None, None

    def copy_out(self, jobs: list[Offload]) -> None:
        started = time.monotonic()
        for job in jobs:
            dst = self.views.view(job.slot)
            if job.tensor.is_contiguous():
                # One thread's memcpy (ctypes releases the GIL): torch's copy_ would start an
                # OpenMP team in this thread whose spinning steals the trainer's cores.
                ctypes.memmove(dst.data_ptr(), job.tensor.data_ptr(), job.slot.handle.size_bytes)
            else:
                dst.copy_(job.tensor)
        if self.link is not None and jobs:
            self.link.carry(D2H, sum(job.slot.handle.size_bytes for job in jobs), started)

    def copy_in(self, jobs: list[Fetch]) -> None:
        """Nothing moves: ``take`` reads the confirmed extent on the asking thread.

        With a link, the bytes are ready once they would have crossed it.
        """
        if self.link is not None and jobs:
            self.link.carry(H2D, sum(job.slot.handle.size_bytes for job in jobs), time.monotonic())

    def before_free(self, slot: Slot) -> None:
        """Nothing is in flight on the CPU."""


def copier_for(views: PoolViews, cuda: bool, link: Link | None = None) -> Copier:
    """The copier for this process: CUDA streams where CUDA exists (client/engine/cuda.py), else
    the CPU copier (with ``link``). Neither touches CUDA before a CUDA tensor is copied."""
    return CudaCopier(views, CpuCopier(views)) if cuda else CpuCopier(views, link)
