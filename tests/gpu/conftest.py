"""What the GPU tests share: a calibrated sleep kernel, host memory, and CUDA context probes."""

from __future__ import annotations

import os

import pytest
import torch

_CONTEXT_PROBE = """
import ctypes

def primary_context_active(ordinal):
    '''Whether this process holds a CUDA context on device ``ordinal`` (the driver's view; makes none).'''
    cuda = ctypes.CDLL("libcuda.so.1")
    assert cuda.cuInit(0) == 0
    device, flags, active = ctypes.c_int(), ctypes.c_uint(), ctypes.c_int()
    assert cuda.cuDeviceGet(ctypes.byref(device), ordinal) == 0
    assert cuda.cuDevicePrimaryCtxGetState(device, ctypes.byref(flags), ctypes.byref(active)) == 0
    return bool(active.value)
"""


@pytest.fixture(scope="session")
def context_probe() -> str:
    """Source of ``primary_context_active(ordinal)``, for the scripts the tests run in fresh processes."""
    return _CONTEXT_PROBE


@pytest.fixture(scope="session")
def cycles_per_ms() -> float:
    """How many ``torch.cuda._sleep`` cycles take one millisecond on this device."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(100_000_000)
    end.record()
    end.synchronize()
    return 100_000_000 / start.elapsed_time(end)


@pytest.fixture(scope="session")
def host_bytes_free() -> int:
    """The least of available memory and free /dev/shm: what a pool may take here."""
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    shm = os.statvfs("/dev/shm")
    return min(available, shm.f_bavail * shm.f_frsize)
