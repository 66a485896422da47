"""Device slabs in this process: a GPU's memory lent by the daemon as a CUDA IPC handle, seen as CUDA tensors.

NOTE [Importing device slabs]
  A slab of the daemon's ``cuda`` backend (NOTE [CUDA backend] in
  storm_service/device/cuda.py) comes as a CUDA IPC handle, not an fd
  (storm_service/fdpass.py). :func:`open_cuda_slab` opens it once per process (the
  process maps one allocation once, and ``LentSlabs`` keeps what it opened), the first
  time a copy needs it, with ``cudaIpcMemLazyEnablePeerAccess``.
  * Which device imports: the device current when the copier first asks for the slab,
    which is the device of the tensor it copies (NOTE [Device hygiene] in
    client/engine/cuda.py). The pool GPU's memory is then mapped into that device's
    context, and the copy runs there, device to device (NVLink, or PCIe P2P) on the
    copier's side streams: no context is made on the pool GPU. Views are tensors of the
    importing device. A tensor of another device of this process that lands in the same
    slab copies through PyTorch's cross-device path: correct, with barriers on both
    devices' current streams.
  * The pool GPU need not be visible here: CUDA opens a handle of a device that
    ``CUDA_VISIBLE_DEVICES`` hides, and one GPU per rank is how torchrun jobs run while
    the pool is a spare GPU none of them sees. What CUDA refuses (no peer access between
    the two GPUs, another pid namespace) fails the copy with its error.
  * Views are made from ``__cuda_array_interface__`` with the importing device given
    (``torch.as_tensor(..., device=)``); a PyTorch that would copy the memory to that
    device instead of viewing it is refused, never used.
  * ``close`` waits for the importing device, then closes the handle: nothing reads or
    writes the memory once it is unmapped. Views must not outlive it: the copier's are
    transient, and a fetched CUDA tensor is always a copy, never the pool's memory.

Every CUDA call goes through :class:`CudaIpc`, so that the logic is tested against a
fake on machines without a device (tests/unit/test_cuda_copier_logic.py).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import time
from collections.abc import Sequence
from typing import Any

import torch

from storm_service.errors import ProtocolError, StormError
from storm_service.fdpass import IPC_HANDLE_BYTES, LentSlab

__all__ = ["CudaIpc", "DeviceSegment", "open_cuda_slab"]

log = logging.getLogger("storm.client")

_LAZY_ENABLE_PEER_ACCESS = 1  # cudaIpcMemLazyEnablePeerAccess


class _IpcMemHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_ubyte * IPC_HANDLE_BYTES)]


class _DeviceBytes:
    """``__cuda_array_interface__`` (version 3) of ``size_bytes`` bytes at a device address."""

    def __init__(self, address: int, size_bytes: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (size_bytes,),
            "typestr": "|u1",
            "data": (address, False),
            "strides": None,
            "stream": None,  # nothing to wait for: the copier orders its copies with events
            "version": 3,
        }


class CudaIpc:
    """The CUDA calls a device slab makes (a fake stands in for it in tests)."""

    def current_device(self) -> int:
        return torch.cuda.current_device()

    def open(self, handle: bytes, device: int) -> int:
        address = ctypes.c_void_p()
        with torch.cuda.device(device):
            _check("cudaSetDevice", _cudart().cudaSetDevice(device))  # a runtime of its own would not follow torch
            _check(
                "cudaIpcOpenMemHandle",
                _cudart().cudaIpcOpenMemHandle(
                    ctypes.byref(address), _IpcMemHandle.from_buffer_copy(handle), _LAZY_ENABLE_PEER_ACCESS
                ),
            )
        return address.value or 0

    def close(self, address: int, device: int) -> None:
        with torch.cuda.device(device):
            _check("cudaSetDevice", _cudart().cudaSetDevice(device))  # as in open: our runtime may not follow torch
            _check("cudaIpcCloseMemHandle", _cudart().cudaIpcCloseMemHandle(address))

    def synchronize(self, device: int) -> None:
        torch.cuda.synchronize(device)

    def tensor(self, address: int, size_bytes: int, device: int) -> torch.Tensor:
        """A uint8 view of the mapping, on the importing device, named outright: from a bare pointer
        PyTorch takes the device where the memory lives (the pool GPU, for a peer's slab) and, asked
        for another, copies the whole slab there."""
        where = torch.device("cuda", device)
        make = getattr(torch._C, "_construct_storage_from_data_pointer", None)  # a storage that owns nothing
        if make is not None:
            view = torch.empty(0, dtype=torch.uint8, device=where).set_(make(address, where, size_bytes))
        else:
            view = torch.as_tensor(_DeviceBytes(address, size_bytes), device=where)
        if view.data_ptr() != address or view.device != where:
            raise StormError(
                f"this PyTorch ({torch.__version__}) copies device memory handed to it through "
                "__cuda_array_interface__ instead of viewing it; the device tier needs one that views it"
            )
        return view


@functools.cache
def _cudart() -> Any:
    """The CUDA runtime PyTorch loaded: the copy in this process's maps, else the global namespace."""
    with open("/proc/self/maps") as maps:
        paths = [path for path in (line.split()[-1] for line in maps) if "/libcudart.so" in path]
    lib = ctypes.CDLL(paths[0]) if paths else ctypes.CDLL(None)
    try:
        lib.cudaIpcOpenMemHandle.argtypes = [ctypes.POINTER(ctypes.c_void_p), _IpcMemHandle, ctypes.c_uint]
    except AttributeError:
        raise StormError("device slabs need the CUDA runtime, and this PyTorch has not loaded one") from None
    lib.cudaIpcCloseMemHandle.argtypes = [ctypes.c_void_p]
    lib.cudaSetDevice.argtypes = [ctypes.c_int]
    lib.cudaGetErrorString.argtypes = [ctypes.c_int]
    lib.cudaGetErrorString.restype = ctypes.c_char_p
    return lib


def _check(call: str, code: int) -> None:
    """Raise for a failed call, once the runtime's last error is cleared (NOTE [Device hygiene])."""
    if code != 0:
        _cudart().cudaGetLastError()
        raise StormError(f"{call} failed: {_cudart().cudaGetErrorString(code).decode(errors='replace')} ({code})")


class DeviceSegment:
    """A device slab opened in this process (NOTE [Importing device slabs]).

    It has what the copiers use of :class:`client.segments.MappedSegment`: ``name``,
    ``size_bytes``, ``device``, ``pin``, ``address``, ``bytes``, ``view`` and ``close``.
    """

    def __init__(self, lent: LentSlab, importer: int, cuda: CudaIpc) -> None:
        assert lent.ipc is not None and lent.device is not None
        self.name = f"device slab {lent.slab_id} ({lent.device})"
        self.size_bytes = lent.size_bytes
        self.device = lent.device
        """The pool GPU's UUID (``GPU-...``)."""
        self.importer = importer
        """The CUDA device of this process the memory is mapped into; views are tensors of it."""
        self.pin = False
        """Device memory: nothing to page-lock."""
        self._cuda = cuda
        started = time.perf_counter()
        try:
            address = cuda.open(lent.ipc, importer)
        except StormError as e:
            raise StormError(f"{self.name}: opening it on cuda:{importer}: {e}") from e
        self.open_s = time.perf_counter() - started
        """How long opening the handle took (the first use's extra cost)."""
        self.address: int | None = address
        """The memory's device address in this process; None once closed."""
        try:
            self.bytes = cuda.tensor(address, lent.size_bytes, importer)  # (size_bytes,) uint8 on cuda:importer
        except BaseException:
            self.close()
            raise
        log.debug("opened %s on cuda:%d in %.2f ms", self.name, importer, 1e3 * self.open_s)

    def view(self, offset: int, size_bytes: int) -> torch.Tensor:
        """The bytes ``[offset, offset + size_bytes)`` as a uint8 tensor of the importing device (no copy)."""
        if self.address is None:
            raise ValueError(f"{self.name} is closed")
        if offset < 0 or offset + size_bytes > self.size_bytes:
            raise ValueError(f"extent [{offset}, {offset + size_bytes}) is outside {self.name}")
        return self.bytes[offset : offset + size_bytes]

    def close(self, keep: Sequence[tuple[int, int]] = ()) -> None:
        """Wait for the importing device, then unmap (NOTE [Importing device slabs]).

        ``keep`` is for host slabs' aliased views (NOTE [Detached views]); a device slab
        has none. A failure is logged: the session is being given up either way.
        """
        if self.address is None:
            return
        address, self.address = self.address, None
        self.bytes = torch.empty(0, dtype=torch.uint8)
        try:
            self._cuda.synchronize(self.importer)
            self._cuda.close(address, self.importer)
        except (StormError, RuntimeError) as e:
            log.warning("%s: closing it failed: %s", self.name, e)


def open_cuda_slab(lent: LentSlab, cuda: CudaIpc | None = None) -> DeviceSegment:
    """Open a ``cuda`` device slab under the current device (``LentSlabs``'s ``open_device``)."""
    if lent.backend != "cuda" or lent.ipc is None or lent.device is None:
        raise ProtocolError(f"slab {lent.slab_id} is not a CUDA device slab (backend {lent.backend!r:.20})")
    cuda = cuda if cuda is not None else CudaIpc()
    return DeviceSegment(lent, cuda.current_device(), cuda)
