"""Where the daemon lives on the host: the default endpoint, its runtime directory, and
the lock that keeps two daemons off one endpoint.

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

__all__ = [
    "AUTHORIZED_DIR",
    "EndpointLock",
    "LockHeldError",
    "default_endpoint",
    "ensure_private_dir",
    "ipc_path",
    "pid_alive",
    "pid_namespace",
    "runtime_dir",
    "SERVER_SECRET_FILE",
]

SOCKET_NAME = "stormd.sock"
SERVER_SECRET_FILE = "server.key_secret"
AUTHORIZED_DIR = "authorized"


def runtime_dir() -> str:
    """The per-user directory for the default socket: ``$XDG_RUNTIME_DIR/storm`` or ``/tmp/storm-<uid>``."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base):
        return os.path.join(base, "storm")
    return f"/tmp/storm-{os.getuid()}"


def default_endpoint() -> str:
    return f"ipc://{os.path.join(runtime_dir(), SOCKET_NAME)}"


def ipc_path(endpoint: str) -> str | None:
    """The filesystem path of an ``ipc://`` endpoint, or None for other transports."""
    return endpoint[len("ipc://") :] if endpoint.startswith("ipc://") else None


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


def pid_namespace() -> int | None:
    """This process's pid namespace (the inode of /proc/self/ns/pid), or None if unknown.

    Two processes may compare pids only when their namespaces are equal; containers
    usually differ, and then liveness falls back to heartbeats.
    """
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs in our pid namespace (a zombie, killed but not reaped, is dead)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")
