"""Which saved tensors leave the device: the selection policies ``all`` and ``budget``.

``checkpoint``, the third, offloads only each layer's input and recomputes the rest
(client/checkpoint.py). All three leave the last ``keep_last_layers`` layers of a
``module`` alone: backward needs them first.

NOTE [Offload budget]
  A link K times slower than the compute it hides behind can carry, without slowing
  the step, about 1/K of what forward saves. ``budget`` plans the link's time over the
  forward (``Budget``): a saved tensor goes only if its copy, queued behind those
  already planned, ends before the bounded window would wait for it; the rest stays on
  the device. So a layer offloads about ``FILL * bandwidth * layer time`` bytes (capped
  by ``budget_cap_bytes``), a tensor larger than that when the link was idle before it.
  The last layer offloads nothing: no compute is left to hide its copy out, and
  backward needs it back at once. Both figures are measured online:
  the layer time is the time from one layer's start to the next one's (CUDA events on
  the current stream; the clock on the CPU) less the time forward waited on the link
  meanwhile, the minimum over the steps seen; the bandwidth is the transfer engine's,
  bytes copied into the pool over the seconds its copies took (one 32 MiB probe copy
  if nothing was copied yet). The first ``WARMUP_STEPS`` forwards of a module measure
  and offload nothing. Measurements can flatter the link (layers timed on a busy
  machine, a link shared with other traffic), so the plan also learns from its result:
  a forward that still waited on the link halves the rate the next plan uses
  (``trust``), and each forward that did not grows it back by a quarter, up to the
  measured rate. With bounded copies in flight (NOTE [Bounded copies in flight]),
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
FILL = 0.9
"""The share of the link a budget plans to use: copies have per-batch costs the rate leaves out."""
WARMUP_STEPS = 2
"""Forwards measured before the budget offloads: the first pays one-time costs (allocator, kernels)."""
STALL_SHARE = 0.02
"""A forward that waited on the link for more than this share of its planned time was over-planned."""
MIN_TRUST = 1 / 64


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
    """What one module's forward looks like, learned step by step: its layers in order,
    how long each takes, and how many bytes each offers to offload."""

    def __init__(self) -> None:
        self.layer_s: dict[str, float] = {}
        """Per layer name: the shortest time seen from its start to the next layer's."""
        self.order: list[str] = []
        """The layers in the order the last settled forward ran them."""
        self.offered: dict[str, int] = {}
        """Per layer: the bytes of saved tensors it offered in its last forward."""
        self.steps = 0
        """Forwards measured so far."""
        self.trust = 1.0
        """The share of the measured rate a budget plans with: halved after a forward that
        waited on the link, grown back after one that did not (NOTE [Offload budget])."""
        self._clock: LayerClock | None = None
        self._marks: list[tuple[str, Any, float]] = []
        self._pending: list[list[tuple[str, Any, float]]] = []
        self._offering: dict[str, int] = {}

    @property
    def last(self) -> str | None:
        """The layer backward starts from."""
        return self.order[-1] if self.order else None

    def enter(self, name: str, device: torch.device, waited_s: float = 0.0) -> None:
        """A layer starts (call at its forward pre-hook). ``waited_s``: the seconds forward has
        waited on the link so far (``window_wait_s``), which are not the layers' compute."""
        if self._clock is None:
            self._clock = LayerClock(device)
        self._marks.append((name, self._clock.mark(), waited_s))

    def offer(self, name: str, nbytes: int) -> None:
        """``name`` saved ``nbytes`` that could be offloaded."""
        self._offering[name] = self._offering.get(name, 0) + nbytes

    def end(self, waited_s: float = 0.0) -> None:
        """The block ends: the last layer's time runs to here."""
        if self._clock is not None and self._marks:
            stalled = waited_s - self._marks[0][2]
            planned = sum(self.layer_s.values())
            if planned and stalled > STALL_SHARE * planned:
                self.trust = max(self.trust / 2, MIN_TRUST)
            else:
                self.trust = min(self.trust * 1.25, 1.0)
            self._marks.append(("", self._clock.mark(), waited_s))
            self._pending.append(self._marks)
        self._marks = []
        if self._offering:
            self.offered, self._offering = self._offering, {}
        self._settle()

    def _settle(self) -> None:
        clock = self._clock
        still: list[list[tuple[str, Any, float]]] = []
        for marks in self._pending:
            assert clock is not None
            times = [clock.seconds(a, b) for (_, a, _), (_, b, _) in itertools.pairwise(marks)]
            if any(t is None for t in times):
                still.append(marks)
                continue
            for (name, _, waited_a), (_, _, waited_b), seconds in zip(marks, marks[1:], times, strict=False):
                assert seconds is not None
                compute = max(seconds - (waited_b - waited_a), 0.0)
                self.layer_s[name] = min(self.layer_s.get(name, compute), compute)
            self.order = [name for name, _, _ in marks[:-1]]
            self.steps += 1
        self._pending = still


class Budget:
    """A plan of the link's time over one forward (NOTE [Offload budget]).

    Times are on the forward's planned timeline: layer k starts at the sum of the
    measured times before it. A tensor of layer k is taken to be saved at a point of
    layer k in proportion to the bytes the layer has offered so far; its copy starts
    then or when the link is free, whichever is later, and must end before layer
    k + ``window`` starts (where the bounded window would wait for it) or, in the last
    layers, before forward ends. The last layer offloads nothing.
    """

    def __init__(self, profile: LayerProfile, bytes_per_s: float, cap_bytes: int, window: int) -> None:
        self.bytes_per_s = bytes_per_s
        self._profile = profile
        self._cap_bytes = cap_bytes
        self._start: dict[str, float] = {}
        self._deadline: dict[str, float] = {}
        clock = 0.0
        starts = []
        for name in profile.order:
            starts.append(clock)
            clock += profile.layer_s.get(name, 0.0)
        self.forward_s = clock
        for index, name in enumerate(profile.order):
            self._start[name] = starts[index]
            ahead = index + max(window, 1)
            self._deadline[name] = starts[ahead] if window > 0 and ahead < len(starts) else clock
        self._link_free = 0.0
        self._offered: dict[str, int] = {}
        self.taken: dict[str, int] = {}

    @property
    def hideable_bytes(self) -> int:
        """The most the plan's rate carries during this forward: that rate times its length."""
        return int(self.bytes_per_s * self.forward_s)

    def take(self, layer: str, nbytes: int) -> bool:
        """Whether ``nbytes`` saved now by ``layer`` may go; plans their copy if so."""
        profile = self._profile
        offered = self._offered.get(layer, 0)
        self._offered[layer] = offered + nbytes
        if layer not in self._start or layer == profile.last or self.bytes_per_s <= 0:
            return False
        if self._cap_bytes and self.taken.get(layer, 0) + nbytes > self._cap_bytes:
            return False
        share = offered / profile.offered[layer] if profile.offered.get(layer) else 0.0
        now = self._start[layer] + profile.layer_s[layer] * min(share, 1.0)
        done = max(now, self._link_free) + nbytes / self.bytes_per_s
        if done > self._deadline[layer]:
            return False
        self._link_free = done
        self.taken[layer] = self.taken.get(layer, 0) + nbytes
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

    def __init__(self, system: StormSystem, profile: LayerProfile) -> None:
        self._system = system
        self._profile = profile
        self.budget: Budget | None = None

    def allows(self, layer: str, nbytes: int, device: torch.device) -> bool:
        self._profile.offer(layer, nbytes)
        if self.budget is None:
            known = self._profile.steps >= WARMUP_STEPS
            bytes_per_s = FILL * self._profile.trust * measured_bandwidth(self._system, device) if known else 0.0
            settings = self._system.settings
            self.budget = Budget(self._profile, bytes_per_s, settings.budget_cap_bytes, settings.max_inflight_layers)
        return self.budget.take(layer, nbytes)
