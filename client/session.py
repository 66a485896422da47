"""Registration with the daemon and the heartbeat that keeps a session alive.

``verify_daemon`` checks the daemon (NOTE [Verifying the daemon] in
storm_service/fdpass.py) before anything is sent. ``register`` sends one ``register``
request (with a random nonce, so that a retry cannot open a second session), binds the
session to this process on the fd socket, and returns what the daemon granted: the
session's token, its quota and where to ask for slabs. ``Heartbeat`` is the thread
that proves the process alive every ``heartbeat_interval_s``; when a beat fails it
reports the session lost."""

from __future__ import annotations

import logging
import os
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass

from client.transport import Channel
from storm_service.endpoints import ipc_path, pid_alive, pid_namespace
from storm_service.errors import StormError
from storm_service.fdpass import bind_session, check_socket_dir, connect_checked, fd_socket_path
from storm_service.protocol import Op

__all__ = ["Heartbeat", "Registration", "register", "verify_daemon"]

log = logging.getLogger("storm.client")


@dataclass(frozen=True)
class Registration:
    """What one ``register`` reply granted."""

    session_id: int
    token: str
    quota_bytes: int
    heartbeat_interval_s: float
    fd_socket: str
    """Where this session's slabs are lent (storm_service/fdpass.py)."""
    daemon_alive: Callable[[], bool] | None
    """Where the daemon's pid is visible (same pid namespace): whether it still runs."""
    disk_tier: bool = False
    """The daemon spills to disk (NOTE [Disk tier] in storm_service/disk/tier.py)."""


def verify_daemon(endpoint: str, timeout_s: float) -> None:
    """Before anything is sent: the socket directory and the daemon's uid (NOTE [Verifying the daemon])."""
    path, fd_socket = ipc_path(endpoint), fd_socket_path(endpoint)
    if path is None or fd_socket is None:
        return  # tcp:// (CURVE authenticates the daemon); the fd socket is checked after register
    check_socket_dir(path)
    sock, _ = connect_checked(fd_socket, timeout_s)
    sock.close()


def register(channel: Channel, timeout_s: float, name: str, quota_bytes: int | None) -> Registration:
    """Open a session and bind it to this process; a retried request is answered with the same session (its nonce)."""
    extras = {"rank": _env_int("RANK"), "world_size": _env_int("WORLD_SIZE"), "quota_bytes": quota_bytes}
    reply = channel.call(
        Op.REGISTER,
        None,
        timeout_s,
        pid=os.getpid(),
        name=name,
        pid_ns=pid_namespace() or 0,
        nonce=secrets.token_hex(16),
        **{k: v for k, v in extras.items() if v is not None},
    )
    daemon_alive = None
    if reply.get("pid_ns") is not None and reply["pid_ns"] == pid_namespace():
        daemon_pid = reply["daemon_pid"]

        def daemon_alive() -> bool:
            return pid_alive(daemon_pid)

    refused = reply.get("device_tier_refused")
    if isinstance(refused, str) and refused:
        log.warning("stormd's device tier is not offered to this process: %.300s", refused)
    fd_socket = str(reply["fd_socket"])
    check_socket_dir(fd_socket)
    bind_session(fd_socket, reply["token"], timeout_s)
    return Registration(
        session_id=reply["session_id"],
        token=reply["token"],
        quota_bytes=reply["quota_bytes"],
        heartbeat_interval_s=float(reply["heartbeat_interval_s"]),
        fd_socket=fd_socket,
        daemon_alive=daemon_alive,
        disk_tier=reply.get("disk_tier") is True,
    )


class Heartbeat:
    """A thread that sends ``heartbeat`` every interval on its own channel until stopped."""

    def __init__(
        self,
        new_channel: Callable[[], Channel],
        token: str,
        interval_s: float,
        timeout_s: float,
        on_lost: Callable[[BaseException], None],
    ) -> None:
        self._new_channel = new_channel
        self._token = token
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._on_lost = on_lost
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="storm-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout_s: float) -> None:
        self._thread.join(timeout_s)

    def _beat(self) -> None:
        channel = self._new_channel()
        try:
            while not self._stop.wait(self._interval_s):
                try:
                    channel.call(Op.HEARTBEAT, self._token, self._timeout_s)
                except StormError as e:
                    self._on_lost(e)
                    return
        finally:
            channel.close()


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value and value.isdigit() else None
