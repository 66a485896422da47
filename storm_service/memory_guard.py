"""A bound on the memory ZeroMQ holds for peers: what the socket options cannot bound.

NOTE [Buffered messages]
  libzmq delivers a multipart message whole, so it buffers every frame of one until the
  last arrives; its high-water marks count whole messages and ``ZMQ_MAXMSGSIZE`` bounds
  one frame, so a peer that writes frames flagged "more" and never a last one makes the
  daemon buffer without limit (measured: 200 MiB of such frames, 390 MiB more RSS), and
  nothing tells which connection it is. The daemon therefore watches its own anonymous
  resident memory (``RssAnon``: the heap, not the pool) every tick against an allowance:
  what it had at start (``baseline``), plus an estimate of its own state (a generous cost
  per extent and per session, plus the replay memories' bytes), plus ``--max-buffered``.
  Past it, the server unbinds (which closes every connection and frees what libzmq
  buffered for them), waits for that memory to come back (``settle``), and binds again.
  Clients' DEALER sockets reconnect by themselves within 0.1 s; a request in flight at
  that moment gets no reply (the client times out, and may retry it: NOTE [Replay
  memory]). What is left after settling is the daemon's own (no peer is connected), so
  the baseline is raised to it: memory the heap keeps after a large session closed never
  triggers a reset twice.

  Why every connection and not the one that sends: the frames sit in the pipe between
  that connection's session and the socket, and libzmq tells no pipe's size. The
  connections' fds (known from the monitor, NOTE [Connection caps] in connections.py)
  tell no better: a socket's receive queue (``SIOCINQ``, ``ss``'s Recv-Q) holds only
  what libzmq has not read yet, and libzmq reads as fast as a peer writes (measured: a
  peer sending 64 KiB of such frames every 2 ms had an empty queue in 39 of 40 samples
  over 2 s while the daemon's heap grew by more than 100 MiB), and a Unix socket keeps no
  count of the bytes it received. Shutting connections down a few at a time until the
  memory comes back would drop half of them on average anyway, and take longer.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import time
from collections.abc import Callable

__all__ = ["EXTENT_COST_BYTES", "SESSION_COST_BYTES", "MemoryGuard", "anon_bytes"]

EXTENT_COST_BYTES = 1 << 10
"""More than the daemon's objects for one extent take (about 350 bytes measured with 258048 extents)."""
SESSION_COST_BYTES = 1 << 20
"""More than one session's objects take with its layer stats full (MAX_SESSION_LAYERS entries)."""
_SETTLE_STEPS = 50
_SETTLE_MIN_STEPS = 5
_SETTLE_STEP_S = 0.01
_SETTLED_BYTES = 1 << 20
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
_libc_name = ctypes.util.find_library("c")
_malloc_trim = getattr(ctypes.CDLL(_libc_name), "malloc_trim", None) if _libc_name else None


def anon_bytes() -> int:
    """This process's resident bytes that are neither file nor shared memory (about ``RssAnon``)."""
    with open("/proc/self/statm", "rb") as f:
        fields = f.read().split()
    return (int(fields[1]) - int(fields[2])) * _PAGE_BYTES


class MemoryGuard:
    """Tells when the daemon's anonymous memory is past its allowance (NOTE [Buffered messages])."""

    def __init__(self, max_buffered: int, read: Callable[[], int] = anon_bytes) -> None:
        self.max_buffered = max_buffered
        self._read = read
        self.baseline = read()

    def allowance(self, accounted: int) -> int:
        return self.baseline + accounted + self.max_buffered

    def excess(self, accounted: int) -> tuple[int, int] | None:
        """``(anonymous bytes, allowance)`` when the first is past the second, else None (also when the
        reading fails: out of fds, say; the next tick tries again)."""
        try:
            current = self._read()
        except OSError:
            return None
        allowed = self.allowance(accounted)
        return (current, allowed) if current > allowed else None

    def settle(self, process_commands: Callable[[], object], accounted: int) -> int:
        """With every connection closed: let libzmq free their buffers, give the pages back,
        and raise the baseline to what the daemon itself still holds. Returns that many bytes."""
        previous = current = self._read()
        for step in range(_SETTLE_STEPS):
            time.sleep(_SETTLE_STEP_S)
            process_commands()  # the socket's pending commands tear the closed connections down
            if _malloc_trim is not None:
                _malloc_trim(0)
            current = self._read()
            if step >= _SETTLE_MIN_STEPS and previous - current < _SETTLED_BYTES:
                break
            previous = current
        self.baseline = max(self.baseline, current - accounted)
        return current
