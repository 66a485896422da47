"""The transfer engine: one thread that moves activations between tensors and the pool.

NOTE [Transfer engine]
  The training thread never waits on the daemon to offload. ``offload`` queues a job
  and returns; the engine thread takes every job queued so far as one batch, sends
  one ``offload`` request per layer in it, copies each tensor into its extent (a copy
  thread on CPU, since torch copies release the GIL; the D2H stream on CUDA), and
  posts one ``commit`` whose reply nobody waits for. Fetches are batched the same way
  (one ``fetch`` request to check ownership and commit, then the copies back), and so
  are frees. Within a batch, offloads run before fetches and fetches before frees, so
  a handle's jobs keep their order. Backward prefetches: when a handle is fetched, the
  engine also fetches the handles offloaded just before it (backward runs in reverse)
  until ``prefetch_bytes`` of fetched-but-unused tensors are in flight (on the CPU, to
  the end of the layer it reached: there a prefetch allocates nothing). It refills only
  once less than half of that budget is in flight, so prefetches go out in batches
  (one ``fetch`` request for many tensors), not one engine wake-up per tensor.

  On CUDA, fetch destinations are allocated by the thread that asks (backward's), on
  the consumer's stream, and the engine runs the H2D copies. On the CPU the engine only
  has the daemon confirm the extents; ``take`` then reads the bytes in place or copies
  them on the asking thread (NOTE [Aliased fetch]), so nothing is allocated in a second
  thread's malloc arena, which would hold its own freed blocks.

  CUDA ordering uses events, not ``record_stream``: the D2H copy waits on an event
  recorded on the producer's stream, and the source is dropped only after the copy's
  event completes; the H2D stream waits on an event recorded after the destination
  was allocated, and the consumer waits on the copy's event.

NOTE [Modified sources]
  An offload returns before its bytes are copied, so a tensor changed in place in
  between would be stored with the new bytes. Each offload remembers the version
  counter of its guard tensor (the tensor itself, or the saved tensor whose span is
  copied) and reads it again once the copy is complete (after the D2H event on CUDA).
  If it moved, some in-place operation was issued before the copy finished, so the
  stored bytes cannot be vouched for: the handle fails with ``SourceModifiedError``
  when fetched. Autograd without saved-tensor hooks raises for the same programs
  ("modified by an inplace operation"); a change issued after the copy completed
  leaves the stored bytes as they were at offload, as ``save_on_cpu`` would.
"""

from __future__ import annotations

import copy
import ctypes
import logging
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from client.handle import Handle
from client.reservations import Reservations
from client.segments import MappedSegment
from client.transport import Channel
from storm_service.errors import (
    PoolFullError,
    QuotaExceededError,
    SourceModifiedError,
    StormError,
    StormTimeoutError,
    StormUnavailableError,
    UnknownSessionError,
)
from storm_service.protocol import MAX_BATCH, Op

__all__ = ["EngineStats", "TransferEngine"]

log = logging.getLogger("storm.client")

POLICIES = ("keep", "wait", "error")


@dataclass
class EngineStats:
    offloaded_tensors: int = 0
    offloaded_bytes: int = 0
    fetched_tensors: int = 0
    fetched_bytes: int = 0
    prefetch_hits: int = 0
    """Fetches whose bytes were already back when asked for."""
    prefetch_waits: int = 0
    """Fetches that had been prefetched but were still copying when asked for."""
    fetch_misses: int = 0
    """Fetches nothing had asked for in advance."""
    fetch_wait_s: float = 0.0
    kept_tensors: int = 0
    kept_bytes: int = 0
    dedup_saved_bytes: int = 0
    """Bytes not copied because a saved tensor read an earlier copy (NOTE [Storage records])."""
    span_saved_bytes: int = 0
    """Bytes of saved tensors' storages outside the spans copied (NOTE [Storage records])."""
    engine_round_trips: int = 0
    """Requests the transfer thread waited on (never the training thread)."""
    offload_round_trips: int = 0
    """Of those, ``offload`` requests: one per layer in steady state (NOTE [Reservations])."""
    fetch_round_trips: int = 0
    """Of those, ``fetch`` requests: a miss and its prefetches go out together."""
    freed_tensors: int = 0
    returned_reservation_bytes: int = 0
    """Bytes of spare reservations given back (NOTE [Reservations])."""


@dataclass
class _Offload:
    handle: Handle
    tensor: torch.Tensor
    producer: Any  # torch.cuda.Event on CUDA, else None
    consumer_stream: Any
    guard: torch.Tensor
    """Whose version must not move before the copy is done (NOTE [Modified sources])."""
    version: int


@dataclass
class _Fetch:
    handle: Handle
    out: torch.Tensor | None
    """CUDA: the destination, allocated on the thread that asked (NOTE [Transfer engine]).
    None on the CPU, where the bytes are read from the pool by ``take``."""
    allocated: Any  # CUDA: event recorded on the consumer's stream after allocating ``out``


@dataclass
class _Free:
    handle: Handle


@dataclass
class _Flush:
    done: threading.Event


_STOP = object()


class TransferEngine:
    """Owns the copy thread, its DEALER channel, and the CUDA transfer streams."""

    def __init__(
        self,
        *,
        new_channel: Callable[[], Channel],
        token: str,
        segments: list[MappedSegment],
        policy: str,
        wait_timeout_s: float,
        prefetch_bytes: int,
        reserve_idle_s: float,
        timeout_s: float,
        cuda: bool,
        on_lost: Callable[[BaseException], None],
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.token = token
        self.segments = segments
        self.policy = policy
        self.wait_timeout_s = wait_timeout_s
        self.prefetch_bytes = prefetch_bytes
        self.timeout_s = timeout_s
        self.stats = EngineStats()
        self.reservations = Reservations(reserve_idle_s)
        self.failure: BaseException | None = None
        self.pending_errors: deque[BaseException] = deque(maxlen=64)
        self._new_channel = new_channel
        self._on_lost = on_lost
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._backlog: deque[object] = deque()
        self._lock = threading.Lock()
        self._live: dict[int, Handle] = {}
        self._viewed: set[Handle] = set()
        """Handles that live aliased tensors read (NOTE [Aliased fetch])."""
        self._inflight_prefetch_bytes = 0
        self._pass = 0
        """Counts fetch passes over the live handles (a second backward of a retained graph)."""
        self.d2h_stream = torch.cuda.Stream() if cuda else None
        self.h2d_stream = torch.cuda.Stream() if cuda else None
        self._thread = threading.Thread(target=self._run, name="storm-transfer", daemon=True)
        self._thread.start()

    # -- called from training threads ------------------------------------------

    def submit_offload(self, handle: Handle, tensor: torch.Tensor, guard: torch.Tensor) -> None:
        producer = consumer = None
        if tensor.is_cuda:
            consumer = torch.cuda.current_stream(tensor.device)
            producer = torch.cuda.Event()
            producer.record(consumer)
        with self._lock:
            self._live[handle.seq] = handle
        self._queue.put(_Offload(handle, tensor, producer, consumer, guard, guard._version))

    def take(
        self, handle: Handle, timeout_s: float, alias: bool = False, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Return the tensor for ``handle``, fetching it now if nothing did (see NOTE).

        On the CPU the bytes are read from the pool once the daemon has confirmed the
        extent: copied out (into ``out`` if given), or with ``alias`` handed out in place
        (NOTE [Aliased fetch]).
        """
        if handle.freed:
            raise StormError(f"fetch: {handle!r} was already freed")
        started = time.perf_counter()
        with self._lock:
            if handle.taken_pass == self._pass:
                self._pass += 1  # handed out before in this pass: a new backward pass began
            handle.taken_pass = self._pass
            if not handle.fetch_requested:
                self.stats.fetch_misses += 1
                self._request_fetch(handle, prefetch=False)
            elif handle.fetch_done.is_set():
                self.stats.prefetch_hits += 1
            else:
                self.stats.prefetch_waits += 1
            self._prefetch_before(handle)
        self._wait(handle.fetch_done, timeout_s, f"fetch of {handle!r}")
        with self._lock:
            error, tensor = handle.error, handle.fetched
            handle.fetched = None
            handle.fetch_requested = False
            handle.fetch_done.clear()
            if handle.prefetched:
                self._inflight_prefetch_bytes -= handle.size_bytes
                handle.prefetched = False
        if error is not None:
            # A fresh copy: raising the stored instance would chain each raise's traceback (and
            # the frames and saved tensors it holds) onto the handle, a cycle that keeps them alive.
            raise copy.copy(error)
        if tensor is None:
            if alias:
                tensor = self._alias(handle)
            elif out is not None:
                tensor = out.copy_(self._pool_view(handle))
            else:
                tensor = self._pool_view(handle).clone()
        else:
            if handle.copy_event is not None:
                torch.cuda.current_stream(tensor.device).wait_event(handle.copy_event)  # type: ignore[arg-type]
            if out is not None:
                tensor = out.copy_(tensor)
        self.stats.fetch_wait_s += time.perf_counter() - started
        self.stats.fetched_tensors += 1
        self.stats.fetched_bytes += handle.size_bytes
        return tensor

    def _pool_view(self, handle: Handle) -> torch.Tensor:
        view = self.segments[handle.segment].view(handle.offset, handle.size_bytes)
        return view.view(handle.dtype).view(handle.shape)

    def _alias(self, handle: Handle) -> torch.Tensor:
        """A tensor over the handle's extent with a storage of its own (NOTE [Aliased fetch]).

        NOTE [Aliased fetch]
          On the CPU, backward can read an activation where it lies in the pool: no copy
          back, and no private memory for it. The tensor gets a storage of its own over
          a ctypes window on the mapping, so its lifetime is the storage's: the window's
          finalizer runs when the last view of that storage is gone, and a ``free`` that
          comes while views are alive waits for it (the extent must not be reused under
          a live tensor). Such tensors must not outlive the StormSystem.
        """
        window = (ctypes.c_uint8 * handle.size_bytes).from_buffer(self.segments[handle.segment].mmap, handle.offset)
        with self._lock:
            handle.views += 1
            self._viewed.add(handle)
        weakref.finalize(window, self._view_released, handle)
        return torch.frombuffer(window, dtype=torch.uint8).view(handle.dtype).view(handle.shape)

    def _view_released(self, handle: Handle) -> None:
        with self._lock:
            handle.views -= 1
            if not handle.views:
                self._viewed.discard(handle)
            if handle.views or not handle.free_pending:
                return
            handle.free_pending = False
        self._queue.put(_Free(handle))

    def submit_free(self, handle: Handle) -> None:
        with self._lock:
            if handle.freed:
                return
            handle.freed = True
            self._live.pop(handle.seq, None)
            if handle.prefetched:
                self._inflight_prefetch_bytes -= handle.size_bytes
                handle.prefetched = False
            if handle.views:
                handle.free_pending = True  # freed by the last aliased view (NOTE [Aliased fetch])
                return
        self._queue.put(_Free(handle))

    def flush(self, timeout_s: float) -> None:
        """Wait until every job queued so far is done and the daemon has answered it."""
        done = threading.Event()
        self._queue.put(_Flush(done))
        self._wait(done, timeout_s, "flush")

    def close(self, timeout_s: float) -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout_s)

    def viewed_extents(self) -> list[tuple[int, int, int]]:
        """``(segment, offset, size_bytes)`` of every extent a live aliased tensor reads."""
        with self._lock:
            return [(h.segment, h.offset, h.size_bytes) for h in self._viewed]

    def _request_fetch(self, handle: Handle, prefetch: bool) -> None:
        out = allocated = None
        if handle.device.type == "cuda":  # allocate first: if this raises, nothing is marked requested
            out = torch.empty(handle.shape, dtype=handle.dtype, device=handle.device)
            allocated = torch.cuda.Event()
            allocated.record(torch.cuda.current_stream(handle.device))
        handle.fetch_requested = True
        handle.prefetched = prefetch
        if prefetch:
            self._inflight_prefetch_bytes += handle.size_bytes
        self._queue.put(_Fetch(handle, out, allocated))

    def _prefetch_before(self, handle: Handle) -> None:
        """Backward consumes activations in reverse order of offload: warm the ones before.

        On the CPU a prefetch only has the daemon confirm the extents (nothing is
        allocated), so it runs on to the end of the last layer it reached: each ``fetch``
        request then covers whole layers. On CUDA the byte budget is strict.
        """
        if self.prefetch_bytes <= 0 or self._inflight_prefetch_bytes * 2 > self.prefetch_bytes:
            return
        last_layer: int | None = None
        for other in reversed(self._live.values()):
            if other.seq >= handle.seq or other.fetch_requested or other.taken_pass == self._pass:
                continue
            full = self._inflight_prefetch_bytes + other.size_bytes > self.prefetch_bytes
            same_layer = other.layer_id is not None and other.layer_id == last_layer
            if full and (other.device.type != "cpu" or not same_layer):
                return
            self._request_fetch(other, prefetch=True)
            last_layer = other.layer_id

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
        channel.on_async_error = self._posted_failed
        try:
            while True:
                batch = [self._backlog.popleft() if self._backlog else self._next_job(channel)]
                with self._lock:
                    pass  # a fetch and its prefetches are queued under the lock: take them together
                while len(batch) < MAX_BATCH:
                    try:
                        batch.append(self._backlog.popleft() if self._backlog else self._queue.get_nowait())
                    except queue.Empty:
                        break
                if self._serve(channel, batch):
                    return
        except BaseException as e:  # keep the reason; waiters see the thread gone
            self.failure = e
            log.exception("the transfer thread failed")
        finally:
            channel.close()

    def _next_job(self, channel: Channel) -> object:
        """The next queued job; while waiting, give back spares that expire (NOTE [Reservations])."""
        while True:
            try:
                return self._queue.get(timeout=self.reservations.seconds_to_expiry(time.monotonic()))
            except queue.Empty:
                self._return_expired(channel)

    def _serve(self, channel: Channel, batch: list[object]) -> bool:
        offloads = [job for job in batch if isinstance(job, _Offload)]
        fetches = [job for job in batch if isinstance(job, _Fetch)]
        frees = [job.handle for job in batch if isinstance(job, _Free)]
        flushes = [job for job in batch if isinstance(job, _Flush)]
        if offloads:
            self._guard(offloads, lambda: self._offload(channel, offloads))
        if fetches or flushes:
            self._return_spares(channel, self.reservations.end_run())
        if fetches:
            self._guard(fetches, lambda: self._fetch(channel, fetches))
        if frees:
            self._free(channel, frees)
        self._return_expired(channel)
        if flushes:
            try:
                channel.settle(self.timeout_s)
            except StormError as e:
                self.pending_errors.append(e)
            for job in flushes:
                job.done.set()
        channel.drain()
        return _STOP in batch

    def _return_expired(self, channel: Channel) -> None:
        self._return_spares(channel, self.reservations.expired(time.monotonic()))

    def _return_spares(self, channel: Channel, spares: list[dict[str, Any]]) -> bool:
        """Free spare reserved extents (posted: the daemon applies it before our next request)."""
        if spares:
            self.stats.returned_reservation_bytes += sum(extent["size_bytes"] for extent in spares)
            self._post_free(channel, [extent["handle"] for extent in spares])
        return bool(spares)

    def _posted_failed(self, error: Exception) -> None:
        """A commit or free failed after we moved on: report it at the next offload."""
        if isinstance(error, UnknownSessionError):
            self._on_lost(error)
        self.pending_errors.append(error)

    def _guard(self, jobs: list[Any], work: Callable[[], None]) -> None:
        """Run ``work``; if it raises, fail every handle of ``jobs`` that is not done yet."""
        try:
            work()
        except Exception as e:
            log.error("transfer failed: %s", e)
            if isinstance(e, StormUnavailableError | StormTimeoutError | UnknownSessionError):
                self._on_lost(e)
            for job in jobs:
                handle = job.handle
                if isinstance(job, _Offload) and not handle.stored.is_set():
                    handle.error = e
                    handle.stored.set()
                if isinstance(job, _Fetch) and not handle.fetch_done.is_set():
                    handle.error = handle.error or e
                    handle.fetch_done.set()

    # offload --------------------------------------------------------------------

    def _offload(self, channel: Channel, jobs: list[_Offload]) -> None:
        for layer_jobs in _runs_by_layer(jobs):
            self._reserve_and_place(channel, layer_jobs)
            copies = [job for job in layer_jobs if job.handle.id is not None]
            done_event = None
            for job in copies:
                handle = job.handle
                dst = self._pool_view(handle)
                if job.producer is not None:
                    assert self.d2h_stream is not None
                    with torch.cuda.stream(self.d2h_stream):
                        self.d2h_stream.wait_event(job.producer)
                        dst.copy_(job.tensor, non_blocking=True)
                    done_event = torch.cuda.Event()
                    done_event.record(self.d2h_stream)
                elif job.tensor.is_contiguous():
                    # One thread's memcpy (ctypes releases the GIL): torch's copy_ would start
                    # an OpenMP team in this thread whose spinning steals the trainer's cores.
                    ctypes.memmove(dst.data_ptr(), job.tensor.data_ptr(), handle.size_bytes)
                else:
                    dst.copy_(job.tensor)
            if done_event is not None:
                done_event.synchronize()  # sources may be dropped only once their copies are done
            for job in copies:
                if job.guard._version != job.version:
                    job.handle.error = SourceModifiedError(
                        f"offload: {job.handle!r} was changed in place before its copy into the pool was done "
                        f"(version {job.version} when offloaded, {job.guard._version} after the copy)"
                    )
            if copies:
                channel.post(Op.COMMIT, self.token, handles=[job.handle.id for job in copies])
            for job in layer_jobs:
                job.tensor = job.guard = None  # type: ignore[assignment]
                job.handle.stored.set()

    def _reserve_and_place(self, channel: Channel, jobs: list[_Offload]) -> None:
        """Give every job a reserved extent, reserving what is missing in one request.

        If the pool or the quota refuses the reservation, the jobs without an extent are
        allocated exactly, under the pressure policy (NOTE [Reservations]).
        """
        layer_id = jobs[0].handle.layer_id
        self._return_spares(channel, self.reservations.begin(layer_id))
        sizes = self.reservations.plan([job.handle.size_bytes for job in jobs])
        refused: list[int] = []
        for start in range(0, len(sizes), MAX_BATCH):
            try:
                reply = self._call(channel, Op.OFFLOAD, sizes=sizes[start : start + MAX_BATCH], layer_id=layer_id)
            except (PoolFullError, QuotaExceededError):
                refused = sizes[start:]
                break
            self.reservations.add(reply["extents"], time.monotonic())
        missing = []
        for job in jobs:
            extent = self.reservations.take(job.handle.size_bytes)
            if extent is None:
                missing.append(job)
            else:
                self._place(job, extent)
        if missing:
            # Asking again for exactly what was just refused would only be refused again.
            asked_exactly = sorted(refused) == sorted(job.handle.size_bytes for job in missing)
            self._allocate(channel, missing, ask_together=not asked_exactly)

    def _allocate(self, channel: Channel, jobs: list[_Offload], ask_together: bool = True) -> None:
        """Place every job's handle in the pool, or apply the pressure policy to it."""
        if ask_together:
            sizes = [job.handle.size_bytes for job in jobs]
            try:
                extents = self._call(channel, Op.OFFLOAD, sizes=sizes, layer_id=jobs[0].handle.layer_id)
            except (PoolFullError, QuotaExceededError):
                pass
            else:
                for job, extent in zip(jobs, extents["extents"], strict=True):
                    self._place(job, extent)
                return
        if self._return_spares(channel, self.reservations.drain()):
            self._allocate(channel, jobs)  # our own spares may have been what filled it
        elif len(jobs) > 1:
            for job in jobs:
                self._allocate(channel, [job])
        else:
            self._under_pressure(channel, jobs[0])

    def _under_pressure(self, channel: Channel, job: _Offload) -> None:
        handle = job.handle
        deadline = time.monotonic() + self.wait_timeout_s
        while self.policy == "wait":
            self._serve_while_waiting(channel)
            try:
                extent = self._call(channel, Op.OFFLOAD, sizes=[handle.size_bytes], layer_id=handle.layer_id)
            except (PoolFullError, QuotaExceededError) as e:
                if time.monotonic() > deadline:
                    handle.error = e
                    self.pending_errors.append(e)
                    return
                time.sleep(0.01)
                continue
            self._place(job, extent["extents"][0])
            return
        if self.policy == "keep":
            handle.kept = job.tensor
            self.stats.kept_tensors += 1
            self.stats.kept_bytes += handle.size_bytes
            return
        try:
            extent = self._call(channel, Op.OFFLOAD, sizes=[handle.size_bytes], layer_id=handle.layer_id)
        except (PoolFullError, QuotaExceededError) as e:
            handle.error = e
            self.pending_errors.append(e)
        else:
            self._place(job, extent["extents"][0])  # room appeared since the refusal

    def _place(self, job: _Offload, extent: dict[str, int]) -> None:
        handle = job.handle
        handle.id, handle.segment, handle.offset = extent["handle"], extent["segment"], extent["offset"]
        self.stats.offloaded_tensors += 1
        self.stats.offloaded_bytes += handle.size_bytes

    def _serve_while_waiting(self, channel: Channel) -> None:
        """While an offload waits for room, run the frees and fetches queued behind it.

        Frees may make the room; fetches of tensors already stored must not wait behind
        the offload, since the training thread that would free more is waiting on them.
        Everything else keeps its place in the backlog.
        """
        frees: list[Handle] = []
        fetches: list[_Fetch] = []
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(job, _Free):
                frees.append(job.handle)
            elif isinstance(job, _Fetch) and job.handle.stored.is_set():
                fetches.append(job)
            else:
                self._backlog.append(job)
        if fetches:
            self._guard(fetches, lambda: self._fetch(channel, fetches))
        if frees:
            self._free(channel, frees)

    # fetch ----------------------------------------------------------------------

    def _fetch(self, channel: Channel, jobs: list[_Fetch]) -> None:
        wanted = []
        for job in jobs:
            handle = job.handle
            handle.stored.wait()  # its offload ran earlier in this thread: already set
            if handle.freed or handle.fetch_done.is_set():
                continue
            if handle.kept is not None or handle.error is not None:
                handle.fetched = handle.kept
                handle.fetch_done.set()
            else:
                wanted.append(job)
        if not wanted:
            return
        # The daemon confirms each extent is ours and committed before a byte is read.
        self._call(channel, Op.FETCH, handles=[job.handle.id for job in wanted])
        for job in wanted:
            handle = job.handle
            if job.out is not None:
                assert self.h2d_stream is not None
                self.h2d_stream.wait_event(job.allocated)
                with torch.cuda.stream(self.h2d_stream):
                    job.out.copy_(self._pool_view(handle), non_blocking=True)
                    copied = torch.cuda.Event()
                    copied.record(self.h2d_stream)
                handle.copy_event = copied
                handle.fetched = job.out
            handle.fetch_done.set()

    # free -----------------------------------------------------------------------

    def _free(self, channel: Channel, handles: list[Handle]) -> None:
        ids = []
        for handle in handles:
            if isinstance(handle.copy_event, torch.cuda.Event):
                handle.copy_event.synchronize()  # the extent may be reused once freed
            handle.fetched = handle.kept = None
            if handle.id is not None:
                ids.append(handle.id)
        self.stats.freed_tensors += len(handles)
        self._post_free(channel, ids)

    def _post_free(self, channel: Channel, ids: list[int]) -> None:
        for start in range(0, len(ids), MAX_BATCH):
            try:
                channel.post(Op.FREE, self.token, handles=ids[start : start + MAX_BATCH])
            except StormError as e:
                self.pending_errors.append(e)

    def _call(self, channel: Channel, op: Op, **fields: Any) -> dict[str, Any]:
        self.stats.engine_round_trips += 1
        if op is Op.OFFLOAD:
            self.stats.offload_round_trips += 1
        elif op is Op.FETCH:
            self.stats.fetch_round_trips += 1
        return channel.call(op, self.token, self.timeout_s, **fields)


def _runs_by_layer(jobs: list[_Offload]) -> list[list[_Offload]]:
    """Split jobs into consecutive runs that share a layer id (one offload request each)."""
    runs: list[list[_Offload]] = []
    for job in jobs:
        if runs and runs[-1][0].handle.layer_id == job.handle.layer_id:
            runs[-1].append(job)
        else:
            runs.append([job])
    return runs
