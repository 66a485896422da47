"""Error fan-out: what failed in the transfer thread reaches the training thread once.

A failed batch fails each of its handles that is not done (their ``fetch`` raises); a
request posted without waiting, or an offload that failed, is reported by the next
``offload``. Errors are raised as copies: a traceback on a stored instance (also a
handle's error) would pin the frames, and so the tensors, of the step that raised it.
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
        self.pending: deque[BaseException] = deque(maxlen=64)
        self._on_lost = on_lost

    def raise_pending(self) -> None:
        """Raise the oldest pending error, if any, and forget the rest.

        Errors queued since the last report come from one burst (a step that found the pool
        full): the first stands for all, so the next step starts clean.
        """
        if not self.pending:
            return
        first = copy.copy(self.pending[0])
        more = len(self.pending) - 1
        self.pending.clear()
        if more:
            first.add_note(f"{more} more offload or posted request(s) failed the same way since the last report")
        raise first

    def posted(self, error: Exception) -> None:
        """A commit or free failed after we moved on: report it at the next offload."""
        if isinstance(error, UnknownSessionError):
            self._on_lost(error)
        self.pending.append(error)

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
