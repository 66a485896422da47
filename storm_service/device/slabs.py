"""Device slabs: one device allocation each, lent to one tenant at a time, freed only when no importer is left.

NOTE [Device slabs]
  A device slab is a host slab's twin (NOTE [Slabs] in storm_service/slabs.py): one
  allocation of one backend, its own extent allocator, lent to one tenant, and renewed
  (a fresh zeroed allocation under a new id) when it moves to another tenant. What
  differs is freeing. A process that opened a CUDA IPC handle keeps a mapping the daemon
  cannot revoke, and memory freed under it could be handed to anyone. So the processes a
  slab was lent to are its importers (NOTE [Importers] in importers.py), and memory a
  slab gives up (at renewal) is retired, not freed: :meth:`Retired.release` frees it
  only once every importer of it has exited.
  Retired memory is bounded by the device's share of the tier: past that a slab is not
  renewed (it stays free for its last tenant), so tenants taking turns on a slab while
  the former one's process lives cannot make the daemon hold ever more of the device.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from storm_service.allocator import ExtentAllocator
from storm_service.device.backend import DeviceBackend, DeviceError, DeviceMemory
from storm_service.slabs import SlabError

__all__ = ["Alive", "DeviceSlab", "Retired"]

Alive = Callable[[int], bool]
"""Whether an importer (a pid) may still map what it was lent."""
PRUNE_PAST = 64
"""Importers a slab remembers before it forgets those that exited."""

log = logging.getLogger("stormd.device")


class Retired:
    """Device memory given up by slabs, each with the sessions that may still map it; at most ``limit_bytes``."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self._memory: list[tuple[DeviceMemory, set[int]]] = []

    def add(self, memory: DeviceMemory, importers: set[int]) -> None:
        if importers:
            self._memory.append((memory, importers))
        else:
            memory.free()

    def release(self, alive: Alive) -> int:
        """Free what no live importer may map any more; returns the bytes freed."""
        freed, kept = 0, []
        for memory, importers in self._memory:
            if any(alive(pid) for pid in importers):
                kept.append((memory, importers))
            else:
                memory.free()
                freed += memory.size_bytes
        self._memory = kept
        return freed

    @property
    def size_bytes(self) -> int:
        return sum(memory.size_bytes for memory, _ in self._memory)

    def close(self) -> None:
        for memory, _ in self._memory:
            memory.free()
        self._memory = []


class DeviceSlab:
    """One allocation of ``backend`` and the allocator of its extents (NOTE [Device slabs])."""

    def __init__(
        self, slab_id: int, backend: DeviceBackend, size_bytes: int, alignment: int, retired: Retired, alive: Alive
    ) -> None:
        self.id = slab_id
        self.backend = backend
        self.size_bytes = size_bytes
        self.memory = backend.allocate(size_bytes)
        self.allocator = ExtentAllocator(size_bytes, alignment)
        self.tenant: str | None = None
        self.last_tenant: str | None = None
        self.importers: set[int] = set()
        """Pids of the processes this slab's memory was lent to (NOTE [Importers])."""
        self._retired = retired
        self._alive = alive

    def lent(self, pid: int) -> None:
        """Its memory was lent to process ``pid``; those that exited are forgotten now and then."""
        self.importers.add(pid)
        if len(self.importers) > PRUNE_PAST:
            self.importers = {p for p in self.importers if self._alive(p)}

    def renew(self, slab_id: int) -> None:
        """A fresh zeroed allocation under a new id; the old one is retired until its importers are gone.

        SlabError, and the slab is as it was, when the device has no memory for it or its retired
        memory is at its limit: tenants taking turns on one slab cannot make the daemon hold
        ever more of a device while an importer lives (NOTE [Device slabs]).
        """
        assert self.allocator.live_count == 0, "renew a slab with live extents"
        self.importers = {pid for pid in self.importers if self._alive(pid)}
        if self.importers and self._retired.size_bytes + self.size_bytes > self._retired.limit_bytes:
            raise SlabError(f"{self._retired.size_bytes} bytes of device memory wait for their importers to go")
        try:
            memory = self.backend.allocate(self.size_bytes)
        except DeviceError as e:
            raise SlabError(str(e)) from e
        self._retired.add(self.memory, self.importers)
        self.id, self.memory, self.importers, self.last_tenant = slab_id, memory, set(), None

    def close(self) -> None:
        self.memory.free()
