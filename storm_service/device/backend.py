"""What the device tier needs of a device: memory to lend, a way to read it back, and its links.

NOTE [Device backends]
  A backend owns one device's memory and nothing else; the tier above it (tier.py) does
  placement, accounting, eviction and lending, the same for every backend, so that its
  logic is tested on machines without a GPU through :class:`~storm_service.device.fake.FakeDevice`.
  * ``cuda`` (cuda.py): raw ``cudaMalloc`` allocations, one CUDA IPC handle each, read
    back with ``cudaMemcpy``; links measured at start.
  * ``fake`` (fake.py): sealed memfds, lent by fd like host slabs; its links are a model
    (stated in ``Link.measured``), never a measurement.
  A client learns how to open a slab from :meth:`DeviceMemory.lend`'s fields (the fd
  socket's reply, storm_service/fdpass.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["CPU", "DeviceBackend", "DeviceError", "DeviceMemory", "Link"]

CPU = "cpu"
"""The client device of tensors in host memory (the offload request's ``device``)."""


@dataclass(frozen=True)
class Link:
    """How fast bytes move from one client device to a device of the tier, and to the host pool."""

    peer_gbps: float
    """Client device to this device (device to device: NVLink, or P2P over PCIe)."""
    host_gbps: float
    """Client device to the host pool (device to host over PCIe, or a memcpy)."""
    measured: bool
    """False when the numbers are a model (the fake backend), not a measurement."""

    @property
    def faster(self) -> bool:
        """Whether the tier pays for this pair: only where the device is faster than the host path."""
        return self.peer_gbps > self.host_gbps

    def summary(self) -> dict[str, Any]:
        return {
            "peer_gbps": round(self.peer_gbps, 1),
            "host_gbps": round(self.host_gbps, 1),
            "measured": self.measured,
            "enabled": self.faster,
        }


class DeviceMemory(Protocol):
    """One allocation on the device: the bytes of one slab."""

    size_bytes: int

    def lend(self) -> tuple[dict[str, Any], list[int]]:
        """The fd socket reply's fields that tell a client how to open it, and the fds to send."""
        ...

    def read(self, offset: int, into: memoryview) -> None:
        """Copy ``len(into)`` bytes at ``offset`` into host memory (blocking): eviction to the host tier."""
        ...

    def free(self) -> None:
        """Give the memory back to the device; only once no importer can use it (tier.py)."""
        ...


class DeviceBackend(Protocol):
    """One device of ``--device-pool``."""

    kind: str
    """``cuda`` or ``fake``: the spec's prefix."""
    name: str
    """The GPU's UUID (``GPU-...``, as NVML names it), or the fake's name."""
    size_bytes: int
    """Bytes it lends to the tier (``--device-pool``'s SIZE)."""
    needs_pid_namespace: bool
    """Whether importers must share the daemon's pid namespace (legacy CUDA IPC handles do)."""

    def allocate(self, size_bytes: int) -> DeviceMemory:
        """A zeroed allocation of ``size_bytes``; raises DeviceError when the device has no room."""
        ...

    def links(self) -> dict[str, Link]:
        """The links from every client device known at start (``CPU``, GPU UUIDs) to this device."""
        ...

    def close(self) -> None:
        """Free what is left and release the device."""
        ...


class DeviceError(RuntimeError):
    """A device cannot be used: no such GPU, no CUDA, no memory; the message says which and what to do."""
