"""The shared-memory layout both sides agree on, and page-locking it for CUDA in chunks.

A wire module: the client imports it, so it imports nothing from the rest of the daemon
and nothing from torch. Callers hand in the CUDA calls as small wrappers of
``torch.cuda.cudart().cudaHostRegister`` and ``cudaHostUnregister`` that return the CUDA
error code as an int (0 is success).

NOTE [Pinning in chunks]
  ``cudaHostRegister`` fails on a single call of 512 GiB or more (vLLM PR #51081), so a
  mapping is registered in chunks of at most ``PIN_CHUNK_BYTES``, and unregistered at the
  same offsets: each chunk is a registration of its own, and ``cudaHostUnregister``
  takes the base address of one.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["PIN_CHUNK_BYTES", "SEGMENT_PREFIX", "SHM_DIR", "PinError", "pin", "unpin"]

SHM_DIR = "/dev/shm"
SEGMENT_PREFIX = "storm-"
"""The daemon's segments in SHM_DIR, and only they, have names that start with this."""
PIN_CHUNK_BYTES = 64 << 30


class PinError(RuntimeError):
    """Registering or unregistering host memory with CUDA failed."""


def pin(base: int, size_bytes: int, register: Callable[[int, int], int], *, what: str = "mapping") -> None:
    """Page-lock ``[base, base + size_bytes)`` one chunk at a time (NOTE [Pinning in chunks]).

    ``register(address, length_bytes)`` registers one chunk and returns the CUDA error
    code. Raises PinError naming ``what``, the failed chunk's offset and length and the
    code; the chunks before it stay registered, as after a partial ``cudaHostRegister``.
    """
    for offset in range(0, size_bytes, PIN_CHUNK_BYTES):
        length = min(PIN_CHUNK_BYTES, size_bytes - offset)
        err = register(base + offset, length)
        if err != 0:
            raise PinError(
                f"pin {what}: cudaHostRegister of {length} bytes at offset {offset} "
                f"(of {size_bytes}) failed with CUDA error {err}"
            )


def unpin(base: int, size_bytes: int, unregister: Callable[[int], int], *, what: str = "mapping") -> None:
    """Undo :func:`pin` of the same range: ``unregister(address)`` for every chunk.

    Every chunk is tried even when one fails; then PinError names ``what``, the offsets
    that failed and their CUDA error codes.
    """
    failed = []
    for offset in range(0, size_bytes, PIN_CHUNK_BYTES):
        err = unregister(base + offset)
        if err != 0:
            failed.append(f"offset {offset}: CUDA error {err}")
    if failed:
        raise PinError(f"unpin {what}: cudaHostUnregister failed at {', '.join(failed)} (of {size_bytes} bytes)")
