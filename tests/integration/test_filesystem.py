"""The daemon's files on a shared host (NOTE [Files we trust] in storm_service/lockfile.py).

Each test plants what another user of the host could plant: a symbolic link where the
runtime directory goes, a directory anyone may write, a symbolic link or a foreign file
where the lock goes, a lock record naming a file that is not the daemon's, a regular
file at the endpoint's path. The daemon refuses to start with a message naming the
path, or starts and leaves the planted file alone; it never follows, truncates or
deletes what is not its own. Liveness checks on pids count only ESRCH and ENOENT as
"dead" (``pid_alive``).
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import SEGMENT_PREFIX, SHM_DIR, StartDaemon
from storm_service import endpoints
from storm_service.endpoints import pid_alive
from storm_service.lockfile import UnsafePathError, ensure_private_dir

NOBODY = 65534


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A private directory under /tmp (ipc paths must stay short)."""
    path = Path(tempfile.mkdtemp(prefix="stormfs-", dir="/tmp"))
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


def _stormd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a daemon expected to refuse to start, to completion."""
    command = [sys.executable, "-m", "storm_service.daemon", "--pool-size", "1MiB", *args]
    environ = {k: v for k, v in os.environ.items() if not k.startswith("STORM_")} | (env or {})
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False, env=environ)


def _needs_root() -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to make a file of another user")


# -- the runtime directory ---------------------------------------------------------------


def test_a_symlinked_runtime_directory_is_refused(scratch: Path) -> None:
    real = scratch / "elsewhere"
    real.mkdir(mode=0o700)
    (scratch / "storm").symlink_to(real)

    result = _stormd(env={"XDG_RUNTIME_DIR": str(scratch)})

    assert result.returncode == 1
    assert f"{scratch / 'storm'} is a symbolic link" in result.stderr
    assert list(real.iterdir()) == []  # nothing was created through the link


def test_a_runtime_directory_others_can_write_is_refused(scratch: Path) -> None:
    runtime = scratch / "storm"
    runtime.mkdir()
    runtime.chmod(0o777)

    result = _stormd(env={"XDG_RUNTIME_DIR": str(scratch)})

    assert result.returncode == 1
    assert "others can write to it" in result.stderr
    assert list(runtime.iterdir()) == []


def test_ensure_private_dir_creates_and_narrows_its_own_directory(scratch: Path) -> None:
    fresh = scratch / "fresh"
    ensure_private_dir(str(fresh))
    assert (fresh.stat().st_mode & 0o777, fresh.stat().st_uid) == (0o700, os.getuid())
    fresh.chmod(0o755)  # readable by others, writable by none: ours to narrow
    ensure_private_dir(str(fresh))
    assert fresh.stat().st_mode & 0o777 == 0o700
    (scratch / "file").write_text("x")
    with pytest.raises(UnsafePathError, match="not a directory"):
        ensure_private_dir(str(scratch / "file"))


def test_a_runtime_directory_of_another_user_is_refused(scratch: Path) -> None:
    _needs_root()
    runtime = scratch / "storm"
    runtime.mkdir(mode=0o700)
    os.chown(runtime, NOBODY, NOBODY)
    with pytest.raises(UnsafePathError, match=f"belongs to uid {NOBODY}"):
        ensure_private_dir(str(runtime))


# -- the lock file -------------------------------------------------------------------------


def test_a_planted_symlink_lock_is_refused_and_its_target_untouched(scratch: Path) -> None:
    target = scratch / "precious.txt"
    target.write_text("keep me")
    (scratch / "stormd.sock.lock").symlink_to(target)

    result = _stormd("--endpoint", f"ipc://{scratch}/stormd.sock")

    assert result.returncode == 1
    assert "is a symbolic link" in result.stderr
    assert target.read_text() == "keep me"
    assert not (scratch / "stormd.sock").exists()


@pytest.mark.parametrize("problem", ["mode", "owner"])
def test_a_lock_file_that_is_not_private_and_ours_is_refused(scratch: Path, problem: str) -> None:
    lock = scratch / "stormd.sock.lock"
    lock.write_text(json.dumps({"pid": 1, "segments": []}))
    if problem == "mode":
        lock.chmod(0o644)
    else:
        _needs_root()
        lock.chmod(0o600)
        os.chown(lock, NOBODY, NOBODY)

    result = _stormd("--endpoint", f"ipc://{scratch}/stormd.sock")

    assert result.returncode == 1
    assert f"lock file {lock}" in result.stderr
    assert ("has mode 644" if problem == "mode" else f"belongs to uid {NOBODY}") in result.stderr
    assert json.loads(lock.read_text()) == {"pid": 1, "segments": []}


@pytest.mark.parametrize("kind", ["symlink", "other-user"])
def test_a_lock_record_naming_a_file_not_ours_leaves_it_alone(
    scratch: Path, daemon_factory: StartDaemon, kind: str
) -> None:
    name = f"{SEGMENT_PREFIX}{secrets.token_hex(12)}"
    path = Path(SHM_DIR) / name
    bait = scratch / "bait"
    bait.write_text("not a segment")
    if kind == "symlink":
        path.symlink_to(bait)
    else:
        _needs_root()
        path.write_text("another user's segment")
        os.chown(path, NOBODY, NOBODY)
    lock = scratch / "stormd.sock.lock"
    lock.write_text(json.dumps({"pid": 999_999_999, "segments": [name]}))
    lock.chmod(0o600)
    try:
        daemon = daemon_factory(endpoint=f"ipc://{scratch}/stormd.sock")
        assert os.path.lexists(path)
        assert "1 recorded segment(s) that are not regular files of ours" in daemon.log()
        assert bait.read_text() == "not a segment"
    finally:
        path.unlink(missing_ok=True)


# -- the endpoint's path -----------------------------------------------------------------------


def test_a_regular_file_at_the_endpoint_path_is_refused_not_deleted(scratch: Path) -> None:
    results = scratch / "results.csv"
    results.write_text("epoch,loss\n1,0.5\n")

    result = _stormd("--endpoint", f"ipc://{results}")

    assert result.returncode == 1
    assert f"endpoint {results} exists and is not a socket" in result.stderr
    assert results.read_text() == "epoch,loss\n1,0.5\n"
    assert not (scratch / "results.csv.lock").exists()  # the lock it took is released


# -- pid checks -------------------------------------------------------------------------------


def _unused_pid() -> int:
    """A pid with no process now (a reaped child's)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_another_users_hidden_pid_is_alive(monkeypatch: pytest.MonkeyPatch) -> None:
    """kill(pid, 0) says EPERM and /proc hides the pid (hidepid): the process lives."""
    pid = _unused_pid()

    def eperm(target: int, signal: int) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "kill", eperm)
    assert not os.path.exists(f"/proc/{pid}")
    assert pid_alive(pid)


@pytest.mark.parametrize("code", [errno.EACCES, errno.EMFILE])
def test_a_pid_whose_proc_entry_cannot_be_read_is_alive(monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    def refuse(path: str, mode: str = "r") -> None:
        raise OSError(code, os.strerror(code), path)

    monkeypatch.setattr(endpoints, "open", refuse, raising=False)
    assert pid_alive(os.getpid())


def test_a_gone_or_zombie_pid_is_dead() -> None:
    assert not pid_alive(_unused_pid())
    zombie = subprocess.Popen(["true"])
    try:
        os.waitid(os.P_PID, zombie.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped
        assert not pid_alive(zombie.pid)
    finally:
        zombie.wait()
    assert pid_alive(os.getpid())
