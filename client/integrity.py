"""Checksums of saved bytes for verify mode (``StormSystem(verify=True)``, ``STORM_VERIFY=1``).

On the CPU the bytes are hashed with xxHash's XXH3 (the ``xxhash`` package), which reads
the tensor's memory in place at several GB/s. On CUDA they are hashed where they lie,
by a reduction on the device: the span is folded into 64-bit words and reduced with
``torch.hash_tensor`` (XOR) and a wrapping sum, so no byte crosses the link to be
checked. Either one changes when any single byte changes; the device hash is not
positional (two swapped words hash alike), which is enough to catch corruption, not an
adversary.
"""

from __future__ import annotations

import ctypes

import torch
import xxhash

__all__ = ["checksum", "device_checksum"]

_MASK64 = (1 << 64) - 1


def checksum(data: torch.Tensor) -> int:
    """A checksum of a contiguous 1-D uint8 tensor, computed on its own device."""
    if data.device.type != "cpu":
        return device_checksum(data)
    window = (ctypes.c_uint8 * data.numel()).from_address(data.data_ptr())
    return xxhash.xxh3_64_intdigest(window)


def device_checksum(data: torch.Tensor) -> int:
    """XOR and wrapping sum of the span's 64-bit words (and its unaligned ends), as one 128-bit int.

    Pure tensor ops, so it runs on any device; the CPU tests check it there.
    """
    head = (-data.data_ptr()) % 8
    body_bytes = (data.numel() - head) // 8 * 8 if data.numel() > head else 0
    body = data[head : head + body_bytes].view(torch.int64)
    ends = torch.cat([data[:head], data[head + body_bytes :]]).to(torch.int64) if body_bytes else data.to(torch.int64)
    ends = ends * torch.arange(1, ends.numel() + 1, dtype=torch.int64, device=data.device)
    xor = int(torch.hash_tensor(body).view(torch.int64)) if body.numel() else 0
    total = (int(body.sum()) if body.numel() else 0) + int(ends.sum())
    return ((xor & _MASK64) << 64) | (total & _MASK64)
