"""The ``cuda`` device backend: a GPU's spare memory, lent through CUDA IPC handles (NOTE [CUDA backend]).

NOTE [CUDA backend]
  * Bindings: ctypes to the CUDA runtime (libcudart) and to NVML (libnvidia-ml, which the
    driver installs). The daemon imports no torch, and loads CUDA only when
    ``--device-pool`` names a GPU (storm_service/device/setup.py imports this module then).
    The runtime is the first that answers ``cudaGetDeviceCount`` among ldconfig's
    ``libcudart.so`` and the copies PyTorch's CUDA wheels ship under
    ``site-packages/nvidia/cuda_runtime/lib``, so that a runtime newer than the driver is
    passed over for one that works. Every call goes through :class:`CudaCalls`, one line
    each, so that the logic here is tested against a fake on machines without a GPU
    (tests/unit/test_device_cuda_logic.py).
  * Identity: ``--device-pool`` names a GPU by UUID, which never changes, where CUDA's
    indices change with ``CUDA_VISIBLE_DEVICES``. NVML gives the UUID's PCI bus id, and
    ``cudaDeviceGetByPCIBusId`` the index that bus id has in this process.
  * Memory: each allocation is a raw ``cudaMalloc`` (no caching allocator: a free gives the
    memory back, and an IPC handle names exactly one allocation), zeroed, and the zeroing
    waited for before its handle is lent: ``cudaMemset`` is asynchronous, and an
    importer's copies are not ordered after this process's stream. Eviction reads it back
    with ``cudaMemcpy`` into the host slab's mapping: pageable memory, so the call returns
    once the bytes are there.
  * Links, measured once, at start, before the tier takes the device's memory: from every
    GPU NVML lists and CUDA shows the daemon, 64 MiB copied 5 times after a warm-up, timed
    with CUDA events, into the pool device (device to device: NVLink or PCIe P2P; a copy
    within the device for the pool device itself) and into pinned host memory (the host
    path). A GPU without peer access to the pool device gets 0 GB/s: its copies would be
    staged through the host, slower than the host path itself. A CPU client never gets
    this device's memory (0 GB/s): a CUDA slab is not host memory a CPU copier can read.
  * Contexts: the daemon keeps a context only on its pool devices. The contexts the
    measurement made on other GPUs are destroyed (``cudaDeviceReset``) once the buffers on
    them are freed, except on a GPU that another pool device of this daemon holds.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import time
from typing import Any, ClassVar

from storm_service.device.backend import CPU, DeviceError, Link
from storm_service.device.cuda_calls import (
    ERROR_MEMORY_ALLOCATION,
    ERROR_PEER_ACCESS_ALREADY_ENABLED,
    REMEDY,
    CudaCallError,
    CudaCalls,
    load_cuda,
)
from storm_service.units import format_bytes

__all__ = ["CudaDevice", "CudaMemory"]

log = logging.getLogger("stormd.device")

PROBE_BYTES = 64 << 20
PROBE_REPEATS = 5


class CudaMemory:
    """One ``cudaMalloc`` allocation of the pool device and its IPC handle."""

    def __init__(self, device: CudaDevice, address: int, size_bytes: int, handle: bytes) -> None:
        self.device = device
        self.address = address
        self.size_bytes = size_bytes
        self.handle = handle

    def lend(self) -> tuple[dict[str, Any], list[int]]:
        """No fd: the client opens the handle (client/engine/ipc.py)."""
        return {"tier": "device", "backend": "cuda", "device": self.device.name, "ipc": self.handle}, []

    def read(self, offset: int, into: memoryview) -> None:
        """Copy ``len(into)`` bytes at ``offset`` into ``into``, a writable view of host memory."""
        size_bytes = len(into)
        if offset < 0 or offset + size_bytes > self.size_bytes:
            raise ValueError(
                f"read of [{offset}, {offset + size_bytes}) is outside a {self.size_bytes}-byte allocation"
            )
        if size_bytes == 0:
            return
        window = (ctypes.c_char * size_bytes).from_buffer(into)
        try:
            self.device.copy_to_host(ctypes.addressof(window), self.address + offset, size_bytes)
        finally:
            del window

    def free(self) -> None:
        """Give the allocation back (once; again is a no-op)."""
        self.device.release(self)


class CudaDevice:
    """One GPU of ``--device-pool cuda:UUID=SIZE`` (NOTE [CUDA backend]).

    Opening it checks the GPU (DeviceError names what is wrong and what to do), makes its
    CUDA context in this process, and measures the links to it.
    """

    kind = "cuda"
    needs_pid_namespace = True
    _held: ClassVar[set[int]] = set()
    """CUDA indices of the pool devices open in this process: their contexts are never reset."""

    def __init__(self, uuid: str, size_bytes: int, calls: CudaCalls | None = None) -> None:
        self._what = f"--device-pool cuda:{uuid}={format_bytes(size_bytes)}"
        self._calls = calls if calls is not None else load_cuda(self._what)
        self.size_bytes = size_bytes
        self._live: dict[int, CudaMemory] = {}
        self._closed = True
        try:
            self.name, self.index, gpus = self._identify(uuid)
            self._calls.set_device(self.index)
            self._closed = False
            CudaDevice._held.add(self.index)
            self._check_room()
            self._links = self._measure(gpus)
        except BaseException as e:
            self.close()
            if isinstance(e, CudaCallError):
                raise DeviceError(f"{self._what}: {e}") from e
            raise

    # -- identity -------------------------------------------------------------------------

    def _identify(self, uuid: str) -> tuple[str, int, dict[str, int]]:
        """``(UUID as NVML spells it, its CUDA index, every GPU CUDA shows this process by UUID)``."""
        calls = self._calls
        try:
            calls.nvml_init()
        except CudaCallError as e:
            raise DeviceError(f"{self._what}: NVML cannot start ({e}): is the NVIDIA driver loaded? {REMEDY}") from e
        try:
            devices = [calls.nvml_device(i) for i in range(calls.nvml_count())]
            buses = {calls.nvml_uuid(device): calls.nvml_bus_id(device) for device in devices}
        except CudaCallError as e:
            raise DeviceError(f"{self._what}: NVML cannot list the GPUs: {e}") from e
        finally:
            calls.nvml_shutdown()
        name = next((known for known in buses if known.lower() == uuid.lower()), None)
        if name is None:
            raise DeviceError(
                f"{self._what}: no GPU has this UUID; NVML sees {', '.join(buses) or 'none'} (nvidia-smi -L lists them)"
            )
        visible: dict[str, int] = {}
        for known, bus_id in buses.items():
            try:
                visible[known] = calls.device_by_bus_id(bus_id)
            except CudaCallError:
                log.debug("GPU %s (PCI %s) is not visible to CUDA in the daemon", known, bus_id)
        if name not in visible:
            raise DeviceError(
                f"{self._what}: the GPU (PCI {buses[name]}) is hidden from the daemon's CUDA "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')}): start stormd where it is visible"
            )
        return name, visible[name], visible

    def _check_room(self) -> None:
        free_bytes, total_bytes = self._calls.mem_get_info()
        if self.size_bytes > free_bytes:
            raise DeviceError(
                f"{self._what}: the GPU has {format_bytes(free_bytes)} free of {format_bytes(total_bytes)}; "
                "lend less, or free memory on it"
            )

    # -- links ----------------------------------------------------------------------------

    def _measure(self, gpus: dict[str, int]) -> dict[str, Link]:
        """Measure the link from every visible GPU to this one, then drop the contexts it made elsewhere."""
        calls = self._calls
        started = time.perf_counter()
        links = {CPU: Link(0.0, 0.0, measured=True)}
        touched: list[int] = []
        try:
            target = calls.malloc(PROBE_BYTES)
            host = calls.host_alloc(PROBE_BYTES)
        except CudaCallError as e:
            raise DeviceError(f"{self._what}: no room to measure its links ({format_bytes(PROBE_BYTES)}): {e}") from e
        try:
            for uuid, index in sorted(gpus.items(), key=lambda item: item[1]):
                if index != self.index:
                    touched.append(index)
                try:
                    links[uuid] = self._link_from(index, target, host)
                except CudaCallError as e:
                    log.warning("%s: the link from GPU %s (cuda:%d) cannot be measured: %s", self.name, uuid, index, e)
        finally:
            calls.set_device(self.index)
            calls.free(target)
            calls.free_host(host)
            for index in touched:
                if index in CudaDevice._held:
                    continue
                try:  # a GPU busy elsewhere (exclusive mode, no memory) may refuse even this
                    calls.set_device(index)
                    calls.reset_device()
                except CudaCallError as e:
                    log.warning("%s: releasing the context measuring made on cuda:%d failed: %s", self.name, index, e)
            calls.set_device(self.index)
        log.info(
            "device %s (cuda:%d in the daemon): links measured in %.2f s (%s x %d)",
            self.name,
            self.index,
            time.perf_counter() - started,
            format_bytes(PROBE_BYTES),
            PROBE_REPEATS,
        )
        return links

    def _link_from(self, index: int, target: int, host: int) -> Link:
        """GB/s from GPU ``index`` into the pool device and into pinned host memory."""
        calls = self._calls
        calls.set_device(index)
        peer = index == self.index or calls.can_access_peer(index, self.index)
        if index != self.index and peer:
            try:
                calls.enable_peer_access(self.index)
            except CudaCallError as e:
                if e.code != ERROR_PEER_ACCESS_ALREADY_ENABLED:
                    raise
        source = calls.malloc(PROBE_BYTES)
        try:
            peer_gbps = self._rate(target, source) if peer else 0.0
            host_gbps = self._rate(host, source)
        finally:
            calls.free(source)
        if not peer:
            log.info("%s: GPU cuda:%d has no peer access to it: the device tier is off for that GPU", self.name, index)
        return Link(peer_gbps, host_gbps, measured=True)

    def _rate(self, dst: int, src: int) -> float:
        """GB/s of ``PROBE_REPEATS`` copies of ``PROBE_BYTES`` on the current device, after a warm-up."""
        calls = self._calls
        start, end = calls.event(), calls.event()
        try:
            calls.copy_async(dst, src, PROBE_BYTES)
            calls.record(start)
            for _ in range(PROBE_REPEATS):
                calls.copy_async(dst, src, PROBE_BYTES)
            calls.record(end)
            calls.wait_event(end)
            elapsed_ms = calls.elapsed_ms(start, end)
        finally:
            calls.destroy_event(start)
            calls.destroy_event(end)
        return PROBE_BYTES * PROBE_REPEATS / (max(elapsed_ms, 1e-3) / 1e3) / 1e9

    def links(self) -> dict[str, Link]:
        """Measured when the device was opened (NOTE [CUDA backend])."""
        return dict(self._links)

    # -- memory ---------------------------------------------------------------------------

    def allocate(self, size_bytes: int) -> CudaMemory:
        if size_bytes <= 0:
            raise ValueError(f"device {self.name}: cannot allocate {size_bytes} bytes")
        calls = self._calls
        try:
            calls.set_device(self.index)
            address = calls.malloc(size_bytes)
        except CudaCallError as e:
            free = f" ({format_bytes(calls.mem_get_info()[0])} free)" if e.code == ERROR_MEMORY_ALLOCATION else ""
            raise DeviceError(f"device {self.name}: cannot allocate {format_bytes(size_bytes)}{free}: {e}") from e
        try:
            calls.memset(address, 0, size_bytes)
            calls.synchronize()  # zeroed before an importer can copy into it: NOTE [CUDA backend]
            handle = calls.ipc_handle(address)
        except CudaCallError as e:
            calls.free(address)
            raise DeviceError(f"device {self.name}: cannot prepare a {format_bytes(size_bytes)} allocation: {e}") from e
        memory = self._live[address] = CudaMemory(self, address, size_bytes, handle)
        return memory

    def copy_to_host(self, host_address: int, address: int, size_bytes: int) -> None:
        try:
            self._calls.set_device(self.index)
            self._calls.copy_to_host(host_address, address, size_bytes)
        except CudaCallError as e:
            raise DeviceError(f"device {self.name}: reading {format_bytes(size_bytes)} back failed: {e}") from e

    def release(self, memory: CudaMemory) -> None:
        """``cudaFree`` of one allocation the tier let go (a failure is logged: nothing else can be done)."""
        if self._live.pop(memory.address, None) is None:
            return
        try:
            self._calls.set_device(self.index)
            self._calls.free(memory.address)
        except CudaCallError as e:
            log.warning("device %s: freeing %s failed: %s", self.name, format_bytes(memory.size_bytes), e)

    def close(self) -> None:
        """Free what is left, then destroy this process's context on the device."""
        if self._closed:
            return
        self._closed = True
        for memory in list(self._live.values()):
            self.release(memory)
        CudaDevice._held.discard(self.index)
        try:
            self._calls.set_device(self.index)
            self._calls.reset_device()
        except CudaCallError as e:
            log.warning("device %s: releasing its context failed: %s", self.name, e)
