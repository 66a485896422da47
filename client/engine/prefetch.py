"""Backward prefetch: pass counting and the bytes in flight.

Backward consumes activations in reverse order of offload, so when a handle is taken
the ones offloaded just before it are fetched ahead (and when forward ends, the
latest ones: ``newest``), until ``budget_bytes`` of
fetched-but-unused tensors are in flight; refills wait until less than half of that is
in flight, so prefetches leave in batches (one ``fetch`` request for many tensors).
On the CPU a prefetch only has the daemon confirm extents and allocates nothing, so it
runs on to the end of the last layer it reached. A handle handed out in this pass is
not fetched again until a new pass (a retained graph's second backward) begins.
Everything here runs on the training threads, under the slot table's lock.
"""

from __future__ import annotations

from collections.abc import Callable

from client.engine.state import Slot, SlotTable

__all__ = ["Prefetcher"]


class Prefetcher:
    def __init__(self, budget_bytes: int, table: SlotTable, request: Callable[[Slot, bool], None]) -> None:
        self.budget_bytes = budget_bytes
        self.inflight_bytes = 0
        self._table = table
        self._request = request
        self._pass = 0
        """Counts fetch passes over the live handles."""

    def taken(self, slot: Slot) -> None:
        """``slot`` is being handed out: a second take in one pass starts a new pass."""
        if slot.taken_pass == self._pass:
            self._pass += 1
        slot.taken_pass = self._pass

    def requested(self, slot: Slot, prefetch: bool) -> None:
        slot.fetch_requested = True
        slot.prefetched = prefetch
        if prefetch:
            self.inflight_bytes += slot.handle.size_bytes

    def settled(self, slot: Slot) -> None:
        """``slot``'s prefetch is used or dropped: it no longer counts as in flight."""
        if slot.prefetched:
            self.inflight_bytes -= slot.handle.size_bytes
            slot.prefetched = False

    def before(self, slot: Slot) -> None:
        """Request the handles offloaded before ``slot``, within the budget."""
        self._from(slot.handle.seq)

    def newest(self) -> None:
        """Request the latest handles, within the budget: forward has ended, backward starts there."""
        self._from(None)

    def _from(self, seq: int | None) -> None:
        if self.budget_bytes <= 0 or self.inflight_bytes * 2 > self.budget_bytes:
            return
        last_layer: int | None = None
        for other in self._table.newest_first():
            handle = other.handle
            if (seq is not None and handle.seq >= seq) or other.fetch_requested or other.taken_pass == self._pass:
                continue
            full = self.inflight_bytes + handle.size_bytes > self.budget_bytes
            same_layer = handle.layer_id is not None and handle.layer_id == last_layer
            if full and (handle.device.type != "cpu" or not same_layer):
                return
            self._request(other, True)
            last_layer = handle.layer_id
