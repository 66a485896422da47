"""One session: a registered client, what it holds, and how it is bound (NOTE [Lending by descriptor] in lending.py).

The table of sessions, their extents and the checks on each access are in sessions.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from storm_service.replay import ReplayMemory
from storm_service.tenants import TenantUsage

__all__ = ["Session"]


@dataclass
class Session:
    id: int
    token: str
    pid: int
    name: str
    rank: int | None
    world_size: int | None
    quota_bytes: int
    pid_ns: int | None
    last_seen: float
    tenant: TenantUsage
    """The tenant (uid) this session belongs to (NOTE [Peer credentials] in tenants.py)."""
    nonce: str | None = None
    """The register nonce this session was opened with (NOTE [Register nonce])."""
    handles: set[int] = field(default_factory=set)
    used_bytes: int = 0
    """Bytes of committed extents: activations held."""
    reserved_bytes: int = 0
    """Bytes of extents allocated and not yet committed."""
    disk_bytes: int = 0
    """Bytes of its extents held in the disk tier only (NOTE [Disk tier] in storm_service/disk/tier.py)."""
    device_bytes: int = 0
    """Bytes of its extents (committed or not) in the device tier: part of ``used_bytes`` and ``reserved_bytes``
    (NOTE [Device tier] in storm_service/device/tier.py)."""
    peak_bytes: int = 0
    """Most bytes held (used + reserved) at once."""
    offloaded_bytes: int = 0
    fetched_bytes: int = 0
    dedup_saved_bytes: int = 0
    """Bytes the client reports it did not copy: saved tensors that read an earlier copy."""
    span_saved_bytes: int = 0
    """Bytes the client reports it did not copy: storage outside the spans its saved tensors cover."""
    layer_bytes: dict[int, int] = field(default_factory=dict)
    """Bytes held per layer id: at most MAX_SESSION_LAYERS ids, plus the overflow key (NOTE [Layer stats cap])."""
    replies: ReplayMemory = field(default_factory=ReplayMemory)
    """Replies to its latest mutating requests (NOTE [Replay memory] in replay.py)."""
    uid: int | None = None
    """The uid of the process that first asked for a slab's fd (NOTE [Lending by descriptor] in lending.py)."""
    pidfd: int | None = None
    """A pidfd of that process (NOTE [Fencing] in pidfds.py)."""
    bound_pid: int | None = None
    """That process's pid in the daemon's pid namespace: the only one lent device slabs (NOTE [Importers])."""

    @property
    def held_bytes(self) -> int:
        """Bytes this session holds in the pool, committed or not (what its quota bounds)."""
        return self.used_bytes + self.reserved_bytes

    def summary(self) -> dict[str, object]:
        return {
            "id": self.id,
            "tenant": self.tenant.name,
            "pid": self.pid,
            "name": self.name,
            "rank": self.rank,
            "world_size": self.world_size,
            "used_bytes": self.used_bytes,
            "reserved_bytes": self.reserved_bytes,
            "disk_bytes": self.disk_bytes,
            "device_bytes": self.device_bytes,
            "peak_bytes": self.peak_bytes,
            "quota_bytes": self.quota_bytes,
            "handles": len(self.handles),
            "offloaded_bytes": self.offloaded_bytes,
            "fetched_bytes": self.fetched_bytes,
            "dedup_saved_bytes": self.dedup_saved_bytes,
            "span_saved_bytes": self.span_saved_bytes,
            "idle_s": round(time.monotonic() - self.last_seen, 3),
        }
