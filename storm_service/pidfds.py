"""Process handles (pidfds): the daemon's way to know a client's process has exited.

A pidfd names one process for good (a pid may be reused; a pidfd never refers to
another process) and becomes readable when that process exits.

NOTE [Fencing]
  A session that falls silent may belong to a process that is only paused (SIGSTOP, a
  debugger, a swapped-out host): when it resumes it may still write into its extents.
  So where the daemon holds a pidfd of the session's process (taken at its first fd
  request, NOTE [Lending by descriptor] in lending.py), expiry ends the session (its
  token and handles stop working at once, so its next request, a fetch included, fails
  with UNKNOWN_SESSION before it reads a byte) but keeps its extents allocated,
  **fenced**: counted in ``fenced_bytes`` and never lent to anyone, until the pidfd
  reports that the process exited (``SessionTable.release_fenced``, on every expiry
  sweep). Its late writes land only in its own fenced extents. A session whose process
  has exited is expired at once, and the heartbeat timeout frees memory at expiry only
  for sessions without a pidfd, whose liveness the daemon cannot know.
"""

from __future__ import annotations

import os
import select

__all__ = ["close_pidfd", "exited", "open_pidfd"]


def open_pidfd(pid: int) -> int | None:
    """A pidfd of ``pid`` (in the daemon's pid namespace), or None when it is gone or cannot be had."""
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None


def exited(pidfd: int) -> bool:
    """Whether the process of ``pidfd`` has exited (never blocks)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


def close_pidfd(pidfd: int | None) -> None:
    if pidfd is not None:
        os.close(pidfd)
