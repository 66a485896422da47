"""Per-handle transfer state: one table, one lock.

NOTE [Handle states]
  A :class:`~client.handle.Handle` is what the caller holds: immutable facts about one
  activation. Everything that changes while it moves lives in its :class:`Slot`, kept
  in the engine's :class:`SlotTable` and changed only under the table's lock (or by the
  transfer thread before ``stored`` is set, when nobody else reads it)::

      submitted ──(placed + copied + committed)──> stored ──(fetch asked)──> requested
          │                                          ▲                          │
          │ pool full, policy keep: kept             │ taken (fetch_done reset) │
          │ pool full, policy error/wait: error      └──── fetch_done ◄─────────┘
          ▼                                                (bytes ready: CUDA copy
      freed ◄── free (from any state; waits for aliased views: free_pending)  event,
                                                                              or CPU extent checked)

  ``stored`` and ``fetch_done`` are events the training thread waits on; every other
  field is plain data. A slot leaves the table when it is freed.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from client.handle import Handle
from storm_service.errors import SourceModifiedError

__all__ = ["Slot", "SlotTable"]


@dataclass(eq=False)
class Slot:
    """The moving parts of one handle (NOTE [Handle states])."""

    handle: Handle
    id: int | None = None
    """The daemon's handle for the extent, once placed."""
    segment: int = -1
    offset: int = -1
    kept: torch.Tensor | None = None
    """The original tensor, when the pool had no room under policy ``keep`` (or it is empty)."""
    kept_version: int = 0
    """``kept._version`` when it was kept: a kept tensor changed in place since is refused."""
    error: BaseException | None = None
    freed: bool = False
    fetch_requested: bool = False
    prefetched: bool = False
    awaited: bool = False
    """A training thread waits in ``take`` for its fetch (set and read under the table's lock)."""
    taken_pass: int = -1
    """The fetch pass that handed it out; prefetch skips it within that pass."""
    fetched: torch.Tensor | None = None
    views: int = 0
    """Live tensors that read this extent in place (NOTE [Aliased fetch] in client/engine/copies.py)."""
    free_pending: bool = False
    stream: Any = None
    """CUDA: the stream current on the tensor's device when it was offloaded; its fetch
    allocates there (NOTE [Device hygiene] in client/engine/cuda.py)."""
    copy_event: Any = None
    """CUDA: the H2D copy into ``fetched`` (a ``Landing``; None on CPU)."""
    stored: threading.Event = field(default_factory=threading.Event)
    fetch_done: threading.Event = field(default_factory=threading.Event)

    @property
    def placed(self) -> bool:
        return self.id is not None

    def take_kept(self, out: torch.Tensor | None) -> torch.Tensor:
        """The kept tensor, unless it changed in place since it was kept (NOTE [Modified sources])."""
        assert self.kept is not None
        if self.error is not None:
            raise copy.copy(self.error)  # a copy: a traceback on the stored one would pin its frames
        if self.kept._version != self.kept_version:
            raise SourceModifiedError(f"fetch: {self.describe()} was kept in place and changed in place since")
        return self.kept if out is None else out.copy_(self.kept)

    def describe(self) -> str:
        """The handle, with where it is: for messages."""
        where = (
            f"handle {self.id}" if self.id is not None else ("kept in place" if self.kept is not None else "pending")
        )
        handle = self.handle
        return f"Handle({where}, {tuple(handle.shape)}, {handle.dtype}, {handle.device}, layer {handle.layer_id})"


class SlotTable:
    """Slots of the handles not freed yet, in offload order, under one lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._slots: dict[int, Slot] = {}
        self._viewed: set[Slot] = set()

    def add(self, handle: Handle) -> Slot:
        slot = Slot(handle)
        with self.lock:
            self.insert(slot)
        return slot

    def insert(self, slot: Slot) -> None:
        """Add a slot made by the caller (call with ``lock`` held)."""
        self._slots[slot.handle.seq] = slot

    def get(self, handle: Handle) -> Slot | None:
        """The handle's slot (None once freed); callers hold ``lock`` if they change it."""
        return self._slots.get(handle.seq)

    def remove(self, slot: Slot) -> None:
        """Forget a freed slot (call with ``lock`` held)."""
        self._slots.pop(slot.handle.seq, None)

    def newest_first(self) -> Iterator[Slot]:
        """Live slots, latest offload first (call with ``lock`` held)."""
        return reversed(self._slots.values())

    def viewed(self, slot: Slot, delta: int) -> int:
        """Count an aliased view of ``slot`` coming (+1) or going (-1); returns the views left."""
        slot.views += delta
        if slot.views:
            self._viewed.add(slot)
        else:
            self._viewed.discard(slot)
        return slot.views

    def viewed_extents(self) -> list[tuple[int, int, int]]:
        """``(segment, offset, size_bytes)`` of every extent a live aliased tensor reads."""
        with self.lock:
            return [(s.segment, s.offset, s.handle.size_bytes) for s in self._viewed]
