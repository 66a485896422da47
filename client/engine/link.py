"""A device link on the CPU: copies that take as long as they would over PCIe.

NOTE [Link emulator]
  On a GPU host, moving an activation to the pool costs link time (about 50 GB/s over
  PCIe 5) while the layer that made it took far less compute; on a CPU a memcpy into
  the pool is cheap next to the compute. ``link_gbps`` (``STORM_LINK_GBPS``) restores
  the GPU's ratio here so that scheduling can be tested and measured: the copier does
  the real copy, then the transfer thread sleeps until the bytes would have arrived on
  a link of that rate. The two directions are lanes of their own (PCIe is full duplex),
  each busy until its last transfer ends, so back-to-back batches queue as DMA would.
  The sleep holds no core and no lock: the training thread computes meanwhile, as it
  would beside a copy engine. Choosing the rate for a model is in docs/benchmarks.md.
"""

from __future__ import annotations

import threading
import time

__all__ = ["Link"]

D2H = "d2h"
H2D = "h2d"


class Link:
    """Two lanes, each at ``gbps`` GB/s (10**9 bytes per second)."""

    def __init__(self, gbps: float) -> None:
        if not gbps > 0:
            raise ValueError(f"a link needs a rate > 0 GB/s, got {gbps!r}")
        self.bytes_per_s = gbps * 1e9
        self._free_at = {D2H: 0.0, H2D: 0.0}
        self._lock = threading.Lock()

    def arrival(self, lane: str, nbytes: int, started: float) -> float:
        """When ``nbytes`` sent on ``lane`` at ``started`` (``time.monotonic()``) have arrived."""
        with self._lock:
            begin = max(started, self._free_at[lane])
            done = begin + nbytes / self.bytes_per_s
            self._free_at[lane] = done
        return done

    def carry(self, lane: str, nbytes: int, started: float) -> None:
        """Block until ``nbytes`` sent at ``started`` have arrived (the copy itself is done)."""
        delay = self.arrival(lane, nbytes, started) - time.monotonic()
        if delay > 0:
            time.sleep(delay)
