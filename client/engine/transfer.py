"""The transfer engine: one thread that moves activations between tensors and the pool.

What the training threads call (offload, take, free, flush) and the thread's lifetime
are here; what the thread does with the jobs they queue is client/engine/loop.py.

NOTE [Transfer engine]
  The training thread never waits on the daemon to offload. ``submit_offload`` queues a
  job and returns; the engine thread takes every job queued so far as one batch, places
  each layer's run of offloads (client/engine/placement.py), has the copier copy them
  into their extents (client/engine/copies.py), and posts one ``commit`` whose reply
  nobody waits for. Fetches are batched the same way (one ``fetch`` request to check
  ownership and commit, then the copies back), and so are frees. Within a batch,
  offloads run before fetches and fetches before frees, so a handle's jobs keep their
  order, except that fetches of handles already stored go first: backward must not wait
  behind forward's copies. Between layers of a long batch of offloads the thread also
  serves fetches queued meanwhile. ``take`` prefetches the handles offloaded before the
  one it wants (client/engine/prefetch.py); a new layer's first offload waits for older
  layers' copies (NOTE [Bounded copies in flight] in client/engine/window.py).

  On CUDA, fetch destinations are allocated by the thread that asks (backward's), on
  the consumer's stream, and the engine runs the H2D copies. On the CPU the engine only
  has the daemon confirm the extents; ``take`` then reads the bytes in place or copies
  them on the asking thread (NOTE [Aliased fetch]), so nothing is allocated in a second
  thread's malloc arena, which would hold its own freed blocks.
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
import time
from collections.abc import Callable

import torch

from client.engine.copies import PoolViews, copier_for
from client.engine.failures import Failures
from client.engine.jobs import EngineStats, Fetch, Flush, Free, Offload
from client.engine.link import Link
from client.engine.loop import STOP, TransferLoop
from client.engine.placement import pressure_policy
from client.engine.prefetch import Prefetcher
from client.engine.requests import Requests
from client.engine.state import Slot, SlotTable
from client.engine.window import InflightWindow
from client.handle import Handle
from client.reservations import Reservations
from client.segments import SlabLookup
from client.settings import ClientSettings
from client.transport import Channel
from storm_service.errors import StormError, StormTimeoutError, StormUnavailableError

__all__ = ["TransferEngine"]

log = logging.getLogger("storm.client")


class TransferEngine:
    """Owns the transfer thread, its DEALER channel, and the copier."""

    def __init__(
        self,
        *,
        new_channel: Callable[[], Channel],
        token: str,
        segments: SlabLookup,
        settings: ClientSettings,
        cuda: bool,
        on_lost: Callable[[BaseException], None],
        disk_tier: bool = False,
    ) -> None:
        self.token = token
        self.timeout_s = timeout_s = settings.timeout_s
        self.stats = EngineStats()
        self.failure: BaseException | None = None
        self._policy = pressure_policy(settings.policy, settings.wait_timeout_s, disk_tier)
        self._reservations = Reservations(settings.reserve_idle_s)
        self._failures = Failures(on_lost)
        self._new_channel = new_channel
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.table = SlotTable()
        self._views = PoolViews(segments)
        link = Link(settings.link_gbps) if settings.link_gbps > 0 else None
        self.copier = copier_for(self._views, cuda, link)
        self._prefetch = Prefetcher(settings.prefetch_bytes, self.table, self._request_fetch)
        self._window = InflightWindow(settings.max_inflight_layers, self._wait_stored, self.stats)
        self._stored_timeout_s = settings.wait_timeout_s + timeout_s
        """A placement may retry (policy wait) and then post its commit: the most a store takes."""
        self._thread = threading.Thread(target=self._run, name="storm-transfer", daemon=True)
        self._thread.start()

    # -- called from training threads ------------------------------------------

    def raise_pending(self) -> None:
        """Raise the oldest error of a posted request or a failed offload, if any (client/engine/failures.py)."""
        self._failures.raise_pending()

    def keep(self, handle: Handle, tensor: torch.Tensor) -> None:
        """Record a handle whose tensor stays where it is (nothing to move)."""
        slot = self.table.add(handle)
        slot.kept = tensor
        slot.stored.set()

    def submit_offload(self, handle: Handle, tensor: torch.Tensor, guard: torch.Tensor) -> None:
        slot = Slot(handle)
        producer = None
        if tensor.is_cuda:  # NOTE [Device hygiene] in client/engine/cuda.py
            slot.stream = torch.cuda.current_stream(tensor.device)
            producer = torch.cuda.Event()
            producer.record(slot.stream)
        self._window.admit(slot)
        job = Offload(slot, tensor, producer, guard, guard._version, tensor.data_ptr(), self._failures.epoch)
        # Prefetches pick slots from the table under its lock: one must never find a slot
        # whose offload is not queued yet, or its fetch would wait on a store never coming.
        with self.table.lock:
            self.table.insert(slot)
            self._queue.put(job)

    def inflight_bytes(self) -> int:
        """Bytes of offloads not stored yet: their sources are still held where they were."""
        with self.table.lock:
            return sum(slot.handle.size_bytes for slot in self.table.newest_first() if not slot.stored.is_set())

    def locate(self, handle: Handle, timeout_s: float) -> tuple[int, int, int] | None:
        """``(daemon handle, segment, offset)`` once the offload is placed; None if it holds no extent."""
        slot = self.table.get(handle)
        if slot is None:
            return None
        slot.stored.wait(timeout_s)
        return (slot.id, slot.segment, slot.offset) if slot.id is not None else None

    def take(
        self, handle: Handle, timeout_s: float, alias: bool = False, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Return the tensor for ``handle``, fetching it now if nothing did (NOTE [Transfer engine]).

        On the CPU the bytes are read from the pool once the daemon has confirmed the
        extent: copied out (into ``out`` if given), or with ``alias`` handed out in place
        (NOTE [Aliased fetch]).
        """
        slot = self.table.get(handle)
        if slot is None:
            raise StormError(f"fetch: {handle!r} was already freed")
        if slot.kept is not None and slot.id is None and slot.stored.is_set():
            return slot.take_kept(out)
        started = time.perf_counter()
        with self.table.lock:
            self._prefetch.taken(slot)
            if not slot.fetch_requested:
                self.stats.fetch_misses += 1
                self._request_fetch(slot, False)
            elif slot.fetch_done.is_set():
                self.stats.prefetch_hits += 1
            else:
                self.stats.prefetch_waits += 1
            self._prefetch.before(slot)
            slot.awaited = True
        try:
            self._wait(slot.fetch_done, timeout_s, f"fetch of {slot.describe()}")
        finally:
            slot.awaited = False
        with self.table.lock:
            error, tensor = slot.error, slot.fetched
            slot.fetched = None
            slot.fetch_requested = False
            slot.fetch_done.clear()
            self._prefetch.settled(slot)
        if error is not None:
            # Reported now: the queued errors of its burst would only fail the next step. A fresh
            # copy, since a traceback on the stored instance would keep the step's tensors alive.
            self._failures.reported()
            raise copy.copy(error)
        if tensor is None:
            if alias:
                with self.table.lock:
                    self.table.viewed(slot, +1)
                tensor = self._views.alias(slot, self._view_released)
            elif out is not None:
                tensor = out.copy_(self._views.view(slot))
            else:
                tensor = self._views.view(slot).clone()
        else:
            if slot.copy_event is not None:
                slot.copy_event.hand_over(tensor)  # NOTE [Device hygiene] in client/engine/cuda.py
            if out is not None:
                tensor = out.copy_(tensor)
        self.stats.fetch_wait_s += time.perf_counter() - started
        self.stats.fetched_tensors += 1
        self.stats.fetched_bytes += handle.size_bytes
        return tensor

    def prefetch_newest(self) -> None:
        """Start fetching the latest offloads: backward will ask for them first."""
        with self.table.lock:
            self._prefetch.newest()

    def _view_released(self, slot: Slot) -> None:  # NOTE [Aliased fetch]
        with self.table.lock:
            if self.table.viewed(slot, -1) or not slot.free_pending:
                return
            slot.free_pending = False
        self._queue.put(Free(slot))

    def submit_free(self, handle: Handle) -> None:
        with self.table.lock:
            slot = self.table.get(handle)
            if slot is None:
                return
            slot.freed = True
            self.table.remove(slot)
            self._prefetch.settled(slot)
            if slot.views:
                slot.free_pending = True  # freed by the last aliased view (NOTE [Aliased fetch])
                return
        self._queue.put(Free(slot))

    def flush(self, timeout_s: float) -> None:
        """Wait until every job queued so far is done and the daemon has answered it."""
        done = threading.Event()
        self._queue.put(Flush(done))
        self._wait(done, timeout_s, "flush")

    def close(self, timeout_s: float) -> None:
        self._queue.put(STOP)
        self._thread.join(timeout_s)

    def _request_fetch(self, slot: Slot, prefetch: bool) -> None:
        # Allocate first: if this raises, nothing is marked requested.
        try:
            out, allocated = self.copier.prepare_fetch(slot)
        except torch.OutOfMemoryError:
            if not prefetch:
                raise
            self.stats.prefetch_oom += 1  # fetched on demand when backward asks
            return
        self._prefetch.requested(slot, prefetch)
        self._queue.put(Fetch(slot, out, allocated))

    def _wait_stored(self, slot: Slot) -> None:
        self._wait(slot.stored, self._stored_timeout_s, f"offload of {slot.describe()}")

    def _wait(self, event: threading.Event, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not event.wait(0.05):
            if not self._thread.is_alive():
                raise StormUnavailableError(f"{what}: the transfer thread has stopped ({self.failure!r})")
            if time.monotonic() > deadline:
                raise StormTimeoutError(f"{what}: not done within {timeout_s:g} s")

    # -- the engine thread ----------------------------------------------------------

    def _run(self) -> None:
        channel = self._new_channel()
        channel.on_async_error = self._failures.posted
        requests = Requests(channel, self.token, self.timeout_s, self.stats, self._failures)
        loop = TransferLoop(
            requests,
            jobs=self._queue,
            table=self.table,
            prefetch=self._prefetch,
            copier=self.copier,
            stats=self.stats,
            failures=self._failures,
            policy=self._policy,
            reservations=self._reservations,
        )
        try:
            loop.run()
        except BaseException as e:  # keep the reason; waiters see the thread gone
            self.failure = e
            log.exception("the transfer thread failed")
        finally:
            channel.close()
