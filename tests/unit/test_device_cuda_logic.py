"""The cuda device backend's logic against a fake of its CUDA and NVML calls (NOTE [CUDA backend]).

The fake keeps a log of every call with the device current when it was made. Its device
memory is bytes in Python, its events read a clock that each copy advances by its size
over the rate the test gives for that GPU and path, so the GB/s the backend computes
are known in advance. One test runs the real backend on this machine.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import mmap
import time
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from storm_service.device.backend import CPU, DeviceError
from storm_service.device.cuda import PROBE_BYTES, CudaDevice
from storm_service.device.cuda_calls import (
    ERROR_MEMORY_ALLOCATION,
    ERROR_PEER_ACCESS_ALREADY_ENABLED,
    IPC_HANDLE_BYTES,
    CudaCallError,
)

GiB = 1 << 30
A = "GPU-aaaaaaaa-0000-0000-0000-000000000000"
B = "GPU-bbbbbbbb-0000-0000-0000-000000000000"
C = "GPU-cccccccc-0000-0000-0000-000000000000"


@dataclass
class Gpu:
    uuid: str
    bus_id: str
    index: int | None
    """Its CUDA index in the daemon; None when CUDA_VISIBLE_DEVICES hides it."""
    peer_gbps: float = 300.0
    """Its copies into another GPU."""
    local_gbps: float = 2000.0
    """Its copies within itself."""
    host_gbps: float = 50.0
    """Its copies into pinned host memory."""


class FakeCalls:
    """Every call CudaDevice makes, logged with the device current at the time."""

    def __init__(self, gpus: list[Gpu], capacity: int = 80 * GiB, peers: set[tuple[int, int]] | None = None) -> None:
        self.gpus = gpus
        self.capacity = capacity
        self.peers = peers if peers is not None else {(a, b) for a in range(8) for b in range(8)}
        self.log: list[tuple[Any, ...]] = []
        self.current: int | None = None
        self.allocations: dict[int, tuple[int, int]] = {}
        """Device address -> (device, bytes)."""
        self.contents: dict[int, bytearray] = {}
        self.host: set[int] = set()
        self.clock = dict.fromkeys(range(8), 0.0)
        self.events: dict[int, float] = {}
        self.fail: dict[str, CudaCallError] = {}
        """Calls that fail, by name."""
        self._addresses = itertools.count(0x7F0000000000, 1 << 32)

    def _call(self, name: str, *args: Any) -> None:
        self.log.append((name, self.current, *args))
        if name in self.fail:
            raise self.fail[name]

    def calls(self, name: str) -> list[tuple[Any, ...]]:
        return [entry for entry in self.log if entry[0] == name]

    def nvml_init(self) -> None:
        self._call("nvml_init")

    def nvml_shutdown(self) -> None:
        self._call("nvml_shutdown")

    def nvml_count(self) -> int:
        return len(self.gpus)

    def nvml_device(self, index: int) -> int:
        return 1000 + index

    def nvml_uuid(self, device: int) -> str:
        return self.gpus[device - 1000].uuid

    def nvml_bus_id(self, device: int) -> str:
        return self.gpus[device - 1000].bus_id

    def device_count(self) -> int:
        return sum(gpu.index is not None for gpu in self.gpus)

    def device_by_bus_id(self, bus_id: str) -> int:
        index = next(gpu.index for gpu in self.gpus if gpu.bus_id == bus_id)
        if index is None:
            raise CudaCallError("cudaDeviceGetByPCIBusId", 101, "invalid device ordinal")
        return index

    def set_device(self, index: int) -> None:
        self.current = index
        self._call("set_device", index)

    def mem_get_info(self) -> tuple[int, int]:
        used = sum(size for device, size in self.allocations.values() if device == self.current)
        return self.capacity - used, self.capacity

    def malloc(self, size_bytes: int) -> int:
        self._call("malloc", size_bytes)
        assert self.current is not None
        if self.mem_get_info()[0] < size_bytes:
            raise CudaCallError("cudaMalloc", ERROR_MEMORY_ALLOCATION, "out of memory")
        address = next(self._addresses)
        self.allocations[address] = (self.current, size_bytes)
        return address

    def memset(self, address: int, value: int, size_bytes: int) -> None:
        self._call("memset", address, value, size_bytes)
        self.contents[address] = bytearray([value]) * size_bytes

    def synchronize(self) -> None:
        self._call("synchronize")

    def ipc_handle(self, address: int) -> bytes:
        self._call("ipc_handle", address)
        return address.to_bytes(8, "little") * (IPC_HANDLE_BYTES // 8)

    def copy_to_host(self, host_address: int, address: int, size_bytes: int) -> None:
        self._call("copy_to_host", host_address, address, size_bytes)
        base = max(a for a in self.contents if a <= address)
        data = bytes(self.contents[base][address - base : address - base + size_bytes])
        ctypes.memmove(host_address, data, size_bytes)

    def copy_async(self, dst: int, src: int, size_bytes: int) -> None:
        self._call("copy_async", dst, src, size_bytes)
        assert self.current is not None and self.allocations[src][0] == self.current
        gpu = next(gpu for gpu in self.gpus if gpu.index == self.current)
        if dst in self.host:
            gbps = gpu.host_gbps
        else:
            gbps = gpu.local_gbps if self.allocations[dst][0] == self.current else gpu.peer_gbps
        self.clock[self.current] += size_bytes / (gbps * 1e9)

    def free(self, address: int) -> None:
        self._call("free", address)
        del self.allocations[address]
        self.contents.pop(address, None)

    def host_alloc(self, size_bytes: int) -> int:
        self._call("host_alloc", size_bytes)
        address = next(self._addresses)
        self.host.add(address)
        return address

    def free_host(self, address: int) -> None:
        self._call("free_host", address)
        self.host.remove(address)

    def can_access_peer(self, index: int, peer: int) -> bool:
        return (index, peer) in self.peers

    def enable_peer_access(self, peer: int) -> None:
        self._call("enable_peer_access", peer)

    def event(self) -> int:
        event = next(self._addresses)
        self.events[event] = float("nan")
        return event

    def record(self, event: int) -> None:
        assert self.current is not None
        self.events[event] = self.clock[self.current]

    def wait_event(self, event: int) -> None:
        self._call("wait_event", event)

    def elapsed_ms(self, start: int, end: int) -> float:
        return (self.events[end] - self.events[start]) * 1e3

    def destroy_event(self, event: int) -> None:
        del self.events[event]

    def reset_device(self) -> None:
        live = sorted(address for address, (device, _) in self.allocations.items() if device == self.current)
        self._call("reset_device", live)


def _gpus() -> list[Gpu]:
    """Three GPUs whose CUDA order differs from NVML's; the third hidden from CUDA."""
    return [
        Gpu(A, "00000000:3B:00.0", 1, peer_gbps=370.0, host_gbps=52.0),
        Gpu(B, "00000000:86:00.0", 0, local_gbps=1800.0, host_gbps=48.0),
        Gpu(C, "00000000:AF:00.0", None),
    ]


@pytest.fixture
def opened():
    """``open(uuid, size_bytes, calls)``: a CudaDevice closed after the test."""
    devices: list[CudaDevice] = []

    def open_device(uuid: str, size_bytes: int, calls: FakeCalls) -> CudaDevice:
        devices.append(CudaDevice(uuid, size_bytes, calls))  # type: ignore[arg-type]
        return devices[-1]

    yield open_device
    for device in devices:
        device.close()


def test_a_uuid_names_the_gpu_with_its_pci_bus_id_whatever_its_cuda_index(opened):
    calls = FakeCalls(_gpus())
    device = opened(B, GiB, calls)
    assert (device.name, device.index, device.kind, device.needs_pid_namespace) == (B, 0, "cuda", True)
    assert calls.log[:2] == [("nvml_init", None), ("nvml_shutdown", None)]  # NVML is not kept open
    other = opened(A.upper(), GiB, FakeCalls(_gpus()))
    assert (other.name, other.index) == (A, 1)  # as NVML spells it


def test_an_unknown_uuid_lists_the_gpus_nvml_sees(opened):
    unknown = "GPU-dddddddd-0000-0000-0000-000000000000"
    with pytest.raises(DeviceError, match=rf"cuda:{unknown}=1.0 GiB: no GPU has this UUID; NVML sees {A}, {B}, {C}"):
        opened(unknown, GiB, FakeCalls(_gpus()))


def test_a_gpu_hidden_from_the_daemons_cuda_is_refused_with_the_reason(opened, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(DeviceError, match=r"PCI 00000000:AF:00.0\) is hidden .*CUDA_VISIBLE_DEVICES=0,1"):
        opened(C, GiB, FakeCalls(_gpus()))


def test_nvml_that_cannot_start_names_the_driver_and_the_fake_backend(opened):
    calls = FakeCalls(_gpus())
    calls.fail["nvml_init"] = CudaCallError("nvmlInit_v2", 9, "Driver Not Loaded")
    with pytest.raises(DeviceError, match=r"NVML cannot start .*Driver Not Loaded.*NVIDIA driver.*fake:NAME=SIZE"):
        opened(A, GiB, calls)


def test_a_pool_larger_than_the_gpus_free_memory_is_refused_at_start(opened):
    calls = FakeCalls(_gpus(), capacity=40 * GiB)
    with pytest.raises(DeviceError, match=r"=64.0 GiB: the GPU has 40.0 GiB free of 40.0 GiB"):
        opened(A, 64 * GiB, calls)
    assert calls.calls("reset_device")[-1] == ("reset_device", 1, [])  # the context it made is released


def test_without_cuda_on_this_machine_the_error_is_fast_and_says_what_to_do():
    """The real backend: no fake."""
    started = time.monotonic()
    with pytest.raises(DeviceError) as raised:
        CudaDevice("GPU-00000000-0000-0000-0000-000000000000", 1 << 20)
    assert time.monotonic() - started < 2.0
    message = str(raised.value)
    assert message.startswith("--device-pool cuda:GPU-00000000-0000-0000-0000-000000000000=1.0 MiB: ")
    if not torch.cuda.is_available():
        assert "no usable CUDA on this machine" in message and "fake:NAME=SIZE" in message, message


def test_an_allocation_is_zeroed_before_its_64_byte_ipc_handle_is_lent(opened):
    calls = FakeCalls(_gpus())
    device = opened(A, GiB, calls)
    before = len(calls.log)
    memory = device.allocate(1 << 20)
    fields, fds = memory.lend()
    assert fields == {"tier": "device", "backend": "cuda", "device": A, "ipc": fields["ipc"]} and fds == []
    assert type(fields["ipc"]) is bytes and len(fields["ipc"]) == IPC_HANDLE_BYTES
    address = memory.address
    assert calls.log[before:] == [
        ("set_device", 1, 1),
        ("malloc", 1, 1 << 20),
        ("memset", 1, address, 0, 1 << 20),
        ("synchronize", 1),  # the memset is asynchronous: done before anyone may copy in
        ("ipc_handle", 1, address),
    ]
    assert calls.contents[address] == bytes(1 << 20)


def test_read_copies_device_bytes_into_the_host_view_it_is_given(opened):
    calls = FakeCalls(_gpus())
    memory = opened(A, GiB, calls).allocate(1 << 20)
    calls.contents[memory.address][4096:8192] = bytes(range(256)) * 16
    host = mmap.mmap(-1, 1 << 16)
    memory.read(4096, memoryview(host)[512 : 512 + 4096])
    assert host[512 : 512 + 4096] == bytes(range(256)) * 16 and host[:512] == bytes(512)
    (_, device, host_address, address, size_bytes) = calls.calls("copy_to_host")[0]
    window = (ctypes.c_char * len(host)).from_buffer(host)
    host_offset = host_address - ctypes.addressof(window)
    del window
    assert (device, host_offset, address - memory.address, size_bytes) == (1, 512, 4096, 4096)
    with pytest.raises(ValueError, match="outside"):
        memory.read((1 << 20) - 100, memoryview(host)[:4096])


def test_a_failed_read_is_a_device_error(opened):
    calls = FakeCalls(_gpus())
    memory = opened(A, GiB, calls).allocate(1 << 20)
    calls.fail["copy_to_host"] = CudaCallError("cudaMemcpy", 700, "an illegal memory access was encountered")
    with pytest.raises(DeviceError, match=rf"device {A}: reading 4.0 KiB back failed: cudaMemcpy failed"):
        memory.read(0, memoryview(bytearray(4096)))


def test_out_of_memory_is_a_device_error_with_the_numbers(opened):
    calls = FakeCalls(_gpus(), capacity=2 * GiB)
    device = opened(A, GiB, calls)
    device.allocate(GiB)
    with pytest.raises(DeviceError, match=rf"device {A}: cannot allocate 1.5 GiB \(1.0 GiB free\): .*out of memory"):
        device.allocate(3 * GiB // 2)


def test_links_are_measured_from_every_visible_gpu_in_gb_per_s(opened, caplog):
    calls = FakeCalls(_gpus())
    with caplog.at_level(logging.INFO, logger="stormd.device"):
        links = opened(B, GiB, calls).links()
    assert set(links) == {CPU, A, B}  # C is hidden from CUDA: nothing to measure
    assert links[A].peer_gbps == pytest.approx(370.0) and links[A].host_gbps == pytest.approx(52.0)
    assert links[B].peer_gbps == pytest.approx(1800.0) and links[B].host_gbps == pytest.approx(48.0)  # itself
    assert all(link.measured for link in links.values()) and links[A].faster and links[B].faster
    assert not links[CPU].faster  # a CPU tensor never gets a CUDA slab
    assert calls.calls("enable_peer_access") == [("enable_peer_access", 1, 0)]  # cuda:1 maps cuda:0's memory
    copies = calls.calls("copy_async")
    assert len(copies) == 2 * 2 * 6 and all(size == PROBE_BYTES for *_, size in copies)  # warm-up + 5, per path
    assert "links measured" in caplog.text  # the tier logs each link (storm_service/device/tier.py)


def test_a_gpu_without_peer_access_to_the_pool_gets_no_device_memory(opened):
    calls = FakeCalls(_gpus(), peers={(0, 0), (1, 1)})
    links = opened(B, GiB, calls).links()
    assert links[A].peer_gbps == 0.0 and links[A].host_gbps == pytest.approx(52.0) and not links[A].faster
    assert calls.calls("enable_peer_access") == []


def test_peer_access_enabled_before_is_no_failure(opened):
    calls = FakeCalls(_gpus())
    calls.fail["enable_peer_access"] = CudaCallError(
        "cudaDeviceEnablePeerAccess", ERROR_PEER_ACCESS_ALREADY_ENABLED, "peer access is already enabled"
    )
    assert opened(B, GiB, calls).links()[A].peer_gbps == pytest.approx(370.0)


def test_a_gpu_whose_link_cannot_be_measured_is_left_out_with_a_warning(opened, caplog):
    calls = FakeCalls(_gpus(), capacity=PROBE_BYTES)  # room for the pool's probe buffer only
    with caplog.at_level(logging.WARNING, logger="stormd.device"):
        links = opened(B, 1, calls).links()
    assert set(links) == {CPU, A}
    assert f"the link from GPU {B} (cuda:0) cannot be measured: cudaMalloc failed" in caplog.text


def test_contexts_made_to_measure_are_released_after_their_buffers_but_never_a_pool_devices(opened):
    calls = FakeCalls([*_gpus()[:2], Gpu("GPU-eeeeeeee-0000-0000-0000-000000000000", "00000000:DB:00.0", 2)])
    opened(B, GiB, calls)
    assert calls.calls("reset_device") == [("reset_device", 1, []), ("reset_device", 2, [])]  # nothing left on them
    assert not calls.allocations and not calls.host  # the probe buffers are freed
    assert calls.current == 0  # back on the pool device
    again = FakeCalls([*_gpus()[:2], Gpu("GPU-eeeeeeee-0000-0000-0000-000000000000", "00000000:DB:00.0", 2)])
    opened(A, GiB, again)  # cuda:0 is the pool device B opened above: its context stays
    assert [entry[1] for entry in again.calls("reset_device")] == [2]


def test_close_frees_every_allocation_then_releases_the_context(opened):
    calls = FakeCalls(_gpus())
    device = opened(A, GiB, calls)
    memories = [device.allocate(1 << 20) for _ in range(3)]
    memories[1].free()
    memories[1].free()  # twice is once
    device.close()
    device.close()
    freed = [entry[2] for entry in calls.calls("free")][-3:]
    assert freed == [memories[1].address, memories[0].address, memories[2].address]  # each once
    assert calls.log[-2:] == [("set_device", 1, 1), ("reset_device", 1, [])]  # nothing left when it goes
    memories[0].free()  # the tier may free after close: nothing happens
    assert len(calls.calls("free")) == 3 + 3  # and the three probe buffers at start


def test_a_gpu_busy_elsewhere_is_left_out_of_the_links_and_the_device_still_opens(opened, caplog):
    class Busy(FakeCalls):
        def set_device(self, index: int) -> None:
            super().set_device(index)
            if index == 1:  # in EXCLUSIVE_PROCESS mode, held by a training job: CUDA 12 makes the context here
                raise CudaCallError("cudaSetDevice", 46, "all CUDA-capable devices are busy or unavailable")

    calls = Busy([Gpu(A, "00000000:3B:00.0", 0), Gpu(B, "00000000:86:00.0", 1)])
    with caplog.at_level(logging.WARNING, logger="stormd.device"):
        device = opened(A, GiB, calls)
    assert set(device.links()) == {CPU, A}
    assert "cannot be measured" in caplog.text
