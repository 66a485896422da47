"""``--device-pool``: which devices lend memory to the device tier, and how much each."""

from __future__ import annotations

import re
from dataclasses import dataclass

from storm_service.units import parse_size

__all__ = ["DeviceSpec", "parse_device_pool"]

_UUID = re.compile(r"GPU-[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
FAKE_PEER_GBPS = 370.0
"""The fake's modelled device-to-device rate: NVLink 4 one way, as measured on an H200."""
FAKE_HOST_GBPS = 50.0
"""The fake's modelled host path: PCIe 5 x16, device to host."""


@dataclass(frozen=True)
class DeviceSpec:
    kind: str
    """``cuda`` or ``fake``."""
    name: str
    """A GPU UUID (``GPU-...``), or the fake's name."""
    size_bytes: int
    peer_gbps: float = FAKE_PEER_GBPS
    """The fake's modelled device-to-device rate (``@GBPS``); a CUDA device's is measured."""


def parse_device_pool(text: str) -> tuple[DeviceSpec, ...]:
    """``cuda:UUID=SIZE`` or ``fake:NAME=SIZE[@GBPS]``, comma-separated; ValueError naming the bad part."""
    specs: list[DeviceSpec] = []
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        kind, _, rest = part.partition(":")
        name, equals, size_text = rest.partition("=")
        if kind not in ("cuda", "fake") or not equals:
            raise ValueError(f"{part!r} is not cuda:UUID=SIZE or fake:NAME=SIZE")
        size_text, at, rate_text = size_text.partition("@")
        if kind == "cuda" and not _UUID.fullmatch(name):
            raise ValueError(
                f"{name!r} is not a GPU UUID (GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx, as `nvidia-smi -L` prints): "
                "GPUs are named by UUID because indices change with CUDA_VISIBLE_DEVICES"
            )
        if kind == "fake" and not _NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not a fake device's name (letters, digits, '_', '.', '-')")
        if at and kind == "cuda":
            raise ValueError(f"{part!r}: a CUDA device's rate is measured, not given (@ is for fake devices)")
        size_bytes = parse_size(size_text)
        if size_bytes <= 0:
            raise ValueError(f"{part!r}: the size must be positive")
        if any(s.name == name for s in specs):
            raise ValueError(f"{text!r} names {name} twice")
        specs.append(DeviceSpec(kind, name, size_bytes, _rate(rate_text, part) if at else FAKE_PEER_GBPS))
    return tuple(specs)


def _rate(text: str, part: str) -> float:
    try:
        rate = float(text)
    except ValueError:
        raise ValueError(f"{part!r}: {text!r} is not a rate in GB/s") from None
    if not 0 < rate < 1e6:
        raise ValueError(f"{part!r}: the rate must be positive")
    return rate
