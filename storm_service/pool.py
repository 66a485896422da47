"""The host pool: slabs (sealed memfds, NOTE [Slabs] in slabs.py), each lent to one tenant.

NOTE [Pool reservation]
  Every page of every slab is allocated (and zeroed) when the slab is made, so a pool
  larger than the host's memory is an error at start (or when a slab is renewed)
  instead of a fault in some client later: through a mapping with
  ``MADV_POPULATE_WRITE``, which allocates huge pages where the mapping was advised to
  (NOTE [Huge pages] in storm_service/shm.py), then ``posix_fallocate`` for whatever a
  kernel before 5.14 left. Clients map with ``MAP_POPULATE``, so that no offload pays
  first-touch faults (measured 5-8x slower than warm copies).

NOTE [Lending slabs]
  An extent of a tenant lies only in a slab that tenant holds. ``allocate`` tries the
  tenant's slabs in the order it got them; when none has room it lends the tenant a free
  slab: first one the tenant held last (its processes still map it), then one never lent,
  then one another tenant held, renewed (a fresh file: NOTE [Slabs]). A slab whose last
  extent is freed goes back to the free list at once. The budget, quotas and pressure
  policies see the pool's totals, whichever slabs hold the bytes.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterable
from typing import Generic, Protocol, TypeVar

from storm_service.allocator import ExtentAllocator
from storm_service.shm import SEGMENT_PREFIX, SHM_DIR
from storm_service.slabs import ALIGNMENT, Slab, SlabError
from storm_service.units import format_bytes

__all__ = ["ALIGNMENT", "LendableSlab", "Pool", "PoolError", "slab_sizes", "sweep_segments"]

log = logging.getLogger("stormd.pool")

MIN_SLAB_BYTES = 16 << 20
"""Slabs are not cut smaller than this unless ``--segment-size`` says so."""


class PoolError(RuntimeError):
    """The pool cannot be created (not enough memory, a bad size)."""


class LendableSlab(Protocol):
    """What a pool lends: a host slab (slabs.py), or a device tier's (storm_service/device/slabs.py)."""

    id: int
    size_bytes: int
    allocator: ExtentAllocator
    tenant: str | None
    last_tenant: str | None

    def renew(self, slab_id: int) -> None: ...

    def close(self) -> None: ...


S = TypeVar("S", bound=LendableSlab)


def slab_sizes(pool_size: int, max_slab_size: int, alignment: int) -> list[int]:
    """The sizes a pool of ``pool_size`` is cut into: at most ``max_slab_size`` (``--segment-size``) and at
    most an eighth of the pool (but at least MIN_SLAB_BYTES), so that several tenants can hold memory at once."""
    slab_size = min(max_slab_size, max(pool_size // 8, MIN_SLAB_BYTES))
    sizes = []
    remaining = pool_size
    while remaining > 0:
        size = min(remaining, slab_size)
        sizes.append(size - size % alignment or alignment)
        remaining -= size
    return sizes


class Pool(Generic[S]):
    """Every slab, which tenant holds which, and the free list (NOTE [Lending slabs]).

    An extent is ``(slab id, offset, length)``.
    """

    def __init__(self, slabs: Iterable[S]) -> None:
        self.slabs: dict[int, S] = {slab.id: slab for slab in slabs}
        self.alignment = next(iter(self.slabs.values())).allocator.alignment if self.slabs else ALIGNMENT
        """Every extent's offset and length are multiples of it (at least a spill file's: storm_service/disk/)."""
        self.used_bytes = 0
        """Bytes of every live extent, in every slab."""
        self._ids = itertools.count(max(self.slabs, default=0) + 1)
        self._free: dict[int, S] = dict(self.slabs)
        """Free slabs by id, in the order they became free."""
        self._held: dict[str, list[S]] = {}
        self.renewed = 0
        """Slabs renewed to move between tenants (NOTE [Slabs])."""
        self.renew_failures = 0
        """Renewals that found no memory: the slab stayed free, lent to nobody."""

    @classmethod
    def create(
        cls, pool_size: int, max_slab_size: int, *, backed: bool = True, alignment: int = ALIGNMENT
    ) -> Pool[Slab]:
        """Make and reserve every slab (NOTE [Pool reservation]); PoolError without the memory."""
        if pool_size < alignment:
            raise PoolError(f"--pool-size {pool_size} is smaller than {alignment} bytes")
        available = _mem_available()
        if backed and available is not None and pool_size > available:
            raise PoolError(
                f"cannot reserve {format_bytes(pool_size)}: {format_bytes(available)} of memory available "
                "(MemAvailable); lower --pool-size"
            )
        slabs: list[Slab] = []
        try:
            for slab_id, size in enumerate(slab_sizes(pool_size, max_slab_size, alignment), start=1):
                slabs.append(Slab(slab_id, size, backed=backed, alignment=alignment))
        except (SlabError, OSError) as e:
            for slab in slabs:
                slab.close()
            raise PoolError(f"cannot reserve {format_bytes(pool_size)}: {e}") from e
        return Pool(slabs)

    @property
    def size_bytes(self) -> int:
        return sum(s.size_bytes for s in self.slabs.values())

    @property
    def free_bytes(self) -> int:
        return self.size_bytes - self.used_bytes

    @property
    def largest_free_bytes(self) -> int:
        return max(s.allocator.free_stats().largest_free_bytes for s in self.slabs.values())

    @property
    def free_slabs(self) -> int:
        return len(self._free)

    def round_up(self, size_bytes: int) -> int:
        """The length the allocators give a request of ``size_bytes``."""
        return -(-size_bytes // self.alignment) * self.alignment

    def allocate(self, tenant: str, size_bytes: int) -> tuple[int, int, int] | None:
        """``(slab id, offset, length)`` of a new extent of ``tenant``, or None when nothing fits."""
        for slab in self._held.get(tenant, ()):
            offset = slab.allocator.allocate(size_bytes)
            if offset is not None:
                return self._allocated(slab, offset)
        lent = self._lend(tenant, size_bytes)
        if lent is None:
            return None
        offset = lent.allocator.allocate(size_bytes)
        assert offset is not None, "an empty slab as large as the request"
        return self._allocated(lent, offset)

    def _allocated(self, slab: S, offset: int) -> tuple[int, int, int]:
        length = slab.allocator.length_of(offset)
        self.used_bytes += length
        return slab.id, offset, length

    def _lend(self, tenant: str, size_bytes: int) -> S | None:
        """A free slab of at least ``size_bytes`` for ``tenant`` (NOTE [Lending slabs])."""
        fits = [slab for slab in self._free.values() if slab.size_bytes >= size_bytes]
        if not fits:
            return None
        slab = (
            next((s for s in fits if s.last_tenant == tenant), None)
            or next((s for s in fits if s.last_tenant is None), None)
            or fits[0]
        )
        old_id = slab.id
        if slab.last_tenant not in (None, tenant):
            try:
                slab.renew(next(self._ids))
            except (SlabError, OSError) as e:  # the slab is as it was: free, for its last tenant
                self.renew_failures += 1
                if self.renew_failures & (self.renew_failures - 1) == 0:  # 1st, 2nd, 4th...
                    log.warning("cannot renew slab %d for %s (it stays free): %s", old_id, tenant, e)
                return None
            del self.slabs[old_id]
            self.slabs[slab.id] = slab
            self.renewed += 1
        del self._free[old_id]
        slab.tenant = slab.last_tenant = tenant
        self._held.setdefault(tenant, []).append(slab)
        return slab

    def free(self, slab_id: int, offset: int) -> int:
        """Free one extent; a slab left empty goes back to the free list. Returns its length."""
        slab = self.slabs[slab_id]
        length = slab.allocator.free(offset)
        self.used_bytes -= length
        if slab.allocator.live_count == 0 and slab.tenant is not None:
            held = self._held[slab.tenant]
            held.remove(slab)
            if not held:
                del self._held[slab.tenant]
            slab.tenant = None
            self._free[slab.id] = slab
        return length

    def view(self: Pool[Slab], slab_id: int, offset: int, length: int) -> memoryview:
        """The daemon's view of a host extent's bytes (for disk I/O, and eviction from the device tier)."""
        return self.slabs[slab_id].view(offset, length)

    def lent_to(self, slab_id: int) -> S | None:
        """The slab ``slab_id`` while some tenant holds it, else None."""
        slab = self.slabs.get(slab_id)
        return slab if slab is not None and slab.tenant is not None else None

    def close(self) -> None:
        for slab in self.slabs.values():
            slab.close()


def _mem_available() -> int | None:
    """MemAvailable of /proc/meminfo in bytes, or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def sweep_segments(names: object) -> list[str]:
    """Unlink /dev/shm segments a dead daemon of an earlier version left behind; returns the names removed."""
    removed = []
    for name in names if isinstance(names, list) else []:
        if not isinstance(name, str) or not name.startswith(SEGMENT_PREFIX) or "/" in name:
            continue
        try:
            os.unlink(os.path.join(SHM_DIR, name))
            removed.append(name)
        except FileNotFoundError:
            pass
    return removed
