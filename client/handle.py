"""What :meth:`StormSystem.offload` returns: a reference to one offloaded activation."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

__all__ = ["Handle"]


@dataclass(eq=False)
class Handle:
    """One activation on its way to, in, or back from the daemon's pool.

    NOTE [Handle states]
      offload returns at once; the transfer engine allocates, copies and commits, then
      sets ``stored``. A fetch is requested (by ``fetch`` or by prefetch), the engine
      copies the bytes back into ``fetched`` and sets ``fetch_done``; ``fetch`` hands
      that tensor out. ``free`` returns the extent. If the pool had no room and the
      policy is ``keep``, ``kept`` holds the original tensor and nothing moves.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    size_bytes: int
    layer_id: int | None
    seq: int
    generation: int = 0
    """The registration of the StormSystem that offloaded it (see StormSystem.generation)."""
    id: int | None = None
    segment: int = -1
    offset: int = -1
    kept: torch.Tensor | None = None
    error: BaseException | None = None
    freed: bool = False
    fetch_requested: bool = False
    prefetched: bool = False
    taken_pass: int = -1
    """The fetch pass that handed it out; prefetch skips it within that pass."""
    fetched: torch.Tensor | None = None
    views: int = 0
    """Live tensors that read this extent in place (NOTE [Aliased fetch] in client/engine.py)."""
    free_pending: bool = False
    copy_event: object | None = None
    """CUDA: the event that completes the H2D copy into ``fetched`` (None on CPU)."""
    stored: threading.Event = field(default_factory=threading.Event)
    fetch_done: threading.Event = field(default_factory=threading.Event)

    def __repr__(self) -> str:
        where = (
            f"handle {self.id}" if self.id is not None else ("kept in place" if self.kept is not None else "pending")
        )
        return f"Handle({where}, {tuple(self.shape)}, {self.dtype}, {self.device}, layer {self.layer_id})"
