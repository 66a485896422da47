"""Who may reach the daemon: tcp only with CURVE keys, and --group to share with one group."""

from __future__ import annotations

import grp
import os
import socket
import stat
import subprocess
import sys

import pytest
import torch

from client import StormSystem, StormUnavailableError
from client.ctl import main as stormctl
from client.transport import connect
from storm_service.protocol import Op


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_tcp_endpoint_without_curve_keys_is_refused_at_start():
    result = subprocess.run(
        [sys.executable, "-m", "storm_service.daemon", "--endpoint", f"tcp://127.0.0.1:{_free_port()}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "refused unless CURVE keys are configured" in result.stderr


@pytest.fixture
def curve_daemon(daemon_factory, tmp_path, monkeypatch):
    keys = tmp_path / "keys"
    assert stormctl(["keygen", str(keys)]) == 0
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    monkeypatch.setenv("STORM_CURVE_SERVER_KEY", str(keys / "server.key"))
    monkeypatch.setenv("STORM_CURVE_CLIENT_KEY", str(keys / "client.key_secret"))
    daemon = daemon_factory(endpoint=endpoint, extra_args=["--curve-dir", str(keys)])
    return daemon, keys


def test_tcp_with_curve_serves_clients_holding_an_authorized_key(curve_daemon):
    daemon, _ = curve_daemon
    with StormSystem(daemon.endpoint) as system:
        tensor = torch.randn(64, 64)
        handle = system.offload(tensor)
        assert torch.equal(system.fetch(handle), tensor)


def test_tcp_with_curve_gives_nothing_to_a_client_with_another_key(curve_daemon, tmp_path, monkeypatch):
    daemon, _ = curve_daemon
    assert stormctl(["keygen", str(tmp_path / "other")]) == 0
    monkeypatch.setenv("STORM_CURVE_CLIENT_KEY", str(tmp_path / "other" / "client.key_secret"))
    with pytest.raises(StormUnavailableError):  # the handshake never completes: any timeout runs out
        StormSystem(daemon.endpoint, timeout_s=0.5)
    monkeypatch.delenv("STORM_CURVE_SERVER_KEY")
    monkeypatch.delenv("STORM_CURVE_CLIENT_KEY")
    with connect(daemon.endpoint) as channel, pytest.raises(StormUnavailableError):
        channel.call(Op.PING, timeout_s=0.5)  # no CURVE at all: the handshake never completes
    assert daemon.proc.poll() is None


@pytest.mark.skipif(os.getuid() != 0, reason="handing files to a group needs a group this user belongs to (root)")
def test_group_option_opens_the_sockets_to_that_group(daemon_factory, tmp_path):
    group = grp.getgrgid(os.getgid()).gr_name
    endpoint = f"ipc://{tmp_path}/run/stormd.sock"  # a directory the daemon creates
    daemon = daemon_factory(endpoint=endpoint, extra_args=["--group", group])
    socket_dir = os.path.dirname(daemon.socket_path)
    assert stat.S_IMODE(os.stat(socket_dir).st_mode) == 0o750
    assert stat.S_IMODE(os.stat(daemon.socket_path).st_mode) == 0o660
    info = os.stat(daemon.socket_path + ".fds")
    assert stat.S_IMODE(info.st_mode) == 0o660 and info.st_gid == os.getgid()
    with StormSystem(daemon.endpoint) as system:
        handle = system.offload(torch.ones(16))
        assert torch.equal(system.fetch(handle), torch.ones(16))
