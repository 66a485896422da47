"""Error fan-out: what failed in the transfer thread reaches the training thread once.

A failed batch fails each of its handles that is not done (their ``fetch`` raises); a
request posted without waiting, or an offload that failed, is reported by the next
``offload``. Errors are raised as copies: a traceback on a stored instance (also a
handle's error) would pin the frames, and so the tensors, of the step that raised it.

NOTE [Error epochs]
  Reporting an error ends an epoch. An offload carries the epoch it was submitted in, and
  its failure is kept only if that epoch has not ended: the training thread has already
  given up on a step whose error it raised, and the rest of that step's queued offloads,
  failing after the report for the same reason (a pool still full), must not fail the
  next step too.
"""

from __future__ import annotations

import copy
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from client.engine.jobs import Fetch, Offload
from storm_service.errors import StormTimeoutError, StormUnavailableError, UnknownSessionError

__all__ = ["Failures"]

log = logging.getLogger("storm.client")

_LOST = (StormUnavailableError, StormTimeoutError, UnknownSessionError)


class Failures:
    def __init__(self, on_lost: Callable[[BaseException], None]) -> None:
        self._pending: deque[tuple[int, BaseException]] = deque(maxlen=64)
        self._on_lost = on_lost
        self.epoch = 0
        """Errors reported so far (NOTE [Error epochs]); offloads are stamped with it."""

    def add(self, error: BaseException, epoch: int | None = None) -> None:
        """Report ``error`` at the next offload, unless ``epoch`` (the failed job's) has ended."""
        self._pending.append((self.epoch if epoch is None else epoch, error))

    def reported(self) -> None:
        """An error was raised to the training thread: what is pending belongs to its epoch."""
        self._pending.clear()
        self.epoch += 1

    def raise_pending(self) -> None:
        """Raise the oldest pending error, if any, and forget the rest.

        Errors queued since the last report come from one burst (a step that found the pool
        full): the first stands for all, so the next step starts clean.
        """
        current = [error for epoch, error in self._pending if epoch >= self.epoch]
        if not current:
            self._pending.clear()
            return
        first = copy.copy(current[0])
        more = len(current) - 1
        self.reported()
        if more:
            first.add_note(f"{more} more offload or posted request(s) failed the same way since the last report")
        raise first

    def posted(self, error: Exception) -> None:
        """A commit or free failed after we moved on: report it at the next offload."""
        if isinstance(error, UnknownSessionError):
            self._on_lost(error)
        self.add(error)

    def guard(self, jobs: list[Any], work: Callable[[], None]) -> None:
        """Run ``work``; if it raises, fail every handle of ``jobs`` that is not done yet."""
        try:
            work()
        except Exception as e:
            log.error("transfer failed: %s", e)
            if isinstance(e, _LOST):
                self._on_lost(e)
            for job in jobs:
                slot = job.slot
                if isinstance(job, Offload) and not slot.stored.is_set():
                    slot.error = e
                    slot.stored.set()
                if isinstance(job, Fetch) and not slot.fetch_done.is_set():
                    slot.error = slot.error or e
                    slot.fetch_done.set()
