"""The decoders' limits against the largest messages each side can build (NOTE [Decoder limits]).

The replies are built by the daemon's own handlers (``Server.dispatch``) over a pool of
slabs without memory (the allocators deal in offsets only), every count and name at its
cap, and decoded by the client's ``decode_reply``. Was: a STATS reply whose
``layer_bytes`` had more than 64 entries did not decode; the client timed out and
marked its session lost.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from storm_service.config import ConfigError, build_parser, load_config
from storm_service.errors import ErrorCode
from storm_service.pool import Pool
from storm_service.protocol import (
    MAX_BATCH,
    MAX_ERROR_MESSAGE,
    MAX_ID,
    MAX_LISTED_SESSIONS,
    MAX_MESSAGE_BYTES,
    MAX_NONCE_LEN,
    MAX_SESSION_LAYERS,
    MAX_SIZE_BYTES,
    MAX_SLABS,
    MAX_STR,
    OVERFLOW_LAYER_ID,
    Op,
    decode_reply,
    decode_request,
    encode_error,
    encode_request,
)
from storm_service.server import Server
from storm_service.slabs import Slab
from storm_service.tenants import Peer

WIDE = "\U0001f600"
"""A character of four UTF-8 bytes: names and messages at their longest in bytes."""
EXTENT_BYTES = (1 << 32) + 512
"""Large enough that every byte count in a reply is a 9-byte msgpack integer."""
MAX_LAYER_ID = (1 << 31) - 1
"""The longest layer id (its ``layer_bytes`` key has the most digits)."""
_REQUEST_IDS = itertools.count(MAX_ID, -1)
"""Never reused: the daemon answers a mutating request whose id it remembers with the old reply."""


def _server(segments: int, segment_bytes: int) -> Server:
    pool = Pool([Slab(i + 1, segment_bytes, backed=False) for i in range(segments)])
    # More sessions than one tenant may open by default: every call here comes from one uid.
    argv = ["--max-tenant-sessions", str(2 * MAX_LISTED_SESSIONS)]
    return Server(load_config(build_parser().parse_args(argv), {}), pool)


def _call(server: Server, op: Op, token: str | None = None, **fields: Any) -> tuple[bytes, dict[str, Any]]:
    """Dispatch one request as the daemon does; return the reply frame and its decoded result."""
    frame = server.dispatch(encode_request(next(_REQUEST_IDS), op, token, **fields))
    reply = decode_reply(frame)
    assert reply.ok, (reply.code, reply.message)
    return frame, reply.result


def _register(server: Server, peer: Peer | None = None) -> str:
    fields: dict[str, Any] = {"pid": (1 << 31) - 1, "name": WIDE * MAX_STR, "rank": 1 << 20, "world_size": 1 << 20}
    fields |= {"quota_bytes": MAX_SIZE_BYTES, "pid_ns": MAX_ID}
    frame = server.dispatch(encode_request(next(_REQUEST_IDS), Op.REGISTER, None, **fields), peer)
    reply = decode_reply(frame)
    assert reply.ok, (reply.code, reply.message)
    return str(reply.result["token"])


def test_largest_stats_reply_decodes_within_the_frame_cap() -> None:
    server = _server(1, MAX_SIZE_BYTES)
    # Every session a tenant of its own, named by a CURVE key (the longest tenant names): `tenants` at its cap.
    peers = [Peer(uid=None, key=f"{i:040d}") for i in range(MAX_LISTED_SESSIONS + 2)]
    tokens = [_register(server)] + [_register(server, peer) for peer in peers]
    for session in server.context.sessions.sessions.values():  # every summary field at its widest
        session.used_bytes = session.reserved_bytes = session.peak_bytes = MAX_SIZE_BYTES
        session.offloaded_bytes = session.fetched_bytes = MAX_SIZE_BYTES
    token = tokens[0]
    for layer in range(MAX_SESSION_LAYERS + 5):
        _call(server, Op.OFFLOAD, token, sizes=[EXTENT_BYTES], layer_id=MAX_LAYER_ID - layer)
    server.context.requests.update({op.value: MAX_ID for op in Op})
    server.context.errors.update({code.value: MAX_ID for code in ErrorCode})
    server.context.dropped_replies = server.context.sessions.expired_total = MAX_ID

    frame, stats = _call(server, Op.STATS, token)

    assert len(frame) <= MAX_MESSAGE_BYTES
    layer_bytes = stats["session"]["layer_bytes"]
    assert len(layer_bytes) == MAX_SESSION_LAYERS + 1
    assert layer_bytes[str(OVERFLOW_LAYER_ID)] == 5 * EXTENT_BYTES
    assert len(stats["sessions"]) == MAX_LISTED_SESSIONS
    assert len(stats["tenants"]) == MAX_LISTED_SESSIONS
    assert stats["live_sessions"] == MAX_LISTED_SESSIONS + 3


def test_stats_lists_the_sessions_holding_most_bytes_past_the_cap() -> None:
    server = _server(1, MAX_SIZE_BYTES)
    tokens = [_register(server) for _ in range(MAX_LISTED_SESSIONS + 2)]
    holders = tokens[-2:]  # registered last, so listing the first sessions would miss them
    for token in holders:
        _call(server, Op.OFFLOAD, token, sizes=[4096])

    _, stats = _call(server, Op.STATS)

    listed = [s["id"] for s in stats["sessions"]]
    assert len(listed) == MAX_LISTED_SESSIONS and listed == sorted(listed)
    assert {server.context.sessions.by_token(t).id for t in holders} <= set(listed)


def test_layers_past_the_cap_count_under_the_overflow_key_until_freed() -> None:
    server = _server(1, 1 << 40)
    token = _register(server)
    session = server.context.sessions.by_token(token)
    handles = {}
    for layer in range(MAX_SESSION_LAYERS + 2):
        _, result = _call(server, Op.OFFLOAD, token, sizes=[512], layer_id=layer)
        handles[layer] = result["extents"][0]["handle"]
    assert len(session.layer_bytes) == MAX_SESSION_LAYERS + 1
    assert session.layer_bytes[OVERFLOW_LAYER_ID] == 2 * 512
    assert sum(session.layer_bytes.values()) == session.held_bytes

    _call(server, Op.FREE, token, handles=[handles[0]])  # layer 0 gives its place back
    _call(server, Op.OFFLOAD, token, sizes=[512], layer_id=-1)
    assert session.layer_bytes[-1] == 512 and session.layer_bytes[OVERFLOW_LAYER_ID] == 2 * 512

    overflowed = [handles[MAX_SESSION_LAYERS], handles[MAX_SESSION_LAYERS + 1]]
    _call(server, Op.FREE, token, handles=overflowed)
    assert OVERFLOW_LAYER_ID not in session.layer_bytes
    assert sum(session.layer_bytes.values()) == session.held_bytes


def test_largest_register_reply_decodes_within_the_frame_cap() -> None:
    server = _server(MAX_SLABS, 1 << 36)
    server.context.fd_socket = "/" + WIDE * 107  # longer than any Unix socket path
    frame = server.dispatch(encode_request(MAX_ID, Op.REGISTER, None, pid=1, name=WIDE * MAX_STR))
    assert len(frame) <= MAX_MESSAGE_BYTES
    assert decode_reply(frame).result["fd_socket"] == server.context.fd_socket


@pytest.mark.parametrize("op", [Op.OFFLOAD, Op.FETCH])
def test_largest_batch_reply_decodes_within_the_frame_cap(op: Op) -> None:
    server = _server(1, MAX_SIZE_BYTES)
    token = _register(server)
    frame, result = _call(server, Op.OFFLOAD, token, sizes=[EXTENT_BYTES] * MAX_BATCH, layer_id=MAX_LAYER_ID)
    if op is Op.FETCH:
        handles = [e["handle"] for e in result["extents"]]
        _call(server, Op.COMMIT, token, handles=handles)
        frame, result = _call(server, Op.FETCH, token, handles=handles)
    assert len(frame) <= MAX_MESSAGE_BYTES and len(result["extents"]) == MAX_BATCH


def test_longest_error_message_decodes() -> None:
    reply = decode_reply(encode_error(MAX_ID, ErrorCode.INTERNAL, WIDE * (2 * MAX_ERROR_MESSAGE)))
    assert reply.message == WIDE * MAX_ERROR_MESSAGE


def test_largest_requests_decode_on_the_daemon_side() -> None:
    token = "t" * MAX_STR
    offload = encode_request(MAX_ID, Op.OFFLOAD, token, sizes=[MAX_SIZE_BYTES] * MAX_BATCH, layer_id=MAX_LAYER_ID)
    free = encode_request(MAX_ID, Op.FREE, token, handles=[MAX_ID] * MAX_BATCH)
    register = encode_request(
        MAX_ID,
        Op.REGISTER,
        token,
        pid=(1 << 31) - 1,
        name=WIDE * MAX_STR,
        rank=1 << 20,
        world_size=1 << 20,
        quota_bytes=MAX_SIZE_BYTES,
        pid_ns=MAX_ID,
        nonce=WIDE * MAX_NONCE_LEN,
    )
    for frame in (offload, free, register):
        assert len(frame) <= MAX_MESSAGE_BYTES
        decode_request(frame)


def test_a_pool_of_more_slabs_than_the_cap_is_refused() -> None:
    argv = ["--pool-size", f"{MAX_SLABS + 1}MiB", "--segment-size", "1MiB"]
    with pytest.raises(ConfigError, match=f"{MAX_SLABS + 1} slabs, at most {MAX_SLABS}"):
        load_config(build_parser().parse_args(argv), {})
    argv = ["--pool-size", f"{MAX_SLABS}MiB", "--segment-size", "1MiB"]
    assert load_config(build_parser().parse_args(argv), {}).pool_size == MAX_SLABS << 20
