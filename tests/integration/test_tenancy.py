"""Memory lent per tenant, fenced (NOTE [Slabs], [Lending by descriptor], [Fencing], [Verifying the daemon]).

Each test closes one hole that /dev/shm segments left open: another uid reading a
tenant's slab, residue of a former tenant, a truncate that SIGBUSes others, a squatter
daemon, a paused client reading after its session was given away, and an embedded
daemon outliving its worker. Tests that need a second uid create a throwaway user
(root only) and remove it afterwards.
"""

from __future__ import annotations

import itertools
import mmap
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import zmq

from client import StormSystem
from client.transport import Channel
from helpers import StartDaemon, run_as, storm_segments, wait_for
from storm_service.endpoints import pid_alive
from storm_service.errors import StormError, UntrustedDaemonError
from storm_service.fdpass import request_slab
from storm_service.protocol import Op


@pytest.fixture(scope="module")
def other_user() -> Iterator[tuple[int, int, str]]:
    """``(uid, gid, group name)`` of a throwaway user, removed at the end."""
    if os.getuid() != 0:
        pytest.skip("needs root to create a second user")
    name = f"stormt{os.getpid() % 100000}"
    subprocess.run(["useradd", "--no-create-home", "--user-group", name], check=True, capture_output=True)
    try:
        out = subprocess.run(["id", "-u", name], check=True, capture_output=True, text=True).stdout
        gid = subprocess.run(["id", "-g", name], check=True, capture_output=True, text=True).stdout
        yield int(out), int(gid), name
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)


@pytest.fixture
def shared_dir(other_user: tuple[int, int, str]) -> Iterator[Path]:
    """A socket directory of root that the other user's group may enter."""
    path = Path(tempfile.mkdtemp(prefix="stormtt-", dir="/tmp"))
    os.chown(path, 0, other_user[1])
    path.chmod(0o750)
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


def _register(endpoint: str) -> tuple[Channel, zmq.Context, dict[str, Any]]:
    context = zmq.Context()
    channel = Channel(context, endpoint, itertools.count(1))
    return channel, context, channel.call(Op.REGISTER, pid=os.getpid())


def _read_fresh_extent(endpoint: str, size_bytes: int) -> Any:
    """Register, offload ``size_bytes``, map the slab it lies in, and return whether its bytes are all zero."""
    channel, context, session = _register(endpoint)
    try:
        [extent] = channel.call(Op.OFFLOAD, session["token"], sizes=[size_bytes])["extents"]
        lent = request_slab(session["fd_socket"], session["token"], extent["slab"], 5)
        fd, slab_bytes = lent.fd, lent.size_bytes
        with mmap.mmap(fd, slab_bytes) as pool:
            data = pool[extent["offset"] : extent["offset"] + size_bytes]
        os.close(fd)
        return {"slab": extent["slab"], "zeros": data == bytes(size_bytes)}
    finally:
        channel.close()
        context.term()


def test_another_uid_gets_no_fd_of_a_tenants_slab(daemon_factory: StartDaemon, other_user, shared_dir) -> None:
    uid, gid, group = other_user
    daemon = daemon_factory(endpoint=f"ipc://{shared_dir}/stormd.sock", extra_args=["--group", group])
    with StormSystem(daemon.endpoint) as system:
        system.offload(torch.full((1024,), 7.0))
        system.flush()
        [(slab_id, _)] = system.segments.items()
        token, fd_socket = system.token, system.segments[slab_id].name

        def steal() -> list[str]:
            channel, context, session = _register(daemon.endpoint)
            refusals = []
            for who in (session["token"], token):  # its own session, then the tenant's stolen token
                try:
                    request_slab(daemon.socket_path + ".fds", who, slab_id, 5)
                    refusals.append("lent")
                except StormError as e:
                    refusals.append(str(e))
            channel.close()
            context.term()
            return refusals

        own, stolen = run_as(uid, gid, steal)
    assert fd_socket == f"slab {slab_id}"
    assert own == f"FORBIDDEN: slab {slab_id}: slab {slab_id} is not lent to uid {uid}"
    assert stolen == f"FORBIDDEN: slab {slab_id}: the session belongs to uid 0, not to uid {uid}"


def test_a_fresh_extent_of_another_tenant_reads_zeros(daemon_factory: StartDaemon, other_user, shared_dir) -> None:
    uid, gid, group = other_user
    one_slab = ["--group", group, "--pool-size", "1MiB", "--segment-size", "1MiB"]
    daemon = daemon_factory(endpoint=f"ipc://{shared_dir}/stormd.sock", extra_args=one_slab)
    with StormSystem(daemon.endpoint) as system:
        handle = system.offload(torch.full((1 << 16,), -1, dtype=torch.int32))  # 256 KiB of 0xff
        system.flush()
        [(first_slab, _)] = system.segments.items()
        system.free(handle)
    wait_for(lambda: daemon.stats()["used_bytes"] + daemon.stats()["reserved_bytes"] == 0, what="the slab freed")
    fresh = run_as(uid, gid, lambda: _read_fresh_extent(daemon.endpoint, 1 << 18))
    assert fresh == {"slab": fresh["slab"], "zeros": True} and fresh["slab"] != first_slab  # renewed, not reused


def test_a_lent_slab_cannot_be_resized(shared_daemon) -> None:
    channel, context, session = _register(shared_daemon.endpoint)
    [extent] = channel.call(Op.OFFLOAD, session["token"], sizes=[4096])["extents"]
    lent = request_slab(session["fd_socket"], session["token"], extent["slab"], 5)
    fd, size_bytes = lent.fd, lent.size_bytes
    try:
        for size in (0, size_bytes * 2):
            with pytest.raises(PermissionError):
                os.ftruncate(fd, size)
        assert os.fstat(fd).st_size == size_bytes
    finally:
        os.close(fd)
        channel.call(Op.UNREGISTER, session["token"])
        channel.close()
        context.term()


def _squat(directory: Path, uid: int, gid: int) -> int:
    """A forked child that, as ``uid``, listens where a daemon's sockets would be; returns its pid."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            for name, kind in (("stormd.sock", socket.SOCK_STREAM), ("stormd.sock.fds", socket.SOCK_SEQPACKET)):
                listener = socket.socket(socket.AF_UNIX, kind)
                listener.bind(str(directory / name))
                listener.listen(8)
            signal.pause()
        finally:
            os._exit(0)
    return pid


def test_a_squatter_daemon_is_refused_naming_its_uid(other_user, shared_dir) -> None:
    uid, gid, _ = other_user
    shared_dir.chmod(0o755)
    for owner, mode, refusal in ((uid, 0o700, "belongs to uid"), (0, 0o770, "runs as uid")):
        directory = shared_dir / f"squat-{owner}"
        directory.mkdir()
        os.chown(directory, owner, gid)
        directory.chmod(mode)
        squatter = _squat(directory, uid, gid)
        try:
            wait_for(lambda d=directory: (d / "stormd.sock.fds").exists(), what="the squatter's sockets")
            with pytest.raises(UntrustedDaemonError, match=f"{refusal} {uid}"):
                StormSystem(f"ipc://{directory}/stormd.sock", timeout_s=2)
        finally:
            os.kill(squatter, signal.SIGKILL)
            os.waitpid(squatter, 0)


_PAUSED_CLIENT = textwrap.dedent(
    """
    import sys, torch
    from client import StormSystem
    from storm_service.errors import StormError
    system = StormSystem(sys.argv[1])
    handle = system.offload(torch.full((1 << 16,), 3.0))
    system.flush()
    print("ready", flush=True)
    sys.stdin.readline()
    try:
        system.fetch(handle)
        print("read")
    except StormError as e:
        print(type(e).__name__)
    """
)


def test_a_paused_client_learns_its_session_is_lost_and_reads_nothing(daemon_factory: StartDaemon) -> None:
    daemon = daemon_factory(extra_args=["--heartbeat-timeout", "1s", "--pool-size", "1MiB", "--segment-size", "1MiB"])
    paused = subprocess.Popen(
        [sys.executable, "-c", _PAUSED_CLIENT, daemon.endpoint],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert paused.stdout is not None and paused.stdin is not None
    assert paused.stdout.readline() == "ready\n"
    paused.send_signal(signal.SIGSTOP)
    try:
        wait_for(lambda: daemon.stats()["fenced_bytes"] == 1 << 18, what="the silent session fenced")
        with StormSystem(daemon.endpoint) as bystander:
            kept = [torch.randn(1 << 14) for _ in range(3)]
            for _ in range(20):  # churn: what is freed is lent again, never the fenced extent
                handles = [bystander.offload(t) for t in kept]
                fetched = [bystander.fetch(h) for h in handles]
                assert all(torch.equal(a, b) for a, b in zip(fetched, kept, strict=True))
                for h in handles:
                    bystander.free(h)
            held = bystander.offload(kept[0])
            assert daemon.stats()["fenced_bytes"] == 1 << 18
            paused.send_signal(signal.SIGCONT)
            out, _ = paused.communicate("go\n", timeout=30)
            assert out.strip() in ("UnknownSessionError", "StormUnavailableError")
            assert torch.equal(bystander.fetch(held), kept[0])
        wait_for(lambda: daemon.stats()["fenced_bytes"] == 0, what="the fenced extents freed after the exit")
    finally:
        paused.send_signal(signal.SIGCONT)
        paused.kill()
        paused.wait()


_WORKER = textwrap.dedent(
    """
    import sys, time
    from worker.embedded import EmbeddedDaemon
    daemon = EmbeddedDaemon("64MiB")
    print(daemon.pid, daemon.endpoint, flush=True)
    time.sleep(600)
    """
)


def test_a_killed_worker_takes_its_embedded_daemon_with_it() -> None:
    before = storm_segments()
    worker = subprocess.Popen([sys.executable, "-c", _WORKER], stdout=subprocess.PIPE, text=True)
    assert worker.stdout is not None
    daemon_pid, endpoint = worker.stdout.readline().split()
    socket_dir = os.path.dirname(endpoint[len("ipc://") :])
    worker.kill()
    worker.wait()
    wait_for(lambda: not pid_alive(int(daemon_pid)), what="the embedded daemon's exit")
    try:
        assert not os.path.exists(socket_dir)  # its sockets, its lock and its private directory are gone
        assert storm_segments() <= before
    finally:
        subprocess.run(["rm", "-rf", socket_dir], check=False)
