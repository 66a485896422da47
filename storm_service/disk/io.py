"""DiskIO: reads and writes of spill files on a thread pool per file, so that the daemon's
loop never blocks on the disk; it learns of finished operations through a file descriptor.

NOTE [Spill I/O pieces]
  An operation (a write of an extent to a file, or a read back) is cut in pieces of
  ``piece_bytes`` (1-4 MiB in service; a multiple of every file's alignments), issued
  with ``pwritev``/``preadv`` straight from or into the caller's memoryview: a slice of
  a slab mapping, so there is no intermediate copy. Each file has its own queue and
  ``depth`` threads, so that up to ``depth`` pieces are in flight per file and a slow
  disk never holds up another. Short transfers are retried for the rest; a transfer of
  nothing is an error (EIO), since the file's whole range is allocated.

  Alignment is checked when an operation is queued, before any I/O: offset and length
  to the file's ``alignment``, the buffer address to its ``mem_alignment``, the range
  inside the file (NOTE [O_DIRECT spill files] in files.py). A misaligned O_DIRECT
  transfer would fail with EINVAL, and a buffered one would break the tier's rules.

  An operation completes when each of its pieces is done or skipped: once a piece has
  failed, the pieces of its operation that have not started are skipped, and its error
  is the first OSError a piece raised. Completions are appended under a lock and
  signalled on an eventfd, which the loop polls with its sockets; ``completed()``
  drains it and takes them, on the loop's thread only. A piece's view is released as
  soon as its transfer ends, so that when an operation completes DiskIO holds nothing
  of the caller's buffer (an mmap with exported views cannot be closed).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from storm_service.disk.files import SpillFile

__all__ = ["DiskIO", "Inject", "buffer_address", "transfer"]

log = logging.getLogger("stormd.disk")

Inject = Callable[[str, int, int, int], None]
"""A test hook called with (op, file, offset, length) before each piece; it may raise OSError."""

_python = ctypes.PyDLL(None)  # holds the GIL and raises what the call raised
_get_buffer = _python.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.c_void_p, ctypes.c_int]
_get_buffer.restype = ctypes.c_int
_release_buffer = _python.PyBuffer_Release
_release_buffer.argtypes = [ctypes.c_void_p]
_release_buffer.restype = None
_PY_BUFFER_BYTES = 128  # more than sizeof(Py_buffer), whose first field is the address


@dataclass
class _Op:
    tag: object
    remaining: int
    """Pieces not yet done or skipped."""
    error: OSError | None = None


@dataclass
class _Piece:
    op: _Op
    kind: str
    file: int
    offset: int
    view: memoryview


class DiskIO:
    """Runs reads and writes of spill files on a thread pool per file (NOTE [Spill I/O pieces]).

    Every method but the hook runs on the loop's thread. DiskIO does not close the files.
    """

    def __init__(self, files: list[SpillFile], *, piece_bytes: int = 1 << 20, depth: int = 4) -> None:
        if not files or depth < 1:
            raise ValueError(f"DiskIO: {len(files)} files and depth {depth}; needs at least one of each")
        for spill in files:
            if piece_bytes <= 0 or piece_bytes % spill.alignment or piece_bytes % spill.mem_alignment:
                raise ValueError(
                    f"DiskIO: piece_bytes {piece_bytes} is not a multiple of the alignments of {spill.dir} "
                    f"({spill.alignment} offset, {spill.mem_alignment} memory)"
                )
        self.files = list(files)
        self.piece_bytes = piece_bytes
        self.depth = depth
        self.inject: Inject | None = None
        self._lock = threading.Lock()
        self._done: list[tuple[object, OSError | None]] = []
        self._pending = 0
        self._closed = False
        self._wakeup = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._queues: list[queue.SimpleQueue[_Piece | None]] = [queue.SimpleQueue() for _ in self.files]
        self._threads = [
            threading.Thread(target=self._work, args=(pieces,), name=f"storm-disk-{index}.{n}", daemon=True)
            for index, pieces in enumerate(self._queues)
            for n in range(depth)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def wakeup_fd(self) -> int:
        """Readable while completions wait to be taken by :meth:`completed`."""
        return self._wakeup

    def write(self, file: int, offset: int, source: memoryview, tag: object) -> None:
        """Queue a write of all of ``source`` at ``offset`` of file number ``file``.

        ``source`` must stay valid and unchanged until the completion of ``tag`` is taken.
        ValueError, before any I/O, when the range is misaligned or outside the file.
        """
        self._submit("write", file, offset, source, tag)

    def read(self, file: int, offset: int, dest: memoryview, tag: object) -> None:
        """Queue a read of ``len(dest)`` bytes at ``offset`` of file number ``file`` into ``dest``."""
        self._submit("read", file, offset, dest, tag)

    def completed(self) -> list[tuple[object, OSError | None]]:
        """``(tag, error)`` of the operations finished since the last call, in completion order; never blocks."""
        if not self._closed:
            try:
                os.eventfd_read(self._wakeup)
            except BlockingIOError:
                pass
        with self._lock:
            done, self._done = self._done, []
        return done

    def pending(self) -> int:
        """Operations queued or running (not yet finished)."""
        with self._lock:
            return self._pending

    def close(self, timeout_s: float = 30.0) -> None:
        """Finish every queued operation and stop the threads; completions stay for :meth:`completed`.

        TimeoutError when the disk has not answered within ``timeout_s`` (the threads are
        then left to finish, and the wakeup fd stays open for them).
        """
        if self._closed:
            return
        self._closed = True
        for pieces in self._queues:
            for _ in range(self.depth):
                pieces.put(None)
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if any(thread.is_alive() for thread in self._threads):
            raise TimeoutError(f"DiskIO.close: {self.pending()} operations still running after {timeout_s} s")
        os.close(self._wakeup)
        self._wakeup = -1

    def _submit(self, kind: str, file: int, offset: int, buffer: memoryview, tag: object) -> None:
        if self._closed:
            raise ValueError(f"DiskIO.{kind}: closed")
        if not 0 <= file < len(self.files):
            raise ValueError(f"DiskIO.{kind}: no file {file} (there are {len(self.files)})")
        spill = self.files[file]
        view = memoryview(buffer).cast("B")
        try:
            _check(kind, spill, offset, view)
            starts = range(0, view.nbytes, self.piece_bytes)
            op = _Op(tag, len(starts))
            with self._lock:
                self._pending += 1
            for start in starts:
                piece = view[start : start + self.piece_bytes]
                self._queues[file].put(_Piece(op, kind, file, offset + start, piece))
        finally:
            view.release()  # the pieces hold the buffer now (NOTE [Spill I/O pieces])

    def _work(self, pieces: queue.SimpleQueue[_Piece | None]) -> None:
        while (piece := pieces.get()) is not None:
            error = None
            if piece.op.error is None:  # read without the lock: at worst one more piece runs
                try:
                    self._run(piece)
                except OSError as e:
                    error = e.with_traceback(None)  # its frames would keep views of the caller's buffer
                except Exception as e:  # a bug must still complete its op, or the loop waits forever
                    log.exception("%s piece at %d of file %d", piece.kind, piece.offset, piece.file)
                    error = OSError(errno.EIO, f"{piece.kind} piece at {piece.offset}: {e!r}")
            piece.view.release()
            self._finish(piece.op, error)

    def _run(self, piece: _Piece) -> None:
        inject = self.inject
        if inject is not None:
            inject(piece.kind, piece.file, piece.offset, piece.view.nbytes)
        transfer(self.files[piece.file].fd, piece.kind, piece.view, piece.offset)

    def _finish(self, op: _Op, error: OSError | None) -> None:
        with self._lock:
            if op.error is None:
                op.error = error
            op.remaining -= 1
            if op.remaining:
                return
            self._done.append((op.tag, op.error))
            self._pending -= 1
        os.eventfd_write(self._wakeup, 1)


def transfer(fd: int, kind: str, view: memoryview, offset: int) -> None:
    """Write (``kind`` "write") or read all of ``view`` at ``offset`` of ``fd``, retrying short transfers.

    A transfer of nothing raises OSError(EIO): a read past the end of the file.
    """
    while view.nbytes:
        done = os.pwritev(fd, [view], offset) if kind == "write" else os.preadv(fd, [view], offset)
        if done == 0:
            raise OSError(errno.EIO, f"{kind} of {view.nbytes} bytes at {offset} moved nothing (end of file)")
        view, offset = view[done:], offset + done


def buffer_address(view: memoryview) -> int:
    """The address of the first byte of a contiguous buffer, read-only ones included."""
    py_buffer = ctypes.create_string_buffer(_PY_BUFFER_BYTES)
    _get_buffer(view, py_buffer, 0)
    try:
        return ctypes.c_void_p.from_buffer(py_buffer).value or 0
    finally:
        _release_buffer(py_buffer)


def _check(kind: str, spill: SpillFile, offset: int, view: memoryview) -> None:
    """ValueError unless the transfer keeps the file's alignments and range (NOTE [Spill I/O pieces])."""
    where = f"DiskIO.{kind}: {view.nbytes} bytes at offset {offset} of {spill.dir}"
    if offset % spill.alignment or view.nbytes % spill.alignment or view.nbytes == 0:
        raise ValueError(f"{where}: offset and length must be positive multiples of {spill.alignment}")
    if offset < 0 or offset + view.nbytes > spill.size_bytes:
        raise ValueError(f"{where}: outside the file's {spill.size_bytes} bytes")
    if buffer_address(view) % spill.mem_alignment:
        raise ValueError(f"{where}: buffer address not a multiple of {spill.mem_alignment}")
    if kind == "read" and view.readonly:
        raise ValueError(f"{where}: the destination is read-only")
