"""Which saved tensors leave the device: the selection policies ``all`` and ``budget``.

``checkpoint``, the third, offloads only each layer's input and recomputes the rest
(client/checkpoint.py). All three leave the last ``keep_last_layers`` layers of a
``module`` alone: backward needs them first.

NOTE [Offload budget]
  A link K times slower than the compute it hides behind can carry, without slowing
  the step, about 1/K of what forward saves. ``budget`` offloads, per layer, at most
  ``bandwidth * layer time`` bytes (capped by ``budget_cap_bytes``), in the order the
  layer saves them; the rest stays on the device. Both figures are measured online:
  the layer time is the time from one layer's start to the next one's (CUDA events on
  the current stream; the clock on the CPU), the minimum over the steps seen, since
  a step that waited on the link only looks slower; the bandwidth is the transfer
  engine's, bytes copied into the pool over the seconds its copies took (one 32 MiB
  probe copy if nothing was copied yet). The first step of a module measures and
  offloads nothing. With bounded copies in flight (NOTE [Bounded copies in flight]),
  a layer's copies then end while the next layer computes, so forward never waits on
  the link.
"""

from __future__ import annotations

import itertools
import time
import weakref
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from client.system import StormSystem

__all__ = ["Budget", "BudgetChooser", "LayerClock", "LayerProfile", "measured_bandwidth", "profile_for"]

PROBE_BYTES = 32 << 20


class LayerClock:
    """Marks on a timeline: the wall clock on the CPU, events on the current stream on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start: Any, end: Any) -> float | None:
        """Seconds between two marks; None while a CUDA mark has not been reached."""
        if not self.cuda:
            return float(end - start)
        if not end.query():
            return None
        return float(start.elapsed_time(end)) / 1e3


class LayerProfile:
    """The layer times of one module (or of one system, without one), learned step by step."""

    def __init__(self) -> None:
        self.layer_s: dict[str, float] = {}
        """Per layer name: the shortest time seen from its start to the next layer's."""
        self._clock: LayerClock | None = None
        self._marks: list[tuple[str, Any]] = []
        self._pending: list[list[tuple[str, Any]]] = []

    def enter(self, name: str, device: torch.device) -> None:
        """A layer starts (call at its forward pre-hook, or once for a whole block)."""
        if self._clock is None:
            self._clock = LayerClock(device)
        self._marks.append((name, self._clock.mark()))

    def end(self) -> None:
        """The block ends: the last layer's time runs to here."""
        if self._clock is not None and self._marks:
            self._marks.append(("", self._clock.mark()))
            self._pending.append(self._marks)
        self._marks = []
        self._settle()

    def _settle(self) -> None:
        clock = self._clock
        still: list[list[tuple[str, Any]]] = []
        for marks in self._pending:
            assert clock is not None
            times = [clock.seconds(a, b) for (_, a), (_, b) in itertools.pairwise(marks)]
            if any(t is None for t in times):
                still.append(marks)
                continue
            for (name, _), seconds in zip(marks, times, strict=False):
                assert seconds is not None
                self.layer_s[name] = min(self.layer_s.get(name, seconds), seconds)
        self._pending = still


class Budget:
    """Bytes each layer may still offload in this step (NOTE [Offload budget])."""

    def __init__(self, profile: LayerProfile, bytes_per_s: float, cap_bytes: int) -> None:
        self.bytes_per_s = bytes_per_s
        self.allowed = {
            name: min(int(bytes_per_s * seconds), cap_bytes or int(bytes_per_s * seconds))
            for name, seconds in profile.layer_s.items()
        }
        self._left = dict(self.allowed)

    def take(self, layer: str, nbytes: int) -> bool:
        """Whether ``nbytes`` of ``layer`` may go; counts them if so."""
        left = self._left.get(layer, 0)
        if nbytes > left:
            return False
        self._left[layer] = left - nbytes
        return True


def measured_bandwidth(system: StormSystem, device: torch.device) -> float:
    """Bytes per second of the system's copies into the pool; one probe copy if none was made."""
    stats = system.transfer_stats()
    if stats.copy_out_bytes < PROBE_BYTES:
        probe = torch.empty(PROBE_BYTES, dtype=torch.uint8, device=device)
        system.free(system.offload(probe))
        system.flush()
        stats = system.transfer_stats()
    return stats.copy_out_bytes / max(stats.copy_out_s, 1e-9)


_profiles: weakref.WeakKeyDictionary[object, LayerProfile] = weakref.WeakKeyDictionary()


def profile_for(owner: object) -> LayerProfile:
    """The profile learned for ``owner`` (a module, or a system), kept as long as it lives."""
    profile = _profiles.get(owner)
    if profile is None:
        profile = _profiles[owner] = LayerProfile()
    return profile


class BudgetChooser:
    """``select="budget"`` for one step: whether a layer may offload the next tensor."""

    def __init__(self, system: StormSystem, profile: LayerProfile, cap_bytes: int) -> None:
        self._system = system
        self._profile = profile
        self._cap_bytes = cap_bytes
        self.budget: Budget | None = None

    def allows(self, layer: str, nbytes: int, device: torch.device) -> bool:
        if self.budget is None:
            known = bool(self._profile.layer_s)  # the first step measures and offloads nothing
            bytes_per_s = measured_bandwidth(self._system, device) if known else 0.0
            self.budget = Budget(self._profile, bytes_per_s, self._cap_bytes)
        return self.budget.take(layer, nbytes)
