"""The fake device backend: device memory played by sealed memfds, for the tier's logic on any machine.

``--device-pool fake:NAME=SIZE[@GBPS]``. Its slabs are host memory lent like host slabs
(by fd, NOTE [Slabs] in storm_service/slabs.py), so a CPU client copies into them with
the same memmove, and everything above the backend (placement, quotas, eviction to the
host tier, lending per tenant, retiring memory, stats) runs as it would on a GPU. Its
links are a model, never a measurement (``Link.measured`` is False): CPU clients reach
it at ``GBPS`` (default: NVLink 4) against a host path of PCIe 5, so the tier takes
their activations; ``@1`` models a box whose peer path is slower than its host path.
"""

from __future__ import annotations

import mmap
import os
from typing import Any

from storm_service.device.backend import CPU, DeviceError, Link
from storm_service.device.spec import FAKE_HOST_GBPS, DeviceSpec
from storm_service.slabs import SlabError, sealed_memfd

__all__ = ["FakeDevice", "FakeMemory"]


class FakeMemory:
    """One fake allocation: a sealed, pre-faulted memfd."""

    def __init__(self, device: FakeDevice, size_bytes: int) -> None:
        self.device = device
        self.size_bytes = size_bytes
        self.fd = sealed_memfd(f"storm-device-{device.name}", size_bytes)
        self._mapping: mmap.mmap | None = None

    def lend(self) -> tuple[dict[str, Any], list[int]]:
        return {"tier": "device", "backend": "fake", "device": self.device.name}, [self.fd]

    def read(self, offset: int, into: memoryview) -> None:
        if self._mapping is None:
            self._mapping = mmap.mmap(self.fd, self.size_bytes, flags=mmap.MAP_SHARED)
        into[:] = memoryview(self._mapping)[offset : offset + len(into)]

    def free(self) -> None:
        if self.fd < 0:
            return
        if self._mapping is not None:
            self._mapping.close()
            self._mapping = None
        os.close(self.fd)
        self.fd = -1
        self.device.freed += 1


class FakeDevice:
    """A device whose tier is ``spec.size_bytes``."""

    kind = "fake"
    needs_pid_namespace = False

    def __init__(self, spec: DeviceSpec) -> None:
        self.name = spec.name
        self.size_bytes = spec.size_bytes
        self.peer_gbps = spec.peer_gbps
        self.freed = 0
        """Allocations given back so far (retired memory is freed late: NOTE [Device slabs])."""

    def allocate(self, size_bytes: int) -> FakeMemory:
        try:
            memory = FakeMemory(self, size_bytes)
        except (SlabError, OSError) as e:
            raise DeviceError(f"fake device {self.name}: cannot allocate {size_bytes} bytes: {e}") from e
        return memory

    def links(self) -> dict[str, Link]:
        return {CPU: Link(self.peer_gbps, FAKE_HOST_GBPS, measured=False)}

    def close(self) -> None:
        """Nothing to release: each allocation is freed by its slab."""
