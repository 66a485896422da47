"""Every op through ``Server.dispatch`` (bytes in, bytes out), in process.

The server is built over a pool of slabs without memory (the allocators deal in offsets
only) and never binds a socket, so no daemon is forked: each test encodes a request as
a client does, dispatches it, and asserts on the decoded reply and on the daemon's state.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

import msgpack
import pytest

from helpers import BAD_FRAMES
from storm_service import ops, protocol
from storm_service.config import build_parser, load_config
from storm_service.errors import (
    ErrorCode,
    ForbiddenError,
    NotCommittedError,
    PoolFullError,
    QuotaExceededError,
    UnknownHandleError,
    UnknownSessionError,
    error_for_code,
)
from storm_service.pool import ALIGNMENT, Pool
from storm_service.protocol import (
    MAX_NONCE_LEN,
    MAX_SIZE_BYTES,
    MIN_NONCE_LEN,
    Op,
    Reply,
    decode_reply,
    encode_request,
)
from storm_service.server import Server
from storm_service.slabs import Slab

SEGMENT_BYTES = 64 << 10
NONCE = "n" * MIN_NONCE_LEN
_REQUEST_IDS = itertools.count(1)


def _server(segments: int = 1, segment_bytes: int = SEGMENT_BYTES) -> Server:
    pool = Pool([Slab(i + 1, segment_bytes, backed=False) for i in range(segments)])
    return Server(load_config(build_parser().parse_args([]), {}), pool)


def _send(server: Server, op: Op, token: str | None = None, request_id: int | None = None, **fields: Any) -> Reply:
    request_id = next(_REQUEST_IDS) if request_id is None else request_id
    reply = decode_reply(server.dispatch(encode_request(request_id, op, token, **fields)))
    assert reply.id == request_id
    return reply


def _ok(server: Server, op: Op, token: str | None = None, **fields: Any) -> dict[str, Any]:
    reply = _send(server, op, token, **fields)
    assert reply.ok, (reply.code, reply.message)
    return reply.result


def _refused(server: Server, code: ErrorCode, op: Op, token: str | None = None, **fields: Any) -> str:
    reply = _send(server, op, token, **fields)
    assert not reply.ok and reply.code == code.value, (reply.code, reply.message)
    return reply.message


def _register(server: Server, **fields: Any) -> dict[str, Any]:
    return _ok(server, Op.REGISTER, pid=fields.pop("pid", os.getpid()), **fields)


def _held(server: Server) -> tuple[int, int, int]:
    """What the pool and the session table hold: allocated bytes, extents, reserved bytes."""
    sessions = server.context.sessions
    return server.context.pool.used_bytes, len(sessions.extents), sessions.reserved_bytes


def test_every_op_has_a_handler_in_the_table_its_token_rule_picks() -> None:
    assert ops.SESSIONLESS_OPS.keys() == protocol.SESSIONLESS_OPS
    assert ops.SESSION_OPS.keys() == (set(Op) - protocol.SESSIONLESS_OPS) | {Op.STATS}
    for table in (ops.SESSIONLESS_OPS, ops.SESSION_OPS):
        assert all(handler.__name__.startswith("handle_") for handler in table.values())


def test_ping_answers_with_the_daemon_pid() -> None:
    assert _ok(_server(), Op.PING)["pid"] == os.getpid()


def test_register_grants_a_session_and_describes_the_pool() -> None:
    server = _server(segments=2)
    result = _register(server, name="rank0", quota_bytes=4096)
    assert result["quota_bytes"] == 4096 and result["alignment"] == ALIGNMENT
    assert "segments" not in result and _ok(server, Op.STATS)["slabs"] == 2
    assert server.context.sessions.by_token(result["token"]).id == result["session_id"]


def test_register_retried_with_its_nonce_answers_for_the_same_session() -> None:
    server = _server()
    first = _register(server, name="rank0", nonce=NONCE)
    again = _register(server, name="rank0", nonce=NONCE)
    assert again == first
    assert _ok(server, Op.STATS)["live_sessions"] == 1


def test_register_without_a_nonce_opens_a_session_each_time() -> None:
    server = _server()
    assert _register(server)["session_id"] != _register(server)["session_id"]
    assert _ok(server, Op.STATS)["live_sessions"] == 2


def test_a_nonce_from_another_pid_opens_its_own_session() -> None:
    server = _server()
    parent = _register(server, pid=100, nonce=NONCE)
    child = _register(server, pid=101, nonce=NONCE)  # a forked child that inherited the nonce
    assert parent["session_id"] != child["session_id"]


def test_a_nonce_is_forgotten_when_its_session_goes() -> None:
    server = _server()
    first = _register(server, nonce=NONCE)
    _ok(server, Op.UNREGISTER, first["token"])
    second = _register(server, nonce=NONCE)
    assert second["session_id"] != first["session_id"]
    _ok(server, Op.UNREGISTER, second["token"])
    assert server.context.sessions.by_nonce(os.getpid(), NONCE) is None


@pytest.mark.parametrize("nonce", ["n" * (MIN_NONCE_LEN - 1), "n" * (MAX_NONCE_LEN + 1), 12345678901234567])
def test_a_nonce_out_of_bounds_is_a_bad_request(nonce: Any) -> None:
    server = _server()
    message = _refused(server, ErrorCode.BAD_REQUEST, Op.REGISTER, pid=1, nonce=nonce)
    assert "'nonce'" in message
    assert server.context.sessions.sessions == {}


def test_offload_within_quota_places_aligned_writing_extents() -> None:
    server = _server()
    token = _register(server, quota_bytes=2 * ALIGNMENT)["token"]
    extents = _ok(server, Op.OFFLOAD, token, sizes=[1, ALIGNMENT], layer_id=3)["extents"]
    assert [e["size_bytes"] for e in extents] == [1, ALIGNMENT]
    assert all(e["offset"] % ALIGNMENT == 0 for e in extents)
    assert _held(server) == (2 * ALIGNMENT, 2, 2 * ALIGNMENT)


def test_offload_over_quota_counts_rounded_sizes_and_holds_nothing() -> None:
    server = _server()
    token = _register(server, quota_bytes=2 * ALIGNMENT)["token"]
    _ok(server, Op.OFFLOAD, token, sizes=[1])
    message = _refused(server, ErrorCode.QUOTA_EXCEEDED, Op.OFFLOAD, token, sizes=[1, 1])  # 1024 rounded, 512 left
    assert message == f"offload: {2 * ALIGNMENT} bytes requested, {ALIGNMENT} left of a {2 * ALIGNMENT}-byte quota"
    assert _held(server) == (ALIGNMENT, 1, ALIGNMENT)


def test_offload_that_does_not_fit_returns_what_it_placed() -> None:
    server = _server(segments=2, segment_bytes=4096)
    token = _register(server)["token"]  # quota: the whole pool, so the pool is what refuses
    _refused(server, ErrorCode.POOL_FULL, Op.OFFLOAD, token, sizes=[4096, 4096, 1])
    assert _held(server) == (0, 0, 0)
    assert server.context.sessions.by_token(token).held_bytes == 0
    assert len(_ok(server, Op.OFFLOAD, token, sizes=[4096, 4096])["extents"]) == 2


def test_a_replayed_offload_gets_the_same_reply_without_allocating_again() -> None:
    server = _server()
    token = _register(server)["token"]
    frame = encode_request(next(_REQUEST_IDS), Op.OFFLOAD, token, sizes=[4096])
    assert server.dispatch(frame) == server.dispatch(frame)
    assert _held(server) == (4096, 1, 4096)


def test_commit_fetch_free_serve_the_owner() -> None:
    server = _server()
    token = _register(server)["token"]
    handles = [e["handle"] for e in _ok(server, Op.OFFLOAD, token, sizes=[1000, 4096])["extents"]]
    _refused(server, ErrorCode.NOT_COMMITTED, Op.FETCH, token, handles=handles)
    assert _ok(server, Op.COMMIT, token, handles=handles + handles) == {"committed": 2}
    assert _held(server) == (1024 + 4096, 2, 0)
    fetched = _ok(server, Op.FETCH, token, handles=handles[::-1])["extents"]
    assert [e["handle"] for e in fetched] == handles[::-1]
    assert _ok(server, Op.HEARTBEAT, token) == {"used_bytes": 1024 + 4096}
    assert _ok(server, Op.FREE, token, handles=handles) == {"freed": 2, "freed_bytes": 1024 + 4096}
    assert _held(server) == (0, 0, 0)
    _refused(server, ErrorCode.UNKNOWN_HANDLE, Op.FREE, token, handles=handles)


def test_commit_adds_the_clients_saved_bytes_to_its_summary() -> None:
    server = _server()
    token = _register(server)["token"]
    handles = [e["handle"] for e in _ok(server, Op.OFFLOAD, token, sizes=[512, 512])["extents"]]
    _ok(server, Op.COMMIT, token, handles=handles[:1], dedup_saved_bytes=100, span_saved_bytes=7)
    _ok(server, Op.COMMIT, token, handles=handles[1:], span_saved_bytes=3)
    summary = _ok(server, Op.STATS, token)["session"]
    assert (summary["dedup_saved_bytes"], summary["span_saved_bytes"]) == (100, 10)
    _refused(server, ErrorCode.BAD_REQUEST, Op.COMMIT, token, handles=handles, span_saved_bytes=-1)


@pytest.mark.parametrize("op", [Op.COMMIT, Op.FETCH, Op.FREE])
def test_another_sessions_handle_is_forbidden_and_changes_nothing(op: Op) -> None:
    server = _server()
    owner, other = _register(server)["token"], _register(server)["token"]
    handles = [e["handle"] for e in _ok(server, Op.OFFLOAD, owner, sizes=[4096])["extents"]]
    mine = [e["handle"] for e in _ok(server, Op.OFFLOAD, other, sizes=[512])["extents"]]
    message = _refused(server, ErrorCode.FORBIDDEN, op, other, handles=mine + handles)
    assert message == f"{op.value}: handle {handles[0]} belongs to another session"
    assert _held(server) == (4096 + 512, 2, 4096 + 512)  # the other's own handle was not touched either


@pytest.mark.parametrize("op", [Op.HEARTBEAT, Op.OFFLOAD, Op.UNREGISTER, Op.STATS, Op.PING])
def test_a_token_naming_no_session_is_an_unknown_session(op: Op) -> None:
    server = _server()
    fields = {"sizes": [1]} if op is Op.OFFLOAD else {}
    _refused(server, ErrorCode.UNKNOWN_SESSION, op, "not-a-token", **fields)


def test_a_session_op_without_a_token_is_an_unknown_session() -> None:
    _refused(_server(), ErrorCode.UNKNOWN_SESSION, Op.HEARTBEAT)


def test_unregister_frees_everything_and_kills_the_token() -> None:
    server = _server()
    token = _register(server, nonce=NONCE)["token"]
    _ok(server, Op.OFFLOAD, token, sizes=[4096, 100])
    assert _ok(server, Op.UNREGISTER, token) == {"freed_bytes": 4096 + 512}
    assert _held(server) == (0, 0, 0)
    _refused(server, ErrorCode.UNKNOWN_SESSION, Op.HEARTBEAT, token)


def test_stats_without_a_token_answers_for_the_daemon() -> None:
    server = _server()
    token = _register(server)["token"]
    handles = [e["handle"] for e in _ok(server, Op.OFFLOAD, token, sizes=[4096, 512])["extents"]]
    _ok(server, Op.COMMIT, token, handles=handles[:1])
    stats = _ok(server, Op.STATS)
    assert "session" not in stats
    assert (stats["used_bytes"], stats["reserved_bytes"], stats["free_bytes"]) == (4096, 512, SEGMENT_BYTES - 4608)
    assert (stats["extents"], stats["live_sessions"], len(stats["sessions"])) == (2, 1, 1)
    assert stats["requests"]["offload"] == 1


def test_stats_with_a_token_adds_the_callers_summary() -> None:
    server = _server()
    token = _register(server, name="rank0")["token"]
    _ok(server, Op.OFFLOAD, token, sizes=[100], layer_id=7)
    session = _ok(server, Op.STATS, token)["session"]
    assert (session["name"], session["reserved_bytes"], session["layer_bytes"]) == ("rank0", 512, {"7": 512})


def test_shutdown_stops_the_daemon_and_later_ops_are_refused() -> None:
    server = _server()
    token = _register(server)["token"]
    assert _ok(server, Op.SHUTDOWN) == {"stopping": True}
    assert server.context.stop.is_set()
    _refused(server, ErrorCode.SHUTTING_DOWN, Op.HEARTBEAT, token)
    assert _ok(server, Op.PING)["pid"] == os.getpid()  # ping is still answered


@pytest.mark.parametrize("frame", [b"\xc1", b"", b"\x93\x01\x02\x03"], ids=["reserved-byte", "empty", "array"])
def test_a_malformed_frame_is_a_bad_request_with_no_id(frame: bytes) -> None:
    server = _server()
    reply = decode_reply(server.dispatch(frame))
    assert (reply.ok, reply.id, reply.code) == (False, None, ErrorCode.BAD_REQUEST.value)
    assert server.context.errors[ErrorCode.BAD_REQUEST.value] == 1


def test_metrics_gauges_agree_with_stats() -> None:
    pytest.importorskip("prometheus_client")
    from storm_service.metrics import Metrics

    server = _server()
    metrics = server.metrics = Metrics(server)
    token = _register(server)["token"]
    handles = [e["handle"] for e in _ok(server, Op.OFFLOAD, token, sizes=[4096, 512])["extents"]]
    _ok(server, Op.COMMIT, token, handles=handles[:1])
    _ok(server, Op.FETCH, token, handles=handles[:1])
    stats = _ok(server, Op.STATS)
    registry = metrics.registry
    assert registry.get_sample_value("storm_pool_used_bytes") == stats["used_bytes"] == 4096
    assert registry.get_sample_value("storm_pool_reserved_bytes") == stats["reserved_bytes"] == 512
    assert registry.get_sample_value("storm_sessions") == stats["live_sessions"] == 1
    assert registry.get_sample_value("storm_offloaded_bytes_total") == 4096
    assert registry.get_sample_value("storm_fetched_bytes_total") == 4096


# -- the daemon's protocol checks, in process -----------------------------------------
# These ran against a forked stormd; tests/integration/test_daemon.py keeps what needs a
# real socket, real shared memory or a real process (one case of each bad input the
# serving loop sees before dispatch, and what dispatch sees over a real connection).


class _Daemon:
    """A :class:`Server` in this process, called as a client's channel calls stormd: an
    error reply is raised as the channel raises it (:func:`error_for_code`)."""

    def __init__(self, pool_bytes: int = 64 << 20) -> None:
        self.server = _server(segments=1, segment_bytes=pool_bytes)  # the fixtures' default pool

    def exchange(self, frame: bytes) -> Reply:
        return decode_reply(self.server.dispatch(frame))

    def call(self, op: Op, token: str | None = None, **fields: Any) -> dict[str, Any]:
        request_id = next(_REQUEST_IDS)
        reply = self.exchange(encode_request(request_id, op, token, **fields))
        assert reply.id == request_id
        if not reply.ok:
            raise error_for_code(reply.code, reply.message)
        return reply.result

    def register(self, **fields: Any) -> dict[str, Any]:
        return self.call(Op.REGISTER, pid=os.getpid(), **fields)

    def stats(self) -> dict[str, Any]:
        return self.call(Op.STATS)


def test_fetch_before_commit_is_refused() -> None:
    daemon = _Daemon()
    token = daemon.register()["token"]
    handles = [e["handle"] for e in daemon.call(Op.OFFLOAD, token, sizes=[4096, 4096])["extents"]]
    daemon.call(Op.COMMIT, token, handles=handles[:1])
    with pytest.raises(NotCommittedError, match=f"handle {handles[1]}"):
        daemon.call(Op.FETCH, token, handles=handles)
    with pytest.raises(UnknownHandleError, match="999999"):
        daemon.call(Op.FETCH, token, handles=[999_999])


def test_batched_offload_returns_aligned_disjoint_extents() -> None:
    daemon = _Daemon()
    session = daemon.register()
    alignment, segment_bytes = session["alignment"], daemon.server.context.pool.size_bytes
    sizes = [1, 511, 512, 513, 4096, 100_000, 1 << 20]
    extents = daemon.call(Op.OFFLOAD, session["token"], sizes=sizes)["extents"]
    assert [e["size_bytes"] for e in extents] == sizes
    assert len({e["handle"] for e in extents}) == len(sizes)
    spans = sorted((e["offset"], e["offset"] + -(-e["size_bytes"] // alignment) * alignment) for e in extents)
    for (start, end), (next_start, _) in itertools.pairwise(spans):
        assert start % alignment == 0 and end <= next_start
    assert spans[-1][1] <= segment_bytes
    assert daemon.stats()["reserved_bytes"] == sum(end - start for start, end in spans)


def test_a_session_cannot_touch_another_sessions_handles() -> None:
    daemon = _Daemon()
    a = daemon.register(name="a")
    b = daemon.register(name="b")
    handles = [e["handle"] for e in daemon.call(Op.OFFLOAD, a["token"], sizes=[4096, 8192])["extents"]]
    for op in (Op.FETCH, Op.FREE, Op.COMMIT):
        with pytest.raises(ForbiddenError, match=f"{op.value}: handle {handles[0]} belongs to another session"):
            daemon.call(op, b["token"], handles=handles)
    view = daemon.call(Op.STATS, b["token"])["session"]
    assert (view["id"], view["handles"], view["used_bytes"], view["layer_bytes"]) == (b["session_id"], 0, 0, {})
    daemon.call(Op.COMMIT, a["token"], handles=handles)  # the refused calls changed nothing
    assert len(daemon.call(Op.FETCH, a["token"], handles=handles)["extents"]) == 2
    assert daemon.call(Op.STATS, a["token"])["session"]["handles"] == 2
    with pytest.raises(UnknownSessionError):
        daemon.call(Op.HEARTBEAT, "not-a-token")


def test_unregister_frees_everything() -> None:
    daemon = _Daemon()
    token = daemon.register()["token"]
    daemon.call(Op.OFFLOAD, token, sizes=[4096] * 10, layer_id=1)
    daemon.call(Op.OFFLOAD, token, sizes=[1 << 20])
    assert daemon.call(Op.UNREGISTER, token) == {"freed_bytes": 10 * 4096 + (1 << 20)}
    stats = daemon.stats()
    assert (stats["used_bytes"], stats["sessions"], stats["expired_sessions"]) == (0, [], 0)
    with pytest.raises(UnknownSessionError):
        daemon.call(Op.HEARTBEAT, token)


def test_quota_exceeded_names_the_numbers() -> None:
    daemon = _Daemon()
    session = daemon.register(quota_bytes=8192)
    assert session["quota_bytes"] == 8192
    daemon.call(Op.OFFLOAD, session["token"], sizes=[4096])
    with pytest.raises(QuotaExceededError, match="offload: 8192 bytes requested, 4096 left of a 8192-byte quota"):
        daemon.call(Op.OFFLOAD, session["token"], sizes=[4096, 4096])
    assert daemon.stats()["reserved_bytes"] == 4096
    big = daemon.register(quota_bytes=MAX_SIZE_BYTES)
    assert big["quota_bytes"] == daemon.stats()["pool_bytes"]  # capped at the pool


def test_pool_full_leaks_nothing_from_a_partial_batch() -> None:
    daemon = _Daemon(pool_bytes=1 << 20)
    daemon.call(Op.OFFLOAD, daemon.register()["token"], sizes=[512 << 10])
    token = daemon.register()["token"]  # its quota (the whole pool) is not what stops it
    with pytest.raises(PoolFullError, match=r"offload: 524800 bytes requested, 524288 free"):
        daemon.call(Op.OFFLOAD, token, sizes=[256 << 10, 256 << 10, 1])
    stats = daemon.stats()
    assert (stats["reserved_bytes"], stats["extents"], stats["largest_free_bytes"]) == (512 << 10, 1, 512 << 10)
    assert daemon.call(Op.STATS, token)["session"]["used_bytes"] == 0
    assert len(daemon.call(Op.OFFLOAD, token, sizes=[512 << 10])["extents"]) == 1  # the rest is still whole


@pytest.mark.parametrize("name", [name for name, (frames, _, _) in BAD_FRAMES.items() if len(frames) == 1])
def test_bad_input_gets_an_error_reply_and_is_counted(name: str) -> None:
    [frame], code, request_id = BAD_FRAMES[name]
    daemon = _Daemon()
    reply = daemon.exchange(frame)
    assert (reply.ok, reply.code, reply.id) == (False, code, request_id)
    assert reply.message
    assert daemon.exchange(encode_request(next(_REQUEST_IDS), Op.PING)).ok  # the server still answers
    assert daemon.stats()["errors"] == {code: 1}


def test_mixed_key_types_are_a_bad_request_not_internal() -> None:
    daemon = _Daemon()
    reply = daemon.exchange(msgpack.packb({"v": 2, "id": 7, "op": "ping", b"x": 1, "y": 2}, use_bin_type=True))
    assert daemon.call(Op.PING)  # served either way
    assert reply.code == "BAD_REQUEST"


def test_replayed_requests_are_not_applied_twice() -> None:
    daemon = _Daemon()
    token = daemon.register()["token"]
    offload = encode_request(next(_REQUEST_IDS), Op.OFFLOAD, token, sizes=[4096, 4096])
    first = daemon.exchange(offload)
    assert daemon.exchange(offload) == first  # same handles, nothing new allocated
    assert daemon.stats()["reserved_bytes"] == 8192
    handles = [e["handle"] for e in first.result["extents"]]
    free = encode_request(next(_REQUEST_IDS), Op.FREE, token, handles=handles)
    freed = daemon.exchange(free)
    assert freed.result == {"freed": 2, "freed_bytes": 8192}
    assert daemon.exchange(free) == freed  # a replayed free is answered, not re-applied
    assert daemon.stats()["reserved_bytes"] == 0
    again = daemon.exchange(encode_request(next(_REQUEST_IDS), Op.FREE, token, handles=handles))
    assert (again.ok, again.code) == (False, "UNKNOWN_HANDLE")
    other = daemon.exchange(encode_request(next(_REQUEST_IDS), Op.OFFLOAD, token, sizes=[4096]))
    assert other.result["extents"][0]["handle"] not in handles
