"""The processes device memory was lent to, each held by a pidfd until it exits.

NOTE [Importers]
  Device memory is freed under no process that may still map it. A CUDA mapping cannot
  be revoked, and a client's word that it closed one cannot be trusted; a process that
  has exited maps nothing. So a device slab is lent only to the process its session is
  bound to (NOTE [Lending by descriptor] in storm_service/lending.py), and that process
  becomes an importer of the slab: the daemon keeps a pidfd of it here (a dup of the
  session's, so it outlives the session) until the process exits. Memory a slab gives up
  (renewal, NOTE [Device slabs] in slabs.py) is freed only once every importer of it has
  exited. The pidfds are bounded: one per process, and at most ``limit`` of them (past
  that, exited ones are dropped first, and a new process is refused a device slab).
"""

from __future__ import annotations

import logging
import os

from storm_service.pidfds import exited

__all__ = ["Importers"]

log = logging.getLogger("stormd.device")


class Importers:
    """Pidfds of the processes device slabs were lent to, by pid (in the daemon's pid namespace)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._pidfds: dict[int, int] = {}

    def add(self, pid: int, pidfd: int) -> bool:
        """Keep a pidfd of ``pid`` (a dup of ``pidfd``) until it exits; False when at the limit."""
        if pid in self._pidfds and not exited(self._pidfds[pid]):
            return True
        if len(self._pidfds) >= self.limit:
            self.prune()
            if len(self._pidfds) >= self.limit:
                return False
        old = self._pidfds.pop(pid, None)
        if old is not None:  # an exited process whose pid came back
            os.close(old)
        self._pidfds[pid] = os.dup(pidfd)
        return True

    def alive(self, pid: int) -> bool:
        """Whether process ``pid``, as it was lent a slab, may still map it."""
        pidfd = self._pidfds.get(pid)
        return pidfd is not None and not exited(pidfd)

    def prune(self) -> int:
        """Close the pidfds of processes that exited; returns how many."""
        gone = [pid for pid, pidfd in self._pidfds.items() if exited(pidfd)]
        for pid in gone:
            os.close(self._pidfds.pop(pid))
        return len(gone)

    def __len__(self) -> int:
        return len(self._pidfds)

    def close(self) -> None:
        for pidfd in self._pidfds.values():
            os.close(pidfd)
        self._pidfds.clear()
