"""The STORM wire protocol: every message, its fields and bounds, in one place.

Transport: a ZeroMQ ROUTER in the daemon, one DEALER per client thread. Each message
is a single frame holding one msgpack map (never pickle)::

    client DEALER ──[ request map ]──▶ ROUTER stormd   (ROUTER sees [identity, map])
    client DEALER ◀──[  reply map  ]── ROUTER stormd

    request = {"v": 2, "id": <int>, "op": <str>, "token": <str|nil>, <op fields>...}
    reply   = {"v": 2, "id": <same int>, "ok": true,  "result": {...}}
            | {"v": 2, "id": <same int|nil>, "ok": false,
               "error": {"code": <ErrorCode>, "message": <sentence>}}

Request ids are chosen by the client, unique within its session; the daemon echoes
them so that replies can be matched, and remembers the last replies to mutating ops
so that a replayed request is answered again instead of being applied twice.

Batched ops (offload, commit, fetch, free) take lists, so a layer's tensors cost one
message; a single tensor is a list of one. ``docs/protocol.md`` shows one example per
op. This module imports nothing from the rest of the daemon and nothing from torch.
"""

from __future__ import annotations

import reprlib
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NamedTuple, cast

import msgpack

from storm_service.errors import ErrorCode, ProtocolError

__all__ = [
    "MAX_BATCH",
    "MAX_DEVICE_LEN",
    "MAX_ERROR_MESSAGE",
    "MAX_LISTED_SESSIONS",
    "MAX_MESSAGE_BYTES",
    "MAX_NONCE_LEN",
    "MAX_SLABS",
    "MAX_SESSION_LAYERS",
    "MAX_SIZE_BYTES",
    "MIN_NONCE_LEN",
    "OVERFLOW_LAYER_ID",
    "PROTOCOL_VERSION",
    "Invalid",
    "Op",
    "Reply",
    "Request",
    "decode_reply",
    "decode_request",
    "encode_error",
    "encode_ok",
    "encode_request",
]

PROTOCOL_VERSION = 2
"""2: extents name a slab (``slab``), and register lends through the fd socket (``fd_socket``)."""
MAX_MESSAGE_BYTES = 1 << 20
"""Largest frame either side accepts (also the daemon's ZMQ_MAXMSGSIZE)."""
MAX_BATCH = 4096
"""Most items in one batched op."""
MAX_SIZE_BYTES = 1 << 48
"""Largest size in bytes any field may carry."""
MAX_STR = 256
MAX_ID = (1 << 63) - 1
MAX_ERROR_MESSAGE = 1024
"""Error messages are cut to this many characters: they may quote what a client sent."""
MAX_SESSION_LAYERS = 8192
"""Most layer ids one session's per-layer stats (``layer_bytes``) keep apart (NOTE [Layer stats cap])."""
OVERFLOW_LAYER_ID = -2
"""The ``layer_bytes`` key that counts the bytes of layers past :data:`MAX_SESSION_LAYERS`.

No offload can name it: ``layer_id`` starts at -1.
"""
MAX_LISTED_SESSIONS = 512
"""Most sessions one stats reply lists (those holding the most bytes); ``live_sessions`` counts all."""
MAX_SLABS = 4096
"""Most slabs a pool may have: each holds an fd in the daemon (NOTE [Slabs] in slabs.py)."""
MIN_NONCE_LEN = 16
MAX_NONCE_LEN = 64
"""Bounds, in characters, of a register ``nonce`` (NOTE [Register nonce] in ``storm_service/sessions.py``).

At least 16: a nonce answers with the session's token, so it must be as hard to guess as one.
"""


class Op(StrEnum):
    PING = "ping"
    REGISTER = "register"
    UNREGISTER = "unregister"
    HEARTBEAT = "heartbeat"
    OFFLOAD = "offload"
    COMMIT = "commit"
    FETCH = "fetch"
    FREE = "free"
    STATS = "stats"
    SHUTDOWN = "shutdown"


MAX_DEVICE_LEN = 64
"""Longest ``device`` of an offload: ``cpu``, or a GPU's UUID (``GPU-`` and 36 characters)."""

MUTATING_OPS = frozenset({Op.OFFLOAD, Op.COMMIT, Op.FREE})
"""Ops whose replies the daemon remembers, so that a replayed request is not applied twice."""
SESSIONLESS_OPS = frozenset({Op.PING, Op.REGISTER, Op.STATS, Op.SHUTDOWN})
"""Ops that need no session token (stats answers for the whole daemon without one)."""


@dataclass(frozen=True)
class _Int:
    lo: int
    hi: int
    required: bool = True


@dataclass(frozen=True)
class _Str:
    max_len: int = MAX_STR
    required: bool = True
    min_len: int = 0


@dataclass(frozen=True)
class _IntList:
    lo: int
    hi: int
    max_len: int = MAX_BATCH
    required: bool = True


_Spec = _Int | _Str | _IntList
_HANDLES = _IntList(1, MAX_ID)
_LAYER = _Int(-1, (1 << 31) - 1, required=False)

FIELDS: dict[Op, dict[str, _Spec]] = {
    Op.PING: {},
    Op.REGISTER: {
        "pid": _Int(0, (1 << 31) - 1),
        "name": _Str(required=False),
        "rank": _Int(0, 1 << 20, required=False),
        "world_size": _Int(1, 1 << 20, required=False),
        "quota_bytes": _Int(1, MAX_SIZE_BYTES, required=False),
        "pid_ns": _Int(0, MAX_ID, required=False),
        "nonce": _Str(MAX_NONCE_LEN, required=False, min_len=MIN_NONCE_LEN),
    },
    Op.UNREGISTER: {},
    Op.HEARTBEAT: {},
    Op.OFFLOAD: {
        "sizes": _IntList(1, MAX_SIZE_BYTES),
        "layer_id": _LAYER,
        "device": _Str(MAX_DEVICE_LEN, required=False, min_len=1),
    },
    Op.COMMIT: {
        "handles": _HANDLES,
        "dedup_saved_bytes": _Int(0, MAX_SIZE_BYTES, required=False),
        "span_saved_bytes": _Int(0, MAX_SIZE_BYTES, required=False),
    },
    Op.FETCH: {"handles": _HANDLES, "wait": _Int(0, 1, required=False)},
    Op.FREE: {"handles": _HANDLES},
    Op.STATS: {},
    Op.SHUTDOWN: {},
}
"""Op fields beyond the envelope (v, id, op, token). Unknown fields are rejected."""

_ENVELOPE = frozenset({"v", "id", "op", "token"})
_OPS_BY_NAME = {op.value: op for op in Op}
_ALLOWED_KEYS = {op: _ENVELOPE | spec.keys() for op, spec in FIELDS.items()}


class Invalid(Exception):
    """A request failed validation; carries the error code and the request id if known."""

    def __init__(self, code: ErrorCode, message: str, request_id: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


class Request(NamedTuple):  # a NamedTuple: built on every message, cheaper than a dataclass
    id: int
    op: Op
    token: str | None
    args: dict[str, Any]


class Reply(NamedTuple):
    id: int | None
    ok: bool
    result: dict[str, Any]
    code: str = ""
    message: str = ""


# NOTE [Decoder limits]
#   msgpack bounds each map, array and string it decodes, and a frame past any bound does
#   not decode at all. The bounds differ by direction:
#   * Requests (decoded by the daemon) are bounded loosely on purpose: strings by the frame
#     cap, arrays by 4 x MAX_BATCH, maps by 64 keys. An over-long list, an over-long string
#     or a few unknown fields then decode, and are refused by name, with the request's id
#     (BAD_REQUEST), instead of as an unreadable frame with id nil.
#   * Replies (decoded by the client) must decode whatever the daemon can build, so each
#     bound is the largest such thing a reply can hold, and the daemon caps what it builds
#     by the same names: a map at most MAX_SESSION_LAYERS layer ids plus the overflow key
#     (layer_bytes; every fixed-shape map has far fewer than _MAX_FIXED_KEYS keys), an array
#     at most MAX_BATCH extents or MAX_LISTED_SESSIONS sessions, a
#     string at most MAX_ERROR_MESSAGE characters (error messages; names are MAX_STR) of
#     up to 4 UTF-8 bytes each, and no bin or ext values. That largest reply also fits in
#     MAX_MESSAGE_BYTES. tests/unit/test_reply_limits.py builds it and decodes it; a new reply
#     field holding a map or array needs a cap here, in the producer and in that test.
_MAX_FIXED_KEYS = 64
"""More keys than any fixed-shape map has (a result, a session summary, the per-op and per-code counters)."""
_UTF8_MAX_BYTES = 4
_REQUEST_LIMITS: dict[str, int] = {
    "max_str_len": MAX_MESSAGE_BYTES,
    "max_bin_len": MAX_MESSAGE_BYTES,
    "max_array_len": MAX_BATCH * 4,
    "max_map_len": _MAX_FIXED_KEYS,
    "max_ext_len": 0,
}
_REPLY_LIMITS: dict[str, int] = {
    "max_str_len": _UTF8_MAX_BYTES * max(MAX_ERROR_MESSAGE, MAX_STR),
    "max_bin_len": 0,
    "max_array_len": max(MAX_BATCH, MAX_LISTED_SESSIONS),
    "max_map_len": max(MAX_SESSION_LAYERS + 1, _MAX_FIXED_KEYS),
    "max_ext_len": 0,
}


def _unpack(frame: bytes, limits: dict[str, int]) -> Any:
    # Map keys must be str or bytes; every container and string within ``limits``.
    return msgpack.unpackb(frame, raw=False, strict_map_key=True, **limits)


_packers = threading.local()


def _pack(obj: Mapping[str, Any]) -> bytes:
    # A Packer per thread: reusing one saves building it per message (a third of packb's cost).
    try:
        packer = _packers.packer
    except AttributeError:
        packer = _packers.packer = msgpack.Packer(use_bin_type=True)
    return cast(bytes, packer.pack(obj))


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict = 2, 64, 64, 6, 4


def _show(value: Any) -> str:
    """A short, bounded repr of a client's value for an error message (never recurses deep)."""
    return _REPR.repr(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_field(op: Op, name: str, spec: _Spec, value: Any) -> None:
    where = f"{op.value}: field {name!r}"
    if isinstance(spec, _Int):
        if not _is_int(value):
            raise ValueError(f"{where} must be an integer, got {type(value).__name__}")
        if not spec.lo <= value <= spec.hi:
            raise ValueError(f"{where} = {value} is outside [{spec.lo}, {spec.hi}]")
    elif isinstance(spec, _Str):
        if not isinstance(value, str):
            raise ValueError(f"{where} must be a string, got {type(value).__name__}")
        if len(value) > spec.max_len:
            raise ValueError(f"{where} is {len(value)} characters, at most {spec.max_len}")
        if len(value) < spec.min_len:
            raise ValueError(f"{where} is {len(value)} characters, at least {spec.min_len}")
    else:
        if not isinstance(value, list):
            raise ValueError(f"{where} must be a list, got {type(value).__name__}")
        if not 1 <= len(value) <= spec.max_len:
            raise ValueError(f"{where} has {len(value)} items, expected 1 to {spec.max_len}")
        for item in value:
            if not _is_int(item) or not spec.lo <= item <= spec.hi:
                raise ValueError(f"{where} items must be integers in [{spec.lo}, {spec.hi}], got {_show(item)}")


def decode_request(frame: bytes) -> Request:
    """Decode and validate one request frame; raises :class:`Invalid` on any defect."""
    if len(frame) > MAX_MESSAGE_BYTES:
        raise Invalid(ErrorCode.BAD_REQUEST, f"message is {len(frame)} bytes, at most {MAX_MESSAGE_BYTES}")
    try:
        msg = _unpack(frame, _REQUEST_LIMITS)
    except Exception as e:  # msgpack raises a zoo of types for malformed input
        raise Invalid(ErrorCode.BAD_REQUEST, f"message is not valid msgpack: {e}") from e
    # Exact type checks: msgpack yields plain int, str and dict, and ``type(x) is int`` rejects bool.
    if type(msg) is not dict:
        raise Invalid(ErrorCode.BAD_REQUEST, f"message must be a map, got {type(msg).__name__}")
    request_id = msg.get("id")
    if type(request_id) is not int or not 0 <= request_id <= MAX_ID:
        raise Invalid(ErrorCode.BAD_REQUEST, f"field 'id' must be an integer in [0, {MAX_ID}]")
    version = msg.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise Invalid(
            ErrorCode.UNSUPPORTED_VERSION,
            f"protocol version {_show(version)} is not supported; this daemon speaks {PROTOCOL_VERSION}",
            request_id,
        )
    raw_op = msg.get("op")
    op = _OPS_BY_NAME.get(raw_op) if type(raw_op) is str else None
    if op is None:
        raise Invalid(ErrorCode.UNKNOWN_OP, f"unknown op {_show(raw_op)}", request_id)
    token = msg.get("token")
    if token is None:
        if op not in SESSIONLESS_OPS:
            raise Invalid(ErrorCode.UNKNOWN_SESSION, f"{op}: a session token is required", request_id)
    elif type(token) is not str or len(token) > MAX_STR:
        raise Invalid(ErrorCode.BAD_REQUEST, f"{op}: field 'token' must be a short string", request_id)
    allowed = _ALLOWED_KEYS[op]
    if not msg.keys() <= allowed:  # bytes keys (msgpack bin) fail here too
        names = ", ".join(sorted(map(_show, msg.keys() - allowed))[:8])
        raise Invalid(ErrorCode.BAD_REQUEST, f"{op}: unknown fields {names}", request_id)
    spec = FIELDS[op]
    args: dict[str, Any] = {}
    if spec:
        try:
            for name, field in spec.items():
                value = msg.get(name)
                if value is None:
                    if field.required:
                        raise ValueError(f"{op}: field {name!r} is required")
                    continue
                _check_field(op, name, field, value)
                args[name] = value
        except ValueError as e:
            raise Invalid(ErrorCode.BAD_REQUEST, str(e), request_id) from None
    return Request(request_id, op, token, args)


def encode_request(request_id: int, op: Op, token: str | None = None, **fields: Any) -> bytes:
    """Encode a request map (the client side of :func:`decode_request`)."""
    return _pack({"v": PROTOCOL_VERSION, "id": request_id, "op": op, "token": token, **fields})


def encode_ok(request_id: int, result: Mapping[str, Any]) -> bytes:
    return _pack({"v": PROTOCOL_VERSION, "id": request_id, "ok": True, "result": result})


def encode_error(request_id: int | None, code: ErrorCode, message: str) -> bytes:
    error = {"code": code.value, "message": message[:MAX_ERROR_MESSAGE]}
    return _pack({"v": PROTOCOL_VERSION, "id": request_id, "ok": False, "error": error})


def decode_reply(frame: bytes) -> Reply:
    """Decode a reply frame (the client side of :func:`encode_ok` / :func:`encode_error`)."""
    try:
        msg = _unpack(frame, _REPLY_LIMITS)
    except Exception as e:
        raise ProtocolError(f"reply is not valid msgpack: {e}") from e
    if type(msg) is not dict or type(msg.get("ok")) is not bool:
        raise ProtocolError(f"reply is not a reply map: {msg!r:.200}")
    request_id = msg.get("id")
    if request_id is not None and type(request_id) is not int:
        raise ProtocolError(f"reply id must be an integer, got {request_id!r:.50}")
    if msg["ok"]:
        result = msg.get("result")
        if type(result) is not dict:
            raise ProtocolError("reply 'result' must be a map")
        return Reply(request_id, True, result)
    error = msg.get("error")
    if not isinstance(error, dict):
        raise ProtocolError("error reply must carry an 'error' map")
    return Reply(
        id=request_id,
        ok=False,
        result={},
        code=str(error.get("code", ErrorCode.INTERNAL.value)),
        message=str(error.get("message", "")),
    )
