"""What :meth:`StormSystem.offload` returns: a reference to one offloaded activation."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Handle"]


@dataclass(frozen=True, eq=False)
class Handle:
    """One activation on its way to, in, or back from the daemon's pool.

    Immutable facts only; where the activation is and what is happening to it is the
    transfer engine's business (NOTE [Handle states] in client/engine/state.py).
    ``StormSystem.locate(handle)`` says which extent holds it.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    size_bytes: int
    layer_id: int | None
    seq: int
    """Offload order within the StormSystem (backward prefetches in reverse)."""
    generation: int = 0
    """The registration of the StormSystem that offloaded it (see StormSystem.generation)."""

    def __repr__(self) -> str:
        return f"Handle(#{self.seq}, {tuple(self.shape)}, {self.dtype}, {self.device}, layer {self.layer_id})"
