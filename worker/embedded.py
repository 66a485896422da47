"""A private stormd for one run, started when no daemon answers (the embedded default).

The daemon dies with the process that started it: it is started with a parent-death
signal (``prctl(PR_SET_PDEATHSIG, SIGTERM)``), so a worker killed with SIGKILL still
stops its daemon, which removes its sockets, its lock and then its private directory on
the way out (``--remove-on-exit``); its log is an unnamed file, and its slabs are memfds,
so nothing of it outlives it (NOTE [Slabs] in storm_service/slabs.py). A daemon killed
with SIGKILL leaves its directory to :meth:`EmbeddedDaemon.stop`. The signal follows the
thread that started the daemon: start it from the main thread.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from types import TracebackType

from client.transport import connect
from storm_service.errors import StormError
from storm_service.protocol import Op

__all__ = ["EmbeddedDaemon", "daemon_answers"]

_PR_SET_PDEATHSIG = 1


def _die_with(parent: int) -> None:
    """In the child, before exec: SIGTERM when the parent dies (and now, if it already has)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0 or os.getppid() != parent:
        os._exit(1)


def daemon_answers(endpoint: str, timeout_s: float = 0.5) -> bool:
    """Whether a daemon answers a ping at ``endpoint`` within ``timeout_s``."""
    try:
        with connect(endpoint) as channel:
            channel.call(Op.PING, timeout_s=timeout_s)
        return True
    except StormError:
        return False


class EmbeddedDaemon:
    """``stormd`` as a child process on a private ipc socket; stopped (SIGTERM) on exit."""

    def __init__(self, pool_size: str, heartbeat_timeout: str = "5s", start_timeout_s: float = 30.0) -> None:
        self._dir = tempfile.mkdtemp(prefix="storm-")
        self.endpoint = f"ipc://{os.path.join(self._dir, 'stormd.sock')}"
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop)
        self._proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "storm_service.daemon",
                "--endpoint",
                self.endpoint,
                "--pool-size",
                pool_size,
                "--heartbeat-timeout",
                heartbeat_timeout,
                "--remove-on-exit",
                self._dir,
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            preexec_fn=functools.partial(_die_with, os.getpid()),
        )
        deadline = time.monotonic() + start_timeout_s
        while not daemon_answers(self.endpoint, timeout_s=0.2):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                log = self.log_tail()
                self.stop()
                raise RuntimeError(f"the embedded stormd did not start:\n{log}")

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def alive(self) -> bool:
        return self._proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        self._log.flush()
        self._log.seek(0)
        return b"\n".join(self._log.read().splitlines()[-lines:]).decode(errors="replace")

    def stop(self, timeout_s: float = 10.0) -> int:
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._log.close()
        shutil.rmtree(self._dir, ignore_errors=True)  # gone already, unless the daemon was killed
        return self._proc.returncode

    def __enter__(self) -> EmbeddedDaemon:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
