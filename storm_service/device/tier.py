"""The device tier: spare GPU memory in front of the host pool, for the activations wanted first.

NOTE [Device tier]
  With ``--device-pool``, the daemon owns memory on devices (one Pool of device slabs per
  device, NOTE [Device slabs] in slabs.py) and lends it as it lends host slabs: per
  tenant, by the fd socket, sub-allocated by offset. Clients copy into it device to
  device; the bytes never cross the host link.

  Placement. An offload names the device its tensors are on (``device``: ``cpu`` or a
  GPU's UUID). Its extents go to the fastest tier with room: the devices whose link from
  that device beats the host path (``Link.faster``: measured at start for CUDA, because
  P2P over some PCIe switches is slower than the host path; modelled for the fake),
  fastest first, then the host pool (and from there the disk tier spills as always). A
  device whose backend needs a shared pid namespace (legacy CUDA IPC handles) is not
  offered to a session in another one: the register reply says why.

  Eviction. The newest activations are the ones backward wants first, so they are the
  ones worth keeping on the device. Past HIGH_WATER of a device, or when an offload
  found no room there (until there is room for it, for at most ROOM_S: slabs of a
  device may be in use well below the mark when its extents are large), committed
  extents are moved to the host pool, the one wanted last first, chosen as the disk
  tier chooses: within a session its oldest, across sessions the one whose step profile
  puts its next use furthest away (NOTE [Time to next use] in storm_service/profile.py),
  so that a job that stopped stepping leaves the device first. The daemon makes these
  copies itself, in the loop, bounded like all its work there: per call at most
  EVICT_BYTES_PER_BALANCE copied, however large the extent (it moves a piece per call,
  moves.py), and at most MOVES_PER_BALANCE moves begun (tiny extents cost per move).
  Extents a fetch answered for (pinned: a client may read them in place), and extents
  not committed yet, never move; a fetch or a free during a move ends it; an extent
  whose move failed stays where it is (``device_evict_errors``). A moved extent's new
  place is in the next fetch's reply, as after a restore from disk, and it joins the
  disk tier's spillable extents in commit order. Nothing moves back up: an extent moved
  to the host is fetched from the host.

  Accounting. Device bytes are the session's like host bytes: one quota (session and
  tenant) bounds what it holds in memory, device and host together; ``device_bytes``
  reports the device's part. A device slab is lent only to the process its session is
  bound to, and memory a slab gives up is freed only once every process it was lent to
  has exited (NOTE [Importers], NOTE [Device slabs]).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sortedcontainers import SortedDict

from storm_service.device.backend import DeviceBackend, DeviceError, Link
from storm_service.device.importers import Importers
from storm_service.device.moves import Move, Mover, victims
from storm_service.device.slabs import DeviceSlab, Retired
from storm_service.errors import ForbiddenError
from storm_service.extents import Extent, ExtentState, Residence
from storm_service.pool import Pool, slab_sizes
from storm_service.profile import StepProfile
from storm_service.slabs import Slab
from storm_service.units import format_bytes

if TYPE_CHECKING:
    from storm_service.session import Session

__all__ = ["EVICT_BYTES_PER_BALANCE", "HIGH_WATER", "Device", "DeviceTier"]

log = logging.getLogger("stormd.device")

HIGH_WATER = 0.9
"""Fraction of a device in use past which its oldest activations move to the host pool."""
EVICT_BYTES_PER_BALANCE = 16 << 20
"""Bytes copied to the host per call, at most: a millisecond or two, so the loop answers in between."""
MOVES_PER_BALANCE = 64
"""Moves begun per call, at most: small extents cost per move, not per byte."""
ROOM_S = 1.0
"""How long the room an offload found missing is made, after the last such offload."""
_ID_SPACE = 1 << 40
"""Device ``k``'s slab ids start at ``(k + 1) * _ID_SPACE``, apart from the host pool's and each other's."""


@dataclass
class Device:
    """One device of the tier: its backend, its pool of slabs, and its links."""

    backend: DeviceBackend
    pool: Pool[DeviceSlab]
    links: dict[str, Link]
    retired: Retired
    """Memory its slabs gave up, waiting for importers (NOTE [Device slabs])."""
    move: Move | None = None
    """The extent being moved to the host, a piece per loop step (moves.py)."""
    room_wanted: int = 0
    """The largest offload it had no room for lately: moves to the host make that much room."""
    room_until: float = 0.0
    resident: dict[int, SortedDict] = field(default_factory=dict)
    """Per session id, its committed extents here that may move to the host, by ``(committed_at, handle)``."""

    @property
    def high_water_bytes(self) -> int:
        return int(HIGH_WATER * self.pool.size_bytes)


class DeviceTier:
    """Every device of ``--device-pool`` and the extents on them (NOTE [Device tier])."""

    def __init__(
        self, backends: list[DeviceBackend], max_slab_size: int, host: Pool[Slab], max_importers: int = 1024
    ) -> None:
        """Cut each backend's memory into slabs; DeviceError when a device cannot hold its share."""
        self.host = host
        self.devices: list[Device] = []
        self.reserved_bytes = 0
        """Bytes of device extents allocated and not committed yet."""
        self.pending = False
        """Whether the last :meth:`balance` stopped at its bounds, not for want of work: the loop comes back at once."""
        self.mover = Mover(host)
        """Moves to the host pool, and their counts (moves.py)."""
        self.importers = Importers(max_importers)
        """The processes device slabs were lent to (NOTE [Importers])."""
        self._profiles: dict[int, StepProfile] = {}
        """Each session's steps (NOTE [Time to next use]): whose activation is wanted last."""
        try:
            for index, backend in enumerate(backends):
                self.devices.append(self._device(index, backend, max_slab_size))
        except BaseException:
            self.close()
            for backend in backends[len(self.devices) :]:
                backend.close()
            raise
        self._by_slab_space = {(index + 1): device for index, device in enumerate(self.devices)}

    def _device(self, index: int, backend: DeviceBackend, max_slab_size: int) -> Device:
        ids = itertools.count((index + 1) * _ID_SPACE)
        slabs: list[DeviceSlab] = []
        retired = Retired(backend.size_bytes)
        try:
            for size in slab_sizes(backend.size_bytes, max_slab_size, self.host.alignment):
                slabs.append(DeviceSlab(next(ids), backend, size, self.host.alignment, retired, self.importers.alive))
        except DeviceError:
            for slab in slabs:
                slab.close()
            raise
        links = backend.links()
        for client, link in links.items():
            log.info(
                "device %s (%s, %s): from %s %.1f GB/s against %.1f GB/s to the host pool (%s): %s",
                backend.name,
                backend.kind,
                format_bytes(backend.size_bytes),
                client,
                link.peer_gbps,
                link.host_gbps,
                "measured" if link.measured else "a model",
                "the tier is on" if link.faster else "the tier is off for it",
            )
        return Device(backend, Pool(slabs), links, retired)

    # -- placement ------------------------------------------------------------------------

    def refusal(self, session: Session, own_pid_ns: int | None) -> str:
        """Why ``session`` may use no device of the tier ('' when it may use some)."""
        if all(d.backend.needs_pid_namespace for d in self.devices) and (
            session.pid_ns is None or session.pid_ns != own_pid_ns
        ):
            return (
                "the client runs in another pid namespace than the daemon, and CUDA IPC handles need a shared one "
                "(docker: run both with `pid: host`, or the worker with `pid: service:stormd`)"
            )
        return ""

    def place(
        self, session: Session, client_device: str, size_bytes: int, own_pid_ns: int | None
    ) -> tuple[int, int, int] | None:
        """``(slab, offset, length)`` of new space on the fastest device that pays for ``client_device``
        and has room, or None: the host pool's turn."""
        candidates = self._candidates(session, client_device, own_pid_ns)
        for device in candidates:
            where = device.pool.allocate(session.tenant.name, size_bytes)
            if where is not None:
                self.reserved_bytes += where[2]
                return where
        if candidates:  # the newest belong on the fastest device: make room there for the next ones
            fastest = candidates[0]
            fastest.room_wanted = max(fastest.room_wanted, size_bytes)
            fastest.room_until = time.monotonic() + ROOM_S
        return None

    def _candidates(self, session: Session, client_device: str, own_pid_ns: int | None) -> list[Device]:
        if session.uid is not None and session.pidfd is None:
            return []  # bound to a process the daemon holds no pidfd of: :meth:`lend` would refuse it every slab
        shared_ns = session.pid_ns is not None and session.pid_ns == own_pid_ns
        fits = [
            d
            for d in self.devices
            if (link := d.links.get(client_device)) is not None
            and link.faster
            and (shared_ns or not d.backend.needs_pid_namespace)
        ]
        return sorted(fits, key=lambda d: -d.links[client_device].peer_gbps)

    def unplace(self, slab_id: int, offset: int) -> None:
        """Give back space :meth:`place` found that was never handed out."""
        self.reserved_bytes -= self._device_of(slab_id).pool.free(slab_id, offset)

    def holds(self, slab_id: int) -> bool:
        """Whether ``slab_id`` names a device slab (else a host one)."""
        return slab_id >= _ID_SPACE

    # -- sessions' events -----------------------------------------------------------------

    def committed(self, session: Session, extent: Extent) -> None:
        """Any extent of ``session`` committed (its step profile learns from all of them)."""
        self._profile(session.id, extent.committed_at).committed(extent.committed_at)
        if extent.residence is Residence.DEVICE:
            self.reserved_bytes -= extent.length
            resident = self._device_of(extent.slab).resident.setdefault(session.id, SortedDict())
            resident[(extent.committed_at, extent.handle)] = extent

    def fetching(self, session: Session, extents: list[Extent]) -> None:
        """A fetch answers for ``extents``: those on a device stay there until freed (read in place)."""
        now = time.monotonic()
        self._profile(session.id, now).fetched(now)
        for extent in extents:
            if extent.residence is Residence.DEVICE and not extent.pinned:
                extent.pinned = True
                self._unlist(extent)
                self._stop_moving(extent)

    def release(self, extent: Extent) -> int:
        """Free a device extent; returns its length."""
        if extent.state is ExtentState.WRITING:
            self.reserved_bytes -= extent.length
        else:
            self._unlist(extent)
            self._stop_moving(extent)
        return self._device_of(extent.slab).pool.free(extent.slab, extent.offset)

    def forget(self, session: Session) -> None:
        """``session`` closed and holds nothing any more."""
        self._profiles.pop(session.id, None)

    def _unlist(self, extent: Extent) -> None:
        """``extent`` may no longer move to the host."""
        device = self._device_of(extent.slab)
        resident = device.resident.get(extent.session_id)
        if resident is not None:
            resident.pop((extent.committed_at, extent.handle), None)
            if not resident:
                del device.resident[extent.session_id]

    def _profile(self, session_id: int, now: float) -> StepProfile:
        profile = self._profiles.get(session_id)
        if profile is None:
            profile = self._profiles[session_id] = StepProfile(now)
        return profile

    def lent_to(self, slab_id: int) -> DeviceSlab | None:
        device = self._by_slab_space.get(slab_id // _ID_SPACE)
        return device.pool.lent_to(slab_id) if device is not None else None

    def lend(self, slab_id: int, session: Session, pid: int) -> tuple[int, dict[str, Any], list[int]]:
        """Its size, and what the fd socket sends process ``pid`` of ``session``, for device slab ``slab_id``
        (NOTE [Importers]); ForbiddenError unless the session's tenant holds it and ``pid`` is
        the process the session is bound to."""
        slab = self.lent_to(slab_id)
        if slab is None or slab.tenant != session.tenant.name:
            raise ForbiddenError(f"slab {slab_id} is not lent to {session.tenant.name}")
        if session.pidfd is None or pid != session.bound_pid:
            raise ForbiddenError(f"device slab {slab_id} is lent only to the process session {session.id} is bound to")
        if not self.importers.add(pid, session.pidfd):
            raise ForbiddenError(f"device slab {slab_id}: {len(self.importers)} processes map device memory already")
        slab.lent(pid)
        return (slab.size_bytes, *slab.memory.lend())

    # -- the loop -------------------------------------------------------------------------

    def balance(self, sessions: dict[int, Session]) -> None:
        """Move the activations wanted last off devices past the high water (or short of room) to the host:
        at most EVICT_BYTES_PER_BALANCE copied, and MOVES_PER_BALANCE moves begun, per call."""
        budget, moves = EVICT_BYTES_PER_BALANCE, MOVES_PER_BALANCE
        now = time.monotonic()
        for device in self.devices:
            order: Iterator[Extent] | None = None
            while budget > 0:
                if device.move is None:
                    if moves == 0 or not self._pressed(device, now):
                        break
                    order = order or victims(device.resident, sessions, self._profiles, now)
                    extent = next(order, None)
                    if extent is None or not self.mover.begin(device, sessions[extent.session_id], extent):
                        break
                    self._unlist(extent)  # no victim twice
                    moves -= 1
                budget -= self.mover.copy(device, budget)
        self.pending = budget <= 0 or moves == 0

    def housekeep(self) -> None:
        """Free retired memory whose importers have all exited, and forget exited importers (every tick)."""
        for device in self.devices:
            device.retired.release(self.importers.alive)
        self.importers.prune()

    @staticmethod
    def _pressed(device: Device, now: float) -> bool:
        """Whether ``device`` is past its high water, or lately had no room for an offload that it still has not."""
        if device.room_wanted and (now > device.room_until or device.pool.largest_free_bytes >= device.room_wanted):
            device.room_wanted = 0
        return device.pool.used_bytes > device.high_water_bytes or device.room_wanted > 0

    def _stop_moving(self, extent: Extent) -> None:
        """``extent`` is fetched or freed: a move of it ends here."""
        device = self._device_of(extent.slab)
        if device.move is not None and device.move.extent is extent:
            self.mover.drop(device)

    def _device_of(self, slab_id: int) -> Device:
        return self._by_slab_space[slab_id // _ID_SPACE]

    # -- stats ----------------------------------------------------------------------------

    @property
    def size_bytes(self) -> int:
        return sum(d.pool.size_bytes for d in self.devices)

    @property
    def fds_bound(self) -> int:
        """The most fds the tier holds: a fake slab's memfd and as many retired, and the importers' pidfds."""
        return 2 * sum(len(d.pool.slabs) for d in self.devices) + self.importers.limit

    @property
    def used_bytes(self) -> int:
        """Bytes of committed activations on the devices."""
        return sum(d.pool.used_bytes for d in self.devices) - self.reserved_bytes

    def stats(self) -> dict[str, Any]:
        """What ``stats`` reports of the device tier (docs/operations.md lists the fields)."""
        return {
            "device_bytes": self.size_bytes,
            "device_used_bytes": self.used_bytes,
            "device_reserved_bytes": self.reserved_bytes,
            "device_evicted_bytes": self.mover.evicted_bytes,
            "device_evictions": self.mover.evictions,
            "device_evict_errors": self.mover.errors,
            "device_retired_bytes": sum(d.retired.size_bytes for d in self.devices),
            "devices": [
                {
                    "name": d.backend.name,
                    "backend": d.backend.kind,
                    "size_bytes": d.pool.size_bytes,
                    "used_bytes": d.pool.used_bytes,
                    "high_water_bytes": d.high_water_bytes,
                    "links": {client: link.summary() for client, link in sorted(d.links.items())},
                }
                for d in self.devices
            ],
        }

    def close(self) -> None:
        for device in self.devices:
            for slab in device.pool.slabs.values():
                slab.close()
            device.retired.close()
            device.backend.close()
        self.importers.close()
