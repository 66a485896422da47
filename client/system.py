"""StormSystem: one training process's session with the host daemon."""

from __future__ import annotations

import atexit
import copy
import ctypes
import itertools
import logging
import math
import os
import threading
import weakref
from typing import Any

import torch
import zmq

from client.engine import TransferEngine
from client.handle import Handle
from client.segments import MappedSegment, PinnedMemoryBuffer
from client.transport import DEFAULT_TIMEOUT_S, Channel, CurveKeys
from storm_service.errors import StormError, StormTimeoutError, StormUnavailableError, UnknownSessionError
from storm_service.protocol import Op
from storm_service.runtime import default_endpoint, pid_alive, pid_namespace

__all__ = ["StormSystem"]

log = logging.getLogger("storm.client")


MMAP_THRESHOLD_BYTES = 1 << 20
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's malloc.h


def _return_freed_memory_to_the_os() -> None:
    """Make glibc serve allocations of 1 MiB and more with mmap, so freeing them unmaps them.

    NOTE [Freed activations leave the process]
      glibc raises its mmap threshold each time a large mmapped block is freed (up to
      32 MiB), after which activation-sized tensors come from the heap, and freeing an
      offloaded activation no longer shrinks the process: the memory STORM moved to the
      pool would stay private to the trainer. A fixed threshold turns that adaptation
      off. ``STORM_MMAP_THRESHOLD=0`` leaves glibc alone.
    """
    threshold = int(os.environ.get("STORM_MMAP_THRESHOLD", MMAP_THRESHOLD_BYTES))
    if threshold <= 0:
        return
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, threshold)
    except (OSError, AttributeError):
        log.debug("mallopt is not available; freed activations may stay in the heap")


def _env_flag(name: str) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{name} must be 1/true/yes/on or 0/false/no/off, got {value!r}")


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value and value.isdigit() else None


class StormSystem:
    """A registered session with ``stormd``: mapped pool, heartbeat, transfer engine.

    ``offload(tensor)`` returns a :class:`Handle` at once and copies in the background;
    ``fetch(handle)`` returns a tensor equal to the one offloaded (same device, dtype,
    shape and values); ``free(handle)`` gives the space back. Any thread may call these
    (autograd runs backward on its own threads): each thread that talks to the daemon
    gets its own DEALER socket, since ZeroMQ sockets are not thread-safe.

    ``policy`` says what happens when the pool or the quota is full: ``keep`` leaves the
    tensor where it is (counted in ``stats()["kept_tensors"]``), ``wait`` retries for up
    to ``wait_timeout_s`` and then fails, ``error`` fails at once; failures surface as
    :class:`PoolFullError` / :class:`QuotaExceededError` from the next ``offload`` or the
    handle's ``fetch``.

    ``verify`` (or ``STORM_VERIFY=1``) checksums every tensor saved through the autograd
    hooks when it is packed and checks it when it is unpacked; a mismatch raises
    :class:`IntegrityError` naming the layer, dtype, shape and handle (NOTE [Verify mode]
    in docs/design.md). It costs a hash of every saved byte twice; it is off by default.
    """

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        name: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        quota_bytes: int | None = None,
        policy: str = "keep",
        wait_timeout_s: float = 30.0,
        prefetch_bytes: int = 64 << 20,
        reserve_idle_s: float = 2.0,
        fetch_timeout_s: float = 120.0,
        verify: bool | None = None,
    ) -> None:
        if not 0 < reserve_idle_s < math.inf:
            raise ValueError(f"reserve_idle_s must be a positive number of seconds, got {reserve_idle_s!r}")
        self.endpoint = endpoint or os.environ.get("STORM_ENDPOINT") or default_endpoint()
        self.name = (name or f"pid-{os.getpid()}")[:256]
        self.timeout_s = timeout_s
        self.fetch_timeout_s = fetch_timeout_s
        self.verify = _env_flag("STORM_VERIFY") if verify is None else verify
        self.blocking_round_trips = 0
        self.generation = 0
        """How many times this system has registered; a handle from an older one is lost."""
        self.lost: StormError | None = None
        self._quota_bytes = quota_bytes
        self._engine_settings = {
            "policy": policy,
            "wait_timeout_s": wait_timeout_s,
            "prefetch_bytes": prefetch_bytes,
            "reserve_idle_s": reserve_idle_s,
        }
        self._closed = False
        self._context = zmq.Context()
        self._ids = itertools.count(1)
        self._seq = itertools.count()
        self._curve = CurveKeys.from_env()
        _return_freed_memory_to_the_os()
        try:
            self._register()
        except BaseException:
            self._context.destroy(linger=0)
            raise
        atexit.register(_close_at_exit, weakref.ref(self))

    def _register(self) -> None:
        """Register a session, map its pool, start the transfer engine and the heartbeat."""
        self._daemon_alive: Any = None
        self._local = threading.local()
        registration = self._new_channel()
        try:
            self.blocking_round_trips += 1
            reply = registration.call(
                Op.REGISTER,
                None,
                self.timeout_s,
                pid=os.getpid(),
                name=self.name,
                pid_ns=pid_namespace() or 0,
                **_register_extras(self._quota_bytes),
            )
        finally:
            registration.close()
        self.session_id: int = reply["session_id"]
        self.token: str = reply["token"]
        self.quota_bytes: int = reply["quota_bytes"]
        if reply.get("pid_ns") is not None and reply["pid_ns"] == pid_namespace():
            daemon_pid = reply["daemon_pid"]
            self._daemon_alive = lambda: pid_alive(daemon_pid)
        cuda = torch.cuda.is_available()
        self.segments = [MappedSegment(s["name"], s["size_bytes"], pin=cuda) for s in reply["segments"]]
        self._engine = TransferEngine(
            new_channel=self._new_channel,
            token=self.token,
            segments=self.segments,
            timeout_s=self.timeout_s,
            cuda=cuda,
            on_lost=self._mark_lost,
            **self._engine_settings,  # type: ignore[arg-type]
        )
        self._stop_heartbeat = threading.Event()
        self._heartbeat = threading.Thread(
            target=self._beat, args=(float(reply["heartbeat_interval_s"]),), name="storm-heartbeat", daemon=True
        )
        self._heartbeat.start()
        self.generation += 1
        self.lost = None
        log.info("registered with stormd at %s as session %d", self.endpoint, self.session_id)

    def _release(self, unregister: bool) -> None:
        """Stop the heartbeat and the engine, unmap the pool, and optionally unregister.

        The pool is unmapped first: once the session is gone the daemon lends its extents
        to others, so tensors that still read the pool in place must hold private copies
        by then (NOTE [Detached views] in client/segments.py).
        """
        self._stop_heartbeat.set()
        self._engine.close(self.timeout_s)
        viewed: dict[int, list[tuple[int, int]]] = {}
        for segment_index, offset, size_bytes in self._engine.viewed_extents():
            viewed.setdefault(segment_index, []).append((offset, size_bytes))
        for index, segment in enumerate(self.segments):
            segment.close(keep=viewed.get(index, []))
        if unregister:
            try:
                self._call(Op.UNREGISTER)
            except StormError as e:
                log.warning("unregister failed (the daemon frees the session when it expires): %s", e)
        self._heartbeat.join(self.timeout_s)

    # -- the public API -------------------------------------------------------------

    @property
    def transfer_d2h_stream(self) -> torch.cuda.Stream | None:
        """The CUDA stream that carries device-to-pool copies (None without CUDA)."""
        return self._engine.d2h_stream

    @property
    def transfer_h2d_stream(self) -> torch.cuda.Stream | None:
        """The CUDA stream that carries pool-to-device copies (None without CUDA)."""
        return self._engine.h2d_stream

    def offload(
        self, tensor: torch.Tensor, layer_id: int | None = None, *, guard: torch.Tensor | None = None
    ) -> Handle:
        """Start moving ``tensor`` into the pool; returns its handle at once.

        If ``guard`` (by default ``tensor`` itself) is changed in place before the copy
        is done, the handle's fetch raises :class:`SourceModifiedError` instead of
        returning bytes nobody can vouch for (NOTE [Modified sources] in client/engine.py).
        """
        self._check_open("offload", reconnect=True)
        if self._engine.pending_errors:
            raise self._engine.pending_errors.popleft()
        if tensor.layout is not torch.strided:
            raise TypeError(f"offload: only strided tensors can be offloaded, got {tensor.layout}")
        handle = Handle(
            shape=tuple(tensor.shape),
            dtype=tensor.dtype,
            device=tensor.device,
            size_bytes=tensor.numel() * tensor.element_size(),
            layer_id=layer_id,
            seq=next(self._seq),
            generation=self.generation,
        )
        if handle.size_bytes == 0:
            handle.kept = tensor
            handle.stored.set()
            return handle
        self._engine.submit_offload(handle, tensor.detach(), tensor if guard is None else guard)
        return handle

    def fetch(self, handle: Handle, alias: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
        """Return a tensor equal to the one offloaded (waits for any copy in flight).

        By default the bytes are copied into a new tensor. With ``out`` they are copied
        into that tensor (same shape, dtype and device as the offloaded one), which is
        returned: a buffer reused across steps costs no allocation and no page faults.
        With ``alias`` a CPU tensor is returned that reads the pool in place instead of
        a copy; its extent stays allocated until that tensor is gone, even once freed,
        and it must not outlive this system (NOTE [Aliased fetch] in client/engine.py).
        """
        if handle.generation != self.generation:
            raise StormUnavailableError(
                f"fetch: {handle!r} was held by an earlier session with stormd at {self.endpoint}, "
                "which was lost; the activation is gone"
            )
        self._check_open("fetch")
        if out is not None:
            if alias:
                raise ValueError("fetch: alias=True reads the pool in place; it cannot also fill out=")
            if (tuple(out.shape), out.dtype, out.device) != (tuple(handle.shape), handle.dtype, handle.device):
                raise ValueError(
                    f"fetch: out= is {tuple(out.shape)} {out.dtype} on {out.device}; "
                    f"{handle!r} needs {tuple(handle.shape)} {handle.dtype} on {handle.device}"
                )
        if handle.kept is not None and handle.id is None:
            return handle.kept if out is None else out.copy_(handle.kept)
        return self._engine.take(handle, self.fetch_timeout_s, alias=alias, out=out)

    def free(self, handle: Handle) -> None:
        """Give the handle's extent back to the pool (asynchronous; safe to call twice)."""
        if not self._closed and handle.generation == self.generation:
            self._engine.submit_free(handle)

    def note_saved_bytes(self, *, span: int = 0, dedup: int = 0) -> None:
        """Count bytes the autograd hooks did not copy (``span_saved_bytes``, ``dedup_saved_bytes`` in stats)."""
        self._engine.stats.span_saved_bytes += span
        self._engine.stats.dedup_saved_bytes += dedup

    def buffer(self, handle: Handle) -> PinnedMemoryBuffer:
        """The pool extent that holds ``handle`` (once its offload is done)."""
        handle.stored.wait(self.fetch_timeout_s)
        if handle.id is None:
            raise StormError(f"buffer: {handle!r} holds no extent")
        return PinnedMemoryBuffer(self.segments[handle.segment], handle.offset, handle.size_bytes)

    def flush(self) -> None:
        """Wait until every queued offload, fetch and free is done and acknowledged."""
        self._check_open("flush")
        self._engine.flush(self.fetch_timeout_s)

    def stats(self) -> dict[str, Any]:
        """The daemon's view of this session plus this client's transfer counters."""
        self.flush()
        reply = self._call(Op.STATS)
        session = reply["session"]
        engine = self._engine.stats
        return {
            "session_id": self.session_id,
            "endpoint": self.endpoint,
            "used_bytes": session["used_bytes"],
            "reserved_bytes": session["reserved_bytes"],
            "peak_bytes": session["peak_bytes"],
            "quota_bytes": session["quota_bytes"],
            "handles": session["handles"],
            "layer_bytes": {int(k): v for k, v in session["layer_bytes"].items()},
            "pool_bytes": reply["pool_bytes"],
            "pool_used_bytes": reply["used_bytes"],
            "blocking_round_trips": self.blocking_round_trips,
            **vars(engine),
        }

    def close(self) -> None:
        """Unregister (the daemon frees everything this session held) and unmap the pool."""
        if self._closed:
            return
        self._closed = True
        self._release(unregister=self.lost is None)
        self._context.destroy(linger=0)

    def __enter__(self) -> StormSystem:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- plumbing -------------------------------------------------------------------

    def _check_open(self, op: str, reconnect: bool = False) -> None:
        """Raise if closed or lost; with ``reconnect``, a lost system first tries to register anew."""
        if self._closed:
            raise StormError(f"{op}: this StormSystem is closed")
        if self.lost is None:
            return
        if not reconnect:
            raise copy.copy(self.lost)  # a fresh instance: the stored one must not collect tracebacks
        lost = self.lost
        self._release(unregister=False)
        try:
            self._register()
        except StormError as e:
            self.lost = lost
            raise StormUnavailableError(f"{op}: {lost}; registering again failed: {e}") from e
        log.warning("stormd at %s was lost and is back: registered again as session %d", self.endpoint, self.session_id)

    def _mark_lost(self, error: BaseException) -> None:
        if self.lost is None:
            self.lost = StormUnavailableError(f"the session with stormd at {self.endpoint} was lost: {error}")
            log.error("%s", self.lost)

    def _new_channel(self) -> Channel:
        return Channel(self._context, self.endpoint, self._ids, alive=self._daemon_alive, curve=self._curve)

    def _channel(self) -> Channel:
        channel: Channel | None = getattr(self._local, "channel", None)
        if channel is None:
            channel = self._local.channel = self._new_channel()
        return channel

    def _call(self, op: Op, **fields: Any) -> dict[str, Any]:
        self.blocking_round_trips += 1
        try:
            return self._channel().call(op, self.token, self.timeout_s, **fields)
        except (StormUnavailableError, StormTimeoutError, UnknownSessionError) as e:
            self._mark_lost(e)
            raise

    def _beat(self, interval_s: float) -> None:
        channel = self._new_channel()
        try:
            while not self._stop_heartbeat.wait(interval_s):
                try:
                    channel.call(Op.HEARTBEAT, self.token, self.timeout_s)
                except StormError as e:
                    self._mark_lost(e)
                    return
        finally:
            channel.close()


def _register_extras(quota_bytes: int | None) -> dict[str, int]:
    extras = {"rank": _env_int("RANK"), "world_size": _env_int("WORLD_SIZE"), "quota_bytes": quota_bytes}
    return {k: v for k, v in extras.items() if v is not None}


def _close_at_exit(ref: weakref.ref[StormSystem]) -> None:
    system = ref()
    if system is not None:
        system.close()
