"""The disk's own pace: raw sequential write and read throughput of a spill directory, the
yardstick the tier's spill and restore throughput is measured against in the same run.

It uses what the tier uses (a SpillFile of its own, O_DIRECT where the directory allows
it, the same piece size, depth and alignments) and nothing of the tier itself: each of
``depth`` threads takes the next piece in file order and moves it from or into a
page-aligned buffer of its own, so that the figure is the disk's and not the pool's.
"""

from __future__ import annotations

import mmap
import os
import queue
import threading
import time
from dataclasses import dataclass

from storm_service.disk.files import SpillFile
from storm_service.disk.io import transfer

__all__ = ["RawThroughput", "raw_throughput"]


@dataclass(frozen=True)
class RawThroughput:
    """What :func:`raw_throughput` measured (GB/s are 10^9 bytes per second)."""

    directory: str
    size_bytes: int
    direct: bool
    write_gb_s: float
    read_gb_s: float


def raw_throughput(directory: str, size_bytes: int, *, piece_bytes: int = 1 << 20, depth: int = 4) -> RawThroughput:
    """Write ``size_bytes`` (rounded down to the file's alignment) sequentially to a new
    spill file in ``directory``, read them back, and return both rates.

    The file is reserved with posix_fallocate first, like the tier's, and has no name:
    nothing is left in ``directory``. SpillFileError as :meth:`SpillFile.open` raises it.
    """
    spill = SpillFile.open(directory, size_bytes)
    try:
        if piece_bytes <= 0 or piece_bytes % spill.alignment:
            raise ValueError(f"raw_throughput: piece_bytes {piece_bytes} is not a multiple of {spill.alignment}")
        write_s = _timed(spill, "write", piece_bytes, depth)
        read_s = _timed(spill, "read", piece_bytes, depth)
    finally:
        spill.close()
    return RawThroughput(
        directory, spill.size_bytes, spill.direct, spill.size_bytes / write_s / 1e9, spill.size_bytes / read_s / 1e9
    )


def _timed(spill: SpillFile, kind: str, piece_bytes: int, depth: int) -> float:
    """Seconds for ``depth`` threads to move the whole file in pieces, in file order."""
    offsets: queue.SimpleQueue[int | None] = queue.SimpleQueue()
    for offset in range(0, spill.size_bytes, piece_bytes):
        offsets.put(offset)
    for _ in range(depth):
        offsets.put(None)
    buffers = [mmap.mmap(-1, piece_bytes) for _ in range(depth)]
    errors: list[OSError] = []

    def work(buffer: mmap.mmap) -> None:
        view = memoryview(buffer)
        try:
            while (offset := offsets.get()) is not None:
                transfer(spill.fd, kind, view[: min(piece_bytes, spill.size_bytes - offset)], offset)
        except OSError as e:
            errors.append(e.with_traceback(None))  # its frames would keep views of the buffer
        finally:
            view.release()

    threads = [threading.Thread(target=work, args=(buffer,), name=f"storm-raw-{n}") for n, buffer in enumerate(buffers)]
    try:
        for buffer in buffers:
            buffer.write(os.urandom(piece_bytes))  # not zeros, which a device might skip
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed_s = time.perf_counter() - start
    finally:
        for buffer in buffers:
            buffer.close()
    if errors:
        raise errors[0]
    return elapsed_s
