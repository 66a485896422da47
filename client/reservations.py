"""Extents reserved ahead of offloads, so that a layer costs one ``offload`` request.

NOTE [Reservations]
  A training step offloads the same shapes, layer by layer, every step. When a run of
  offloads for one layer begins, the transfer engine asks the daemon, in one request,
  for extents matching what that layer offloaded in its previous run (its profile),
  plus whatever the jobs at hand need beyond it. It reserves ahead only once a layer's
  last two runs offloaded the same sizes, so a workload whose shapes change every time
  never reserves what it will not use. Until a tensor is copied into one and
  committed, such an extent is reserved: WRITING on the daemon, counted in its
  ``reserved_bytes``, not in ``used_bytes``. The layer's later tensors each take a
  reserved extent of their exact size, with no round trip. A run ends when the layer
  changes, or at a fetch or a flush (backward, the end of a step).

  Spares are reserved extents no tensor took (the layer's shapes changed). They are
  given back when their run ends, and the layer's profile must repeat again before
  anything is reserved ahead for it. A spare left untaken for ``idle_s`` seconds inside
  a run that never ends is given back too, so a session that stops offloading holds no
  reservations.
  The client gives them back, never the daemon: a live session's WRITING extent may be
  being copied into (NOTE [Extent lifetime] in storm_service/sessions.py).
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

__all__ = ["Reservations"]


@dataclass
class _Spare:
    extent: dict[str, Any]
    since: float


class Reservations:
    """Spare extents by size and per-layer profiles; used by the transfer thread only."""

    def __init__(self, idle_s: float) -> None:
        self.idle_s = idle_s
        self._spares: dict[int, deque[_Spare]] = {}
        self._profiles: dict[int | None, tuple[list[int], bool]] = {}
        """Per layer: the sizes its last run offloaded (sorted), and whether the run before matched."""
        self._running = False
        self._run_layer: int | None = None
        self._run_sizes: list[int] = []
        self._run_fresh = False

    @property
    def spare_bytes(self) -> int:
        """Bytes reserved and not taken yet."""
        return sum(size * len(spares) for size, spares in self._spares.items())

    def begin(self, layer_id: int | None) -> list[dict[str, Any]]:
        """Offloads of ``layer_id`` come next; returns the spares of a run this ends, to free."""
        if self._running and layer_id == self._run_layer:
            return []
        leftovers = self.end_run()
        self._running, self._run_layer, self._run_fresh = True, layer_id, True
        return leftovers

    def plan(self, sizes: list[int]) -> list[int]:
        """The sizes to reserve now so that each of ``sizes`` (offloads of the run) finds a spare.

        At the start of a run that is the layer's whole profile as well.
        """
        need = Counter(sizes)
        if self._run_fresh:
            profile, repeated = self._profiles.get(self._run_layer, ([], False))
            if repeated:
                need |= Counter(profile)
            self._run_fresh = False
        self._run_sizes += sizes
        for size in need:
            need[size] -= len(self._spares.get(size, ()))
        return sorted(need.elements())

    def end_run(self) -> list[dict[str, Any]]:
        """Close the current run: its sizes become its layer's profile; returns its spares, to free."""
        leftovers = self.drain()
        if self._running:
            sizes = sorted(self._run_sizes)
            previous, _ = self._profiles.get(self._run_layer, (None, False))
            self._profiles[self._run_layer] = (sizes, sizes == previous)
        self._running, self._run_sizes, self._run_fresh = False, [], False
        return leftovers

    def add(self, extents: list[dict[str, Any]], now: float) -> None:
        for extent in extents:
            self._spares.setdefault(extent["size_bytes"], deque()).append(_Spare(extent, now))

    def take(self, size_bytes: int) -> dict[str, Any] | None:
        """A spare extent of exactly ``size_bytes``, if one is reserved."""
        spares = self._spares.get(size_bytes)
        if not spares:
            return None
        return spares.popleft().extent

    def expired(self, now: float) -> list[dict[str, Any]]:
        """Remove and return the spares left untaken for ``idle_s`` seconds."""
        out = []
        for spares in self._spares.values():
            while spares and now - spares[0].since >= self.idle_s:
                out.append(spares.popleft().extent)
        return out

    def drain(self) -> list[dict[str, Any]]:
        """Remove and return every spare."""
        out = [spare.extent for spares in self._spares.values() for spare in spares]
        self._spares.clear()
        return out

    def seconds_to_expiry(self, now: float) -> float | None:
        """How long until the oldest spare expires; None without spares."""
        oldest = [spares[0].since for spares in self._spares.values() if spares]
        return max(0.0, min(oldest) + self.idle_s - now) if oldest else None
