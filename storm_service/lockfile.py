"""The daemon's own files: the lock that keeps two daemons off one endpoint, the private
directories it serves from, and what it may remove. Daemon-only: the client never
imports this module.

NOTE [Endpoint lock]
  A second ``bind`` on an ``ipc://`` path silently takes the endpoint over from the
  first daemon, so binding is no proof of ownership. The daemon holds an exclusive
  ``flock`` on ``<socket>.lock`` for its whole life; the lock file also records the
  daemon's pid and its segment names, so that the next daemon to take the lock can
  sweep what a dead one left behind (segments in ``/dev/shm`` and the socket file).

NOTE [Files we trust]
  Every path the daemon opens, changes or removes may have been planted by another
  user of the host. So: a directory is opened with ``O_DIRECTORY | O_NOFOLLOW`` and
  changed through its fd (``fchown``, ``fchmod``), never by name; a lock file is opened
  with ``O_NOFOLLOW`` and used only if it is a regular file of ours with no group or
  other bits; a recorded segment is removed only if it is a regular file of ours (in
  the sticky ``/dev/shm`` nobody else can swap it between the check and the unlink);
  and only a socket is removed at the endpoint's path, since libzmq's ``bind``
  deletes whatever it finds there. Anything else is refused with UnsafePathError,
  naming the path and what is wrong with it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
from dataclasses import dataclass, field

from storm_service.shm import SEGMENT_PREFIX, SHM_DIR

__all__ = [
    "EndpointLock",
    "LockHeldError",
    "UnsafePathError",
    "ensure_private_dir",
    "owned_segments",
    "remove_stale_socket",
]


class UnsafePathError(PermissionError):
    """A path the daemon would use is not safely its own (NOTE [Files we trust])."""


def ensure_private_dir(path: str, mode: int = 0o700, gid: int = -1) -> None:
    """Create ``path`` with ``mode``, or check that an existing one is ours and not wider.

    Raises UnsafePathError naming the directory when it is a symbolic link or not a
    directory, when another user owns it, or when others could write to it (they could
    have planted files inside). An existing directory of ours is narrowed to ``mode``;
    with ``gid``, it is handed to that group (``mode`` then opens it to it).
    """
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        pass
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafePathError(f"{path} is a symbolic link or not a directory; refusing to serve from it") from None
        raise
    try:
        info = os.fstat(fd)
        if info.st_uid != os.getuid():
            raise UnsafePathError(f"{path} belongs to uid {info.st_uid}, not to uid {os.getuid()}")
        if stat.S_IMODE(info.st_mode) & 0o022:
            raise UnsafePathError(
                f"{path} has mode {stat.S_IMODE(info.st_mode):o}: others can write to it; remove it or make it {mode:o}"
            )
        os.fchown(fd, -1, gid)
        os.fchmod(fd, mode)  # mkdir's mode is masked by the umask; a reused dir is narrowed
    finally:
        os.close(fd)


def remove_stale_socket(path: str) -> bool:
    """Remove a socket a dead daemon left at ``path``; returns whether there was one.

    Raises UnsafePathError when ``path`` is anything but a socket of ours: libzmq's bind
    would delete it, and it is not the daemon's to delete.
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(info.st_mode):
        raise UnsafePathError(f"endpoint {path} exists and is not a socket; refusing to replace it")
    if info.st_uid != os.getuid():
        raise UnsafePathError(f"endpoint {path} is a socket of uid {info.st_uid}, not of uid {os.getuid()}")
    os.unlink(path)
    return True


def owned_segments(names: object) -> tuple[list[str], list[str]]:
    """Split recorded segment names into ``(ours, refused)``: ours are regular files of
    this uid in SHM_DIR with the STORM prefix; refused are those that exist but are not."""
    ours: list[str] = []
    refused: list[str] = []
    for name in names if isinstance(names, list) else []:
        if not isinstance(name, str) or not name.startswith(SEGMENT_PREFIX) or "/" in name:
            continue
        try:
            info = os.lstat(os.path.join(SHM_DIR, name))
        except FileNotFoundError:
            continue
        (ours if stat.S_ISREG(info.st_mode) and info.st_uid == os.getuid() else refused).append(name)
    return ours, refused


class LockHeldError(RuntimeError):
    """Another live daemon holds the endpoint."""


@dataclass
class EndpointLock:
    """An exclusive, process-lifetime lock on an endpoint (see NOTE [Endpoint lock])."""

    path: str
    _fd: int = -1
    previous: dict[str, object] = field(default_factory=dict)

    def acquire(self) -> None:
        """Take the lock; LockHeldError if a live daemon has it, UnsafePathError if the file is not ours."""
        while True:
            fd = _open_lock(self.path)
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
        if _same_file(self._fd, self.path):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = -1


def _open_lock(path: str) -> int:
    """Open (or create) the lock file, refusing one that is not a private regular file of ours."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnsafePathError(f"lock file {path} is a symbolic link; refusing to follow it") from None
        raise
    info = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(info.st_mode):
        problem = "is not a regular file"
    elif info.st_uid != os.getuid():
        problem = f"belongs to uid {info.st_uid}, not to uid {os.getuid()}"
    elif stat.S_IMODE(info.st_mode) & 0o077:
        problem = f"has mode {stat.S_IMODE(info.st_mode):o}, not 600"
    if problem is not None:
        os.close(fd)
        raise UnsafePathError(f"lock file {path} {problem}; remove it if no stormd serves this endpoint")
    return fd


def _same_file(fd: int, path: str) -> bool:
    try:
        on_disk = os.lstat(path)
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
