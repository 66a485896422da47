"""``stormd``: start-up, signals and clean shutdown around :class:`~storm_service.server.Server`.

Start-up order matters: take the endpoint lock first (NOTE [Endpoint lock]), sweep
what a dead daemon left, create and reserve the pool, record the segment names, bind,
and only then announce readiness. The daemon touches CUDA only for a ``cuda:`` device of
``--device-pool`` (NOTE [CUDA backend] in storm_service/device/cuda.py): each client pins
its own mapping of the host pool (NOTE [Lazy pinning] in storm_service/shm.py). Shutdown (SIGTERM, SIGINT
or ``stormctl shutdown``) answers queued requests with SHUTTING_DOWN, frees every
session, unlinks the segments, removes the socket and the lock, and exits 0.
"""

from __future__ import annotations

import gc
import grp
import logging
import os
import re
import resource
import signal
import stat
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType

import zmq

from storm_service.config import ConfigError, DaemonConfig, build_parser, load_config
from storm_service.device.backend import DeviceError
from storm_service.device.setup import open_devices
from storm_service.device.tier import DeviceTier
from storm_service.disk.files import SpillFileError
from storm_service.disk.io import DiskIO
from storm_service.disk.setup import open_spill_files, pool_alignment
from storm_service.disk.tier import DiskTier
from storm_service.endpoints import ipc_path, runtime_dir, runtime_dir_fallback
from storm_service.lockfile import (
    EndpointLock,
    LockHeldError,
    UnsafePathError,
    ensure_private_dir,
    owned_segments,
    remove_stale_socket,
)
from storm_service.metrics import Metrics
from storm_service.pool import ALIGNMENT, Pool, PoolError, sweep_segments
from storm_service.server import Server
from storm_service.units import format_bytes

__all__ = ["main", "run"]

log = logging.getLogger("stormd")

EXIT_CONFIG = 2
_NO_FULL_COLLECTIONS = 1 << 30
"""A generation-2 threshold never reached: the serving loop runs full collections itself."""
EXIT_STARTUP = 1


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, level),
        format="%(asctime)s stormd[%(process)d] %(levelname)s %(name)s: %(message)s",
    )


@dataclass(frozen=True)
class _Access:
    """Who may reach the daemon: the owner only, or the owner and one group."""

    gid: int
    dir_mode: int
    file_mode: int

    @classmethod
    def of(cls, group: str) -> _Access:
        if not group:
            return cls(gid=-1, dir_mode=0o700, file_mode=0o600)
        return cls(gid=grp.getgrnam(group).gr_gid, dir_mode=0o750, file_mode=0o660)


def _raise_fd_limit() -> None:
    """Raise the soft limit on open files to the hard one: each connection costs the daemon an fd,
    and libzmq 4.3 aborts the process when an ipc accept fails with EMFILE."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        log.info("open files limit raised from %d to %d", soft, hard)


def _secure_socket(path: str, access: _Access) -> None:
    """Give the socket file the access the daemon serves with (after every bind)."""
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise UnsafePathError(f"endpoint {path} is not the socket the daemon bound")
        os.chown(f"/proc/self/fd/{fd}", -1, access.gid)
        os.chmod(f"/proc/self/fd/{fd}", access.file_mode)
    finally:
        os.close(fd)


def _prepare_socket_dir(endpoint: str, access: _Access) -> str | None:
    path = ipc_path(endpoint)
    if path is None:
        return None
    directory = os.path.dirname(os.path.abspath(path))
    if directory == runtime_dir():
        _ensure_runtime_dir(access.dir_mode, access.gid)
    elif not os.path.exists(directory):
        ensure_private_dir(directory, access.dir_mode, access.gid)
    elif stat.S_IMODE(os.stat(directory).st_mode) & 0o007:
        log.warning("socket directory %s is open to other users; anyone there can reach the daemon", directory)
    return path


def _lock_path(endpoint: str, socket_path: str | None) -> str:
    if socket_path is not None:
        return socket_path + ".lock"
    return os.path.join(_ensure_runtime_dir(), re.sub(r"[^A-Za-z0-9]+", "_", endpoint) + ".lock")


def _ensure_runtime_dir(mode: int = 0o700, gid: int = -1) -> str:
    """Create or check the default runtime directory, saying why when it is under /tmp (NOTE [Runtime directory])."""
    directory, fallback = runtime_dir(), runtime_dir_fallback()
    if fallback is not None:
        log.info(
            "%s: the runtime directory is %s, which must be uid %d's alone (made %o; refused if it is another "
            "user's or others may write to it)",
            fallback,
            directory,
            os.getuid(),
            mode,
        )
    try:
        ensure_private_dir(directory, mode, gid)
    except OSError as e:  # UnsafePathError, or EACCES from a directory of another user that we may not open
        problem = str(e) if isinstance(e, UnsafePathError) else f"cannot open {directory}: {e.strerror}"
        raise UnsafePathError(
            f"{problem}; it is the default runtime directory: point XDG_RUNTIME_DIR at a private directory, or "
            "--endpoint at a socket in a directory of yours"
        ) from None
    return directory


def run(config: DaemonConfig) -> int:
    """Run the daemon until stopped; returns the exit status."""
    access = _Access.of(config.group)
    stop = threading.Event()
    _install_signals(stop)
    _raise_fd_limit()
    gc.freeze()  # what start-up made lives as long as the process: out of every collection
    gc.set_threshold(*gc.get_threshold()[:2], _NO_FULL_COLLECTIONS)  # NOTE [Full collections when idle]
    try:
        socket_path = _prepare_socket_dir(config.endpoint, access)
        lock = EndpointLock(_lock_path(config.endpoint, socket_path))
    except OSError as e:
        log.error("cannot use the socket directory: %s", e)
        return EXIT_STARTUP
    try:
        lock.acquire()
    except (LockHeldError, OSError) as e:
        log.error("refusing to start on %s: %s", config.endpoint, e)
        return EXIT_STARTUP
    pool: Pool | None = None
    tier: DiskTier | None = None
    devices: DeviceTier | None = None
    server: Server | None = None
    try:
        ours, refused = owned_segments(lock.previous.get("segments"))
        if refused:
            log.warning("left %d recorded segment(s) that are not regular files of ours: %s", len(refused), refused)
        swept = sweep_segments(ours)
        if swept:
            log.warning("swept %d segment(s) left by a dead daemon (pid %s)", len(swept), lock.previous.get("pid"))
        if socket_path is not None and remove_stale_socket(socket_path):
            log.warning("removed a stale socket %s", socket_path)
        start = time.perf_counter()
        lock.record([])
        spill_files = open_spill_files(config.spill_dir, config.spill_size)
        pool = Pool.create(config.pool_size, config.segment_size, alignment=pool_alignment(spill_files, ALIGNMENT))
        if spill_files:
            tier = DiskTier(pool, spill_files, DiskIO(spill_files), config.spill_high_water)
        log.info(
            "pool of %s in %d slab(s) reserved and pre-faulted in %.2f s",
            format_bytes(pool.size_bytes),
            len(pool.slabs),
            time.perf_counter() - start,
        )
        if config.device_pool:
            devices = DeviceTier(open_devices(config.device_pool), config.segment_size, pool)
        after_bind = (lambda: _secure_socket(socket_path, access)) if socket_path is not None else (lambda: None)
        server = Server(config, pool, stop=stop, after_bind=after_bind, tier=tier, device=devices)
        server.bind()
        if config.metrics_port:
            server.metrics = Metrics(server)
            server.metrics.serve(config.metrics_host, config.metrics_port)
            log.info("metrics on http://%s:%d/metrics", config.metrics_host, config.metrics_port)
        log.info("serving on %s (heartbeat timeout %.1f s)", config.endpoint, config.heartbeat_timeout)
        server.serve()  # returns at once if a signal came during start-up
        log.info("shutting down")
        return 0
    except (PoolError, SpillFileError, DeviceError) as e:
        log.error("%s", e)
        return EXIT_STARTUP
    except zmq.ZMQError as e:
        log.error("cannot bind %s: %s", config.endpoint, e)
        return EXIT_STARTUP
    except (OSError, RuntimeError) as e:
        log.error("cannot start: %s", e)
        return EXIT_STARTUP
    finally:
        if server is not None:
            if server.metrics is not None:
                server.metrics.close()
            server.close()
        else:
            if tier is not None:
                tier.close()
            if devices is not None:
                devices.close()
        if pool is not None:
            pool.close()
        if socket_path is not None and server is not None:
            try:
                remove_stale_socket(socket_path)
            except UnsafePathError as e:
                log.warning("left the endpoint's path alone: %s", e)
        lock.release()
        if config.remove_on_exit:
            _remove_dir(config.remove_on_exit)
        log.info("stopped")


def _remove_dir(path: str) -> None:
    """Remove the endpoint's directory the daemon was given as its own (``--remove-on-exit``), if
    nothing but its own files was there: they are gone by now."""
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("left the directory %s: %s", path, e.strerror)
    else:
        log.info("removed the directory %s", path)


def _install_signals(stop: threading.Event) -> None:
    def handle(signum: int, frame: FrameType | None) -> None:
        if not stop.is_set():
            log.info("received %s", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args)
    except ConfigError as e:
        print(f"stormd: {e}", file=sys.stderr)
        return EXIT_CONFIG
    _setup_logging(config.log_level)
    return run(config)


if __name__ == "__main__":
    sys.exit(main())
