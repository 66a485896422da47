"""Opening the devices of ``--device-pool`` at start."""

from __future__ import annotations

from storm_service.device.backend import DeviceBackend
from storm_service.device.fake import FakeDevice
from storm_service.device.spec import DeviceSpec

__all__ = ["open_devices"]


def open_devices(specs: tuple[DeviceSpec, ...]) -> list[DeviceBackend]:
    """A backend per spec; DeviceError (with what to do) when one cannot be had: no CUDA, no such GPU."""
    backends: list[DeviceBackend] = []
    try:
        for spec in specs:
            if spec.kind == "fake":
                backends.append(FakeDevice(spec))
            else:
                from storm_service.device.cuda import CudaDevice  # CUDA is loaded only when a GPU is asked for

                backends.append(CudaDevice(spec.name, spec.size_bytes))
    except BaseException:
        for backend in backends:
            backend.close()
        raise
    return backends
