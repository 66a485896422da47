"""The transfer thread's fetches: the daemon confirms the extents, then the copier copies them back.

A batch's fetches go out as one ``fetch`` request, what backward waits for first. With a
disk tier the daemon may answer for fewer than were asked: the rest are asked for again,
and prefetches it cannot answer yet are dropped (backward fetches them on demand).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from client.engine.copies import Copier
from client.engine.jobs import EngineStats, Fetch
from client.engine.prefetch import Prefetcher
from client.engine.requests import Requests
from client.engine.state import SlotTable
from storm_service.protocol import Op

__all__ = ["Fetches"]


class Fetches:
    """Serves fetch jobs; used by the transfer thread only."""

    def __init__(
        self,
        *,
        requests: Requests,
        copier: Copier,
        table: SlotTable,
        prefetch: Prefetcher,
        stats: EngineStats,
        serve_frees: Callable[[], None],
    ) -> None:
        self.requests = requests
        self.copier = copier
        self.table = table
        self.prefetch = prefetch
        self.stats = stats
        self.serve_frees = serve_frees
        """Sends the frees queued meanwhile (the other jobs keep their place): they may make room."""

    def serve(self, jobs: list[Fetch]) -> None:
        """Fetch each of ``jobs`` not done yet; a kept or failed handle is done at once."""
        wanted = []
        for job in jobs:
            slot = job.slot
            slot.stored.wait()  # its offload ran earlier in this thread: already set
            if slot.freed or slot.fetch_done.is_set():
                continue
            if slot.kept is not None or slot.error is not None:
                slot.fetched = slot.kept
                slot.fetch_done.set()
            else:
                wanted.append(job)
        if not wanted:
            return
        # The daemon confirms each extent is ours and committed before a byte is read. With a disk
        # tier it answers for those in host memory, from the first (NOTE [Disk tier]): ask again for
        # the rest, sending the frees queued meanwhile, which may be what makes room for them.
        started = time.perf_counter()
        while wanted:
            wanted.sort(key=lambda job: not job.slot.awaited)  # what backward waits for first
            wait = int(wanted[0].slot.awaited)  # a prefetch must not pull bytes back from disk early
            extents = self.requests.call(Op.FETCH, handles=[job.slot.id for job in wanted], wait=wait)["extents"]
            for job, extent in zip(wanted, extents, strict=False):  # each is ready when its own copy is
                job.slot.segment, job.slot.offset = extent["slab"], extent["offset"]  # read back: a new place
                self.copier.copy_in([job])
                self.stats.copy_in_bytes += job.slot.handle.size_bytes
                job.slot.fetch_done.set()
            wanted = wanted[len(extents) :]
            if wanted and not extents:
                if not self._awaited_or_dropped(wanted):
                    break
                self.serve_frees()
        self.stats.copy_in_s += time.perf_counter() - started

    def _awaited_or_dropped(self, jobs: list[Fetch]) -> bool:
        """Whether backward waits for one of ``jobs``; if not, drop them all: prefetches the disk tier
        could not answer yet must not hold the transfer thread (backward may wait for an offload
        queued behind them). Backward fetches them on demand."""
        with self.table.lock:
            if any(job.slot.awaited for job in jobs):
                return True
            for job in jobs:
                job.slot.fetch_requested = False
                self.prefetch.settled(job.slot)
            self.stats.prefetch_deferred += len(jobs)
        return False
