"""The fd socket: how a client gets a slab's file descriptor, and checks whom it got it from.

A wire module: the client imports it, so it imports nothing from the rest of the daemon
and nothing from torch. Beside an ``ipc://`` endpoint's socket ``<path>`` the daemon
listens on ``<path>.fds``, a plain Unix ``SOCK_SEQPACKET`` socket (one message per
datagram, never split). A client connects, sends one request, reads one reply, and the
daemon closes the connection::

    client ──[ {"v": 2, "token": <str>, "slab": <int>} ]──────────────▶ stormd
    client ◀──[ {"v": 2, "ok": true, "slab": <int>, "size_bytes": <int>} + SCM_RIGHTS fd ]──
            | [ {... "tier": "device", "backend": "fake", "device": <str>} + SCM_RIGHTS fd ]
            | [ {... "tier": "device", "backend": "cuda", "device": <GPU UUID>, "ipc": <64 bytes>} ]
            | [ {"v": 2, "ok": false, "error": {"code": <ErrorCode>, "message": <str>}} ]

A device slab (NOTE [Device tier] in storm_service/device/tier.py) of the ``fake``
backend is a sealed memfd like a host slab, checked the same way; one of the ``cuda``
backend carries no fd but a CUDA IPC handle of the allocation on the GPU named by UUID.

``slab`` 0 asks for no fd: it binds the session to the caller's process (the daemon
takes its uid and a pidfd, NOTE [Lending by descriptor] in lending.py).

NOTE [Verifying the daemon]
  Before a client sends anything it checks whom it talks to: the endpoint's directory
  must belong to the client's own uid, root, or ``STORM_DAEMON_UID``, and not be
  writable by others (a squatter cannot have made it or put a socket in it); the fd
  socket's peer (``SO_PEERCRED``, filled in by the kernel) must run as one of those uids;
  every fd it receives must be a regular file (a memfd) of the announced size, owned by
  that uid, and sealed against shrinking and growing (``F_GET_SEALS``), so that nobody
  can truncate it under the client. Any failure raises UntrustedDaemonError naming the
  uid or the check.
"""

from __future__ import annotations

import fcntl
import os
import socket
import stat
import struct
from dataclasses import dataclass
from typing import Any

import msgpack

from storm_service.errors import ProtocolError, StormUnavailableError, UntrustedDaemonError, error_for_code
from storm_service.protocol import MAX_ID, MAX_SIZE_BYTES, MAX_STR, PROTOCOL_VERSION
from storm_service.shm import SLAB_SEALS

__all__ = [
    "FD_SOCKET_SUFFIX",
    "IPC_HANDLE_BYTES",
    "LentSlab",
    "MAX_FD_MESSAGE_BYTES",
    "bind_session",
    "check_socket_dir",
    "connect_checked",
    "decode_slab_request",
    "encode_slab_error",
    "encode_slab_reply",
    "fd_socket_path",
    "peer_credentials",
    "request_slab",
    "trusted_uids",
]

FD_SOCKET_SUFFIX = ".fds"
MAX_FD_MESSAGE_BYTES = 2048
"""Largest request or reply on the fd socket."""
IPC_HANDLE_BYTES = 64
"""``sizeof(cudaIpcMemHandle_t)``."""
_LIMITS = {"max_str_len": MAX_FD_MESSAGE_BYTES, "max_bin_len": IPC_HANDLE_BYTES, "max_array_len": 0, "max_map_len": 12}
_BACKENDS = ("fake", "cuda")


@dataclass(frozen=True)
class LentSlab:
    """A slab as the fd socket lent it: a host or fake-device slab's fd, or a CUDA slab's IPC handle."""

    slab_id: int
    size_bytes: int
    fd: int | None
    """The memfd (host and ``fake`` device slabs), already checked; the receiver closes it."""
    backend: str | None = None
    """None for a host slab, else the device backend: ``fake`` or ``cuda``."""
    device: str | None = None
    """The device's name: a GPU UUID for ``cuda``."""
    ipc: bytes | None = None
    """The CUDA IPC handle of a ``cuda`` slab."""


_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def fd_socket_path(endpoint: str) -> str | None:
    """The fd socket beside an ``ipc://`` endpoint, or None for other transports."""
    return endpoint[len("ipc://") :] + FD_SOCKET_SUFFIX if endpoint.startswith("ipc://") else None


def trusted_uids() -> set[int]:
    """The uids a daemon may run as for this client: its own, root, and ``STORM_DAEMON_UID``."""
    uids = {os.getuid(), 0}
    extra = os.environ.get("STORM_DAEMON_UID", "")
    if extra.isdigit():
        uids.add(int(extra))
    return uids


def check_socket_dir(socket_path: str) -> None:
    """Refuse (UntrustedDaemonError) a socket directory a squatter could own or write.

    NOTE [Verifying the daemon].
    """
    directory = os.path.dirname(os.path.abspath(socket_path))
    try:
        info = os.stat(directory)
    except OSError as e:
        raise UntrustedDaemonError(f"cannot check the socket directory {directory}: {e.strerror}") from e
    if info.st_uid not in trusted_uids():
        raise UntrustedDaemonError(
            f"socket directory {directory} belongs to uid {info.st_uid}, not to this user ({os.getuid()}), "
            "root or STORM_DAEMON_UID: refusing to talk to a daemon there"
        )
    if info.st_mode & stat.S_IWOTH:
        raise UntrustedDaemonError(
            f"socket directory {directory} is writable by every user (mode {stat.S_IMODE(info.st_mode):o}): "
            "anyone could have put a socket there"
        )


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of the process at the other end of a Unix socket, as the kernel attests."""
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return pid, uid, gid


def connect_checked(path: str, timeout_s: float) -> tuple[socket.socket, int]:
    """A connection to the fd socket ``path`` and the daemon's uid; UntrustedDaemonError unless trusted."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout_s)
        try:
            sock.connect(path)
        except OSError as e:
            raise StormUnavailableError(f"no daemon answers at {path}: {e}") from e
        _, daemon_uid, _ = peer_credentials(sock)
        if daemon_uid not in trusted_uids():
            raise UntrustedDaemonError(
                f"the daemon at {path} runs as uid {daemon_uid}, not as this user ({os.getuid()}), root or "
                "STORM_DAEMON_UID: refusing it"
            )
    except BaseException:
        sock.close()
        raise
    return sock, daemon_uid


def encode_slab_reply(slab_id: int, size_bytes: int, device: dict[str, Any] | None = None) -> bytes:
    """A reply lending a slab; ``device`` adds a device slab's ``tier``, ``backend``, ``device`` (and ``ipc``)."""
    return msgpack.packb(
        {"v": PROTOCOL_VERSION, "ok": True, "slab": slab_id, "size_bytes": size_bytes} | (device or {})
    )


def encode_slab_error(code: str, message: str) -> bytes:
    return msgpack.packb({"v": PROTOCOL_VERSION, "ok": False, "error": {"code": code, "message": message[:1024]}})


def decode_slab_request(frame: bytes) -> tuple[str, int]:
    """``(token, slab id)`` of a request; ValueError on any defect."""
    if len(frame) > MAX_FD_MESSAGE_BYTES:
        raise ValueError(f"request is {len(frame)} bytes, at most {MAX_FD_MESSAGE_BYTES}")
    try:
        msg = msgpack.unpackb(frame, raw=False, strict_map_key=True, **_LIMITS)
    except Exception as e:  # msgpack raises a zoo of types for malformed input
        raise ValueError(f"request is not valid msgpack: {e}") from None
    if type(msg) is not dict or set(msg) != {"v", "token", "slab"}:
        raise ValueError("request must be a map of exactly v, token and slab")
    if msg["v"] != PROTOCOL_VERSION:
        raise ValueError(f"protocol version {msg['v']!r:.20} is not supported; this daemon speaks {PROTOCOL_VERSION}")
    token, slab_id = msg["token"], msg["slab"]
    if type(token) is not str or not 0 < len(token) <= MAX_STR:
        raise ValueError("field 'token' must be a short string")
    if type(slab_id) is not int or not 0 <= slab_id <= MAX_ID:
        raise ValueError(f"field 'slab' must be an integer in [0, {MAX_ID}]")
    return token, slab_id


def bind_session(path: str, token: str, timeout_s: float) -> None:
    """Tie the session to this process: the daemon takes its uid and a pidfd (request ``slab`` 0)."""
    _exchange(path, token, 0, timeout_s)


def request_slab(path: str, token: str, slab_id: int, timeout_s: float) -> LentSlab:
    """Ask the daemon at ``path`` for slab ``slab_id`` (NOTE [Verifying the daemon]).

    An error reply raises the matching RemoteError; an untrusted peer or fd,
    UntrustedDaemonError; no daemon, StormUnavailableError.
    """
    lent = _exchange(path, token, slab_id, timeout_s)
    assert lent is not None
    return lent


def _exchange(path: str, token: str, slab_id: int, timeout_s: float) -> LentSlab | None:
    sock, daemon_uid = connect_checked(path, timeout_s)
    with sock:
        try:
            sock.sendall(msgpack.packb({"v": PROTOCOL_VERSION, "token": token, "slab": slab_id}))
            data, fds, _, _ = socket.recv_fds(sock, MAX_FD_MESSAGE_BYTES, 1)
        except OSError as e:  # socket.timeout included
            raise StormUnavailableError(f"slab {slab_id}: the fd socket {path} did not answer: {e}") from e
    try:
        reply = _decode_reply(data)
        if not reply["ok"]:
            error = reply.get("error") or {}
            raise error_for_code(str(error.get("code")), f"slab {slab_id}: {error.get('message', '')}")
        if slab_id == 0:
            return None
        lent = _lent_slab(reply, slab_id, len(fds))
        if lent.ipc is None:
            _check_slab_fd(fds[0], slab_id, lent.size_bytes, daemon_uid)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return LentSlab(lent.slab_id, lent.size_bytes, fds[0] if fds else None, lent.backend, lent.device, lent.ipc)


def _lent_slab(reply: dict[str, Any], slab_id: int, fd_count: int) -> LentSlab:
    """The reply's fields, checked: a host or fake slab comes with one fd, a CUDA slab with none and a handle."""
    size_bytes = reply.get("size_bytes")
    if reply.get("slab") != slab_id:
        raise ProtocolError(f"slab {slab_id}: the reply is for slab {reply.get('slab')!r:.20}")
    if type(size_bytes) is not int or not 0 < size_bytes <= MAX_SIZE_BYTES:
        raise ProtocolError(f"slab {slab_id}: bad size_bytes {size_bytes!r:.20}")
    tier = reply.get("tier", "host")
    if tier == "host":
        backend = device = ipc = None
    elif tier == "device":
        backend, device, ipc = reply.get("backend"), reply.get("device"), reply.get("ipc")
        if backend not in _BACKENDS or type(device) is not str or not 0 < len(device) <= MAX_STR:
            raise ProtocolError(f"slab {slab_id}: bad device slab {backend!r:.20} {device!r:.80}")
        if (backend == "cuda") != (type(ipc) is bytes and len(ipc) == IPC_HANDLE_BYTES):
            raise ProtocolError(f"slab {slab_id}: a {backend} slab with an IPC handle of {ipc!r:.20}")
    else:
        raise ProtocolError(f"slab {slab_id}: unknown tier {tier!r:.20}")
    if fd_count != (0 if ipc is not None else 1):
        raise ProtocolError(f"slab {slab_id}: the reply carries {fd_count} fds")
    return LentSlab(slab_id, size_bytes, None, backend, device, ipc)


def _decode_reply(data: bytes) -> dict[str, Any]:
    try:
        reply = msgpack.unpackb(data, raw=False, strict_map_key=True, **_LIMITS)
    except Exception as e:
        raise ProtocolError(f"fd socket reply is not valid msgpack: {e}") from e
    if type(reply) is not dict or type(reply.get("ok")) is not bool:
        raise ProtocolError(f"fd socket reply is not a reply map: {reply!r:.100}")
    return reply


def _check_slab_fd(fd: int, slab_id: int, size_bytes: int, daemon_uid: int) -> None:
    """A regular file of ``size_bytes`` owned by the daemon's uid, sealed against resizing.

    NOTE [Verifying the daemon].
    """
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_size != size_bytes or info.st_uid != daemon_uid:
        raise UntrustedDaemonError(
            f"slab {slab_id}: the fd is not a {size_bytes}-byte file of uid {daemon_uid} "
            f"(mode {info.st_mode:o}, {info.st_size} bytes, uid {info.st_uid})"
        )
    seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    if seals & SLAB_SEALS != SLAB_SEALS:
        raise UntrustedDaemonError(f"slab {slab_id}: the fd is not sealed against resizing (seals {seals:#x})")
