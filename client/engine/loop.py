"""The transfer thread's loop: the jobs the training threads queue, served in batches.

The thread takes every job queued so far as one batch and serves it in order (NOTE
[Transfer engine] in client/engine/transfer.py): fetches of handles already stored first,
since backward waits on them; then the offloads, one layer's run at a time, each placed
(client/engine/placement.py), copied into the pool and committed; then the other fetches
(client/engine/fetches.py), the frees, and a flush's wait for the daemon's answers.
"""

from __future__ import annotations

import functools
import queue
import time
from collections import deque

from client.engine.copies import Copier
from client.engine.failures import Failures
from client.engine.fetches import Fetches
from client.engine.jobs import EngineStats, Fetch, Flush, Free, Offload, runs_by_layer
from client.engine.placement import Placement, PressurePolicy
from client.engine.prefetch import Prefetcher
from client.engine.requests import Requests
from client.engine.state import Slot, SlotTable
from client.reservations import Reservations
from storm_service.errors import StormError
from storm_service.protocol import MAX_BATCH, Op

__all__ = ["STOP", "TransferLoop"]

STOP = object()
"""Queued by ``TransferEngine.close``: the loop ends after the batch that holds it."""


class TransferLoop:
    """Serves the queued jobs; made and run by the transfer thread, on that thread's channel."""

    def __init__(
        self,
        requests: Requests,
        *,
        jobs: queue.SimpleQueue[object],
        table: SlotTable,
        prefetch: Prefetcher,
        copier: Copier,
        stats: EngineStats,
        failures: Failures,
        policy: PressurePolicy,
        reservations: Reservations,
    ) -> None:
        self._requests = requests
        self._queue = jobs
        self._backlog: deque[object] = deque()
        self._table = table
        self._copier = copier
        self._stats = stats
        self._failures = failures
        self._reservations = reservations
        self._placement = Placement(
            policy=policy,
            reservations=reservations,
            stats=stats,
            requests=requests,
            serve_while_waiting=self._serve_while_waiting,
        )
        self._fetches = Fetches(
            requests=requests,
            copier=copier,
            table=table,
            prefetch=prefetch,
            stats=stats,
            serve_frees=lambda: self._serve_while_waiting(fetches=False),
        )

    def run(self) -> None:
        """Serve batches until one holds STOP."""
        while True:
            batch = [self._backlog.popleft() if self._backlog else self._next_job()]
            with self._table.lock:
                pass  # a fetch and its prefetches are queued under the lock: take them together
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self._backlog.popleft() if self._backlog else self._queue.get_nowait())
                except queue.Empty:
                    break
            if self._serve(batch):
                return

    def _next_job(self) -> object:
        """The next queued job; while waiting, give back spares that expire (NOTE [Reservations])."""
        while True:
            try:
                return self._queue.get(timeout=self._reservations.seconds_to_expiry(time.monotonic()))
            except queue.Empty:
                self._placement.return_spares(self._reservations.expired(time.monotonic()))

    def _serve(self, batch: list[object]) -> bool:
        offloads = [job for job in batch if isinstance(job, Offload)]
        fetches = [job for job in batch if isinstance(job, Fetch)]
        frees = [job.slot for job in batch if isinstance(job, Free)]
        flushes = [job for job in batch if isinstance(job, Flush)]
        ready = [job for job in fetches if job.slot.stored.is_set()]
        later = [job for job in fetches if not job.slot.stored.is_set()]
        if ready:  # backward waits on these; nothing in this batch comes before them
            self._failures.guard(ready, lambda: self._fetches.serve(ready))
        if offloads:
            self._failures.guard(offloads, lambda: self._offload(offloads))
        if fetches or flushes:
            self._placement.return_spares(self._reservations.end_run())
        if later:
            self._failures.guard(later, lambda: self._fetches.serve(later))
        if frees:
            self._free(frees)
        self._placement.return_spares(self._reservations.expired(time.monotonic()))
        if flushes:
            try:
                self._requests.channel.settle(self._requests.timeout_s)
            except StormError as e:
                self._failures.add(e)
            for job in flushes:
                job.done.set()
        self._requests.channel.drain()
        return STOP in batch

    def _offload(self, jobs: list[Offload]) -> None:
        for index, layer_jobs in enumerate(runs_by_layer(jobs)):
            if index and not self._queue.empty():
                self._serve_while_waiting()  # fetches queued meanwhile go first
            waiting = list(layer_jobs)
            # Before a policy waits for room, what is placed is stored, so that the daemon may spill
            # it: an uncommitted extent never moves, and a layer larger than the room would wait forever.
            self._placement.before_wait = functools.partial(self._store_placed, waiting)
            self._placement.place_layer(layer_jobs)
            self._placement.before_wait = None
            self._store(waiting)

    def _store_placed(self, waiting: list[Offload]) -> None:
        """Store the placed jobs of ``waiting``, leaving the others in it."""
        placed = [job for job in waiting if job.slot.placed]
        waiting[:] = [job for job in waiting if not job.slot.placed]
        self._store(placed)

    def _store(self, jobs: list[Offload]) -> None:
        """Copy the placed ones of ``jobs`` into the pool and commit them; each is then stored."""
        copies = [job for job in jobs if job.slot.placed and not job.moved()]
        started = time.perf_counter()
        self._copier.copy_out(copies)
        self._stats.copy_out_s += time.perf_counter() - started
        self._stats.copy_out_bytes += sum(job.slot.handle.size_bytes for job in copies)
        for job in copies:
            job.slot.error = job.modified()
        if copies:
            requests = self._requests
            requests.post(Op.COMMIT, handles=[job.slot.id for job in copies], **requests.unreported_savings())
        for job in jobs:
            job.tensor = job.guard = None  # type: ignore[assignment]
            job.slot.stored.set()

    def _serve_while_waiting(self, fetches: bool = True) -> None:
        """While an offload waits for room (or a fetch for the disk tier: ``fetches`` False), run the
        frees and fetches queued behind it.

        Frees may make the room; fetches of tensors already stored must not wait behind
        the offload, since the training thread that would free more is waiting on them.
        Everything else keeps its place in the backlog.
        """
        frees: list[Slot] = []
        ready: list[Fetch] = []
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(job, Free):
                frees.append(job.slot)
            elif fetches and isinstance(job, Fetch) and job.slot.stored.is_set():
                ready.append(job)
            else:
                self._backlog.append(job)
        if ready:
            self._failures.guard(ready, lambda: self._fetches.serve(ready))
        if frees:
            self._free(frees)

    def _free(self, slots: list[Slot]) -> None:
        ids = []
        for slot in slots:
            self._copier.before_free(slot)
            slot.fetched = slot.kept = None
            if slot.id is not None:
                ids.append(slot.id)
        self._stats.freed_tensors += len(slots)
        self._requests.post_free(ids)
