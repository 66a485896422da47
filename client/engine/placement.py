"""Where each offload goes: a reserved extent, an exact one, or what the pressure policy says.

"What happens when the pool is full?" is answered here alone: the layer's reservation
(NOTE [Reservations] in client/reservations.py) is asked for in one request; offloads
it did not cover are asked for exactly, together; if the pool or the quota refuses,
our own spares are given back first (they may be what fills it), then each offload is
asked for alone, and one that still finds no room goes to the policy: ``keep`` leaves
the tensor where it is, ``wait`` retries (serving queued frees and fetches meanwhile)
until ``wait_timeout_s``, ``error`` asks once more and then fails the handle, ``spill``
retries while the daemon's disk tier makes room and keeps the tensor if none appears
within ``wait_timeout_s``. ``auto`` is ``spill`` where the daemon has a disk tier (its
register reply says so), ``keep`` elsewhere.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any, Protocol

import torch

from client.engine.jobs import EngineStats, Offload
from client.engine.requests import Requests
from client.reservations import Reservations
from client.settings import POLICIES
from storm_service.errors import PoolFullError, QuotaExceededError
from storm_service.protocol import MAX_BATCH, Op

__all__ = ["Placement", "PressurePolicy", "pressure_policy"]

_Full = (PoolFullError, QuotaExceededError)


class PressurePolicy(Protocol):
    def resolve(self, placement: Placement, job: Offload) -> None:
        """Decide for one offload the pool had no room for."""


class Keep:
    """The tensor stays where it is; training goes on (``kept_tensors`` counts it)."""

    def resolve(self, placement: Placement, job: Offload) -> None:
        job.slot.error = job.modified()
        job.slot.kept, job.slot.kept_version = job.tensor, job.tensor._version
        placement.stats.kept_tensors += 1
        placement.stats.kept_bytes += job.slot.handle.size_bytes


class Wait:
    """Retry until ``timeout_s``, running the frees and fetches queued behind meanwhile; then ``then``
    (fail the handle, or for ``spill`` keep the tensor)."""

    def __init__(self, timeout_s: float, then: PressurePolicy | None = None) -> None:
        self.timeout_s = timeout_s
        self.then = then

    def resolve(self, placement: Placement, job: Offload) -> None:
        if placement.before_wait is not None:
            placement.before_wait()
        deadline = time.monotonic() + self.timeout_s
        while True:
            placement.serve_while_waiting()
            try:
                placement.ask([job])
                return
            except _Full as e:
                if time.monotonic() > deadline:
                    if self.then is not None:
                        self.then.resolve(placement, job)
                    else:
                        placement.fail(job, e)
                    return
            time.sleep(0.01)


class Error:
    """Fail the handle (raised by the next ``offload`` and by its ``fetch``)."""

    def resolve(self, placement: Placement, job: Offload) -> None:
        try:
            placement.ask([job])  # room may have appeared since the refusal
        except _Full as e:
            placement.fail(job, e)


def pressure_policy(name: str, wait_timeout_s: float, disk_tier: bool = False) -> PressurePolicy:
    """The policy ``name`` (``auto``: ``spill`` when the daemon has a disk tier, else ``keep``)."""
    if name not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {name!r}")
    if name == "auto":
        name = "spill" if disk_tier else "keep"
    policies: dict[str, PressurePolicy] = {
        "keep": Keep(),
        "wait": Wait(wait_timeout_s),
        "error": Error(),
        "spill": Wait(wait_timeout_s, then=Keep()),
    }
    return policies[name]


class Placement:
    """Gives offloads their extents; used by the transfer thread only."""

    def __init__(
        self,
        *,
        policy: PressurePolicy,
        reservations: Reservations,
        stats: EngineStats,
        requests: Requests,
        serve_while_waiting: Callable[[], None],
    ) -> None:
        self.policy = policy
        self.reservations = reservations
        self.stats = stats
        self.requests = requests
        self.serve_while_waiting = serve_while_waiting
        self.before_wait: Callable[[], None] | None = None
        """Set while a layer is placed: stores its jobs placed so far, before a policy waits for room."""

    def place_layer(self, jobs: list[Offload]) -> None:
        """Give every job of one layer's run an extent, reserving what is missing in one request."""
        layer_id = jobs[0].slot.handle.layer_id
        self.return_spares(self.reservations.begin(layer_id))
        sizes = self.reservations.plan([job.slot.handle.size_bytes for job in jobs])
        refused: list[int] = []
        for start in range(0, len(sizes), MAX_BATCH):
            try:
                reply = self.requests.call(
                    Op.OFFLOAD, sizes=sizes[start : start + MAX_BATCH], layer_id=layer_id, **_source(jobs)
                )
            except _Full:
                refused = sizes[start:]
                break
            self.reservations.add(reply["extents"], time.monotonic())
        missing = []
        for job in jobs:
            extent = self.reservations.take(job.slot.handle.size_bytes)
            if extent is None:
                missing.append(job)
            else:
                self._place(job, extent)
        if missing:
            # Asking again for exactly what was just refused would only be refused again.
            asked_exactly = sorted(refused) == sorted(job.slot.handle.size_bytes for job in missing)
            self._allocate(missing, ask_together=not asked_exactly)

    def return_spares(self, spares: list[dict[str, Any]]) -> bool:
        """Free spare reserved extents (posted: the daemon applies it before our next request)."""
        if spares:
            self.stats.returned_reservation_bytes += sum(extent["size_bytes"] for extent in spares)
            self.requests.post_free([extent["handle"] for extent in spares])
        return bool(spares)

    def ask(self, jobs: list[Offload]) -> None:
        """Ask for exactly these jobs' extents in one request and place them; raises if refused."""
        sizes = [job.slot.handle.size_bytes for job in jobs]
        reply = self.requests.call(Op.OFFLOAD, sizes=sizes, layer_id=jobs[0].slot.handle.layer_id, **_source(jobs))
        for job, extent in zip(jobs, reply["extents"], strict=True):
            self._place(job, extent)

    def fail(self, job: Offload, error: BaseException) -> None:
        job.slot.error = error
        self.requests.failures.add(error, job.epoch)

    def _allocate(self, jobs: list[Offload], ask_together: bool = True) -> None:
        if ask_together:
            try:
                self.ask(jobs)
                return
            except _Full:
                pass
        if self.return_spares(self.reservations.drain()):
            self._allocate(jobs)  # our own spares may have been what filled it
        elif len(jobs) > 1:
            for job in jobs:
                self._allocate([job])
        else:
            self.policy.resolve(self, jobs[0])

    def _place(self, job: Offload, extent: dict[str, int]) -> None:
        slot = job.slot
        slot.id, slot.segment, slot.offset = extent["handle"], extent["slab"], extent["offset"]
        self.stats.offloaded_tensors += 1
        self.stats.offloaded_bytes += slot.handle.size_bytes


def _source(jobs: list[Offload]) -> dict[str, str]:
    """The offload request's ``device``: the GPU the tensors are on, by UUID, so that the daemon's device
    tier can place them where that GPU reaches fastest (NOTE [Device tier]); nothing for host tensors."""
    device = jobs[0].tensor.device
    if device.type != "cuda":
        return {}
    return {"device": gpu_uuid(device.index if device.index is not None else torch.cuda.current_device())}


@functools.cache
def gpu_uuid(index: int) -> str:
    """``GPU-<uuid>`` of CUDA device ``index``, as NVML and ``nvidia-smi -L`` write it."""
    return f"GPU-{torch.cuda.get_device_properties(index).uuid}"
