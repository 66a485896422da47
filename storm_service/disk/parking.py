"""Fetches parked while the disk tier reads their extents back, and the tier's turn in the loop.

The serving loop calls :meth:`Parking.step` after each message and when the I/O threads
signal ``wakeup_fd``: finished I/O is taken, parked fetches are answered again (in the
order they arrived; one whose first extent is still not back parks again), and the
tier balances. A fetch is parked by raising :class:`~storm_service.ops.Parked`; nothing
else waits for it. A fetch parked for PARK_S is answered with what is in host memory,
maybe nothing (NOTE [Disk tier] in tier.py). At most MAX_PARKED fetches wait at once;
past that a fetch is refused with an error instead.
"""

from __future__ import annotations

import contextlib
import logging
import select
import time
from collections.abc import Callable, Iterator

import zmq

from storm_service.disk.tier import DiskTier
from storm_service.errors import ErrorCode
from storm_service.ops import OpContext, Parked
from storm_service.protocol import encode_error

__all__ = ["MAX_PARKED", "Parking"]

log = logging.getLogger("stormd.disk")

MAX_PARKED = 4096
"""Fetches waiting for the disk tier at once, at most."""
PARK_S = 0.02
"""How long a fetch waits parked before it is answered with what is in host memory."""

Envelope = tuple[bytes, ...]
Answer = Callable[[Envelope, zmq.Frame], None]


class Parking:
    """Parked fetches of one server, and the tier they wait on."""

    def __init__(
        self, tier: DiskTier, context: OpContext, answer: Answer, send: Callable[[Envelope, bytes], None]
    ) -> None:
        self.tier = tier
        self._context = context
        self._answer = answer
        """Answers a request frame again (it may park it again)."""
        self._send = send
        self._parked: list[tuple[float, Envelope, zmq.Frame]] = []
        """``(when it answers anyway, envelope, request)`` in arrival order."""

    @property
    def wakeup_fd(self) -> int:
        return self.tier.io.wakeup_fd

    def park(self, envelope: Envelope, body: zmq.Frame) -> None:
        if len(self._parked) >= MAX_PARKED:
            self._send(
                envelope,
                encode_error(
                    None, ErrorCode.QUOTA_EXCEEDED, f"fetch: {MAX_PARKED} fetches already wait for the disk tier"
                ),
            )
            return
        self._parked.append((time.monotonic() + PARK_S, envelope, body))

    def step(self) -> None:
        """Take finished I/O, answer the fetches it unblocked or that waited long enough, then balance.

        A bug in the tier is logged, never let out: the loop serves everyone else.
        """
        try:
            if self.tier.poll() or (self._parked and self._parked[0][0] <= time.monotonic()):
                self.retry()
            self.tier.balance()
        except Exception:
            log.exception("disk tier: internal error (the daemon goes on serving)")

    def retry(self) -> None:
        """Answer every parked fetch again: one whose first extent is still away parks again, until
        its PARK_S are up; then it is answered with what is in host memory."""
        parked, self._parked = self._parked, []
        now = time.monotonic()
        for until, envelope, body in parked:
            if until <= now:
                with self.answering_now():
                    self._answer(envelope, body)
                continue
            self._answer(envelope, body)
            if self._parked and self._parked[-1][2] is body:
                self._parked[-1] = (until, envelope, body)  # parked again: it keeps its first deadline

    @contextlib.contextmanager
    def answering_now(self) -> Iterator[None]:
        """While inside, a fetch is answered with what is in host memory instead of parking."""
        self._context.answer_now = True
        try:
            yield
        finally:
            self._context.answer_now = False

    def wait(self, timeout_s: float) -> None:
        """Block until I/O finishes or ``timeout_s`` passes, then step (for in-process dispatch)."""
        select.select([self.wakeup_fd], [], [], timeout_s)
        self.step()


def dispatch_until_answered(
    reply: Callable[[], bytes | None], parking: Parking | None, timeout_s: float
) -> bytes | None:
    """``reply()``, stepping the tier while it raises Parked (in process, where nothing else runs);
    after ``timeout_s`` it is answered with what is in host memory."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return reply()
        except Parked:
            if parking is None:
                raise
            if time.monotonic() > deadline:
                with parking.answering_now():
                    return reply()
            parking.wait(0.05)
