"""What a killed process leaves behind: nothing, or only what the next daemon sweeps.

A worker killed with SIGKILL takes its embedded daemon and that daemon's private
directory with it (test_tenancy.py); these tests cover the other side. A daemon killed
with SIGKILL leaves its socket, its fd socket and its lock file, which the next daemon on
the endpoint takes over and removes at its own exit (its slabs were memfds: nothing in
/dev/shm); an embedded daemon's directory is then removed by its worker. A daemon
removes its directory (``--remove-on-exit``) only once nothing but its own files was
there.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from helpers import StartDaemon, storm_segments, wait_for
from storm_service.config import ConfigError, build_parser, load_config
from storm_service.endpoints import pid_alive
from storm_service.protocol import Op
from worker.embedded import EmbeddedDaemon


def test_a_killed_daemon_leaves_only_what_the_next_one_sweeps(daemon_factory: StartDaemon) -> None:
    before = storm_segments()
    first = daemon_factory()
    channel = first.channel()
    token = channel.call(Op.REGISTER, pid=os.getpid())["token"]
    channel.call(Op.OFFLOAD, token, sizes=[4096])
    channel.close()
    first.kill()
    assert sorted(os.listdir(first.socket_dir)) == ["stormd.log", "stormd.sock", "stormd.sock.fds", "stormd.sock.lock"]
    assert storm_segments() <= before

    second = daemon_factory(endpoint=first.endpoint)
    assert "removed a stale socket" in second.log()
    assert second.stop() == 0
    assert os.listdir(first.socket_dir) == ["stormd.log"]  # the test's log, nothing of either daemon


def test_a_killed_embedded_daemon_leaves_its_directory_to_the_worker() -> None:
    daemon = EmbeddedDaemon("16MiB")
    directory = os.path.dirname(daemon.endpoint[len("ipc://") :])
    os.kill(daemon.pid, signal.SIGKILL)
    wait_for(lambda: not daemon.alive, what="the embedded daemon's death")
    assert os.path.exists(os.path.join(directory, "stormd.sock.lock"))
    assert daemon.stop() == -signal.SIGKILL
    assert not os.path.exists(directory)


def test_a_stopped_embedded_daemon_removes_its_directory_itself() -> None:
    daemon = EmbeddedDaemon("16MiB")
    directory = os.path.dirname(daemon.endpoint[len("ipc://") :])
    pid = daemon.pid
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not daemon.alive, what="the embedded daemon's exit")
    assert not os.path.exists(directory)
    assert "removed the directory" in daemon.log_tail()
    assert daemon.stop() == 0
    assert not pid_alive(pid)


def test_remove_on_exit_leaves_a_directory_that_holds_other_files(daemon_factory: StartDaemon) -> None:
    probe = daemon_factory()  # for a directory of its own, with the test's stormd.log in it
    directory = probe.socket_dir
    assert probe.stop() == 0
    daemon = daemon_factory(endpoint=probe.endpoint, extra_args=["--remove-on-exit", directory])
    assert daemon.stop() == 0
    assert os.listdir(directory) == ["stormd.log"]
    assert f"left the directory {directory}: Directory not empty" in daemon.log()


def test_remove_on_exit_must_name_the_endpoints_directory(tmp_path: Path) -> None:
    endpoint = f"ipc://{tmp_path}/stormd.sock"
    config = load_config(build_parser().parse_args(["--endpoint", endpoint, "--remove-on-exit", str(tmp_path)]), {})
    assert config.remove_on_exit == str(tmp_path)
    for wrong in (str(tmp_path.parent), "/"):
        with pytest.raises(ConfigError, match=f"remove_on_exit '{wrong}' is not the directory of endpoint"):
            load_config(build_parser().parse_args(["--endpoint", endpoint, "--remove-on-exit", wrong]), {})
