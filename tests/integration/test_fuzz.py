"""Property-based fuzzing of a live stormd over a raw DEALER socket.

Every example sends one message (random bytes, random msgpack values, or a valid
request of some op, mutated) as one or several frames, and checks the reply against
an oracle built from the shared protocol module:

* every reply decodes with :func:`decode_reply`; ``ok`` is a bool; an error carries a
  known :class:`ErrorCode` and a non-empty message; ``INTERNAL`` never appears;
* a frame the local :func:`decode_request` rejects gets exactly that code and id;
* a valid request gets its own id back, and an error only from the codes its op can
  meet once validated (``UNKNOWN_SESSION``, ``POOL_FULL``, ``FORBIDDEN``...); results
  have the shape the op promises (one extent per size, fresh handles, aligned offsets);
* a mutating request whose ``(token, id)`` the daemon still remembers gets the
  remembered reply byte for byte (a model mirrors the daemon's 512-reply memory);
* a frame over ``ZMQ_MAXMSGSIZE`` may get no reply: a fresh socket is used after it.

After every example the daemon process is alive; every few examples the pool's books
balance; a "normal" client (a :class:`StormSystem` that offloaded tensors before the
fuzzing) reads them back bit-exact midway and at the end, and the daemon's log holds
no traceback. The fuzzer never sends a valid ``shutdown``, and never a mutating op
or ``unregister`` under the normal client's token (both would be legitimate and
would end the run or change the normal client's data).

Values the daemon once choked on are in the mix: lists nested ~1000 deep (Python's
repr hit its recursion limit: INTERNAL plus a traceback) and large strings echoed in
error messages (replies no client could decode); both have regression tests at the
bottom of this file.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgpack
import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client.system import StormSystem
from storm_service.endpoints import pid_namespace
from storm_service.errors import ErrorCode
from storm_service.protocol import (
    MAX_BATCH,
    MAX_ID,
    MAX_MESSAGE_BYTES,
    MAX_SIZE_BYTES,
    MUTATING_OPS,
    Invalid,
    Op,
    Reply,
    Request,
    decode_reply,
    decode_request,
    encode_request,
)

if TYPE_CHECKING:
    from helpers import DaemonProcess, StartDaemon

POOL_SIZE = "32MiB"
POOL_BYTES = 32 << 20
ALIGNMENT = 512
MAX_FRAME = MAX_MESSAGE_BYTES + 1024
"""The ROUTER's ZMQ_MAXMSGSIZE: a longer frame drops the connection, unanswered."""
REPLY_TIMEOUT_S = 2.0
REPLAY_MEMORY = 512
POOL_CHECK_EVERY = 25
DEEP = 1000
"""Nesting past Python's default recursion limit (msgpack's packer stops near 1024)."""
BIG_STRINGS = ["\x00" * 300_000, "é" * 100_000]
"""Their repr is 1.2 MB and 100 000 characters: error messages must not quote them whole."""
KNOWN_CODES = {code.value for code in ErrorCode}
FUZZ_OPS = [op for op in Op if op is not Op.SHUTDOWN]
WEIGHTED_OPS = [*FUZZ_OPS, Op.OFFLOAD, Op.OFFLOAD, Op.COMMIT, Op.COMMIT, Op.FETCH, Op.FETCH, Op.FREE]
"""Valid requests: the data path more often than register and unregister (which churn sessions)."""
OP_NAMES = [op.value for op in Op]
FIELD_NAMES = ["v", "id", "op", "token", "pid", "name", "rank", "world_size", "quota_bytes", "pid_ns"]
FIELD_NAMES += ["sizes", "layer_id", "handles"]
# Codes a request that passed validation can still meet, per op (UNKNOWN_SESSION aside).
OP_ERRORS: dict[Op, set[str]] = {op: set() for op in Op}
OP_ERRORS[Op.OFFLOAD] = {ErrorCode.POOL_FULL.value, ErrorCode.QUOTA_EXCEEDED.value}
OP_ERRORS[Op.COMMIT] = {ErrorCode.UNKNOWN_HANDLE.value, ErrorCode.FORBIDDEN.value}
OP_ERRORS[Op.FREE] = set(OP_ERRORS[Op.COMMIT])
OP_ERRORS[Op.FETCH] = OP_ERRORS[Op.COMMIT] | {ErrorCode.NOT_COMMITTED.value}


def _deep(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


# -- the world the fuzzer lives in (read by the strategies at draw time) --------------


@dataclass
class World:
    normal_token: str
    normal_handles: list[int]
    tokens: deque[str] = field(default_factory=lambda: deque(maxlen=8))
    """Tokens of sessions the fuzzer opened (most recent first to go)."""
    dead_tokens: deque[str] = field(default_factory=lambda: deque(maxlen=8))
    owned: dict[str, list[int]] = field(default_factory=dict)
    """Handles the fuzzer's sessions hold, by token (as far as the replies tell)."""
    freed: deque[int] = field(default_factory=lambda: deque(maxlen=64))
    issued: set[int] = field(default_factory=set)
    """Every handle any offload reply carried: a new one must never repeat one."""
    remembered: dict[str, OrderedDict[int, bytes]] = field(default_factory=dict)
    """Model of the daemon's replay memory: successful mutating replies per session."""

    def add_token(self, token: str) -> None:
        if len(self.tokens) == self.tokens.maxlen:
            self.dead_tokens.append(self.tokens[0])  # not dead, just no longer picked as live
        self.tokens.append(token)

    def forget(self, token: str) -> None:
        """The session behind ``token`` is gone (unregistered or expired)."""
        with contextlib.suppress(ValueError):
            self.tokens.remove(token)
        self.dead_tokens.append(token)
        self.freed.extend(self.owned.pop(token, []))
        self.remembered.pop(token, None)

    def remember(self, token: str, request_id: int, reply: bytes) -> None:
        memory = self.remembered.setdefault(token, OrderedDict())
        memory[request_id] = reply
        if len(memory) > REPLAY_MEMORY:
            memory.popitem(last=False)

    def resolve(self, ref: Ref, token: Any) -> Any:
        i = ref.index
        if ref.kind == "live":
            return self.tokens[i % len(self.tokens)]
        if ref.kind == "owner":  # a session that holds handles, so that its own handles can be used
            owners = [t for t, hs in self.owned.items() if hs and t in self.tokens]
            return owners[i % len(owners)] if owners else self.tokens[i % len(self.tokens)]
        if ref.kind == "dead":
            return self.dead_tokens[i % len(self.dead_tokens)] if self.dead_tokens else f"dead-{i}"
        if ref.kind == "normal":
            return self.normal_token
        if ref.kind == "normal_handle":
            return self.normal_handles[i % len(self.normal_handles)]
        if ref.kind == "freed":
            return self.freed[i % len(self.freed)] if self.freed else i + 1
        own = self.owned.get(token) if isinstance(token, str) and ref.kind == "owned" else None
        pool = own or [h for hs in self.owned.values() for h in hs]
        return pool[i % len(pool)] if pool else i + 1

    def dangerous(self, frame: bytes) -> str | None:
        """Why this frame must not be sent (a valid shutdown, or harm to the normal client)."""
        try:
            request = decode_request(frame)
        except Invalid:
            return None
        if request.op is Op.SHUTDOWN:
            return "shutdown"
        if request.token == self.normal_token and (request.op in MUTATING_OPS or request.op is Op.UNREGISTER):
            return "normal"
        return None


# -- strategies -------------------------------------------------------------------------
#
# Hypothesis needs data generation that does not depend on outside state, so the
# strategies draw symbolic references (Ref) to tokens and handles; :func:`resolve`
# turns them into the world's current ones just before the message is sent.


@dataclass(frozen=True)
class Ref:
    kind: str
    """live / dead / normal token; normal / owned / freed handle."""
    index: int


def resolve(world: World, obj: Any, token: Any = None, depth: int = 0) -> Any:
    """Replace the Refs in ``obj``; they sit at most a few levels down (deep values hold none)."""
    if isinstance(obj, Ref):
        return world.resolve(obj, token)
    if depth > 4:
        return obj
    if isinstance(obj, dict):
        token = world.resolve(obj["token"], None) if isinstance(obj.get("token"), Ref) else obj.get("token")
        return {key: resolve(world, value, token, depth + 1) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [resolve(world, item, token, depth + 1) for item in obj]
    return obj


ints64 = st.integers(-(1 << 63), (1 << 64) - 1)
interesting_ints = st.sampled_from(
    [
        *(0, 1, -1, 2, 511, 512, 513, MAX_ID, MAX_ID + 1, -(1 << 63), (1 << 64) - 1, 1 << 31, (1 << 31) - 1),
        *(1 << 20, (1 << 20) + 1, MAX_SIZE_BYTES, MAX_SIZE_BYTES + 1, MAX_BATCH, MAX_BATCH + 1),
    ]
)
small_text = st.text(max_size=24)
leaves = st.one_of(
    st.none(),
    st.booleans(),
    ints64,
    interesting_ints,
    st.floats(),
    small_text,
    st.binary(max_size=24),
    st.sampled_from([*OP_NAMES, *FIELD_NAMES, "", "SHUTDOWN", "pïng", "ping\x00"]),
    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=4)),
    st.sampled_from([10, 100, 500, DEEP]).map(_deep),
    st.sampled_from(BIG_STRINGS),
)
values = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6),
        st.dictionaries(st.one_of(small_text, st.binary(max_size=8), st.integers(-5, 5)), inner, max_size=6),
    ),
    max_leaves=24,
)
request_ids = st.one_of(st.integers(0, 64), st.integers(0, MAX_ID), st.just(MAX_ID))
bad_ids = st.one_of(st.integers(-(1 << 63), -1), st.just(MAX_ID + 1), st.integers(MAX_ID + 1, (1 << 64) - 1), values)
sizes_item = st.one_of(st.integers(1, 4096), st.integers(1, 256 << 10), st.integers(1, MAX_SIZE_BYTES))
bad_size = st.one_of(st.just(0), st.integers(-(1 << 63), 0), st.just(MAX_SIZE_BYTES + 1), values)
live_token = st.builds(Ref, st.just("live"), st.integers(0, 7))
tokens = st.one_of(
    live_token,
    live_token,
    st.just(Ref("normal", 0)),
    st.builds(Ref, st.just("dead"), st.integers(0, 7)),
    small_text,
    st.text(min_size=257, max_size=300),
    st.none(),
)
handles = st.one_of(
    st.builds(Ref, st.just("owned"), st.integers(0, 63)),  # the message's session's own, when it has some
    st.builds(Ref, st.just("any_owned"), st.integers(0, 63)),  # some fuzzer session's (often foreign)
    st.builds(Ref, st.just("normal_handle"), st.integers(0, 15)),  # the normal client's (always foreign)
    st.builds(Ref, st.just("freed"), st.integers(0, 63)),  # use after free
    st.integers(1, 64),
    st.integers(1, MAX_ID),
)


@st.composite
def handle_list(draw: st.DrawFn, coherent: bool = False) -> list[Any]:
    if coherent:  # this session's own handles, as a real client would send
        picked = draw(st.lists(st.builds(Ref, st.just("owned"), st.integers(0, 63)), min_size=1, max_size=6))
    else:
        picked = draw(st.lists(handles, min_size=1, max_size=6))
    if draw(st.integers(0, 4)) == 0:  # duplicated handles
        picked = picked + picked[: draw(st.integers(1, len(picked)))]
    return picked


@st.composite
def valid_token(draw: st.DrawFn, op: Op) -> Any:
    gate = draw(st.integers(0, 9))
    if op in (Op.PING, Op.REGISTER, Op.STATS):
        return None if gate < 7 else draw(tokens)
    if gate < 5 and op in (Op.COMMIT, Op.FETCH, Op.FREE):
        return Ref("owner", draw(st.integers(0, 7)))
    if gate < 7:
        return Ref("live", draw(st.integers(0, 7)))
    return draw(tokens)


@st.composite
def offload_size(draw: st.DrawFn) -> int:
    gate = draw(st.integers(0, 19))
    if gate < 16:
        return draw(st.integers(1, 64 << 10))
    if gate < 19:
        return draw(st.integers(1, 4 << 20))
    return draw(st.integers(1, MAX_SIZE_BYTES))


@st.composite
def valid_requests(draw: st.DrawFn) -> dict[str, Any]:
    """A well-formed request of some op (its token may still name no live session)."""
    op = draw(st.sampled_from(WEIGHTED_OPS))
    token = draw(valid_token(op))
    msg: dict[str, Any] = {"v": 2, "id": draw(request_ids), "op": op.value, "token": token}
    if op is Op.REGISTER:
        msg["pid"] = os.getpid() if draw(st.integers(0, 3)) else draw(st.integers(0, (1 << 31) - 1))
        optional = {
            "name": small_text,
            "rank": st.integers(0, 1 << 20),
            "world_size": st.integers(1, 1 << 20),
            "quota_bytes": st.one_of(st.integers(1, 1 << 20), st.integers(1, MAX_SIZE_BYTES)),
            "pid_ns": st.one_of(st.just(pid_namespace() or 0), st.integers(0, MAX_ID)),
        }
        for name, strategy in optional.items():
            if draw(st.booleans()):
                msg[name] = draw(st.one_of(st.none(), strategy))
    elif op is Op.OFFLOAD:
        msg["sizes"] = draw(st.lists(offload_size(), min_size=1, max_size=8))
        if draw(st.booleans()):
            msg["layer_id"] = draw(st.one_of(st.none(), st.integers(-1, (1 << 31) - 1)))
    elif op in (Op.COMMIT, Op.FETCH, Op.FREE):
        msg["handles"] = draw(handle_list(coherent=draw(st.integers(0, 3)) > 0))
    return msg


MUTATIONS = ["drop", "replace", "retype", "add", "token", "id", "bad_id", "op", "v", "list", "bytes_key"]


def _retype(draw: st.DrawFn, value: Any) -> Any:
    if isinstance(value, bool) or value is None:
        return draw(st.sampled_from([0, 1, "true", [], {}]))
    if isinstance(value, int):
        return draw(st.sampled_from([str(value), float(value), [value], {"x": value}, value != 0, None]))
    if isinstance(value, str):
        return draw(st.sampled_from([value.encode(), [value], len(value), None]))
    if isinstance(value, list):
        return draw(st.sampled_from([value[0] if value else 0, value[:1], {"0": value}, "list"]))
    return draw(values)


@st.composite
def mutated_requests(draw: st.DrawFn) -> dict[Any, Any]:
    msg: dict[Any, Any] = draw(valid_requests())
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(MUTATIONS))
        keys = list(msg)
        key = draw(st.sampled_from(keys)) if keys else None
        if kind == "drop" and key is not None:
            del msg[key]
        elif kind == "replace" and key is not None:
            msg[key] = draw(values)
        elif kind == "retype" and key is not None:
            msg[key] = _retype(draw, msg[key])
        elif kind == "add":
            name = draw(st.one_of(st.sampled_from(FIELD_NAMES), small_text))
            msg[name] = draw(st.one_of(values, sizes_item, st.lists(handles, max_size=3)))
        elif kind == "token":
            msg["token"] = draw(tokens)
        elif kind == "id":
            msg["id"] = draw(request_ids)
        elif kind == "bad_id":
            msg["id"] = draw(bad_ids)
        elif kind == "op":
            msg["op"] = draw(st.one_of(st.sampled_from(OP_NAMES), small_text, values))
        elif kind == "v":
            msg["v"] = draw(st.one_of(st.sampled_from([0, 2, -1, 1.0, True, "1", None]), values))
        elif kind == "list":
            name = draw(st.sampled_from(["sizes", "handles"]))
            msg[name] = draw(
                st.one_of(
                    st.just([]),
                    st.just([1] * (MAX_BATCH + 1)),
                    st.just([1] * (MAX_BATCH * 4 + 1)),  # over the decoder's array bound
                    st.lists(st.one_of(bad_size, handles), min_size=1, max_size=5),
                )
            )
        elif kind == "bytes_key" and isinstance(key, str):
            msg[key.encode()] = msg.pop(key)
    return msg


def _pad_frame(size: int, request_id: int) -> bytes:
    """A register request whose ``name`` pads the frame to exactly ``size`` bytes."""
    base = {"v": 2, "id": request_id, "op": "register", "token": None, "pid": 1}
    overhead = len(msgpack.packb({**base, "name": "a" * 70_000}, use_bin_type=True)) - 70_000
    frame = msgpack.packb({**base, "name": "a" * (size - overhead)}, use_bin_type=True)
    assert len(frame) == size
    return frame


@st.composite
def edge_frames(draw: st.DrawFn) -> bytes:
    """Frames around the size limits: BAD_REQUEST up to MAX_FRAME, a dropped connection past it."""
    limits = [MAX_MESSAGE_BYTES - 1, MAX_MESSAGE_BYTES, MAX_MESSAGE_BYTES + 1, MAX_FRAME, MAX_FRAME + 1]
    size = draw(st.sampled_from(limits))
    if draw(st.booleans()):
        return _pad_frame(size, draw(request_ids))
    return bytes([draw(st.integers(0, 255))]) * size


@dataclass(frozen=True)
class Packed:
    """A message body to pack once its references are resolved, then maybe cut or extended."""

    obj: Any
    bin_type: bool = True
    cut: int | None = None
    tail: bytes = b""


@st.composite
def bodies(draw: st.DrawFn) -> bytes | Packed:
    kind = draw(st.sampled_from(["raw", "value", "valid", "valid", "mutated", "mutated", "mutated", "edge"]))
    bin_type = draw(st.integers(0, 9)) > 0
    if kind == "value":
        return Packed(draw(values), bin_type)
    if kind == "valid":
        return Packed(draw(valid_requests()))
    if kind == "mutated":
        return Packed(draw(mutated_requests()), bin_type)
    if kind == "edge":
        return draw(edge_frames())
    raw = draw(st.integers(0, 3))
    if raw == 0:
        return draw(st.binary(max_size=256))
    if raw == 1:  # truncated
        return Packed(draw(valid_requests()), cut=draw(st.integers(0, 1 << 16)))
    if raw == 2:  # trailing garbage
        return Packed(draw(valid_requests()), tail=draw(st.binary(min_size=1, max_size=16)))
    # nesting the decoder accepts (up to msgpack's stack of 1024) or refuses
    depth = draw(st.sampled_from([DEEP, 1020, 1025, 1100, 5000]))
    return b"\x81\xa2op" + b"\x91" * depth + b"\xc0"


@dataclass
class Message:
    body: bytes | Packed
    framing: list[bytes | None]
    """The frames to send; None stands for the body."""
    repeat: int
    """2: the same frames twice in a row (a replayed request id)."""

    def frames(self, world: World) -> list[bytes]:
        body = self.body if isinstance(self.body, bytes) else self._pack(world, self.body)
        frames = [body if frame is None else frame for frame in self.framing]
        if any(world.dangerous(frame) for frame in frames):  # raw bytes that happen to decode to one
            return [b"not this one"]
        return frames

    @staticmethod
    def _pack(world: World, packed: Packed) -> bytes:
        """A valid shutdown becomes a ping, a harmful normal-token request a fuzzer one."""
        obj = resolve(world, packed.obj)
        for _ in range(3):
            frame = msgpack.packb(obj, use_bin_type=packed.bin_type)
            if packed.cut is not None:
                frame = frame[: packed.cut % len(frame)]
            frame += packed.tail
            why = world.dangerous(frame)
            if why is None:
                return frame
            obj = dict(obj)
            if why == "shutdown":
                obj["op"] = "ping"
            else:
                obj["token"] = world.tokens[-1]
        raise AssertionError(f"could not make {obj!r:.200} harmless")


@st.composite
def messages(draw: st.DrawFn) -> Message:
    body = draw(bodies())
    framing_kind = draw(st.integers(0, 9))
    framing: list[bytes | None]
    if framing_kind == 7:  # a REQ socket's envelope: answered, with the delimiter echoed
        framing = [b"", None]
    elif framing_kind == 8:  # several frames: BAD_REQUEST, whatever they hold
        extra = draw(st.lists(st.one_of(st.binary(max_size=16), st.none()), min_size=1, max_size=3))
        framing = [None, *extra] if draw(st.booleans()) else [*extra, None]
    elif framing_kind == 9:
        framing = [b"", None, b""]
    else:
        framing = [None]
    repeat = 2 if draw(st.integers(0, 7)) == 0 else 1
    return Message(body, framing, repeat)


# -- the fuzzer's side of the socket and the oracle ----------------------------------


class Fuzzer:
    def __init__(self, daemon: DaemonProcess, world: World) -> None:
        self.daemon = daemon
        self.world = world
        self.sent = 0
        self.replies = 0
        self.unanswered = 0
        self.codes: dict[str, int] = {}
        self.ok: dict[str, int] = {}
        self.socket = self._connect()

    def _connect(self) -> zmq.Socket:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.daemon.endpoint)
        return sock

    def close(self) -> None:
        self.socket.close(linger=0)

    def register(self) -> None:
        frame = encode_request(next(_OWN_IDS), Op.REGISTER, None, pid=os.getpid(), name="fuzzer")
        self.exchange([frame])

    def exchange(self, frames: list[bytes]) -> None:
        self.sent += 1
        if any(len(frame) > MAX_FRAME for frame in frames):
            # ZeroMQ drops the connection unanswered; the socket's linger lets the frame
            # still reach the daemon, and a fresh socket carries on.
            self.socket.send_multipart(frames)
            self.socket.close(linger=1000)
            self.socket = self._connect()
            self.unanswered += 1
            return
        self.socket.send_multipart(frames)
        assert self.socket.poll(int(REPLY_TIMEOUT_S * 1000)), (
            f"no reply within {REPLY_TIMEOUT_S} s to {[f[:120] for f in frames]!r}"
            f" (daemon alive: {self.daemon.proc.poll() is None})"
        )
        parts = self.socket.recv_multipart()
        self.replies += 1
        self.check(frames, parts)

    def check(self, frames: list[bytes], parts: list[bytes]) -> None:
        what = f"request {[f[:200] for f in frames]!r}"
        reply = decode_reply(parts[-1])  # raises ProtocolError if the reply is malformed
        assert isinstance(reply.ok, bool), what
        if not reply.ok:
            assert reply.code in KNOWN_CODES, f"{what}: unknown code {reply.code!r}"
            assert reply.message, f"{what}: error {reply.code} without a message"
            assert reply.code != ErrorCode.INTERNAL.value, f"{what}: {reply.message}"
            self.codes[reply.code] = self.codes.get(reply.code, 0) + 1
        if len(frames) == 1:
            assert len(parts) == 1, what
            self.check_body(frames[0], reply, parts[-1], what)
        elif len(frames) == 2 and frames[0] == b"":
            assert len(parts) == 2 and parts[0] == b"", f"{what}: the REQ delimiter was not echoed: {parts!r:.200}"
            self.check_body(frames[1], reply, parts[-1], what)
        else:
            assert len(parts) == 1, what
            assert not reply.ok and reply.code == ErrorCode.BAD_REQUEST.value and reply.id is None, what
            assert reply.message == f"expected one frame, got {len(frames)}", what

    def check_body(self, body: bytes, reply: Reply, raw: bytes, what: str) -> None:
        try:
            request = decode_request(body)
        except Invalid as e:
            assert not reply.ok, f"{what}: accepted, though it is invalid ({e.code}: {e.message})"
            assert (reply.code, reply.id) == (e.code.value, e.request_id), (
                f"{what}: expected {e.code.value} id {e.request_id}, got {reply.code} id {reply.id}: {reply.message}"
            )
            return
        assert reply.id == request.id, f"{what}: reply id {reply.id}, request id {request.id}"
        self.check_valid(request, reply, raw, what)

    def check_valid(self, request: Request, reply: Reply, raw: bytes, what: str) -> None:
        world, token, op = self.world, request.token, request.op
        if token is not None and op in MUTATING_OPS and request.id in world.remembered.get(token, {}):
            remembered = world.remembered[token][request.id]
            assert raw == remembered or reply.code == ErrorCode.UNKNOWN_SESSION.value, (
                f"{what}: a replay of id {request.id} got {reply!r:.300}, not the remembered reply"
            )
            if reply.code == ErrorCode.UNKNOWN_SESSION.value:
                world.forget(token)
            return
        if not reply.ok:
            allowed = OP_ERRORS[op] | ({ErrorCode.UNKNOWN_SESSION.value} if token is not None else set())
            assert reply.code in allowed, f"{what}: {op.value} cannot fail with {reply.code}: {reply.message}"
            if reply.code == ErrorCode.UNKNOWN_SESSION.value and token is not None:
                world.forget(token)
            return
        result, args = reply.result, request.args
        self.ok[op.value] = self.ok.get(op.value, 0) + 1
        if op is Op.PING:
            assert result["pid"] == self.daemon.proc.pid, what
        elif op is Op.REGISTER:
            assert isinstance(result["token"], str) and 0 < result["quota_bytes"] <= POOL_BYTES, what
            world.add_token(result["token"])
        elif op is Op.UNREGISTER:
            assert token is not None and result["freed_bytes"] >= 0, what
            world.forget(token)
        elif op is Op.HEARTBEAT:
            assert 0 <= result["used_bytes"] <= POOL_BYTES, what
        elif op is Op.STATS:
            held = result["used_bytes"] + result["reserved_bytes"]
            assert held + result["free_bytes"] == result["pool_bytes"] == POOL_BYTES, what
            assert ("session" in result) == (token is not None), what
        elif op is Op.OFFLOAD:
            assert token is not None
            extents = result["extents"]
            assert [e["size_bytes"] for e in extents] == args["sizes"], what
            for extent in extents:
                assert extent["offset"] % ALIGNMENT == 0 and extent["slab"] >= 1, what
                assert extent["offset"] + extent["size_bytes"] <= POOL_BYTES, what
                assert extent["handle"] not in world.issued, f"{what}: handle {extent['handle']} issued twice"
                world.issued.add(extent["handle"])
            world.owned.setdefault(token, []).extend(e["handle"] for e in extents)
        elif op is Op.COMMIT:
            assert result["committed"] == len(set(args["handles"])), what
        elif op is Op.FETCH:
            assert [e["handle"] for e in result["extents"]] == list(dict.fromkeys(args["handles"])), what
        elif op is Op.FREE:
            assert token is not None
            assert result["freed"] == len(set(args["handles"])) and result["freed_bytes"] >= 0, what
            gone = set(args["handles"])
            world.owned[token] = [h for h in world.owned.get(token, []) if h not in gone]
            world.freed.extend(gone)
        if op in MUTATING_OPS and token is not None:
            world.remember(token, request.id, raw)


_OWN_IDS = itertools.count(10**15)
"""Ids for the fuzzer's own setup requests, far from what the strategies draw."""


# -- the normal client working alongside --------------------------------------------


class NormalClient:
    """A StormSystem that offloaded random tensors before the fuzzing and reads them back."""

    def __init__(self, endpoint: str, seed: int) -> None:
        self.system = StormSystem(endpoint, name="normal", policy="error")
        generator = torch.Generator().manual_seed(seed)
        self.originals = [
            torch.randn(1000, generator=generator),
            torch.randn(64, 129, generator=generator, dtype=torch.float64),
            torch.randint(-(1 << 62), 1 << 62, (3, 5, 7), generator=generator, dtype=torch.int64),
            torch.randint(0, 256, (200_001,), generator=generator, dtype=torch.uint8),
            torch.randn(1, generator=generator).to(torch.bfloat16),
            torch.randint(-(1 << 15), 1 << 15, (300_001,), generator=generator, dtype=torch.int16),
        ]
        self.handles = [self.system.offload(t.clone(), layer_id=i) for i, t in enumerate(self.originals)]
        self.system.flush()
        self.placed = [self.system.locate(h) for h in self.handles]
        assert all(where is not None for where in self.placed), "the normal client's tensors did not reach the pool"
        self.own_bytes = sum(-(-t.numel() * t.element_size() // ALIGNMENT) * ALIGNMENT for t in self.originals)
        self.checks = 0

    @property
    def token(self) -> str:
        return self.system.token

    @property
    def handle_ids(self) -> list[int]:
        return [where[0] for where in self.placed if where is not None]

    def verify(self) -> None:
        for handle, original in zip(self.handles, self.originals, strict=True):
            fetched = self.system.fetch(handle)
            assert fetched.dtype == original.dtype and torch.equal(fetched, original), f"{handle!r} came back changed"
        stats = self.system.stats().as_dict()
        assert stats["used_bytes"] == self.own_bytes, stats
        assert stats["handles"] == len(self.handles), stats
        assert stats["kept_tensors"] == 0 and stats["pool_bytes"] == POOL_BYTES, stats
        assert stats["offloaded_tensors"] == len(self.handles), stats
        assert set(stats["layer_bytes"]) == set(range(len(self.handles))), stats
        self.checks += 1

    def close(self) -> None:
        self.system.close()


def check_pool(daemon: DaemonProcess, normal: NormalClient) -> None:
    """The daemon's books balance, and the normal client's session is intact."""
    stats = daemon.stats()
    assert stats["used_bytes"] + stats["reserved_bytes"] + stats["free_bytes"] == stats["pool_bytes"] == POOL_BYTES
    held = sum(s["used_bytes"] + s["reserved_bytes"] for s in stats["sessions"])
    closing = stats["reclaiming_bytes"] + stats["fenced_bytes"]  # sessions no longer listed, bytes not back yet
    assert held + closing == stats["used_bytes"] + stats["reserved_bytes"], stats
    if not closing:
        assert sum(s["used_bytes"] for s in stats["sessions"]) == stats["used_bytes"], stats
    assert sum(s["handles"] for s in stats["sessions"]) == stats["extents"], stats
    assert stats["used_bytes"] >= 0 and stats["reserved_bytes"] >= 0, stats
    assert ErrorCode.INTERNAL.value not in stats["errors"], stats["errors"]
    mine = [s for s in stats["sessions"] if s["id"] == normal.system.session_id]
    assert len(mine) == 1 and mine[0]["used_bytes"] == normal.own_bytes, mine


# -- the runs ---------------------------------------------------------------------------


@contextlib.contextmanager
def _fuzz_setup(daemon_factory: StartDaemon) -> Iterator[tuple[DaemonProcess, NormalClient, Fuzzer]]:
    daemon = daemon_factory(pool_size=POOL_SIZE)
    normal = NormalClient(daemon.endpoint, seed=int.from_bytes(os.urandom(4), "little"))
    world = World(normal_token=normal.token, normal_handles=normal.handle_ids)
    fuzzer = Fuzzer(daemon, world)
    try:
        for _ in range(2):
            fuzzer.register()
        assert len(world.tokens) == 2
        yield daemon, normal, fuzzer
    finally:
        fuzzer.close()
        normal.close()


def run_fuzz(daemon_factory: StartDaemon, examples: int) -> Fuzzer:
    with _fuzz_setup(daemon_factory) as (daemon, normal, fuzzer):
        world = fuzzer.world
        count = itertools.count(1)
        started = time.monotonic()

        @settings(
            max_examples=examples,
            deadline=None,
            derandomize=False,
            print_blob=True,
            suppress_health_check=list(HealthCheck),
        )
        @given(st.data())
        def fuzz_one(data: st.DataObject) -> None:
            if len(world.tokens) < 2:
                fuzzer.register()
            message = data.draw(messages(), label="message")
            frames = message.frames(world)
            for _ in range(message.repeat):
                fuzzer.exchange(frames)
            assert daemon.proc.poll() is None, f"stormd died ({daemon.proc.returncode}); log:\n{daemon.log()[-4000:]}"
            n = next(count)
            if n % POOL_CHECK_EVERY == 0:
                check_pool(daemon, normal)
            if n == examples // 2:
                normal.verify()

        fuzz_one()
        elapsed = time.monotonic() - started
        normal.verify()
        check_pool(daemon, normal)
        channel = daemon.channel()
        try:
            assert channel.call(Op.PING)["pid"] == daemon.proc.pid
        finally:
            channel.close()
        assert daemon.proc.poll() is None
        assert normal.checks >= 2
        log = daemon.log()
        assert "Traceback" not in log and "internal error" not in log, log[-4000:]
        print(
            f"\nfuzz: {fuzzer.sent} messages ({fuzzer.replies} answered, {fuzzer.unanswered} over the size limit) "
            f"in {elapsed:.1f} s; ok {dict(sorted(fuzzer.ok.items()))}; errors {dict(sorted(fuzzer.codes.items()))}"
        )
    return fuzzer


def test_fuzz_live_daemon(daemon_factory: StartDaemon) -> None:
    fuzzer = run_fuzz(daemon_factory, examples=300)
    assert fuzzer.replies >= 250


@pytest.mark.fuzz_long
@pytest.mark.timeout(1200)
def test_fuzz_live_daemon_long(daemon_factory: StartDaemon) -> None:
    fuzzer = run_fuzz(daemon_factory, examples=20_000)
    assert fuzzer.sent >= 20_000


# -- regressions: values the daemon once answered badly ---------------------------------


def _one_reply(daemon: DaemonProcess, frame: bytes) -> bytes:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(daemon.endpoint)
    try:
        sock.send(frame)
        assert sock.poll(int(REPLY_TIMEOUT_S * 1000)), "no reply"
        return sock.recv()
    finally:
        sock.close()


EXPECTED_CODE = {"v": ErrorCode.UNSUPPORTED_VERSION, "op": ErrorCode.UNKNOWN_OP, "sizes": ErrorCode.BAD_REQUEST}


@pytest.mark.parametrize("where", ["v", "op", "sizes"])
def test_deeply_nested_value_is_a_clean_error(daemon: DaemonProcess, where: str) -> None:
    """Was: repr of a list nested 1000 deep raised RecursionError, answered INTERNAL with id nil."""
    msg: dict[str, Any] = {"v": 2, "id": 7, "op": "offload", "token": "t", "sizes": [1]}
    msg[where] = [_deep(DEEP)] if where == "sizes" else _deep(DEEP)
    reply = decode_reply(_one_reply(daemon, msgpack.packb(msg, use_bin_type=True)))
    assert daemon.proc.poll() is None
    assert (reply.ok, reply.code, reply.id) == (False, EXPECTED_CODE[where].value, 7), reply
    assert "Traceback" not in daemon.log()


@pytest.mark.parametrize("where", ["sizes", "v", "op", "unknown_field"])
def test_error_reply_to_a_large_value_decodes(daemon: DaemonProcess, where: str) -> None:
    """Was: the message quoted the value whole (1.2 MB), past decode_reply's 1 MiB string bound."""
    big = BIG_STRINGS[0]
    msg: dict[str, Any] = {"v": 2, "id": 7, "op": "offload", "token": "t", "sizes": [1]}
    if where == "sizes":
        msg["sizes"] = [big]
    elif where == "unknown_field":
        msg[big] = 1
    else:
        msg[where] = big
    reply = decode_reply(_one_reply(daemon, msgpack.packb(msg, use_bin_type=True)))
    assert not reply.ok and reply.id == 7 and reply.code != ErrorCode.INTERNAL.value, reply
    assert 0 < len(reply.message) <= 4096, len(reply.message)
