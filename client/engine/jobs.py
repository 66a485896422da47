"""What the training threads queue for the transfer thread, and the engine's counters.

NOTE [Modified sources]
  An offload returns before its bytes are copied, so a tensor changed in place in
  between would be stored with the new bytes. Each offload remembers the version
  counter of its guard tensor (the tensor itself, or the saved tensor whose span is
  copied) and reads it again once the copy is complete (after the D2H event on CUDA).
  If it moved, some in-place operation was issued before the copy finished, so the
  stored bytes cannot be vouched for: the handle fails with ``SourceModifiedError``
  when fetched. PyTorch bumps a version only when an in-place kernel ends, so a change
  still running when the copy completes is not seen here: the autograd hooks therefore
  also check, at unpack, the version of the saved tensor's base while it lives, which is
  autograd's own rule ("modified by an inplace operation"), and a tensor kept in place
  (pool full) is checked when fetched. A source whose storage was freed or resized is
  not read (checked before the copy; a resize that lands during the copy is not seen).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch

from client.engine.state import Slot
from storm_service.errors import SourceModifiedError

__all__ = ["EngineStats", "Fetch", "Flush", "Free", "Offload", "runs_by_layer"]


@dataclass
class EngineStats:
    """Transfer counters of one StormSystem (merged into ``StormSystem.stats()``)."""

    offloaded_tensors: int = 0
    offloaded_bytes: int = 0
    fetched_tensors: int = 0
    fetched_bytes: int = 0
    prefetch_hits: int = 0
    """Fetches whose bytes were already back when asked for."""
    prefetch_waits: int = 0
    """Fetches that had been prefetched but were still copying when asked for."""
    fetch_misses: int = 0
    """Fetches nothing had asked for in advance."""
    fetch_wait_s: float = 0.0
    kept_tensors: int = 0
    kept_bytes: int = 0
    dedup_saved_bytes: int = 0
    """Bytes not copied because a saved tensor read an earlier copy (NOTE [Storage records])."""
    span_saved_bytes: int = 0
    """Bytes of saved tensors' storages outside the spans copied (NOTE [Storage records])."""
    engine_round_trips: int = 0
    """Requests the transfer thread waited on (never the training thread)."""
    offload_round_trips: int = 0
    """Of those, ``offload`` requests: one per layer in steady state (NOTE [Reservations])."""
    fetch_round_trips: int = 0
    """Of those, ``fetch`` requests: a miss and its prefetches go out together."""
    freed_tensors: int = 0
    copy_out_bytes: int = 0
    copy_out_s: float = 0.0
    """Bytes the copier moved into the pool, and the seconds it took (the link's measured rate)."""
    copy_in_bytes: int = 0
    copy_in_s: float = 0.0
    """Likewise back from the pool (on the CPU: the daemon's confirmation, and the link if emulated)."""
    window_waits: int = 0
    window_wait_s: float = 0.0
    """Times, and seconds, a new layer waited for older copies (NOTE [Bounded copies in flight])."""
    prefetch_oom: int = 0
    """Prefetches dropped for want of device memory (fetched on demand instead)."""
    prefetch_deferred: int = 0
    """Prefetches dropped while the disk tier still had them (fetched on demand instead)."""
    returned_reservation_bytes: int = 0
    """Bytes of spare reservations given back (NOTE [Reservations])."""


@dataclass
class Offload:
    slot: Slot
    tensor: torch.Tensor
    producer: Any
    """CUDA: an event recorded on the producer's stream at submit (None on the CPU)."""
    guard: torch.Tensor
    """Whose version must not move before the copy is done (NOTE [Modified sources])."""
    version: int
    address: int
    """``tensor.data_ptr()`` at submit: a storage freed or resized since must not be read."""
    epoch: int
    """The error epoch it was submitted in (NOTE [Error epochs] in client/engine/failures.py)."""

    def moved(self) -> bool:
        """Whether the source's storage was freed or resized since submit (the handle then fails)."""
        storage = self.tensor.untyped_storage()
        end = self.tensor.storage_offset() * self.tensor.element_size() + self.slot.handle.size_bytes
        if self.tensor.data_ptr() == self.address and storage.nbytes() >= end:
            return False
        self.slot.error = SourceModifiedError(
            f"offload: the storage of {self.slot.describe()} was freed or resized before its copy into the pool"
        )
        return True

    def modified(self) -> SourceModifiedError | None:
        """Call once the copy is complete: the error to fail the handle with, if the source moved."""
        now = self.guard._version
        if now == self.version:
            return None
        return SourceModifiedError(
            f"offload: {self.slot.describe()} was changed in place before its copy into the pool was done "
            f"(version {self.version} when offloaded, {now} after the copy)"
        )


@dataclass
class Fetch:
    slot: Slot
    out: torch.Tensor | None
    """CUDA: the destination, allocated on the thread that asked. None on the CPU, where
    ``take`` reads the bytes from the pool."""
    allocated: Any
    """CUDA: an event recorded on the consumer's stream after allocating ``out``."""


@dataclass
class Free:
    slot: Slot


@dataclass
class Flush:
    done: threading.Event


def runs_by_layer(jobs: list[Offload]) -> list[list[Offload]]:
    """Split jobs into consecutive runs that share a layer id (one offload request each)."""
    runs: list[list[Offload]] = []
    for job in jobs:
        if runs and runs[-1][0].slot.handle.layer_id == job.slot.handle.layer_id:
            runs[-1].append(job)
        else:
            runs.append([job])
    return runs
