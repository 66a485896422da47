"""What ``StormSystem.stats()`` returns."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from client.engine import EngineStats

__all__ = ["SystemStats"]


@dataclass
class SystemStats(EngineStats):
    """The daemon's view of this session, plus this client's transfer counters (``EngineStats``).

    Byte counts are bytes; ``layer_bytes`` maps a layer id to the pool bytes its
    activations hold now. ``as_dict()`` gives the same as a plain dict (for JSON).
    """

    session_id: int = 0
    endpoint: str = ""
    used_bytes: int = 0
    """Bytes of committed activations this session holds."""
    reserved_bytes: int = 0
    """Bytes reserved ahead of copies, not holding an activation yet (NOTE [Reservations])."""
    peak_bytes: int = 0
    quota_bytes: int = 0
    handles: int = 0
    layer_bytes: dict[int, int] = field(default_factory=dict)
    pool_bytes: int = 0
    pool_used_bytes: int = 0
    """Bytes of committed activations of every session."""
    blocking_round_trips: int = 0
    """Requests the training thread waited on (register, stats, close): not one per tensor."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
