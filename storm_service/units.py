"""Human units for sizes and durations: ``512MiB``, ``8GiB``, ``1.5G``, ``250ms``, ``5s``."""

from __future__ import annotations

import re

__all__ = ["format_bytes", "parse_duration", "parse_size"]

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1 << 10,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1 << 20,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1 << 30,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1 << 40,
}
_DURATION_UNITS = {"": 1.0, "s": 1.0, "ms": 1e-3, "m": 60.0, "min": 60.0}
_NUMBER = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int) -> int:
    """Parse a byte count such as ``512MiB``, ``8GiB``, ``1.5GB`` or ``4096``."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    match = _NUMBER.match(str(text))
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _SIZE_UNITS:
        raise ValueError(f"{text!r} is not a size (examples: 4096, 512MiB, 8GiB)")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def parse_duration(text: str | float) -> float:
    """Parse a duration in seconds such as ``5``, ``2.5s`` or ``250ms``."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        return float(text)
    match = _NUMBER.match(str(text))
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _DURATION_UNITS:
        raise ValueError(f"{text!r} is not a duration (examples: 5, 2.5s, 250ms)")
    return float(match.group(1)) * _DURATION_UNITS[unit]


def format_bytes(size_bytes: float) -> str:
    """Format a byte count with a binary unit: ``1.5 GiB``."""
    value = float(size_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"
