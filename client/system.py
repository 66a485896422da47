"""StormSystem: one training process's session with the host daemon."""

from __future__ import annotations

import copy
import itertools
import logging
import os
import threading
from typing import Any

import torch
import zmq

from client.engine import EngineStats, TransferEngine
from client.engine.cuda import CudaCopier
from client.engine.ipc import open_cuda_slab
from client.handle import Handle
from client.lifetime import close_at_exit
from client.malloc import fix_mmap_threshold
from client.segments import LentSlabs, PinnedMemoryBuffer
from client.session import Heartbeat, Registration, register, verify_daemon
from client.settings import ClientSettings
from client.stats import SystemStats
from client.transport import Channel
from storm_service.errors import StormError, StormTimeoutError, StormUnavailableError, UnknownSessionError
from storm_service.fdpass import request_slab
from storm_service.protocol import Op

__all__ = ["StormSystem"]

log = logging.getLogger("storm.client")


class StormSystem:
    """A registered session with ``stormd``: mapped pool, heartbeat, transfer engine.

    ``offload(tensor)`` returns a :class:`Handle` at once and copies in the background;
    ``fetch(handle)`` returns a tensor equal to the one offloaded (same device, dtype,
    shape and values); ``free(handle)`` gives the space back. Any thread may call these
    (autograd runs backward on its own threads): each thread that talks to the daemon
    gets its own DEALER socket, since ZeroMQ sockets are not thread-safe.

    ``policy`` says what happens when the pool or the quota is full: ``keep`` leaves the
    tensor where it is (counted in ``stats().kept_tensors``), ``wait`` retries for up
    to ``wait_timeout_s`` and then fails, ``error`` fails at once; failures surface as
    :class:`PoolFullError` / :class:`QuotaExceededError` from the next ``offload`` or the
    handle's ``fetch``.

    ``verify`` (or ``STORM_VERIFY=1``) checksums every tensor saved through the autograd
    hooks when it is packed and checks it when it is unpacked; a mismatch raises
    :class:`IntegrityError` naming the layer, dtype, shape and handle (NOTE [Verify mode]
    in docs/design.md). It costs a hash of every saved byte twice; it is off by default.

    ``select`` says which saved tensors leave the device (``all``, ``budget``,
    ``checkpoint``: client/selection.py); ``max_inflight_layers`` bounds the layers whose
    copies may still run when the next layer starts offloading (NOTE [Bounded copies in
    flight]); ``link_gbps`` emulates a device link on the CPU (NOTE [Link emulator]).

    Every keyword left as None takes its ``STORM_*`` variable, else its default
    (``client/settings.py``).
    """

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        name: str | None = None,
        timeout_s: float | None = None,
        quota_bytes: int | None = None,
        policy: str | None = None,
        wait_timeout_s: float | None = None,
        prefetch_bytes: int | None = None,
        reserve_idle_s: float | None = None,
        fetch_timeout_s: float | None = None,
        verify: bool | None = None,
        select: str | None = None,
        max_inflight_layers: int | None = None,
        keep_last_layers: int | None = None,
        budget_cap_bytes: int | None = None,
        link_gbps: float | None = None,
    ) -> None:
        self.settings = ClientSettings.load(
            endpoint=endpoint,
            timeout_s=timeout_s,
            policy=policy,
            wait_timeout_s=wait_timeout_s,
            prefetch_bytes=prefetch_bytes,
            reserve_idle_s=reserve_idle_s,
            fetch_timeout_s=fetch_timeout_s,
            verify=verify,
            select=select,
            max_inflight_layers=max_inflight_layers,
            keep_last_layers=keep_last_layers,
            budget_cap_bytes=budget_cap_bytes,
            link_gbps=link_gbps,
        )
        self.endpoint = self.settings.resolved_endpoint
        self.name = (name or f"pid-{os.getpid()}")[:256]
        self.timeout_s = self.settings.timeout_s
        self.fetch_timeout_s = self.settings.fetch_timeout_s
        self.verify = self.settings.verify
        self.blocking_round_trips = 0
        self.generation = 0
        """How many times this system has registered; a handle from an older one is lost."""
        self.lost: StormError | None = None
        self._quota_bytes = quota_bytes
        self._pid = os.getpid()
        self._closed = False
        self._context = zmq.Context()
        self._ids = itertools.count(1)
        self._seq = itertools.count()
        self._curve = self.settings.curve_keys()
        fix_mmap_threshold(self.settings.mmap_threshold_bytes)  # NOTE [Freed activations leave the process]
        try:
            self._register()
        except BaseException:
            self._context.destroy(linger=0)
            raise
        close_at_exit(self)

    def _register(self) -> None:
        """Check the daemon, register a session, start its heartbeat and the transfer engine.

        Nothing is mapped here: a slab is mapped when the first extent in it arrives
        (:class:`LentSlabs`), so attaching costs the same whatever the pool's size.
        Nothing here touches CUDA (NOTE [Device hygiene] in client/engine/cuda.py).
        """
        self._daemon_alive: Any = None
        self._local = threading.local()
        verify_daemon(self.endpoint, self.timeout_s)
        channel = self._new_channel()
        try:
            self.blocking_round_trips += 1
            registration: Registration = register(channel, self.timeout_s, self.name, self._quota_bytes)
        finally:
            channel.close()
        self.session_id = registration.session_id
        self.token = registration.token
        self.quota_bytes = registration.quota_bytes
        self._daemon_alive = registration.daemon_alive
        self._heartbeat = Heartbeat(
            self._new_channel, self.token, registration.heartbeat_interval_s, self.timeout_s, self._mark_lost
        )
        settings, cuda = self.settings, torch.cuda.is_available()
        fd_socket, token, timeout_s = registration.fd_socket, self.token, self.timeout_s
        self.segments = LentSlabs(
            lambda slab_id: request_slab(fd_socket, token, slab_id, timeout_s),
            pin=cuda and settings.pin,
            open_device=open_cuda_slab if cuda else None,
        )
        try:
            self._engine = TransferEngine(
                new_channel=self._new_channel,
                token=self.token,
                segments=self.segments,
                settings=settings,
                cuda=cuda,
                on_lost=self._mark_lost,
                disk_tier=registration.disk_tier,
            )
        except BaseException:
            self._heartbeat.stop()
            for segment in self.segments:
                segment.close()
            self._heartbeat.join(self.timeout_s)
            raise
        self.generation += 1
        self.lost = None
        log.info("registered with stormd at %s as session %d", self.endpoint, self.session_id)

    def _release(self, unregister: bool) -> None:
        """Stop the heartbeat and the engine, unmap the pool, and optionally unregister.

        Every device's copies are waited for and the pinned chunks unregistered before the
        pool is unmapped (NOTE [Device hygiene] in client/engine/cuda.py). The pool is
        unmapped before the session is given up: once it is gone the daemon lends its
        extents to others, so tensors that still read the pool in place must hold private
        copies by then (NOTE [Detached views] in client/segments.py).
        """
        self._heartbeat.stop()
        self._engine.close(self.timeout_s)
        if isinstance(self._engine.copier, CudaCopier):
            self._engine.copier.close()
        self.segments.close(self._engine.table.viewed_extents())
        if unregister:
            try:
                self._call(Op.UNREGISTER)
            except StormError as e:
                log.warning("unregister failed (the daemon frees the session when it expires): %s", e)
        self._heartbeat.join(self.timeout_s)

    # -- the public API -------------------------------------------------------------

    @property
    def transfer_d2h_stream(self) -> torch.cuda.Stream | None:
        """The current device's stream for device-to-pool copies (None without CUDA).

        Each device has its own, made on first use (NOTE [Device hygiene] in client/engine/cuda.py).
        """
        self._check_open("transfer_d2h_stream")
        copier = self._engine.copier
        return copier.streams(torch.cuda.current_device()).d2h if isinstance(copier, CudaCopier) else None

    @property
    def transfer_h2d_stream(self) -> torch.cuda.Stream | None:
        """The current device's stream for pool-to-device copies (None without CUDA); see ``transfer_d2h_stream``."""
        self._check_open("transfer_h2d_stream")
        copier = self._engine.copier
        return copier.streams(torch.cuda.current_device()).h2d if isinstance(copier, CudaCopier) else None

    def offload(
        self, tensor: torch.Tensor, layer_id: int | None = None, *, guard: torch.Tensor | None = None
    ) -> Handle:
        """Start moving ``tensor`` into the pool; returns its handle at once.

        If ``guard`` (by default ``tensor`` itself) is changed in place before the copy
        is done, the handle's fetch raises :class:`SourceModifiedError` instead of
        returning bytes nobody can vouch for (NOTE [Modified sources] in client/engine/jobs.py).
        """
        self._check_open("offload", reconnect=True)
        self._engine.raise_pending()
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
            self._engine.keep(handle, tensor)
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
        and it must not outlive this system (NOTE [Aliased fetch] in client/engine/copies.py).
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
        return self._engine.take(handle, self.fetch_timeout_s, alias=alias, out=out)

    def free(self, handle: Handle) -> None:
        """Give the handle's extent back to the pool (asynchronous; safe to call twice)."""
        if not self._closed and os.getpid() == self._pid and handle.generation == self.generation:
            self._engine.submit_free(handle)

    def note_saved_bytes(self, *, span: int = 0, dedup: int = 0) -> None:
        """Count bytes the autograd hooks did not copy (``span_saved_bytes``, ``dedup_saved_bytes`` in stats)."""
        self._engine.stats.span_saved_bytes += span
        self._engine.stats.dedup_saved_bytes += dedup

    def prefetch_latest(self) -> None:
        """Start bringing back the latest offloads (within ``prefetch_bytes``): call when forward
        ends; backward asks for them first. ``offload_saved_tensors`` calls it at the end of its block."""
        self._check_open("prefetch")
        self._engine.prefetch_newest()

    def inflight_bytes(self) -> int:
        """Bytes offloaded whose copies into the pool are not done: still held on their device."""
        return self._engine.inflight_bytes()

    def transfer_stats(self) -> EngineStats:
        """This client's transfer counters so far (no request to the daemon; ``stats()`` adds its view)."""
        return copy.copy(self._engine.stats)

    def locate(self, handle: Handle) -> tuple[int, int, int] | None:
        """``(daemon handle id, segment, offset)`` of the extent that holds ``handle``, once its
        offload is placed; None if it holds none (kept in place, failed, or freed)."""
        return self._engine.locate(handle, self.fetch_timeout_s)

    def buffer(self, handle: Handle) -> PinnedMemoryBuffer:
        """The pool extent that holds ``handle`` (once its offload is done)."""
        where = self.locate(handle)
        if where is None:
            raise StormError(f"buffer: {handle!r} holds no extent")
        _, segment, offset = where
        return PinnedMemoryBuffer(self.segments[segment], offset, handle.size_bytes)

    def flush(self) -> None:
        """Wait until every queued offload, fetch and free is done and acknowledged."""
        self._check_open("flush")
        self._engine.flush(self.fetch_timeout_s)

    def stats(self) -> SystemStats:
        """The daemon's view of this session plus this client's transfer counters."""
        self.flush()
        reply = self._call(Op.STATS)
        session = reply["session"]
        return SystemStats(
            **vars(self._engine.stats),
            session_id=self.session_id,
            endpoint=self.endpoint,
            used_bytes=session["used_bytes"],
            reserved_bytes=session["reserved_bytes"],
            peak_bytes=session["peak_bytes"],
            quota_bytes=session["quota_bytes"],
            handles=session["handles"],
            layer_bytes={int(k): v for k, v in session["layer_bytes"].items()},
            pool_bytes=reply["pool_bytes"],
            pool_used_bytes=reply["used_bytes"],
            blocking_round_trips=self.blocking_round_trips,
        )

    def close(self) -> None:
        """Unregister (the daemon frees everything this session held) and unmap the pool.

        In a forked child it does nothing: the session, its threads and its sockets
        belong to the parent (NOTE [Fork]).
        """
        if self._closed or os.getpid() != self._pid:
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
        """Raise if closed, forked or lost; with ``reconnect``, a lost system first tries to register anew.

        NOTE [Fork]
          A forked child inherits the StormSystem object but not its threads, and its
          sockets and session are the parent's: using it would interleave two processes
          on one ZeroMQ socket and one session. Any use in the child raises; the child
          makes a StormSystem of its own. Its exit never closes the parent's session.
        """
        if os.getpid() != self._pid:
            raise StormError(
                f"{op}: this StormSystem belongs to process {self._pid}, and this is a forked child "
                f"({os.getpid()}); create a StormSystem in the child"
            )
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
