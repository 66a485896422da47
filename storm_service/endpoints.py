"""Where the daemon serves on the host, as both sides need to know it: the default
endpoint, its runtime directory, the names of the files beside the socket, and the pid
checks that tell whether a peer process still lives.

A wire module: the client imports it, so it imports nothing from the rest of the daemon
and nothing from torch (``[tool.importlinter]`` in pyproject.toml enforces both).

NOTE [Runtime directory]
  The default endpoint is ``$XDG_RUNTIME_DIR/storm/stormd.sock`` when ``XDG_RUNTIME_DIR``
  names an absolute path to a directory (the per-user 0700 directory systemd makes at
  login), else ``/tmp/storm-<uid>/stormd.sock``. Everyone may create names in /tmp, so
  that directory is taken only as one of our own: the daemon creates it 0700, or opens
  the one there without following links and refuses it, naming the remedy, unless it is
  its uid's and nobody else may write to it (NOTE [Files we trust] in lockfile.py); it
  logs at start which directory it took and why (``runtime_dir_fallback``). A client
  refuses a socket directory that belongs to another uid than its own, root's or
  ``STORM_DAEMON_UID``, or that everyone may write (NOTE [Verifying the daemon] in
  fdpass.py), so a directory another user made there first gets no activations.
"""

from __future__ import annotations

import os

__all__ = [
    "AUTHORIZED_DIR",
    "SERVER_SECRET_FILE",
    "SOCKET_NAME",
    "default_endpoint",
    "ipc_path",
    "pid_alive",
    "pid_namespace",
    "runtime_dir",
    "runtime_dir_fallback",
]

SOCKET_NAME = "stormd.sock"
SERVER_SECRET_FILE = "server.key_secret"
AUTHORIZED_DIR = "authorized"


def runtime_dir() -> str:
    """The per-user directory for the default socket: ``$XDG_RUNTIME_DIR/storm`` or ``/tmp/storm-<uid>``
    (NOTE [Runtime directory])."""
    base = os.environ.get("XDG_RUNTIME_DIR", "")
    return os.path.join(base, "storm") if runtime_dir_fallback() is None else f"/tmp/storm-{os.getuid()}"


def runtime_dir_fallback() -> str | None:
    """Why :func:`runtime_dir` is under /tmp (``XDG_RUNTIME_DIR is not set``, ...), or None when it is not."""
    base = os.environ.get("XDG_RUNTIME_DIR", "")
    if not base:
        return "XDG_RUNTIME_DIR is not set"
    if not os.path.isabs(base):
        return f"XDG_RUNTIME_DIR={base} is not an absolute path"
    if not os.path.isdir(base):
        return f"XDG_RUNTIME_DIR={base} is not a directory"
    return None


def default_endpoint() -> str:
    return f"ipc://{os.path.join(runtime_dir(), SOCKET_NAME)}"


def ipc_path(endpoint: str) -> str | None:
    """The filesystem path of an ``ipc://`` endpoint, or None for other transports."""
    return endpoint[len("ipc://") :] if endpoint.startswith("ipc://") else None


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
    """Whether ``pid`` runs in our pid namespace (a zombie, killed but not reaped, is dead).

    Only ESRCH (no such process, from ``kill(pid, 0)``) and ENOENT (no ``/proc`` entry)
    mean dead. EPERM means the process lives but belongs to another user, whose
    ``/proc`` entry a ``hidepid`` mount may hide; EACCES, EMFILE and the like say
    nothing about the process, so they count as alive too: calling a live client dead
    would free memory it is still using.
    """
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return False
    except OSError:
        return True
    fields = data.rsplit(b")", 1)[-1].split()
    return not fields or fields[0] not in (b"Z", b"X")
