"""glibc's mmap threshold, fixed once per process so that freed activations leave it.

NOTE [Freed activations leave the process]
  glibc raises its mmap threshold each time a large mmapped block is freed (up to
  32 MiB), after which activation-sized tensors come from the heap, and freeing an
  offloaded activation no longer shrinks the process: the memory STORM moved to the
  pool would stay private to the trainer. A fixed threshold turns that adaptation off.
  It is a process-wide setting, so it is made once per process, by the first
  ``StormSystem`` (or by calling :func:`fix_mmap_threshold` first);
  ``STORM_MMAP_THRESHOLD=0`` leaves glibc alone.
"""

from __future__ import annotations

import ctypes
import logging
import threading

__all__ = ["fix_mmap_threshold"]

log = logging.getLogger("storm.client")

_M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's malloc.h
_lock = threading.Lock()
_fixed: int | None = None


def fix_mmap_threshold(threshold_bytes: int) -> None:
    """Serve allocations of ``threshold_bytes`` and more with mmap, for the rest of the process.

    Only the first call acts; later ones with another value are logged and ignored.
    ``0`` leaves glibc's adaptive threshold alone.
    """
    global _fixed
    with _lock:
        if _fixed is not None:
            if _fixed != threshold_bytes:
                log.info("mmap threshold already fixed at %d bytes; ignoring %d", _fixed, threshold_bytes)
            return
        _fixed = threshold_bytes
        if threshold_bytes <= 0:
            return
        try:
            ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, threshold_bytes)
        except (OSError, AttributeError):
            log.debug("mallopt is not available; freed activations may stay in the heap")
