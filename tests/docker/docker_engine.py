"""A Docker engine for the compose tests: use a running one, or start (and stop) our own.

What this machine and CI have (see docker/ and the project's notes on Docker): Debian's
``docker.io`` (dockerd 20.10) and ``docker-compose`` 1.29 (v1, no ``docker compose``
plugin, no buildx), no systemd, and no registry to pull images from. So:

* if ``docker info`` answers already, that engine is used as it is;
* else, as root and with ``CI=true`` or ``STORM_DOCKER_TESTS=1``, the packages are
  installed with apt-get where missing and a private ``dockerd`` is started with its own
  data root, exec root and socket under a fresh directory in /tmp; it is stopped by its
  pid and the directory removed at the end of the session;
* otherwise the tests are skipped, saying why.

The base image is built without a registry: ``debootstrap`` of Debian bookworm with
python3, imported with ``docker import`` as ``localbase:bookworm``. The root filesystem
is kept as a tarball in ``STORM_DOCKER_CACHE`` (default /var/tmp/storm-docker-cache), so
later sessions import it in seconds instead of bootstrapping again. ``STORM_DOCKER_BASE``
names another base image to use instead (``python:3.11-slim`` where pulls work).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

LOCAL_BASE = "localbase:bookworm"
APT_PACKAGES = ("docker.io", "docker-compose", "debootstrap")
ENGINE_START_TIMEOUT_S = 90.0
ENGINE_STOP_TIMEOUT_S = 30.0
DEFAULT_MIRROR = "http://deb.debian.org/debian"


class EngineUnavailable(Exception):
    """No engine can be had here; the message says why (it becomes the skip reason)."""


def log(message: str) -> None:
    print(f"[docker-test] {message}", file=sys.stderr, flush=True)


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _run(
    args: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    timeout: float,
    check: bool = True,
    cwd: str | os.PathLike[str] | None = None,
    stdin: int | None = subprocess.DEVNULL,
) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing its output; raise with the output's tail when ``check`` fails."""
    proc = subprocess.run(
        list(args),
        env=env,
        cwd=cwd,
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited with {proc.returncode}:\n{tail(proc.stdout)}")
    return proc


@dataclass
class Engine:
    """A reachable Docker engine: the environment to run ``docker``/``docker-compose`` in."""

    env: dict[str, str]
    workdir: Path | None = None
    """Our own engine's directory (data root, exec root, socket, log); None for one we found."""
    proc: subprocess.Popen[bytes] | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def started_here(self) -> bool:
        return self.proc is not None

    def docker(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run(["docker", *args], env=self.env, timeout=timeout, check=check)

    def compose(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return _run(["docker-compose", *args], env={**self.env, **(env or {})}, timeout=timeout, check=check)

    def log_tail(self, lines: int = 40) -> str:
        if self.workdir is None:
            return ""
        try:
            return tail((self.workdir / "dockerd.log").read_text(errors="replace"), lines)
        except OSError:
            return ""

    def image_exists(self, name: str) -> bool:
        return self.docker("image", "inspect", name, check=False, timeout=60).returncode == 0

    # ---- base image -------------------------------------------------------------------

    def base_image(self) -> str:
        """The image the Dockerfile builds FROM; built with debootstrap where needed."""
        override = os.environ.get("STORM_DOCKER_BASE")
        if override:
            return override
        if self.image_exists(LOCAL_BASE):
            return LOCAL_BASE
        start = time.monotonic()
        cache = Path(os.environ.get("STORM_DOCKER_CACHE", "/var/tmp/storm-docker-cache"))
        tarball = cache / "localbase-bookworm.tar"
        if not tarball.exists():
            self._debootstrap(tarball)
        log(f"importing {tarball} as {LOCAL_BASE}")
        self.docker("import", str(tarball), LOCAL_BASE, timeout=600)
        self.timings["base image"] = time.monotonic() - start
        return LOCAL_BASE

    def _debootstrap(self, tarball: Path) -> None:
        if os.geteuid() != 0:
            raise EngineUnavailable(
                f"no base image {LOCAL_BASE} and debootstrap needs root (or set STORM_DOCKER_BASE to an image)"
            )
        if shutil.which("debootstrap") is None:
            ensure_packages()
        tarball.parent.mkdir(parents=True, exist_ok=True)
        mirror = _debian_mirror()
        with tempfile.TemporaryDirectory(prefix="storm-rootfs-", dir="/var/tmp") as tmp:
            rootfs = os.path.join(tmp, "rootfs")
            log(f"debootstrap bookworm from {mirror} (about a minute)")
            _run(
                [
                    "debootstrap",
                    "--variant=minbase",
                    "--include=python3,python3-pip,python3-venv,python-is-python3",
                    "bookworm",
                    rootfs,
                    mirror,
                ],
                timeout=900,
            )
            for marker in glob.glob(os.path.join(rootfs, "usr/lib/python3*/EXTERNALLY-MANAGED")):
                os.unlink(marker)
            partial = tarball.with_suffix(".tar.partial")
            _run(["tar", "-C", rootfs, "-cf", str(partial), "."], timeout=600)
            os.replace(partial, tarball)

    # ---- teardown ---------------------------------------------------------------------

    def stop(self) -> None:
        """Stop our own engine (by its pid) and remove its directory; a found engine is left alone."""
        if self.proc is None or self.workdir is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=ENGINE_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log(f"dockerd (pid {self.proc.pid}) did not stop in {ENGINE_STOP_TIMEOUT_S:.0f} s: killing it")
                self.proc.kill()
                self.proc.wait(timeout=30)
        # dockerd unmounts its overlays on a clean stop; after a kill some may linger.
        root = str(self.workdir)
        with open("/proc/mounts") as f:
            mounts = [line.split()[1] for line in f if line.split()[1].startswith(root + "/")]
        for mount in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", mount], check=False, capture_output=True)
        shutil.rmtree(self.workdir, ignore_errors=True)


def _debian_mirror() -> str:
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    with contextlib.suppress(OSError):
        for line in sources.read_text().splitlines():
            if line.startswith("URIs:"):
                return line.split()[1]
    return DEFAULT_MIRROR


def _docker_env(host: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(DOCKER_BUILDKIT="0", COMPOSE_DOCKER_CLI_BUILD="0", COMPOSE_INTERACTIVE_NO_CLI="1")
    if host is not None:
        env["DOCKER_HOST"] = host
    return env


def _info_ok(env: dict[str, str]) -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return _run(["docker", "info"], env=env, timeout=30, check=False).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def may_provision() -> bool:
    """Whether this run may install packages and start an engine: root, and CI or opted in."""
    return os.geteuid() == 0 and (_truthy("CI") or _truthy("STORM_DOCKER_TESTS"))


def ensure_packages() -> None:
    """apt-get install docker.io docker-compose debootstrap where any is missing."""
    missing = [cmd for cmd in ("dockerd", "docker-compose", "debootstrap", "docker") if shutil.which(cmd) is None]
    if not missing:
        return
    if not may_provision():
        raise EngineUnavailable(f"{', '.join(missing)} not installed, and not root with CI=true to install them")
    log(f"installing {' '.join(APT_PACKAGES)} ({', '.join(missing)} missing)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        _run(["apt-get", "update", "-qq"], env=env, timeout=600)
        _run(["apt-get", "install", "-y", "-qq", *APT_PACKAGES], env=env, timeout=900)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        raise EngineUnavailable(f"apt-get could not install {' '.join(APT_PACKAGES)}: {e}") from e


def acquire_engine() -> Engine:
    """An engine to test with, or EngineUnavailable saying why there is none."""
    timings: dict[str, float] = {}
    env = _docker_env()
    if _info_ok(env):
        if shutil.which("docker-compose") is None:
            if not may_provision():
                raise EngineUnavailable("a Docker engine runs, but docker-compose (v1) is not installed")
            ensure_packages()
        log("using the running Docker engine")
        return Engine(env=env, timings=timings)
    if os.environ.get("DOCKER_HOST"):
        raise EngineUnavailable(f"DOCKER_HOST={os.environ['DOCKER_HOST']} does not answer `docker info`")
    if not may_provision():
        why = "not root" if os.geteuid() != 0 else "neither CI=true nor STORM_DOCKER_TESTS=1"
        raise EngineUnavailable(f"nothing answers `docker info`, and this run may not start an engine ({why})")
    start = time.monotonic()
    ensure_packages()
    timings["install"] = time.monotonic() - start
    dockerd = shutil.which("dockerd") or "/usr/sbin/dockerd"
    if not os.path.exists(dockerd):
        raise EngineUnavailable("dockerd missing even after installing docker.io")

    start = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="storm-dockerd-", dir="/tmp"))
    host = f"unix://{workdir}/docker.sock"
    log_path = workdir / "dockerd.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [
                dockerd,
                "--data-root",
                str(workdir / "data"),
                "--exec-root",
                str(workdir / "exec"),
                "--pidfile",
                str(workdir / "dockerd.pid"),
                "--host",
                host,
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    engine = Engine(env=_docker_env(host), workdir=workdir, proc=proc, timings=timings)
    deadline = time.monotonic() + ENGINE_START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            reason = f"dockerd exited with {proc.returncode} at start; its log ends:\n{engine.log_tail()}"
            engine.stop()
            raise EngineUnavailable(reason)
        if _info_ok(engine.env):
            break
        if time.monotonic() > deadline:
            reason = f"dockerd gave no `docker info` within {ENGINE_START_TIMEOUT_S:.0f} s; its log ends:\n"
            reason += engine.log_tail()
            engine.stop()
            raise EngineUnavailable(reason)
        time.sleep(0.5)
    timings["engine start"] = time.monotonic() - start
    log(f"started dockerd pid {proc.pid} on {host} in {timings['engine start']:.1f} s")
    return engine
