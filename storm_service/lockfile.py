"""The daemon's own files: the lock that keeps two daemons off one endpoint, and the
private directories it serves from. Daemon-only: the client never imports this module.

NOTE [Endpoint lock]
  A second ``bind`` on an ``ipc://`` path silently takes the endpoint over from the
  first daemon, so binding is no proof of ownership. The daemon holds an exclusive
  ``flock`` on ``<socket>.lock`` for its whole life; the lock file also records the
  daemon's pid and its segment names, so that the next daemon to take the lock can
  sweep what a dead one left behind (segments in ``/dev/shm`` and the socket file).
"""

from __future__ import annotations

import fcntl
import json
import os
import stat
from dataclasses import dataclass, field

__all__ = ["EndpointLock", "LockHeldError", "ensure_private_dir"]


def ensure_private_dir(path: str, mode: int = 0o700, gid: int = -1) -> None:
    """Create ``path`` with ``mode``, or check that an existing one is ours and not wider.

    Raises PermissionError naming the directory when another user owns it or when
    its mode lets others in, since the socket inside would then be reachable by them.
    With ``gid``, the directory is handed to that group (``mode`` then opens it to it).
    """
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        pass
    if os.stat(path).st_uid == os.getuid():
        os.chown(path, -1, gid)
        os.chmod(path, mode)  # mkdir's mode is masked by the umask; a reused dir is narrowed
    info = os.stat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise PermissionError(f"{path} exists and is not a directory")
    if info.st_uid != os.getuid():
        raise PermissionError(f"{path} belongs to uid {info.st_uid}, not to uid {os.getuid()}")
    if stat.S_IMODE(info.st_mode) & ~mode:
        raise PermissionError(f"{path} has mode {stat.S_IMODE(info.st_mode):o}, expected {mode:o}")


class LockHeldError(RuntimeError):
    """Another live daemon holds the endpoint."""


@dataclass
class EndpointLock:
    """An exclusive, process-lifetime lock on an endpoint (see NOTE [Endpoint lock])."""

    path: str
    _fd: int = -1
    previous: dict[str, object] = field(default_factory=dict)

    def acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_record(fd).get("pid", "unknown")
                os.close(fd)
                raise LockHeldError(
                    f"another stormd (pid {holder}) already serves this endpoint; lock file {self.path}"
                ) from None
            if _same_file(fd, self.path):
                break
            os.close(fd)  # we locked a file its last owner had just unlinked: take the new one
        self.previous = _read_record(fd)
        self._fd = fd

    def record(self, segments: list[str]) -> None:
        """Write this daemon's pid and segment names into the lock file."""
        data = json.dumps({"pid": os.getpid(), "segments": segments}).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        os.fsync(self._fd)

    def release(self) -> None:
        if self._fd < 0:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = -1


def _same_file(fd: int, path: str) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _read_record(fd: int) -> dict[str, object]:
    try:
        data = os.pread(fd, 1 << 16, 0)
        record = json.loads(data) if data else {}
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}
