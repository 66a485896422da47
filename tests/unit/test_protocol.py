"""Validation of every request by :mod:`storm_service.protocol`, the error-code mapping of
:mod:`storm_service.errors`, and the settings parsers of :mod:`storm_service.units` and
:mod:`storm_service.config`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgpack
import pytest

from storm_service import errors
from storm_service.config import ConfigError, build_parser, load_config
from storm_service.errors import ErrorCode, ProtocolError
from storm_service.protocol import (
    FIELDS,
    MAX_BATCH,
    MAX_ID,
    MAX_MESSAGE_BYTES,
    MAX_SIZE_BYTES,
    MAX_STR,
    PROTOCOL_VERSION,
    SESSIONLESS_OPS,
    Invalid,
    Op,
    decode_reply,
    decode_request,
    encode_error,
    encode_ok,
    encode_request,
)
from storm_service.units import format_bytes, parse_duration, parse_size

TOKEN = "t0ken"

# One valid request per op: (op, token, fields).
VALID: dict[Op, tuple[str | None, dict[str, Any]]] = {
    Op.PING: (None, {}),
    Op.REGISTER: (
        None,
        {
            "pid": 1234,
            "name": "rank0",
            "rank": 0,
            "world_size": 8,
            "quota_bytes": 1 << 30,
            "pid_ns": 7,
            "nonce": "0" * 32,
        },
    ),
    Op.UNREGISTER: (TOKEN, {}),
    Op.HEARTBEAT: (TOKEN, {}),
    Op.OFFLOAD: (TOKEN, {"sizes": [1, 4096, MAX_SIZE_BYTES], "layer_id": 3}),
    Op.COMMIT: (TOKEN, {"handles": [1, 2]}),
    Op.FETCH: (TOKEN, {"handles": [MAX_ID]}),
    Op.FREE: (TOKEN, {"handles": [5]}),
    Op.STATS: (None, {}),
    Op.SHUTDOWN: (None, {}),
}


def _frame(**msg: Any) -> bytes:
    base: dict[Any, Any] = {"v": PROTOCOL_VERSION, "id": 9, "op": "ping", "token": None}
    base.update(msg)
    return msgpack.packb(base, use_bin_type=True)


def _invalid(frame: bytes, code: ErrorCode, *words: str) -> Invalid:
    with pytest.raises(Invalid) as info:
        decode_request(frame)
    assert info.value.code is code, info.value.message
    for word in words:
        assert word in info.value.message, info.value.message
    return info.value


def test_every_op_is_covered_by_the_examples() -> None:
    assert set(VALID) == set(Op) == set(FIELDS)


@pytest.mark.parametrize("op", list(Op))
def test_every_op_round_trips(op: Op) -> None:
    token, fields = VALID[op]
    request = decode_request(encode_request(42, op, token, **fields))
    assert (request.id, request.op, request.token, request.args) == (42, op, token, fields)


def test_optional_fields_may_be_absent_or_nil() -> None:
    request = decode_request(encode_request(1, Op.REGISTER, None, pid=1, name=None))
    assert request.args == {"pid": 1}
    assert decode_request(encode_request(1, Op.OFFLOAD, TOKEN, sizes=[1])).args == {"sizes": [1]}


@pytest.mark.parametrize(
    "frame",
    [b"", b"\xc1", b"\x92\x01", b"\x81\xa1", b"\xff" * 16, msgpack.packb({"v": 2}) + b"extra"],
    ids=["empty", "reserved-byte", "truncated-array", "truncated-map", "garbage", "trailing-bytes"],
)
def test_garbage_bytes_are_bad_requests(frame: bytes) -> None:
    error = _invalid(frame, ErrorCode.BAD_REQUEST)
    assert error.request_id is None


@pytest.mark.parametrize("value", [[1, 2], "ping", 7, None])
def test_non_map_message_is_a_bad_request(value: Any) -> None:
    _invalid(msgpack.packb(value), ErrorCode.BAD_REQUEST, "must be a map")


def test_non_string_map_keys_are_refused() -> None:
    _invalid(msgpack.packb({1: 2, "id": 1}), ErrorCode.BAD_REQUEST, "not valid msgpack")


def test_invalid_utf8_string_is_a_bad_request() -> None:
    _invalid(b"\x81\xa2id\xa2\xff\xfe", ErrorCode.BAD_REQUEST, "not valid msgpack")


def test_frame_over_the_size_limit_is_refused_before_decoding() -> None:
    _invalid(b"\x00" * (MAX_MESSAGE_BYTES + 1), ErrorCode.BAD_REQUEST, str(MAX_MESSAGE_BYTES))


@pytest.mark.parametrize("bad_id", ["missing", -1, True, 1.0, "7", MAX_ID + 1, None])
def test_request_id_must_be_a_non_negative_integer(bad_id: Any) -> None:
    msg = {"v": 2, "op": "ping"} if bad_id == "missing" else {"v": 2, "op": "ping", "id": bad_id}
    error = _invalid(msgpack.packb(msg), ErrorCode.BAD_REQUEST, "'id'")
    assert error.request_id is None


@pytest.mark.parametrize("version", [0, 1, 3, "2", None, "missing"])
def test_other_protocol_versions_are_unsupported(version: Any) -> None:
    frame = msgpack.packb({"id": 9, "op": "ping"}) if version == "missing" else _frame(v=version)
    error = _invalid(frame, ErrorCode.UNSUPPORTED_VERSION, "version", str(PROTOCOL_VERSION))
    assert error.request_id == 9


@pytest.mark.parametrize("version", [True, 2.0])
def test_version_must_be_the_integer_two(version: Any) -> None:
    _invalid(_frame(v=version), ErrorCode.UNSUPPORTED_VERSION)


@pytest.mark.parametrize("op", ["launch", "", "PING", ["ping"], 3, None, {"op": "ping"}])
def test_unknown_or_non_string_op_is_unknown(op: Any) -> None:
    error = _invalid(_frame(op=op), ErrorCode.UNKNOWN_OP, "unknown op")
    assert error.request_id == 9


@pytest.mark.parametrize("op", sorted(set(Op) - SESSIONLESS_OPS))
def test_session_ops_require_a_token(op: Op) -> None:
    _, fields = VALID[op]
    _invalid(encode_request(1, op, None, **fields), ErrorCode.UNKNOWN_SESSION, op.value, "token")


@pytest.mark.parametrize("token", [5, b"bytes", "x" * (MAX_STR + 1), ["t"]])
def test_token_must_be_a_short_string(token: Any) -> None:
    _invalid(_frame(op="heartbeat", token=token), ErrorCode.BAD_REQUEST, "'token'")


def test_unknown_fields_are_refused_by_name() -> None:
    _invalid(_frame(op="heartbeat", token=TOKEN, extra=1), ErrorCode.BAD_REQUEST, "heartbeat", "extra")
    _invalid(_frame(op="ping", handles=[1]), ErrorCode.BAD_REQUEST, "ping", "handles")


def test_missing_required_field_is_named() -> None:
    _invalid(_frame(op="register"), ErrorCode.BAD_REQUEST, "register", "'pid'", "required")
    _invalid(_frame(op="offload", token=TOKEN), ErrorCode.BAD_REQUEST, "offload", "'sizes'", "required")
    _invalid(_frame(op="free", token=TOKEN, handles=None), ErrorCode.BAD_REQUEST, "'handles'", "required")


@pytest.mark.parametrize(
    ("op", "field", "value", "words"),
    [
        ("register", "pid", "1234", ("'pid'", "integer", "str")),
        ("register", "pid", True, ("'pid'", "integer", "bool")),
        ("register", "pid", 12.0, ("'pid'", "integer", "float")),
        ("register", "pid", -1, ("'pid'", "outside")),
        ("register", "pid", 1 << 31, ("'pid'", "outside")),
        ("register", "rank", -1, ("'rank'", "outside")),
        ("register", "world_size", 0, ("'world_size'", "outside")),
        ("register", "quota_bytes", 0, ("'quota_bytes'", "outside")),
        ("register", "quota_bytes", MAX_SIZE_BYTES + 1, ("'quota_bytes'", "outside")),
        ("register", "name", 5, ("'name'", "string", "int")),
        ("register", "name", "n" * (MAX_STR + 1), ("'name'", str(MAX_STR))),
        ("offload", "sizes", 4096, ("'sizes'", "list", "int")),
        ("offload", "sizes", [], ("'sizes'", "0 items")),
        ("offload", "sizes", [1] * (MAX_BATCH + 1), ("'sizes'", f"{MAX_BATCH + 1} items")),
        ("offload", "sizes", [0], ("'sizes'", "items", "0")),
        ("offload", "sizes", [-4096], ("'sizes'", "-4096")),
        ("offload", "sizes", [MAX_SIZE_BYTES + 1], ("'sizes'", str(MAX_SIZE_BYTES + 1))),
        ("offload", "sizes", ["4096"], ("'sizes'", "'4096'")),
        ("offload", "sizes", [True], ("'sizes'", "True")),
        ("offload", "sizes", [1.5], ("'sizes'", "1.5")),
        ("offload", "layer_id", -2, ("'layer_id'", "outside")),
        ("offload", "layer_id", "l1", ("'layer_id'", "integer")),
        ("fetch", "handles", [0], ("'handles'", "0")),
        ("fetch", "handles", {"1": 1}, ("'handles'", "list", "dict")),
        ("free", "handles", [1] * (MAX_BATCH + 1), ("'handles'", "items")),
    ],
)
def test_wrong_types_and_out_of_range_values_name_the_field(op: str, field: str, value: Any, words: tuple) -> None:
    token, fields = VALID[Op(op)]
    msg = {**fields, field: value}
    error = _invalid(_frame(op=op, token=token, **msg), ErrorCode.BAD_REQUEST, op, *words)
    assert error.request_id == 9


def test_largest_batch_is_accepted() -> None:
    request = decode_request(encode_request(1, Op.FREE, TOKEN, handles=list(range(1, MAX_BATCH + 1))))
    assert len(request.args["handles"]) == MAX_BATCH


def test_unknown_fields_mixing_string_and_bytes_keys_are_a_bad_request() -> None:
    # strict_map_key admits bytes keys; they are unknown fields like any other.
    frame = msgpack.packb({"v": 2, "id": 1, "op": "ping", "token": None, b"x": 1, "y": 2}, use_bin_type=True)
    _invalid(frame, ErrorCode.BAD_REQUEST, "unknown fields")


def test_a_bytes_key_alone_is_an_unknown_field() -> None:
    frame = msgpack.packb({"v": 2, "id": 1, "op": "ping", "token": None, b"x": 1}, use_bin_type=True)
    _invalid(frame, ErrorCode.BAD_REQUEST, "unknown fields")


# -- replies --------------------------------------------------------------------


def test_ok_reply_round_trips() -> None:
    reply = decode_reply(encode_ok(5, {"extents": [{"handle": 1}]}))
    assert (reply.id, reply.ok, reply.result, reply.code) == (5, True, {"extents": [{"handle": 1}]}, "")


@pytest.mark.parametrize("request_id", [5, None])
def test_error_reply_round_trips(request_id: int | None) -> None:
    reply = decode_reply(encode_error(request_id, ErrorCode.POOL_FULL, "offload: 10 bytes requested, 0 free"))
    assert (reply.id, reply.ok, reply.result) == (request_id, False, {})
    assert (reply.code, reply.message) == ("POOL_FULL", "offload: 10 bytes requested, 0 free")


@pytest.mark.parametrize(
    "frame",
    [
        b"\xc1",
        msgpack.packb([1]),
        msgpack.packb({"id": 1}),
        msgpack.packb({"id": 1, "ok": 1}),
        msgpack.packb({"id": "1", "ok": True, "result": {}}),
        msgpack.packb({"id": 1, "ok": True, "result": []}),
        msgpack.packb({"id": 1, "ok": False, "error": "POOL_FULL"}),
    ],
)
def test_malformed_replies_raise_protocol_error(frame: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_reply(frame)


ERROR_CLASSES = {
    ErrorCode.BAD_REQUEST: errors.BadRequestError,
    ErrorCode.UNKNOWN_OP: errors.UnknownOpError,
    ErrorCode.UNSUPPORTED_VERSION: errors.UnsupportedVersionError,
    ErrorCode.UNKNOWN_SESSION: errors.UnknownSessionError,
    ErrorCode.UNKNOWN_HANDLE: errors.UnknownHandleError,
    ErrorCode.FORBIDDEN: errors.ForbiddenError,
    ErrorCode.NOT_COMMITTED: errors.NotCommittedError,
    ErrorCode.POOL_FULL: errors.PoolFullError,
    ErrorCode.QUOTA_EXCEEDED: errors.QuotaExceededError,
    ErrorCode.SESSION_LIMIT: errors.SessionLimitError,
    ErrorCode.ACTIVATION_LOST: errors.ActivationLostError,
    ErrorCode.SHUTTING_DOWN: errors.ShuttingDownError,
    ErrorCode.INTERNAL: errors.InternalError,
}


@pytest.mark.parametrize("code", list(ErrorCode))
def test_error_for_code_maps_each_code_to_its_class(code: ErrorCode) -> None:
    error = errors.error_for_code(code.value, "the sentence")
    assert type(error) is ERROR_CLASSES[code]
    assert isinstance(error, errors.RemoteError) and isinstance(error, errors.StormError)
    assert error.code is code and error.message == "the sentence"
    assert str(error) == f"{code.value}: the sentence"


def test_error_for_an_unknown_code_is_internal_and_keeps_the_code() -> None:
    error = errors.error_for_code("NEW_CODE", "why")
    assert type(error) is errors.InternalError
    assert "NEW_CODE" in error.message and "why" in error.message


# -- units ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size_bytes"),
    [
        ("512MiB", 512 << 20),
        ("8GiB", 8 << 30),
        ("1.5GB", 1_500_000_000),
        ("4096", 4096),
        ("64 kib", 64 << 10),
        ("2T", 2 * 1000**4),
        ("100TiB", 100 << 40),
        (4096, 4096),
    ],
)
def test_parse_size_accepts_units(text: str | int, size_bytes: int) -> None:
    assert parse_size(text) == size_bytes


@pytest.mark.parametrize("text", ["", "lots", "-5MiB", "5 MiBs", "1e9", "MiB", "5 5"])
def test_parse_size_rejects_bad_input(text: str) -> None:
    with pytest.raises(ValueError, match="is not a size"):
        parse_size(text)


@pytest.mark.parametrize(("text", "seconds"), [("5", 5.0), ("2.5s", 2.5), ("250ms", 0.25), ("1m", 60.0), (3, 3.0)])
def test_parse_duration_accepts_units(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["soon", "5h", "-1s", ""])
def test_parse_duration_rejects_bad_input(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)


def test_format_bytes_uses_binary_units() -> None:
    assert [format_bytes(n) for n in (512, 1536, 8 << 30, 3 << 40)] == ["512 B", "1.5 KiB", "8.0 GiB", "3.0 TiB"]


# -- config -----------------------------------------------------------------------


def _load(argv: list[str], environ: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return load_config(build_parser().parse_args(argv), environ or {})


def test_defaults_apply_without_flags_env_or_file() -> None:
    config = _load([])
    assert (config.pool_size, config.heartbeat_timeout, config.quota) == (1 << 30, 5.0, 0)
    assert config.endpoint.startswith("ipc://") and config.endpoint.endswith("/stormd.sock")


def test_flags_beat_env_beat_file_beat_defaults(tmp_path: Path) -> None:
    path = tmp_path / "stormd.toml"
    path.write_text('pool_size = "2GiB"\nheartbeat_timeout = "7s"\nquota = "1MiB"\nlog_level = "debug"\n')
    env = {"STORM_POOL_SIZE": "3GiB", "STORM_HEARTBEAT_TIMEOUT": "9s"}
    config = _load(["--config", str(path), "--pool-size", "4GiB"], env)
    assert config.pool_size == 4 << 30  # flag
    assert config.heartbeat_timeout == 9.0  # env over file
    assert config.quota == 1 << 20  # file over default
    assert config.log_level == "DEBUG"  # file, normalised
    assert config.segment_size == 64 << 30  # default


def test_config_file_may_use_a_stormd_table(tmp_path: Path) -> None:
    path = tmp_path / "stormd.toml"
    path.write_text('[stormd]\npool_size = 1048576\nlog_level = "ERROR"\n')
    config = _load(["--config", str(path)])
    assert (config.pool_size, config.log_level) == (1 << 20, "ERROR")


@pytest.mark.parametrize(
    ("argv", "env", "words"),
    [
        (["--pool-size", "lots"], {}, ("--pool-size", "'lots'")),
        (["--pool-size", "0"], {}, ("--pool-size", "positive")),
        ([], {"STORM_POOL_SIZE": "huge"}, ("STORM_POOL_SIZE", "'huge'")),
        (["--heartbeat-timeout=-1s"], {}, ("--heartbeat-timeout",)),
        (["--heartbeat-timeout", "0"], {}, ("--heartbeat-timeout", "positive")),
        (["--quota=-1"], {}, ("--quota", "not a size")),
        ([], {"STORM_LOG_LEVEL": "LOUD"}, ("STORM_LOG_LEVEL", "DEBUG")),
        (["--endpoint", "tcp://127.0.0.1:5555"], {}, ("endpoint", "tcp://127.0.0.1:5555", "CURVE")),
        ([], {"STORM_ENDPOINT": "tcp://*:1"}, ("endpoint", "tcp://*:1", "CURVE")),
        (["--endpoint", "/tmp/x.sock"], {}, ("--endpoint", "ipc://")),
    ],
)
def test_bad_values_name_the_setting(argv: list[str], env: dict[str, str], words: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError) as info:
        _load(argv, env)
    for word in words:
        assert word in str(info.value)


def test_bad_value_in_the_file_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "stormd.toml"
    path.write_text("pool_size = -5\n")
    with pytest.raises(ConfigError, match="pool_size in the config file"):
        _load(["--config", str(path)])


def test_unknown_key_in_the_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "stormd.toml"
    path.write_text('pool_size = "1GiB"\npool_sise = "2GiB"\n')
    with pytest.raises(ConfigError, match=r"unknown settings \['pool_sise'\]"):
        _load(["--config", str(path)])


@pytest.mark.parametrize(("content", "words"), [(None, "cannot read"), ("pool_size = = 1", "not valid TOML")])
def test_unreadable_or_invalid_file_is_an_error(tmp_path: Path, content: str | None, words: str) -> None:
    path = tmp_path / "stormd.toml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=words):
        _load(["--config", str(path)])
