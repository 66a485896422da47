"""The calls of the ``cuda`` device backend: ctypes to libcudart and NVML (NOTE [CUDA backend] in cuda.py).

Every call the backend makes is a method of :class:`CudaCalls`, so that its logic is
tested against a fake on machines without a GPU (tests/unit/test_device_cuda_logic.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys
from typing import Any

from storm_service.device.backend import DeviceError
from storm_service.fdpass import IPC_HANDLE_BYTES

__all__ = [
    "ERROR_MEMORY_ALLOCATION",
    "ERROR_PEER_ACCESS_ALREADY_ENABLED",
    "IPC_HANDLE_BYTES",
    "REMEDY",
    "CudaCallError",
    "CudaCalls",
    "load_cuda",
]

NVML_LIBRARY = "libnvidia-ml.so.1"
_WHEEL_CUDART = os.path.join("nvidia", "cuda_runtime", "lib", "libcudart.so.*")
ERROR_MEMORY_ALLOCATION = 2  # cudaErrorMemoryAllocation
ERROR_PEER_ACCESS_ALREADY_ENABLED = 704
_MEMCPY_DEVICE_TO_HOST = 2
_MEMCPY_DEFAULT = 4  # the direction follows from the addresses (unified addressing)
_HOST_ALLOC_PORTABLE = 1  # pinned for every context, not only the one that allocated it
_UUID_BUFFER_BYTES = 96  # NVML_DEVICE_UUID_V2_BUFFER_SIZE
REMEDY = (
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
    raise DeviceError(f"{what}: no usable CUDA on this machine: {'; '.join(problems)}. {REMEDY}")


def _cudart_paths() -> list[str]:
    """ldconfig's libcudart, then the copies of PyTorch's CUDA wheels on ``sys.path``."""
    found = ctypes.util.find_library("cudart")
    wheels = [path for entry in sys.path for path in sorted(glob.glob(os.path.join(entry, _WHEEL_CUDART)))]
    return list(dict.fromkeys(([found] if found else []) + wheels))
