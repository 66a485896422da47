"""The CUDA copier: streams and events per device, and the pool pinned as copies reach it.

NOTE [Device hygiene]
  A process's CUDA work happens on the devices its tensors live on, and only when a
  tensor asks for it: a CUDA context costs about 0.5 GiB of the device it is made on.
  * ``StormSystem()`` makes no stream and pins nothing. Each device gets a D2H and an
    H2D stream the first time one of its tensors is copied (``streams``), made under
    that device.
  * Every copy runs under ``torch.cuda.device(tensor's device)``, on that device's
    streams, with its events recorded there, and so does the first registration of a
    pool chunk it touches (NOTE [Lazy pinning] in storm_service/shm.py): a tensor on
    cuda:1 never makes a context on cuda:0.
  * D2H: the copy stream waits on an event recorded on the producer's stream at offload,
    and the source is dropped only once the copy's event completes (no ``record_stream``:
    it fragments the allocator).
  * H2D: the destination is allocated on the stream that was current for the tensor's
    device when it was offloaded (forward's, which autograd also runs its backward on),
    so the caching allocator keeps the block in that stream's pool; the copy stream waits
    on an event recorded after the allocation, and the consumer waits on the copy's
    event. A consumer on another stream is recorded on the tensor (``record_stream``), so
    that the allocator does not reuse the block before that stream is done with it.
    Allocation may raise ``torch.OutOfMemoryError``: a prefetch that meets it is dropped
    and fetched on demand (client/engine/transfer.py).
  * D2D: a slot in a device slab (client/engine/ipc.py) is copied device to device on the
    same streams, with the same events, and nothing is pinned for it. The slab is opened
    the first time a copy touches it, under that copy's device, so the pool GPU's memory
    is mapped into the context of the tensor's device and no context is made on the pool
    GPU (NOTE [Importing device slabs]).
  * The transfer thread waits on events made with ``blocking=True``
    (``cudaEventBlockingSync``): it sleeps until the device signals, instead of spinning
    a core the trainer needs.
  * ``close`` waits for the streams of every device used, then unregisters the pinned
    chunks under the device that pinned first (a registration is portable: flags 0 under
    unified addressing), so no context is made just to unpin.
  * A registration that fails leaves copies pageable (synchronous, slower), with one
    warning, and the runtime's last error is cleared: torch checks it after its next
    kernel launch on this thread and would report it as that kernel's failure.

Every CUDA call goes through :class:`TorchCuda`, one line each, so that the logic here
is tested against a fake on machines without a device (tests/unit/test_cuda_copier_logic.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from client.engine.ipc import DeviceSegment
from client.engine.jobs import Fetch, Offload
from client.engine.state import Slot
from storm_service.shm import ChunkPins, PinError

if TYPE_CHECKING:
    from client.engine.copies import CpuCopier, PoolViews

__all__ = ["Allocation", "CudaCopier", "DeviceStreams", "Landing", "TorchCuda"]

log = logging.getLogger("storm.client")


class TorchCuda:
    """The CUDA calls the copier makes (a fake stands in for it in tests)."""

    def device(self, index: int) -> contextlib.AbstractContextManager[Any]:
        return torch.cuda.device(index)

    def use(self, stream: Any) -> contextlib.AbstractContextManager[Any]:
        return torch.cuda.stream(stream)

    def new_stream(self, index: int) -> Any:
        return torch.cuda.Stream(device=index)

    def current_stream(self, index: int) -> Any:
        return torch.cuda.current_stream(index)

    def event(self, *, blocking: bool = False) -> Any:
        return torch.cuda.Event(blocking=blocking)

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=device)

    def record_stream(self, tensor: torch.Tensor, stream: Any) -> None:
        tensor.record_stream(stream)

    def register(self, address: int, length_bytes: int) -> int:
        err = int(torch.cuda.cudart().cudaHostRegister(address, length_bytes, 0))
        if err != 0:
            _clear_last_error()
        return err

    def unregister(self, address: int) -> int:
        err = int(torch.cuda.cudart().cudaHostUnregister(address))
        if err != 0:
            _clear_last_error()
        return err


def _clear_last_error() -> None:
    """Reset this thread's CUDA runtime error after a failure we handled (NOTE [Device hygiene])."""
    try:
        ctypes.CDLL(None).cudaGetLastError()  # torch loads the runtime with RTLD_GLOBAL
    except (OSError, AttributeError):
        log.debug("cudaGetLastError is not reachable; the next kernel launch may report the handled error")


@dataclass(frozen=True)
class DeviceStreams:
    """The copy streams of one device."""

    d2h: Any
    h2d: Any


@dataclass(frozen=True)
class Allocation:
    """A fetch destination's allocation: ``event`` follows it on ``stream``."""

    event: Any
    stream: Any


@dataclass(frozen=True)
class Landing:
    """An H2D copy in flight into a destination allocated on ``stream`` of ``device``."""

    done: Any
    stream: Any
    device: int
    cuda: TorchCuda

    def hand_over(self, tensor: torch.Tensor) -> None:
        """On the consumer's thread, before it uses ``tensor`` (NOTE [Device hygiene])."""
        current = self.cuda.current_stream(self.device)
        current.wait_event(self.done)
        if current != self.stream:
            self.cuda.record_stream(tensor, current)

    def synchronize(self) -> None:
        self.done.synchronize()


class CudaCopier:
    """Copies CUDA tensors on per-device streams (NOTE [Device hygiene]); CPU tensors go to ``host``."""

    def __init__(self, views: PoolViews, host: CpuCopier, cuda: TorchCuda | None = None) -> None:
        self.views = views
        self._host = host
        self._cuda = cuda if cuda is not None else TorchCuda()
        self._streams: dict[int, DeviceStreams] = {}
        self._lock = threading.Lock()
        self._pins: dict[int, ChunkPins] = {}
        """Per segment index: its chunks registered so far (transfer thread only)."""
        self._pin_device: int | None = None
        """The device of the first registration: where the chunks are unregistered."""
        self._pinning = True

    def streams(self, device: int) -> DeviceStreams:
        """The copy streams of ``device``, made on first use."""
        with self._lock:
            streams = self._streams.get(device)
            if streams is None:
                with self._cuda.device(device):
                    streams = DeviceStreams(self._cuda.new_stream(device), self._cuda.new_stream(device))
                self._streams[device] = streams
            return streams

    @property
    def devices(self) -> list[int]:
        """The devices that have copy streams so far."""
        with self._lock:
            return sorted(self._streams)

    def prepare_fetch(self, slot: Slot) -> tuple[Any, Any]:
        """On the asking thread: the destination, allocated on the stream current at offload."""
        handle = slot.handle
        if handle.device.type != "cuda":
            return None, None
        device = _index(slot)
        with self._cuda.device(device):
            stream = slot.stream if slot.stream is not None else self._cuda.current_stream(device)
            with self._cuda.use(stream):
                out = self._cuda.empty(handle.shape, handle.dtype, handle.device)
            allocated = self._cuda.event()
            allocated.record(stream)
        return out, Allocation(allocated, stream)

    def copy_out(self, jobs: list[Offload]) -> None:
        self._host.copy_out([job for job in jobs if job.slot.handle.device.type != "cuda"])
        used: dict[int, DeviceStreams] = {}
        try:
            for job in jobs:
                if job.slot.handle.device.type != "cuda":
                    continue
                device = _index(job.slot)
                streams = used[device] = self.streams(device)
                with self._cuda.device(device):
                    self._pin(job.slot, device)
                    with self._cuda.use(streams.d2h):
                        streams.d2h.wait_event(job.producer)
                        self._copy(self.views.view(job.slot), job.tensor, job.slot)
        finally:  # a failed job leaves the copies queued before it: they too are waited for
            done = []
            for device, streams in used.items():
                with self._cuda.device(device):
                    done.append(self._record(streams.d2h))
            for event in done:
                event.synchronize()  # sources may be dropped only once their copies are done

    def copy_in(self, jobs: list[Fetch]) -> None:
        for job in jobs:
            if job.out is None:
                continue
            slot = job.slot
            device = _index(slot)
            streams = self.streams(device)
            with self._cuda.device(device):
                self._pin(slot, device)
                with self._cuda.use(streams.h2d):
                    streams.h2d.wait_event(job.allocated.event)
                    self._copy(job.out, self.views.view(slot), slot)
                copied = self._record(streams.h2d)
            slot.copy_event = Landing(copied, job.allocated.stream, device, self._cuda)
            slot.fetched = job.out

    def before_free(self, slot: Slot) -> None:
        if isinstance(slot.copy_event, Landing):
            slot.copy_event.synchronize()  # the extent may be reused once freed

    def close(self) -> None:
        """Wait for the copies of every device, then unregister the pinned chunks (NOTE [Device hygiene])."""
        with self._lock:
            streams = sorted(self._streams.items())
        done = []
        for device, pair in streams:
            with self._cuda.device(device):
                done += [self._record(pair.d2h), self._record(pair.h2d)]
        for event in done:
            event.synchronize()
        if self._pin_device is None:
            return
        with self._cuda.device(self._pin_device):
            for pins in self._pins.values():
                try:
                    pins.release()
                except PinError as e:  # close goes on: the mapping is given up either way
                    log.warning("%s", e)

    def pinned_bytes(self) -> int:
        """Bytes of the pool this process has page-locked so far."""
        return sum(pins.pinned_bytes for pins in self._pins.values())

    def _record(self, stream: Any) -> Any:
        event = self._cuda.event(blocking=True)  # the transfer thread sleeps on it
        event.record(stream)
        return event

    def _chunk_pins(self, segment_index: int) -> ChunkPins | None:
        pins = self._pins.get(segment_index)
        segment = self.views.segments[segment_index]
        if pins is None and segment.pin and segment.address is not None:
            pins = self._pins[segment_index] = ChunkPins(
                segment.address,
                segment.size_bytes,
                self._cuda.register,
                self._cuda.unregister,
                what=f"segment {segment.name}",
            )
        return pins

    def _pin(self, slot: Slot, device: int) -> None:
        """Register the chunks the slot's extent covers, under ``device`` (NOTE [Lazy pinning]).

        A slab's first use opens it, here, under ``device``; a device slab has nothing to pin.
        """
        if isinstance(self.views.segments[slot.segment], DeviceSegment):
            return
        pins = self._chunk_pins(slot.segment) if self._pinning else None
        if pins is None:
            return
        try:
            pins.ensure(slot.offset, slot.handle.size_bytes)
        except PinError as e:
            self._pinning = False
            log.warning("%s; copies between devices and the pool go on unpinned (synchronous, slower)", e)
        if self._pin_device is None and pins.registered:
            self._pin_device = device

    def _copy(self, dst: torch.Tensor, src: torch.Tensor, slot: Slot) -> None:
        """``dst.copy_(src)``, cut where the extent crosses a pin chunk (NOTE [Lazy pinning])."""
        pins = self._pins.get(slot.segment)
        pieces = pins.pieces(slot.offset, slot.handle.size_bytes) if pins is not None else []
        if len(pieces) <= 1:
            dst.copy_(src, non_blocking=True)
            return
        # Chunks and extents are 512-byte aligned (the daemon's allocator), so every cut
        # falls between elements.
        itemsize = dst.element_size()
        flat_dst, flat_src = dst.reshape(-1), src.reshape(-1)
        for start, length in pieces:
            first, stop = start // itemsize, (start + length) // itemsize
            flat_dst[first:stop].copy_(flat_src[first:stop], non_blocking=True)


def _index(slot: Slot) -> int:
    index = slot.handle.device.index
    assert index is not None, "a CUDA tensor's device has an index"
    return index
