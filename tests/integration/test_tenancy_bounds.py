"""Bounds between tenants and on what any one peer may cost the daemon.

* caps on sessions (per daemon, per tenant), extents per session and bytes per tenant
  refuse with typed errors, and everyone else keeps being served;
* a tenant (uid, from the kernel: NOTE [Peer credentials]) sees other tenants' totals in
  ``stats``, never their sessions; only the daemon's uid or root may shut it down;
* closing a session of many extents frees them a slice at a time between requests (NOTE
  [Bounded work per request]), and silence is judged only once the queue is drained
  (NOTE [Liveness after the queue]);
* replays and unfinished multipart messages cannot make the daemon hold unbounded memory
  (NOTE [Replay memory], NOTE [Buffered messages]); connections and fds are
  tests/integration/test_connections.py's.

Tests that need a second uid fork a child that drops to ``nobody`` (root only).
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from client.transport import Channel
from helpers import DaemonProcess, StartDaemon, run_as, wait_for
from storm_service import ops
from storm_service.config import build_parser, load_config
from storm_service.errors import (
    ErrorCode,
    QuotaExceededError,
    SessionLimitError,
    StormError,
    UnknownSessionError,
)
from storm_service.pool import Pool
from storm_service.protocol import Op, decode_reply, encode_request
from storm_service.server import Server
from storm_service.sessions import RECLAIM_SLICE
from storm_service.slabs import Slab

NOBODY = 65534
KiB = 1 << 10
MiB = 1 << 20


# -- helpers -------------------------------------------------------------------------------------


def _server(*argv: str, pool_bytes: int = 64 * MiB) -> Server:
    config = load_config(build_parser().parse_args(list(argv)), {})
    return Server(config, Pool([Slab(1, pool_bytes, backed=False)]))


_IDS = itertools.count(1)


def _call(server: Server, op: Op, token: str | None = None, **fields: Any) -> dict[str, Any]:
    reply = decode_reply(server.dispatch(encode_request(next(_IDS), op, token, **fields)))
    assert reply.ok, (reply.code, reply.message)
    return reply.result


def _channel(endpoint: str, context: zmq.Context | None = None) -> Channel:
    return Channel(context or zmq.Context.instance(), endpoint, _IDS)


def _anon_bytes(pid: int) -> int:
    """RssAnon of ``pid`` in bytes: the daemon's heap, not the pool it maps."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * KiB
    raise AssertionError("no RssAnon")


def _as_nobody(work: Callable[[], Any]) -> Any:
    """Run ``work`` in a forked child as uid and gid nobody; return its JSON-able result."""
    if os.getuid() != 0:
        pytest.skip("needs root to act as a second uid")
    return run_as(NOBODY, NOBODY, work)


def _in_child(endpoint: str, calls: Callable[[Channel], Any]) -> Callable[[], Any]:
    def work() -> Any:
        context = zmq.Context()
        channel = Channel(context, endpoint, itertools.count(1))
        try:
            return calls(channel)
        finally:
            channel.close()
            context.term()

    return work


def _refusal(call: Callable[[], Any]) -> str:
    """The error code and message a call raised, as one string (for a child's result)."""
    try:
        call()
    except StormError as e:
        return str(e)
    return "no error"


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A socket directory the group nogroup may enter (the daemon runs with ``--group nogroup``)."""
    path = Path(tempfile.mkdtemp(prefix="stormtb-", dir="/tmp"))
    if os.getuid() == 0:
        os.chown(path, 0, NOBODY)
    path.chmod(0o750)
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


def _two_tenant_daemon(start: StartDaemon, directory: Path, *args: str) -> DaemonProcess:
    if os.getuid() != 0:
        pytest.skip("needs root to act as a second uid")
    return start(endpoint=f"ipc://{directory}/stormd.sock", extra_args=["--group", "nogroup", *args])


# -- caps on sessions, extents and bytes ---------------------------------------------------------


def test_registers_past_the_tenant_cap_are_refused_and_others_still_served(daemon_factory: StartDaemon) -> None:
    daemon = daemon_factory(extra_args=["--max-tenant-sessions", "3"])
    channel = daemon.channel()
    tokens = [channel.call(Op.REGISTER, pid=os.getpid(), name=f"r{i}")["token"] for i in range(3)]
    with pytest.raises(SessionLimitError, match=r"has 3 sessions open, at most 3 \(--max-tenant-sessions\)"):
        channel.call(Op.REGISTER, pid=os.getpid())
    assert channel.call(Op.HEARTBEAT, tokens[0]) == {"used_bytes": 0}
    assert channel.call(Op.PING)["pid"] == daemon.proc.pid
    channel.call(Op.UNREGISTER, tokens[1])
    channel.call(Op.REGISTER, pid=os.getpid())  # a place came free
    channel.close()
    assert "refused a register from uid" in daemon.log()
    assert daemon.stats()["refused_registers"] == 1


def test_the_daemon_wide_cap_counts_every_tenant(daemon_factory: StartDaemon, shared_dir: Path) -> None:
    daemon = _two_tenant_daemon(daemon_factory, shared_dir, "--max-sessions", "3", "--max-tenant-sessions", "2")
    channel = daemon.channel()
    for _ in range(2):
        channel.call(Op.REGISTER, pid=os.getpid())
    with pytest.raises(SessionLimitError, match="--max-tenant-sessions"):
        channel.call(Op.REGISTER, pid=os.getpid())

    def register_twice(child: Channel) -> list[str]:
        first = child.call(Op.REGISTER, pid=os.getpid())["session_id"]
        return [str(first), _refusal(lambda: child.call(Op.REGISTER, pid=os.getpid()))]

    first, second = _as_nobody(_in_child(daemon.endpoint, register_twice))
    assert first.isdigit()
    assert second.startswith(ErrorCode.SESSION_LIMIT.value) and "(--max-sessions)" in second
    channel.close()


def test_a_tenant_quota_bounds_what_all_its_sessions_hold(daemon_factory: StartDaemon, shared_dir: Path) -> None:
    daemon = _two_tenant_daemon(daemon_factory, shared_dir, "--tenant-quota", "1MiB", "--quota", "1MiB")
    channel = daemon.channel()
    first, second = (channel.call(Op.REGISTER, pid=os.getpid())["token"] for _ in range(2))
    channel.call(Op.OFFLOAD, first, sizes=[768 * KiB])
    with pytest.raises(QuotaExceededError, match=r"262144 left of uid 0's 1048576-byte tenant quota"):
        channel.call(Op.OFFLOAD, second, sizes=[512 * KiB])  # within its own quota, past its tenant's

    def offload(child: Channel) -> int:
        token = child.call(Op.REGISTER, pid=os.getpid())["token"]
        return len(child.call(Op.OFFLOAD, token, sizes=[768 * KiB])["extents"])

    assert _as_nobody(_in_child(daemon.endpoint, offload)) == 1  # another tenant: a quota of its own
    channel.close()


def test_a_session_past_its_cap_on_extents_is_refused() -> None:
    server = _server("--max-extents", "8")
    token = _call(server, Op.REGISTER, pid=os.getpid())["token"]
    handles = [e["handle"] for e in _call(server, Op.OFFLOAD, token, sizes=[512] * 6)["extents"]]
    reply = decode_reply(server.dispatch(encode_request(next(_IDS), Op.OFFLOAD, token, sizes=[512] * 3)))
    assert (reply.ok, reply.code) == (False, ErrorCode.QUOTA_EXCEEDED.value)
    assert reply.message == "offload: 3 extents requested, the session holds 6 of at most 8 (--max-extents)"
    _call(server, Op.FREE, token, handles=handles[:1])
    assert len(_call(server, Op.OFFLOAD, token, sizes=[512] * 3)["extents"]) == 3


# -- what tenants see of each other, and who may stop the daemon -----------------------------


def test_stats_shows_other_tenants_totals_not_their_sessions(daemon_factory: StartDaemon, shared_dir: Path) -> None:
    daemon = _two_tenant_daemon(daemon_factory, shared_dir)
    channel = daemon.channel()
    token = channel.call(Op.REGISTER, pid=os.getpid(), name="secret-job")["token"]
    channel.call(Op.OFFLOAD, token, sizes=[4096])

    def look(child: Channel) -> list[Any]:
        tokenless = child.call(Op.STATS)
        own = child.call(Op.REGISTER, pid=os.getpid(), name="mine")["token"]
        return [tokenless, child.call(Op.STATS, own)]

    tokenless, tokened = _as_nobody(_in_child(daemon.endpoint, look))
    for stats in (tokenless, tokened):
        assert "secret-job" not in json.dumps(stats) and str(os.getpid()) not in json.dumps(stats["sessions"])
        root = next(t for t in stats["tenants"] if t["tenant"] == "uid 0")
        assert (root["sessions"], root["reserved_bytes"], root["used_bytes"]) == (1, 4096, 0)
    assert tokenless["sessions"] == [] and tokenless["live_sessions"] == 1
    assert [s["name"] for s in tokened["sessions"]] == ["mine"] and tokened["live_sessions"] == 2
    operator = channel.call(Op.STATS)  # the daemon's own uid sees every session
    assert sorted(s["name"] for s in operator["sessions"]) == ["mine", "secret-job"]
    channel.close()


def test_shutdown_from_another_uid_is_forbidden(daemon_factory: StartDaemon, shared_dir: Path) -> None:
    daemon = _two_tenant_daemon(daemon_factory, shared_dir)
    refused = _as_nobody(_in_child(daemon.endpoint, lambda child: _refusal(lambda: child.call(Op.SHUTDOWN))))
    expected = f"shutdown: only uid {os.getuid()} (the daemon's) or root may stop it, not uid {NOBODY}"
    assert refused == f"{ErrorCode.FORBIDDEN.value}: {expected}"
    channel = daemon.channel()
    assert channel.call(Op.PING)["pid"] == daemon.proc.pid
    channel.close()
    assert daemon.proc.poll() is None
    assert f"refused a shutdown from uid {NOBODY}" in daemon.log()


def test_shutdown_from_the_daemons_uid_is_accepted() -> None:
    server = _server()
    assert _call(server, Op.SHUTDOWN) == {"stopping": True}
    assert server.context.stop.is_set()


# -- bounded work in the serving loop ----------------------------------------------------------------


def test_closing_a_session_of_many_extents_frees_them_a_slice_per_request() -> None:
    server = _server()
    token = _call(server, Op.REGISTER, pid=os.getpid())["token"]
    count = 4 * RECLAIM_SLICE + 10
    for start in range(0, count, 1000):
        _call(server, Op.OFFLOAD, token, sizes=[512] * min(1000, count - start))
    pool = server.context.pool
    assert _call(server, Op.UNREGISTER, token) == {"freed_bytes": count * 512}
    steps = []
    while (stats := _call(server, Op.PING) and _call(server, Op.STATS))["reclaiming_bytes"]:
        steps.append(stats["reclaiming_bytes"])
    assert stats["extents"] == 0 and pool.used_bytes == 0
    assert len(steps) >= 2  # the unregister reply did not wait for every free
    with pytest.raises(AssertionError, match="UNKNOWN_SESSION"):
        _call(server, Op.HEARTBEAT, token)


class _QueueSocket:
    """The ROUTER as the serving loop sees it, in memory: queued messages in order, replies recorded."""

    def __init__(self) -> None:
        self._queued: deque[tuple[bytes, zmq.Frame]] = deque()
        self._body: zmq.Frame | None = None
        self.replies: list[bytes] = []

    def queue(self, identity: bytes, body: bytes) -> None:
        self._queued.append((identity, zmq.Frame(body)))

    def recv(self, flags: int = 0, copy: bool = True) -> bytes | zmq.Frame:
        if self._body is not None:
            body, self._body = self._body, None
            return body
        identity, self._body = self._queued.popleft()
        return identity

    def getsockopt(self, option: int) -> int:
        assert option == zmq.EVENTS
        return zmq.POLLIN if self._queued else 0

    def send(self, frame: bytes, flags: int = 0) -> None:
        if not flags & zmq.SNDMORE:
            self.replies.append(frame)


def test_others_are_answered_while_a_long_request_pauses_and_its_session_waits() -> None:
    """One offload of 1024 sizes, then that session's heartbeat and another peer's ping, all queued:
    the ping is answered at a pause of the offload, the heartbeat after it (NOTE [Serving around a long
    request])."""
    server = _server()
    token = _call(server, Op.REGISTER, pid=os.getpid())["token"]
    queue = _QueueSocket()
    server._socket = queue  # type: ignore[assignment]  # the transport seam: everything else is real
    queue.queue(b"busy", encode_request(1, Op.OFFLOAD, token, sizes=[512] * 1024))
    queue.queue(b"busy", encode_request(2, Op.HEARTBEAT, token))
    queue.queue(b"other", encode_request(3, Op.PING))
    server._answer(queue.recv())  # what the loop does with the first message
    replies = [decode_reply(frame) for frame in queue.replies]
    assert [(r.id, r.ok) for r in replies] == [(3, True), (1, True), (2, True)]
    assert len(replies[1].result["extents"]) == 1024


@pytest.fixture
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A Server bound on a private ipc endpoint, serving on a thread, with a 1 s heartbeat timeout."""
    directory = tempfile.mkdtemp(prefix="stormlv-", dir="/tmp")
    argv = ["--endpoint", f"ipc://{directory}/s.sock", "--heartbeat-timeout", "1s"]
    context = zmq.Context()
    server = Server(load_config(build_parser().parse_args(argv), {}), Pool([Slab(1, MiB, backed=False)]), context)
    server.bind()
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    yield server
    server.context.stop.set()
    thread.join(10)
    server.close()
    context.term()
    subprocess.run(["rm", "-rf", directory], check=False)


def test_a_long_request_does_not_make_a_bystander_look_silent(served: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """A request holds the loop for 2.5 heartbeat timeouts while a bystander's heartbeats queue."""
    endpoint = served.config.endpoint
    release = threading.Event()

    def long_fetch(context: ops.OpContext, request: Any, session: Any) -> dict[str, Any]:
        release.wait(10)
        return {"extents": []}

    monkeypatch.setitem(ops.SESSION_OPS, Op.FETCH, long_fetch)
    bystander = _channel(endpoint)
    token = bystander.call(Op.REGISTER, pid=os.getpid(), name="bystander")["token"]
    busy = _channel(endpoint)
    busy_token = busy.call(Op.REGISTER, pid=os.getpid(), name="busy")["token"]
    long_request = busy.send(Op.FETCH, busy_token, handles=[1])
    posted = []
    deadline = time.monotonic() + 2.5 * served.config.heartbeat_timeout
    while time.monotonic() < deadline:  # the loop is held: these wait in the queue
        posted.append(bystander.send(Op.HEARTBEAT, token))
        time.sleep(0.1)
    release.set()
    busy.wait(long_request, Op.FETCH, timeout_s=10)
    for request_id in posted:
        assert bystander.wait(request_id, Op.HEARTBEAT, timeout_s=10) == {"used_bytes": 0}
    assert bystander.call(Op.HEARTBEAT, token) == {"used_bytes": 0}
    assert served.context.sessions.expired_total == 0
    bystander.close()
    busy.close()


def test_a_silent_session_still_expires_once_the_queue_is_drained(served: Server) -> None:
    channel = _channel(served.config.endpoint)
    token = channel.call(Op.REGISTER, pid=os.getpid())["token"]
    wait_for(lambda: served.context.sessions.expired_total == 1, 10, "the silent session to expire")
    with pytest.raises(UnknownSessionError):
        channel.call(Op.HEARTBEAT, token)
    channel.close()


# -- memory and descriptors a peer can make the daemon hold ---------------------------------------


def test_a_replay_flood_keeps_the_daemon_heap_bounded(daemon_factory: StartDaemon) -> None:
    """Offloads of 4096 extents answer with ~170 KB each; the session remembers at most 1 MiB of replies."""
    daemon = daemon_factory(pool_size="16MiB")
    channel = daemon.channel()
    token = channel.call(Op.REGISTER, pid=os.getpid())["token"]

    def cycle() -> None:
        extents = channel.call(Op.OFFLOAD, token, timeout_s=30, sizes=[512] * 4096)["extents"]
        channel.call(Op.FREE, token, timeout_s=30, handles=[e["handle"] for e in extents])

    for _ in range(10):  # warm up the daemon's heap
        cycle()
    before = _anon_bytes(daemon.proc.pid)
    for _ in range(80):  # 13 MiB of offload replies: what the old count-bounded memory kept
        cycle()
    growth = _anon_bytes(daemon.proc.pid) - before
    assert growth < 6 * MiB, f"the daemon's heap grew by {growth / MiB:.1f} MiB"
    channel.close()


def _zmtp_peer(path: str) -> socket.socket:
    """A raw connection that speaks just enough ZMTP 3.0 (NULL, as a DEALER) to send frames."""
    peer = socket.socket(socket.AF_UNIX)
    peer.settimeout(10)
    peer.connect(path)
    peer.sendall(b"\xff" + b"\x00" * 8 + b"\x7f" + bytes([3, 0]) + b"NULL".ljust(20, b"\x00") + b"\x00" * 32)
    ready = b"\x05READY" + b"\x0bSocket-Type" + struct.pack(">I", 6) + b"DEALER"
    peer.sendall(bytes([0x04, len(ready)]) + ready)
    _read(peer, 64)  # the daemon's greeting
    flags, size = _read(peer, 2)
    assert flags == 0x04 and b"READY" in _read(peer, size), "the daemon did not complete the handshake"
    return peer


def _read(peer: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = peer.recv(count - len(data))
        assert chunk, "the daemon closed the connection during the handshake"
        data += chunk
    return data


def _send_until_dropped(peer: socket.socket, chunk: bytes, limit_bytes: int) -> int:
    """Send ``chunk`` until the daemon closes the connection or ``limit_bytes`` went; bytes sent."""
    sent = 0
    peer.settimeout(10)
    try:
        while sent < limit_bytes:
            peer.sendall(chunk)
            sent += len(chunk)
    except OSError:  # EPIPE or ECONNRESET: the daemon dropped us
        return sent
    return sent


def test_an_unfinished_multipart_message_cannot_grow_the_daemon_heap(daemon_factory: StartDaemon) -> None:
    daemon = daemon_factory(extra_args=["--max-buffered", "32MiB"])
    before = _anon_bytes(daemon.proc.pid)
    frame = bytes([0x01, 0xFF]) + b"x" * 255  # flags MORE, 255 bytes: a message that never ends
    peer = _zmtp_peer(daemon.socket_path)
    sent = _send_until_dropped(peer, frame * 4096, 512 * MiB)
    peer.close()
    assert sent < 512 * MiB, "the daemon kept reading a message that never ends"
    wait_for(lambda: _anon_bytes(daemon.proc.pid) < before + 32 * MiB, 10, "the buffered frames to be freed")
    stats = daemon.stats()  # a new connection is served
    assert stats["connection_resets"] >= 1
    assert "dropped every connection" in daemon.log()


def test_an_oversized_frame_drops_only_its_sender(daemon_factory: StartDaemon) -> None:
    daemon = daemon_factory()
    channel = daemon.channel()
    token = channel.call(Op.REGISTER, pid=os.getpid())["token"]
    peer = _zmtp_peer(daemon.socket_path)
    header = bytes([0x02]) + struct.pack(">Q", 1 << 31)  # LONG frame of 2 GiB, past MAXMSGSIZE
    sent = _send_until_dropped(peer, header + b"x" * MiB, 256 * MiB)
    peer.close()
    assert sent < 256 * MiB
    assert channel.call(Op.HEARTBEAT, token) == {"used_bytes": 0}  # the others keep their connections
    assert daemon.stats()["connection_resets"] == 0
    channel.close()


# -- metrics -------------------------------------------------------------------------------------------


def test_metrics_bind_loopback_by_default_and_in_every_manifest() -> None:
    """Per-session metrics name pids, ranks and job names: off the host's loopback only if an operator says so."""
    assert load_config(build_parser().parse_args([]), {}).metrics_host == "127.0.0.1"
    docker = Path(__file__).resolve().parents[2] / "docker"
    manifests = sorted([*docker.glob("*.yml"), *docker.glob("*.yaml")])
    assert manifests
    for manifest in manifests:
        words = manifest.read_text().replace('"', " ").replace(",", " ").replace("=", " ").split()
        hosts = [words[i + 1] for i, word in enumerate(words[:-1]) if word == "--metrics-host"]
        hosts += [words[i + 1] for i, word in enumerate(words[:-1]) if word.rstrip(":") == "STORM_METRICS_HOST"]
        assert set(hosts) <= {"127.0.0.1", "localhost"}, f"{manifest.name} binds metrics to {hosts}"
