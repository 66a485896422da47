"""Backpressure: a bounded number of layers' copies in flight.

NOTE [Bounded copies in flight]
  An offload returns at once and its source is dropped only when its copy is done. With
  nothing holding the training thread back, a forward on a GPU allocates at compute
  speed while the copies drain at link speed, so nearly every activation is still on
  the device when forward ends. So when the first offload of layer k is submitted, the
  training thread first waits until every offload of layer k - ``max_layers`` and older
  is stored (copied, source dropped): at most ``max_layers`` layers' copies are in
  flight, and forward's peak is its own working set plus those layers. Layers are told
  apart by the handle's ``layer_id``; a run of offloads without one is one layer. On
  CUDA "stored" is set after the D2H copy's event completes, so the wait also keeps the
  host from queueing kernels far ahead of the copies. 0 means no bound.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from client.engine.jobs import EngineStats
from client.engine.state import Slot

__all__ = ["InflightWindow"]

_NO_LAYER = object()


class InflightWindow:
    """The offloads of the last few layers, oldest first; ``admit`` waits for old ones."""

    def __init__(self, max_layers: int, wait: Callable[[Slot], None], stats: EngineStats) -> None:
        self.max_layers = max_layers
        self._wait = wait
        self._stats = stats
        self._layers: deque[tuple[Any, list[Slot]]] = deque()
        self._lock = threading.Lock()

    def admit(self, slot: Slot) -> None:
        """Call on the training thread before queueing ``slot``'s offload; may wait (see the NOTE)."""
        if self.max_layers <= 0:
            return
        layer = slot.handle.layer_id if slot.handle.layer_id is not None else _NO_LAYER
        with self._lock:
            if not self._layers or self._layers[-1][0] != layer:
                self._open(layer)
            self._layers[-1][1].append(slot)

    def _open(self, layer: Any) -> None:
        while self._layers and all(s.stored.is_set() for s in self._layers[0][1]):
            self._layers.popleft()
        while len(self._layers) >= self.max_layers:
            _, oldest = self._layers.popleft()
            pending = [s for s in oldest if not s.stored.is_set()]
            if not pending:
                continue
            started = time.perf_counter()
            for waiting in pending:
                self._wait(waiting)
            self._stats.window_waits += 1
            self._stats.window_wait_s += time.perf_counter() - started
        self._layers.append((layer, []))
