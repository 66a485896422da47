"""The daemon's files on a shared host (NOTE [Files we trust] in storm_service/lockfile.py).

Each test plants what another user of the host could plant: a symbolic link where the
runtime directory goes, a directory anyone may write, ``/tmp/storm-<uid>`` made by
another user first (NOTE [Runtime directory]), a symbolic link or a foreign file where
the lock goes, a lock record naming a file that is not the daemon's, a regular file at
the endpoint's path. The daemon refuses to start with a message naming the
path, or starts and leaves the planted file alone; it never follows, truncates or
deletes what is not its own. Liveness checks on pids count only ESRCH and ENOENT as
"dead" (``pid_alive``).
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import secrets
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import SEGMENT_PREFIX, SHM_DIR, StartDaemon, run_as
from storm_service import daemon, endpoints
from storm_service.endpoints import pid_alive, runtime_dir, runtime_dir_fallback
from storm_service.lockfile import UnsafePathError, ensure_private_dir

NOBODY = 65534
FRESH_UID = 64998
"""A uid with no files on the host: its /tmp/storm-<uid> is the tests' to make and remove."""


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


@pytest.mark.parametrize(
    ("xdg", "reason"),
    [
        (None, "XDG_RUNTIME_DIR is not set"),
        ("relative/run", "XDG_RUNTIME_DIR=relative/run is not an absolute path"),
        ("/nonexistent/run", "XDG_RUNTIME_DIR=/nonexistent/run is not a directory"),
    ],
)
def test_the_runtime_directory_falls_back_to_tmp_only_with_a_reason(
    monkeypatch: pytest.MonkeyPatch, scratch: Path, xdg: str | None, reason: str
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(scratch))
    assert (runtime_dir(), runtime_dir_fallback()) == (f"{scratch}/storm", None)
    if xdg is None:
        monkeypatch.delenv("XDG_RUNTIME_DIR")
    else:
        monkeypatch.setenv("XDG_RUNTIME_DIR", xdg)
    assert (runtime_dir(), runtime_dir_fallback()) == (f"/tmp/storm-{os.getuid()}", reason)


@pytest.fixture
def fresh_tmp_runtime_dir() -> Iterator[Path]:
    """``/tmp/storm-<FRESH_UID>``, absent at the start and removed at the end (root only)."""
    if os.getuid() != 0:
        pytest.skip("needs root to act as a uid whose /tmp/storm-<uid> the test may create and remove")
    path = Path(f"/tmp/storm-{FRESH_UID}")
    if os.path.lexists(path):
        pytest.skip(f"{path} exists already")
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


def _stormd_as_fresh_uid(*args: str, stop_when_serving: bool = False) -> tuple[int, str]:
    """``stormd.main(args)`` in a child running as FRESH_UID without XDG_RUNTIME_DIR; its exit
    status and log. With ``stop_when_serving``, the child sends itself SIGTERM once it serves."""

    def work() -> tuple[int, str]:
        os.environ.pop("XDG_RUNTIME_DIR", None)
        text = io.StringIO()
        handler = logging.StreamHandler(text)
        logging.getLogger("stormd").addHandler(handler)
        logging.getLogger("stormd").setLevel(logging.INFO)
        if stop_when_serving:
            threading.Thread(target=_terminate_when_serving, daemon=True).start()
        code = daemon.main(list(args))
        handler.flush()
        return code, text.getvalue()

    code, log = run_as(FRESH_UID, FRESH_UID, work)
    return code, log


def _terminate_when_serving() -> None:
    socket_path = f"/tmp/storm-{FRESH_UID}/stormd.sock"
    deadline = time.monotonic() + 30
    while not os.path.exists(socket_path) and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGTERM)


def test_the_tmp_runtime_directory_is_made_private_and_the_fallback_logged(fresh_tmp_runtime_dir: Path) -> None:
    code, log = _stormd_as_fresh_uid("--pool-size", "16MiB", stop_when_serving=True)

    assert code == 0, log
    said = (
        f"XDG_RUNTIME_DIR is not set: the runtime directory is {fresh_tmp_runtime_dir}, which must be uid {FRESH_UID}'s"
    )
    assert said in log
    info = fresh_tmp_runtime_dir.lstat()
    assert stat.S_ISDIR(info.st_mode) and (info.st_uid, stat.S_IMODE(info.st_mode)) == (FRESH_UID, 0o700)
    assert list(fresh_tmp_runtime_dir.iterdir()) == []  # socket, fd socket and lock removed at exit


@pytest.mark.parametrize(
    ("problem", "refusal"),
    [
        ("another user's, 700", f"cannot open /tmp/storm-{FRESH_UID}: Permission denied"),
        ("another user's, 755", f"/tmp/storm-{FRESH_UID} belongs to uid {NOBODY}, not to uid {FRESH_UID}"),
        ("writable by others", f"/tmp/storm-{FRESH_UID} has mode 777: others can write to it"),
        ("a symbolic link", f"/tmp/storm-{FRESH_UID} is a symbolic link or not a directory"),
    ],
)
def test_a_tmp_runtime_directory_made_by_someone_else_is_refused_with_the_remedy(
    fresh_tmp_runtime_dir: Path, scratch: Path, problem: str, refusal: str
) -> None:
    if problem == "a symbolic link":
        target = scratch / "target"
        target.mkdir(mode=0o700)
        os.chown(target, FRESH_UID, FRESH_UID)
        fresh_tmp_runtime_dir.symlink_to(target)
    else:
        fresh_tmp_runtime_dir.mkdir()
        owner = NOBODY if problem.startswith("another user's") else FRESH_UID
        os.chown(fresh_tmp_runtime_dir, owner, owner)
        fresh_tmp_runtime_dir.chmod({"another user's, 755": 0o755, "writable by others": 0o777}.get(problem, 0o700))

    code, log = _stormd_as_fresh_uid("--pool-size", "16MiB")

    assert code == 1
    assert f"cannot use the socket directory: {refusal}" in log
    assert "; it is the default runtime directory: point XDG_RUNTIME_DIR at a private directory, or --endpoint" in log
    assert not os.path.lexists(fresh_tmp_runtime_dir / "stormd.sock")


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
