"""The CUDA copier's logic against a fake CUDA (NOTE [Device hygiene]): no device needed.

The fake keeps a log of every call with the device current when it was made; the
tensors are CPU tensors over an anonymous mapping, so the bytes copied are real. A device
slab's memory (NOTE [Importing device slabs]) is another anonymous mapping.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import logging
import mmap
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from client.engine.copies import CpuCopier, PoolViews
from client.engine.cuda import Allocation, CudaCopier, Landing
from client.engine.ipc import DeviceSegment, open_cuda_slab
from client.engine.jobs import Fetch, Offload
from client.engine.state import Slot
from client.handle import Handle
from client.segments import LentSlabs
from storm_service.errors import ProtocolError, StormError
from storm_service.fdpass import IPC_HANDLE_BYTES, LentSlab
from storm_service.shm import PIN_CHUNK_BYTES

CHUNK = PIN_CHUNK_BYTES


class FakeStream:
    def __init__(self, cuda: FakeCuda, name: str) -> None:
        self.cuda = cuda
        self.name = name

    def wait_event(self, event: FakeEvent) -> None:
        self.cuda.log.append(("wait", self.name, event.name))

    def __repr__(self) -> str:
        return self.name


class FakeEvent:
    def __init__(self, cuda: FakeCuda, name: str, blocking: bool) -> None:
        self.cuda = cuda
        self.name = name
        self.blocking = blocking

    def record(self, stream: FakeStream) -> None:
        self.cuda.log.append(("record", self.name, stream.name, self.cuda.device_now))

    def synchronize(self) -> None:
        self.cuda.log.append(("sync", self.name, self.blocking))


class FakeCuda:
    """Every call the copier makes, logged with the device current at the time."""

    def __init__(self, fail_register_at: int | None = None) -> None:
        self.log: list[tuple[Any, ...]] = []
        self.device_now: int | None = None
        self.current: dict[int, FakeStream] = {}
        self.fail_register_at = fail_register_at
        self.base = 0
        self._names = itertools.count()

    @contextlib.contextmanager
    def device(self, index: int) -> Iterator[None]:
        before, self.device_now = self.device_now, index
        try:
            yield
        finally:
            self.device_now = before

    @contextlib.contextmanager
    def use(self, stream: FakeStream) -> Iterator[None]:
        assert self.device_now is not None, "a stream is used outside a device guard"
        before = self.current.get(self.device_now)
        self.current[self.device_now] = stream
        self.log.append(("use", stream.name, self.device_now))
        try:
            yield
        finally:
            if before is None:
                del self.current[self.device_now]
            else:
                self.current[self.device_now] = before

    def new_stream(self, index: int) -> FakeStream:
        stream = FakeStream(self, f"s{next(self._names)}@{index}")
        self.log.append(("new_stream", stream.name, self.device_now))
        return stream

    def current_stream(self, index: int) -> FakeStream:
        return self.current.setdefault(index, FakeStream(self, f"default@{index}"))

    def event(self, *, blocking: bool = False) -> FakeEvent:
        return FakeEvent(self, f"e{next(self._names)}", blocking)

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        assert self.device_now is not None
        self.log.append(("empty", str(device), self.device_now, self.current_stream(self.device_now).name))
        return torch.empty(shape, dtype=dtype)

    def record_stream(self, tensor: torch.Tensor, stream: FakeStream) -> None:
        self.log.append(("record_stream", stream.name))

    def register(self, address: int, length: int) -> int:
        offset = address - self.base
        if offset == self.fail_register_at:
            return 2  # cudaErrorMemoryAllocation
        self.log.append(("register", offset, length, self.device_now))
        return 0

    def unregister(self, address: int) -> int:
        self.log.append(("unregister", address - self.base, self.device_now))
        return 0

    def calls(self, name: str) -> list[tuple[Any, ...]]:
        return [entry for entry in self.log if entry[0] == name]


class FakeSegment:
    """An anonymous mapping with MappedSegment's attributes; untouched pages cost nothing."""

    def __init__(self, size_bytes: int, pin: bool = True) -> None:
        self.name = "storm-fake"
        self.size_bytes = size_bytes
        self.pin = pin
        self.mmap = mmap.mmap(-1, size_bytes)
        window = (ctypes.c_uint8 * size_bytes).from_buffer(self.mmap)
        self.address = ctypes.addressof(window)
        self.bytes = torch.frombuffer(window, dtype=torch.uint8)

    def view(self, offset: int, size_bytes: int) -> torch.Tensor:
        return self.bytes[offset : offset + size_bytes]


@pytest.fixture
def cuda() -> FakeCuda:
    return FakeCuda()


def _copier(cuda: FakeCuda, size_bytes: int = 2 * CHUNK, pin: bool = True) -> CudaCopier:
    segment = FakeSegment(size_bytes, pin)
    cuda.base = segment.address
    views = PoolViews([segment])  # type: ignore[list-item]
    return CudaCopier(views, CpuCopier(views), cuda)  # type: ignore[arg-type]


_seq = itertools.count()


def _offload(cuda: FakeCuda, tensor: torch.Tensor, device: str, offset: int, segment: int = 0) -> Offload:
    """An offload job as the engine queues it: the slot placed at ``offset``, the producer event recorded."""
    handle = Handle(tuple(tensor.shape), tensor.dtype, torch.device(device), tensor.numel() * 4, 0, next(_seq))
    slot = Slot(handle, id=1, segment=segment, offset=offset)
    producer = None
    if slot.handle.device.type == "cuda":
        slot.stream = FakeStream(cuda, f"forward@{handle.device.index}")
        producer = cuda.event()
        producer.record(slot.stream)
    return Offload(slot, tensor, producer, tensor, tensor._version, tensor.data_ptr(), 0)


def test_nothing_is_made_or_pinned_before_a_cuda_tensor_is_copied(cuda):
    copier = _copier(cuda)
    assert cuda.log == [] and copier.devices == [] and copier.pinned_bytes() == 0
    job = _offload(cuda, torch.arange(8.0), "cpu", 0)
    copier.copy_out([job])  # a CPU tensor: the host copier's
    assert cuda.log == [] and copier.devices == []
    assert torch.equal(copier.views.view(job.slot), torch.arange(8.0))


def test_each_device_gets_its_own_streams_made_under_it(cuda):
    copier = _copier(cuda)
    on_1 = _offload(cuda, torch.arange(64.0), "cuda:1", 0)
    on_0 = _offload(cuda, torch.arange(64.0) + 1, "cuda:0", 4096)
    copier.copy_out([on_1, on_0])
    assert copier.devices == [0, 1]
    made = cuda.calls("new_stream")
    assert [(name.split("@")[1], device) for _, name, device in made] == [("1", 1), ("1", 1), ("0", 0), ("0", 0)]
    assert copier.streams(1).d2h.name.endswith("@1") and copier.streams(0).d2h.name.endswith("@0")
    assert copier.streams(1) is copier.streams(1)
    uses = cuda.calls("use")
    assert uses == [("use", copier.streams(1).d2h.name, 1), ("use", copier.streams(0).d2h.name, 0)]
    assert torch.equal(copier.views.view(on_1.slot), torch.arange(64.0))
    assert torch.equal(copier.views.view(on_0.slot), torch.arange(64.0) + 1)


def test_copy_out_waits_on_the_producer_then_on_one_blocking_event_per_device(cuda):
    copier = _copier(cuda)
    jobs = [_offload(cuda, torch.full((64,), float(i)), "cuda:1", 4096 * i) for i in range(3)]
    copier.copy_out(jobs)
    d2h = copier.streams(1).d2h.name
    assert [entry for entry in cuda.log if entry[0] == "wait"] == [("wait", d2h, job.producer.name) for job in jobs]
    done = [entry for entry in cuda.calls("record") if entry[2] == d2h]
    assert len(done) == 1 and done[0][3] == 1  # recorded on device 1's copy stream, under device 1
    assert cuda.log[-1] == ("sync", done[0][1], True)  # blocking: the thread sleeps, it does not spin


def test_only_the_chunks_a_copy_touches_are_registered_under_its_device(cuda):
    copier = _copier(cuda, size_bytes=4 * CHUNK)
    copier.copy_out([_offload(cuda, torch.ones(1024), "cuda:1", 2 * CHUNK + 512)])
    assert cuda.calls("register") == [("register", 2 * CHUNK, CHUNK, 1)]
    copier.copy_out([_offload(cuda, torch.ones(1024), "cuda:0", 2 * CHUNK + 8192)])  # same chunk: nothing new
    assert len(cuda.calls("register")) == 1
    assert copier.pinned_bytes() == CHUNK


def test_an_extent_across_a_chunk_boundary_is_copied_in_pieces_bitwise(cuda, monkeypatch):
    copier = _copier(cuda)
    pool = copier.views.segments[0]
    touched: list[tuple[int, int]] = []  # (pool offset, bytes) of every copy that reads or writes the pool
    copy = torch.Tensor.copy_

    def spy(dst: torch.Tensor, src: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
        for side in (dst, src):
            if 0 <= side.data_ptr() - pool.address < pool.size_bytes:
                touched.append((side.data_ptr() - pool.address, side.numel() * side.element_size()))
        return copy(dst, src, non_blocking)

    monkeypatch.setattr(torch.Tensor, "copy_", spy)
    source = torch.randn(256, 1024).t()  # (1024, 256), not contiguous: 1 MiB across the boundary
    offset = CHUNK - 512 * 1024
    job = _offload(cuda, source, "cuda:1", offset)
    copier.copy_out([job])
    out, allocation = copier.prepare_fetch(job.slot)
    copier.copy_in([Fetch(job.slot, out, allocation)])
    monkeypatch.undo()
    assert [entry[1] for entry in cuda.calls("register")] == [0, CHUNK]
    pieces = [(offset, 512 * 1024), (CHUNK, 512 * 1024)]
    assert touched == pieces + pieces  # out, then back: no copy spans two registrations
    assert torch.equal(copier.views.view(job.slot), source)
    assert torch.equal(out, source)


def test_a_failed_registration_warns_once_and_copies_go_on_unpinned(caplog):
    cuda = FakeCuda(fail_register_at=CHUNK)
    copier = _copier(cuda, size_bytes=4 * CHUNK)
    first = torch.randn(1 << 18)  # 1 MiB across the boundary into the chunk that fails
    second = torch.randn(1 << 10)
    with caplog.at_level(logging.WARNING, logger="storm.client"):
        copier.copy_out([_offload(cuda, first, "cuda:1", CHUNK - 4096)])
        copier.copy_out([_offload(cuda, second, "cuda:1", 3 * CHUNK)])  # another chunk: no more attempts
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "CUDA error 2" in warnings[0] and "unpinned" in warnings[0]
    assert cuda.calls("register") == [("register", 0, CHUNK, 1)]  # the chunk before it stays registered
    assert torch.equal(copier.views.segments[0].view(CHUNK - 4096, 1 << 20).view(torch.float32), first)
    assert torch.equal(copier.views.segments[0].view(3 * CHUNK, 4096).view(torch.float32), second)
    copier.close()
    assert cuda.calls("unregister") == [("unregister", 0, 1)]


def test_a_segment_not_to_pin_is_never_registered(cuda):
    copier = _copier(cuda, pin=False)
    job = _offload(cuda, torch.randn(1 << 18), "cuda:0", CHUNK - 4096)
    copier.copy_out([job])
    copier.close()
    assert cuda.calls("register") == [] and cuda.calls("unregister") == []
    assert torch.equal(copier.views.view(job.slot), job.tensor)


def test_fetch_allocates_on_the_stream_current_at_offload_and_the_copy_waits_for_it(cuda):
    copier = _copier(cuda)
    job = _offload(cuda, torch.arange(512.0), "cuda:1", 0)
    copier.copy_out([job])
    out, allocation = copier.prepare_fetch(job.slot)
    assert isinstance(allocation, Allocation) and allocation.stream is job.slot.stream
    assert cuda.calls("empty") == [("empty", "cuda:1", 1, "forward@1")]
    assert ("record", allocation.event.name, "forward@1", 1) in cuda.log
    copier.copy_in([Fetch(job.slot, out, allocation)])
    h2d = copier.streams(1).h2d.name
    assert ("wait", h2d, allocation.event.name) in cuda.log
    landing = job.slot.copy_event
    assert isinstance(landing, Landing) and landing.stream is job.slot.stream and landing.done.blocking
    assert job.slot.fetched is out and torch.equal(out, torch.arange(512.0))


def test_a_cpu_handle_needs_no_destination(cuda):
    copier = _copier(cuda)
    assert copier.prepare_fetch(_offload(cuda, torch.ones(4), "cpu", 0).slot) == (None, None)
    assert cuda.log == []


def test_the_consumer_waits_on_the_copy_and_a_foreign_stream_is_recorded(cuda):
    copier = _copier(cuda)
    job = _offload(cuda, torch.arange(512.0), "cuda:1", 0)
    copier.copy_out([job])
    out, allocation = copier.prepare_fetch(job.slot)
    copier.copy_in([Fetch(job.slot, out, allocation)])
    landing = job.slot.copy_event
    cuda.current[1] = job.slot.stream  # backward on forward's stream: nothing to record
    landing.hand_over(out)
    assert cuda.log[-1] == ("wait", "forward@1", landing.done.name)
    assert cuda.calls("record_stream") == []
    cuda.current[1] = FakeStream(cuda, "side@1")  # another stream: the allocator must know
    landing.hand_over(out)
    assert cuda.log[-2:] == [("wait", "side@1", landing.done.name), ("record_stream", "side@1")]


def test_free_waits_for_the_copy_into_the_destination(cuda):
    copier = _copier(cuda)
    job = _offload(cuda, torch.arange(512.0), "cuda:1", 0)
    copier.copy_out([job])
    out, allocation = copier.prepare_fetch(job.slot)
    copier.copy_in([Fetch(job.slot, out, allocation)])
    copier.before_free(job.slot)
    assert cuda.log[-1] == ("sync", job.slot.copy_event.done.name, True)


def test_close_waits_for_every_device_then_unregisters_the_registered_chunks_under_the_first(cuda):
    copier = _copier(cuda, size_bytes=4 * CHUNK)
    copier.copy_out([_offload(cuda, torch.ones(1024), "cuda:1", 3 * CHUNK)])
    copier.copy_out([_offload(cuda, torch.ones(1024), "cuda:0", 0)])
    before = len(cuda.log)
    copier.close()
    closing = cuda.log[before:]
    kinds = [entry[0] for entry in closing]
    assert kinds == ["record"] * 4 + ["sync"] * 4 + ["unregister"] * 2  # every copy done before any unpin
    streams = [copier.streams(0), copier.streams(1)]
    assert [entry[2] for entry in closing[:4]] == [s.name for pair in streams for s in (pair.d2h, pair.h2d)]
    assert [entry[3] for entry in closing[:4]] == [0, 0, 1, 1]  # each recorded under its own device
    assert all(blocking for _, _, blocking in closing[4:8])
    assert closing[8:] == [("unregister", 0, 1), ("unregister", 3 * CHUNK, 1)]  # under cuda:1, which pinned first


# -- device slabs (NOTE [Importing device slabs] in client/engine/ipc.py) ---------------------

POOL_GPU = "GPU-11111111-2222-3333-4444-555555555555"


class FakeIpc:
    """CudaIpc over an anonymous mapping that plays the pool GPU's memory; calls logged in the fake's log."""

    def __init__(self, cuda: FakeCuda, size_bytes: int, fail_open: str | None = None) -> None:
        self.cuda = cuda
        self.fail_open = fail_open
        self.memory = mmap.mmap(-1, size_bytes)
        window = (ctypes.c_uint8 * size_bytes).from_buffer(self.memory)
        self.address = ctypes.addressof(window)
        self.bytes = torch.frombuffer(window, dtype=torch.uint8)

    def current_device(self) -> int:
        assert self.cuda.device_now is not None, "a device slab is opened outside a device guard"
        return self.cuda.device_now

    def open(self, handle: bytes, device: int) -> int:
        if self.fail_open is not None:
            raise StormError(self.fail_open)
        self.cuda.log.append(("ipc_open", handle, device, self.cuda.device_now))
        return self.address

    def close(self, address: int, device: int) -> None:
        self.cuda.log.append(("ipc_close", address - self.address, device))

    def synchronize(self, device: int) -> None:
        self.cuda.log.append(("ipc_sync", device))

    def tensor(self, address: int, size_bytes: int, device: int) -> torch.Tensor:
        return self.bytes[address - self.address : address - self.address + size_bytes]


class Slabs:
    """Slab 0 in host memory (mapped already); the others device slabs, opened on first use by ``LentSlabs``."""

    def __init__(self, host: FakeSegment, ipc: FakeIpc) -> None:
        self.host = host
        self.ipc = ipc
        self.device = LentSlabs(self._lend, pin=True, open_device=lambda lent: open_cuda_slab(lent, ipc))
        self.lent: list[int] = []

    def _lend(self, slab_id: int) -> LentSlab:
        self.lent.append(slab_id)
        return LentSlab(slab_id, self.host.size_bytes, None, "cuda", POOL_GPU, bytes(range(IPC_HANDLE_BYTES)))

    def __getitem__(self, slab_id: int) -> Any:
        return self.host if slab_id == 0 else self.device[slab_id]


def _with_device_slab(cuda: FakeCuda, size_bytes: int = 2 * CHUNK, fail_open: str | None = None) -> CudaCopier:
    host = FakeSegment(size_bytes)
    cuda.base = host.address
    views = PoolViews(Slabs(host, FakeIpc(cuda, size_bytes, fail_open)))  # type: ignore[arg-type]
    return CudaCopier(views, CpuCopier(views), cuda)  # type: ignore[arg-type]


def _round_trip(cuda: FakeCuda, copier: CudaCopier, segment: int) -> Offload:
    job = _offload(cuda, torch.arange(1024.0), "cuda:1", 4096, segment)
    copier.copy_out([job])
    out, allocation = copier.prepare_fetch(job.slot)
    copier.copy_in([Fetch(job.slot, out, allocation)])
    cuda.current[1] = job.slot.stream  # backward runs on forward's stream
    job.slot.copy_event.hand_over(out)
    assert torch.equal(out, job.tensor)
    return job


def _copier_calls(log: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """The streams, events and copies of a log: pinning and opening slabs left out."""
    return [entry for entry in log if entry[0] != "register" and not entry[0].startswith("ipc_")]


def test_a_device_slab_is_opened_once_under_the_device_of_the_first_copy_into_it(cuda):
    copier = _with_device_slab(cuda)
    first = _offload(cuda, torch.arange(64.0), "cuda:1", 0, segment=1)
    copier.copy_out([first])
    copier.copy_out([_offload(cuda, torch.arange(64.0) + 1, "cuda:0", 4096, segment=1)])
    slab = copier.views.segments[1]
    assert isinstance(slab, DeviceSegment) and slab.importer == 1 and slab.device == POOL_GPU and not slab.pin
    assert cuda.calls("ipc_open") == [("ipc_open", bytes(range(IPC_HANDLE_BYTES)), 1, 1)]
    assert copier.views.segments.lent == [1]
    assert torch.equal(copier.views.view(first.slot), torch.arange(64.0))


def test_a_device_slab_is_copied_device_to_device_with_the_host_pools_streams_and_events_and_no_pinning():
    on_host, on_device = FakeCuda(), FakeCuda()
    _round_trip(on_host, _with_device_slab(on_host), segment=0)
    copier = _with_device_slab(on_device)
    job = _round_trip(on_device, copier, segment=1)
    assert on_device.calls("register") == [] and on_host.calls("register") != []
    assert _copier_calls(on_device.log) == _copier_calls(on_host.log)  # NOTE [Device hygiene], call for call
    assert [entry[0] for entry in _copier_calls(on_device.log)] == [
        *("record", "new_stream", "new_stream", "use", "wait", "record", "sync"),  # out: producer, copy, done
        *("use", "empty", "record", "use", "wait", "record"),  # back: allocated on forward's stream, copy, landed
        "wait",  # the consumer waits on the copy
    ]
    assert torch.equal(copier.views.segments.ipc.bytes[4096 : 4096 + 4096].view(torch.float32), job.tensor)


def test_device_slabs_are_never_registered_beside_pinned_host_slabs(cuda):
    copier = _with_device_slab(cuda)
    on_device = _offload(cuda, torch.randn(1 << 18), "cuda:1", CHUNK - 4096, segment=1)  # across a chunk boundary
    copier.copy_out([on_device])
    assert cuda.calls("register") == []
    device_slab = copier.views.segments[1]
    assert torch.equal(device_slab.view(CHUNK - 4096, 1 << 20).view(torch.float32), on_device.tensor)
    copier.copy_out([_offload(cuda, torch.ones(1024), "cuda:1", 0, segment=0)])
    assert cuda.calls("register") == [("register", 0, CHUNK, 1)]
    assert copier.pinned_bytes() == CHUNK
    copier.close()
    assert cuda.calls("unregister") == [("unregister", 0, 1)]


def test_closing_a_device_slab_waits_for_its_device_then_closes_the_handle(cuda):
    copier = _with_device_slab(cuda)
    copier.copy_out([_offload(cuda, torch.ones(1024), "cuda:1", 0, segment=1)])
    slab = copier.views.segments[1]
    slab.close()
    slab.close()
    assert [e for e in cuda.log if e[0] in ("ipc_sync", "ipc_close")] == [("ipc_sync", 1), ("ipc_close", 0, 1)]
    with pytest.raises(ValueError, match="closed"):
        slab.view(0, 512)


def test_a_device_slab_that_cannot_be_opened_fails_the_copy_naming_it_and_the_device(cuda):
    why = "cudaIpcOpenMemHandle failed: peer access is not supported between these two devices (217)"
    copier = _with_device_slab(cuda, fail_open=why)
    with pytest.raises(StormError, match=rf"device slab 1 \({POOL_GPU}\): opening it on cuda:1: .*peer access"):
        copier.copy_out([_offload(cuda, torch.ones(1024), "cuda:1", 0, segment=1)])


def test_only_a_cuda_slab_opens_as_a_device_slab(cuda):
    fake = LentSlab(3, 1 << 20, None, "fake", "fake0", None)
    with pytest.raises(ProtocolError, match="slab 3 is not a CUDA device slab"):
        open_cuda_slab(fake, FakeIpc(cuda, 1 << 20))


def test_a_job_that_fails_mid_batch_still_waits_for_the_copies_queued_before_it(cuda):
    """A source may be dropped only once its copy is done, even when a later job of the batch raised."""
    copier = _copier(cuda)
    good = _offload(cuda, torch.arange(64.0), "cuda:1", 0)
    bad = _offload(cuda, torch.arange(64.0), "cuda:1", 2 * CHUNK)  # past the segment's end: its view raises
    with pytest.raises(ValueError):
        copier.copy_out([good, bad])
    d2h = copier.streams(1).d2h.name
    recorded = [entry for entry in cuda.log if entry[0] == "record" and entry[2] == d2h]
    assert len(recorded) == 1 and cuda.log[-1] == ("sync", recorded[0][1], True)
