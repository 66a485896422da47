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
import glob
import logging
import os
import sys
import time
from typing import Any, ClassVar

from storm_service.device.backend import CPU, DeviceError, Link
from storm_service.units import format_bytes

__all__ = ["CudaCallError", "CudaCalls", "CudaDevice", "CudaMemory", "load_cuda"]

log = logging.getLogger("stormd.device")

NVML_LIBRARY = "libnvidia-ml.so.1"
_WHEEL_CUDART = os.path.join("nvidia", "cuda_runtime", "lib", "libcudart.so.*")
PROBE_BYTES = 64 << 20
PROBE_REPEATS = 5
IPC_HANDLE_BYTES = 64
ERROR_MEMORY_ALLOCATION = 2  # cudaErrorMemoryAllocation
ERROR_PEER_ACCESS_ALREADY_ENABLED = 704
_MEMCPY_DEVICE_TO_HOST = 2
_MEMCPY_DEFAULT = 4  # the direction follows from the addresses (unified addressing)
_HOST_ALLOC_PORTABLE = 1  # pinned for every context, not only the one that allocated it
_UUID_BUFFER_BYTES = 96  # NVML_DEVICE_UUID_V2_BUFFER_SIZE
_REMEDY = (
    "The cuda backend needs an NVIDIA GPU with its driver and a CUDA runtime (a CUDA build of PyTorch "
    "brings one); to try the device tier without a GPU, use --device-pool fake:NAME=SIZE"
)


class CudaCallError(Exception):
    """A CUDA runtime or NVML call failed: which, its code, and the library's text."""

    def __init__(self, call: str, code: int, text: str) -> None:
        super().__init__(f"{call} failed: {text} ({code})")
        self.call = call
        self.code = code


class _IpcMemHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_ubyte * IPC_HANDLE_BYTES)]


class _PciInfo(ctypes.Structure):  # nvmlPciInfo_t (nvmlDeviceGetPciInfo_v3)
    _fields_ = [
        ("busIdLegacy", ctypes.c_char * 16),
        ("domain", ctypes.c_uint),
        ("bus", ctypes.c_uint),
        ("device", ctypes.c_uint),
        ("pciDeviceId", ctypes.c_uint),
        ("pciSubSystemId", ctypes.c_uint),
        ("busId", ctypes.c_char * 32),
    ]


_int_p, _size_p, _ptr_p = ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_void_p)
_ptr, _size = ctypes.c_void_p, ctypes.c_size_t
_CUDART_ARGS: dict[str, list[Any]] = {
    "cudaGetDeviceCount": [_int_p],
    "cudaDeviceGetByPCIBusId": [_int_p, ctypes.c_char_p],
    "cudaSetDevice": [ctypes.c_int],
    "cudaMemGetInfo": [_size_p, _size_p],
    "cudaMalloc": [_ptr_p, _size],
    "cudaMemset": [_ptr, ctypes.c_int, _size],
    "cudaDeviceSynchronize": [],
    "cudaIpcGetMemHandle": [ctypes.POINTER(_IpcMemHandle), _ptr],
    "cudaMemcpy": [_ptr, _ptr, _size, ctypes.c_int],
    "cudaMemcpyAsync": [_ptr, _ptr, _size, ctypes.c_int, _ptr],
    "cudaFree": [_ptr],
    "cudaHostAlloc": [_ptr_p, _size, ctypes.c_uint],
    "cudaFreeHost": [_ptr],
    "cudaDeviceCanAccessPeer": [_int_p, ctypes.c_int, ctypes.c_int],
    "cudaDeviceEnablePeerAccess": [ctypes.c_int, ctypes.c_uint],
    "cudaEventCreate": [_ptr_p],
    "cudaEventRecord": [_ptr, _ptr],
    "cudaEventSynchronize": [_ptr],
    "cudaEventElapsedTime": [ctypes.POINTER(ctypes.c_float), _ptr, _ptr],
    "cudaEventDestroy": [_ptr],
    "cudaDeviceReset": [],
}
_NVML_ARGS: dict[str, list[Any]] = {
    "nvmlInit_v2": [],
    "nvmlShutdown": [],
    "nvmlDeviceGetCount_v2": [ctypes.POINTER(ctypes.c_uint)],
    "nvmlDeviceGetHandleByIndex_v2": [ctypes.c_uint, _ptr_p],
    "nvmlDeviceGetUUID": [_ptr, ctypes.c_char_p, ctypes.c_uint],
    "nvmlDeviceGetPciInfo_v3": [_ptr, ctypes.POINTER(_PciInfo)],
}


def _declare(lib: Any, args: dict[str, list[Any]], error_string: str) -> Any:
    """Give each function its argument types (ctypes would pass addresses as 32-bit ints)."""
    for name, types in args.items():
        getattr(lib, name).argtypes = types
    getattr(lib, error_string).argtypes = [ctypes.c_int]
    getattr(lib, error_string).restype = ctypes.c_char_p
    return lib


class CudaCalls:
    """Every CUDA runtime and NVML call the backend makes (a fake stands in for it in tests).

    A failed call raises :class:`CudaCallError`. The runtime's calls act on the device
    current for the calling thread (``set_device``).
    """

    def __init__(self, cudart: ctypes.CDLL, nvml: ctypes.CDLL | None) -> None:
        self._rt = _declare(cudart, _CUDART_ARGS, "cudaGetErrorString")
        self._nvml: Any = _declare(nvml, _NVML_ARGS, "nvmlErrorString") if nvml is not None else None

    def _cuda(self, call: str, *args: Any) -> None:
        code = getattr(self._rt, call)(*args)
        if code != 0:
            raise CudaCallError(call, code, self._rt.cudaGetErrorString(code).decode(errors="replace"))

    def _nv(self, call: str, *args: Any) -> None:
        code = getattr(self._nvml, call)(*args)
        if code != 0:
            raise CudaCallError(call, code, self._nvml.nvmlErrorString(code).decode(errors="replace"))

    # -- NVML ---------------------------------------------------------------------------

    def nvml_init(self) -> None:
        self._nv("nvmlInit_v2")

    def nvml_shutdown(self) -> None:
        self._nv("nvmlShutdown")

    def nvml_count(self) -> int:
        count = ctypes.c_uint()
        self._nv("nvmlDeviceGetCount_v2", ctypes.byref(count))
        return count.value

    def nvml_device(self, index: int) -> int:
        handle = ctypes.c_void_p()
        self._nv("nvmlDeviceGetHandleByIndex_v2", index, ctypes.byref(handle))
        return handle.value or 0

    def nvml_uuid(self, device: int) -> str:
        text = ctypes.create_string_buffer(_UUID_BUFFER_BYTES)
        self._nv("nvmlDeviceGetUUID", device, text, _UUID_BUFFER_BYTES)
        return text.value.decode()

    def nvml_bus_id(self, device: int) -> str:
        info = _PciInfo()
        self._nv("nvmlDeviceGetPciInfo_v3", device, ctypes.byref(info))
        return info.busId.decode()

    # -- the CUDA runtime ----------------------------------------------------------------

    def device_count(self) -> int:
        count = ctypes.c_int()
        self._cuda("cudaGetDeviceCount", ctypes.byref(count))
        return count.value

    def device_by_bus_id(self, bus_id: str) -> int:
        index = ctypes.c_int()
        self._cuda("cudaDeviceGetByPCIBusId", ctypes.byref(index), bus_id.encode())
        return index.value

    def set_device(self, index: int) -> None:
        self._cuda("cudaSetDevice", index)

    def mem_get_info(self) -> tuple[int, int]:
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        self._cuda("cudaMemGetInfo", ctypes.byref(free), ctypes.byref(total))
        return free.value, total.value

    def malloc(self, size_bytes: int) -> int:
        address = ctypes.c_void_p()
        self._cuda("cudaMalloc", ctypes.byref(address), size_bytes)
        return address.value or 0

    def memset(self, address: int, value: int, size_bytes: int) -> None:
        self._cuda("cudaMemset", address, value, size_bytes)

    def synchronize(self) -> None:
        self._cuda("cudaDeviceSynchronize")

    def ipc_handle(self, address: int) -> bytes:
        handle = _IpcMemHandle()
        self._cuda("cudaIpcGetMemHandle", ctypes.byref(handle), address)
        return bytes(handle.reserved)

    def copy_to_host(self, host_address: int, address: int, size_bytes: int) -> None:
        self._cuda("cudaMemcpy", host_address, address, size_bytes, _MEMCPY_DEVICE_TO_HOST)

    def copy_async(self, dst: int, src: int, size_bytes: int) -> None:
        self._cuda("cudaMemcpyAsync", dst, src, size_bytes, _MEMCPY_DEFAULT, None)

    def free(self, address: int) -> None:
        self._cuda("cudaFree", address)

    def host_alloc(self, size_bytes: int) -> int:
        address = ctypes.c_void_p()
        self._cuda("cudaHostAlloc", ctypes.byref(address), size_bytes, _HOST_ALLOC_PORTABLE)
        return address.value or 0

    def free_host(self, address: int) -> None:
        self._cuda("cudaFreeHost", address)

    def can_access_peer(self, index: int, peer: int) -> bool:
        can = ctypes.c_int()
        self._cuda("cudaDeviceCanAccessPeer", ctypes.byref(can), index, peer)
        return bool(can.value)

    def enable_peer_access(self, peer: int) -> None:
        self._cuda("cudaDeviceEnablePeerAccess", peer, 0)

    def event(self) -> int:
        event = ctypes.c_void_p()
        self._cuda("cudaEventCreate", ctypes.byref(event))
        return event.value or 0

    def record(self, event: int) -> None:
        self._cuda("cudaEventRecord", event, None)

    def wait_event(self, event: int) -> None:
        self._cuda("cudaEventSynchronize", event)

    def elapsed_ms(self, start: int, end: int) -> float:
        ms = ctypes.c_float()
        self._cuda("cudaEventElapsedTime", ctypes.byref(ms), start, end)
        return ms.value

    def destroy_event(self, event: int) -> None:
        self._cuda("cudaEventDestroy", event)

    def reset_device(self) -> None:
        self._cuda("cudaDeviceReset")


def load_cuda(what: str) -> CudaCalls:
    """This machine's CUDA runtime and NVML (NOTE [CUDA backend]); DeviceError naming what is missing."""
    problems: list[str] = []
    try:
        nvml: ctypes.CDLL | None = ctypes.CDLL(NVML_LIBRARY)
    except OSError as e:
        nvml = None
        problems.append(f"NVML ({NVML_LIBRARY}, installed with the NVIDIA driver) cannot be loaded: {e}")
    candidates = _cudart_paths()
    if not candidates:
        problems.append(
            "no CUDA runtime: ldconfig knows no libcudart.so, and no site-packages has nvidia/cuda_runtime/lib"
        )
    for path in candidates:
        try:
            calls = CudaCalls(ctypes.CDLL(path), nvml)
            count = calls.device_count()
        except (OSError, CudaCallError) as e:
            problems.append(f"{path}: {e}")
            continue
        if count == 0:
            problems.append(f"{path}: CUDA sees no GPU (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')})")
            continue
        if nvml is not None:
            return calls
        break
    raise DeviceError(f"{what}: no usable CUDA on this machine: {'; '.join(problems)}. {_REMEDY}")


def _cudart_paths() -> list[str]:
    """ldconfig's libcudart, then the copies of PyTorch's CUDA wheels on ``sys.path``."""
    found = ctypes.util.find_library("cudart")
    wheels = [path for entry in sys.path for path in sorted(glob.glob(os.path.join(entry, _WHEEL_CUDART)))]
    return list(dict.fromkeys(([found] if found else []) + wheels))


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
            raise DeviceError(f"{self._what}: NVML cannot start ({e}): is the NVIDIA driver loaded? {_REMEDY}") from e
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
                if index not in CudaDevice._held:
                    calls.set_device(index)
                    calls.reset_device()
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
