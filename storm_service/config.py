"""stormd's settings: one table, read from flags > environment > TOML file > defaults.

Each setting has a flag (``--pool-size``), an environment variable (``STORM_POOL_SIZE``)
and a key in the config file (``pool_size``); ``docs/operations.md`` lists them all.
Values are validated once, at start, with messages that name the setting.
"""

from __future__ import annotations

import argparse
import grp
import os
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from storm_service.device.spec import DeviceSpec, parse_device_pool
from storm_service.endpoints import SERVER_SECRET_FILE, default_endpoint, ipc_path
from storm_service.protocol import MAX_SLABS
from storm_service.units import format_bytes, parse_duration, parse_size

__all__ = ["ConfigError", "DaemonConfig", "build_parser", "load_config"]

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class ConfigError(ValueError):
    """A setting has an invalid value; the message names the setting and its source."""


@dataclass(frozen=True)
class DaemonConfig:
    endpoint: str
    pool_size: int
    """Bytes of host pool, reserved in /dev/shm at start."""
    segment_size: int
    """Largest slab (NOTE [Lending slabs] in pool.py); slabs are also at most 1/8 of the pool, at least 16 MiB."""
    heartbeat_timeout: float
    """Seconds without a message after which a session is expired and its memory freed."""
    quota: int
    """Bytes one session may hold by default (0: the whole pool)."""
    max_quota: int
    """Largest quota a session may ask for at register (0: the whole pool)."""
    log_level: str
    group: str
    """A group whose members may use the daemon too (socket dir 0750, sockets 0660)."""
    curve_dir: str
    """Directory with server.key_secret and authorized/*.key: required for tcp:// endpoints."""
    metrics_port: int
    """Serve Prometheus metrics on this port (0: off)."""
    metrics_host: str
    """Address the metrics endpoint binds (loopback unless told otherwise)."""
    max_sessions: int
    """Sessions the daemon keeps open at once (0: no cap)."""
    max_tenant_sessions: int
    """Sessions one tenant (uid) keeps open at once (0: no cap)."""
    max_extents: int
    """Extents one session holds at once (0: no cap)."""
    tenant_quota: int
    """Bytes the sessions of one tenant hold together (0: the whole pool)."""
    max_buffered: int
    """Anonymous memory past its own state the daemon lets ZeroMQ buffer before it drops every connection."""
    max_connections_per_uid: int
    """ZeroMQ connections one uid (over tcp://, one remote address) keeps open at once (0: no cap)."""
    remove_on_exit: str
    """The endpoint's directory, removed (once empty) when the daemon exits: an embedded daemon's own."""
    spill_dir: tuple[str, ...] = ()
    """Directories of the disk tier, one spill file each (NOTE [Disk tier] in storm_service/disk/tier.py)."""
    spill_size: int = 0
    """Bytes reserved in each spill file."""
    spill_high_water: float = 0.8
    """Fraction of the host pool in use past which the disk tier starts spilling."""
    device_pool: tuple[DeviceSpec, ...] = ()
    """Devices of the device tier and the bytes each lends (NOTE [Device tier] in storm_service/device/tier.py)."""


def _choice(options: Sequence[str]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = str(text).strip()
        if value.upper() in options:
            return value.upper()
        if value.lower() in options:
            return value.lower()
        raise ValueError(f"{text!r} is not one of {', '.join(options)}")

    return parse


def _endpoint(text: str) -> str:
    value = str(text)
    if not value.startswith(("ipc://", "tcp://")):
        raise ValueError(f"{text!r} is not an ipc:// or tcp:// endpoint")
    return value


MIN_SEGMENT_BYTES = 1 << 20
PAGE_BYTES = 4096


def _segment_size(text: str | int) -> int:
    value = parse_size(text)
    if value < MIN_SEGMENT_BYTES or value % PAGE_BYTES:
        raise ValueError(f"{text!r} must be at least 1MiB and a multiple of 4096 bytes")
    return value


def _port(text: str | int) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError(f"{text!r} is not a port number (0 to 65535)")
    return value


def _group(text: str) -> str:
    value = str(text).strip()
    if value:
        try:
            grp.getgrnam(value)
        except KeyError:
            raise ValueError(f"{text!r} is not a group on this host") from None
    return value


def _curve_dir(text: str) -> str:
    value = str(text).strip()
    if value and not os.path.isfile(os.path.join(value, SERVER_SECRET_FILE)):
        raise ValueError(f"{text!r} holds no {SERVER_SECRET_FILE} (create keys with `stormctl keygen DIR`)")
    return value


def _spill_dirs(text: str) -> tuple[str, ...]:
    dirs = tuple(part.strip() for part in str(text).split(",") if part.strip())
    for path in dirs:
        if not os.path.isabs(path):
            raise ValueError(f"{path!r} is not an absolute path")
    if len(set(dirs)) != len(dirs):
        raise ValueError(f"{text!r} names a directory twice")
    return dirs


def _fraction(text: str | float) -> float:
    value = str(text).strip()
    number = float(value[:-1]) / 100 if value.endswith("%") else float(value)
    if not 0.05 <= number <= 0.99:
        raise ValueError(f"{text!r} is not between 5% and 99% (write 80% or 0.8)")
    return number


def _positive(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def check(text: Any) -> Any:
        value = parse(text)
        if value <= 0:
            raise ValueError(f"{text!r} must be positive")
        return value

    return check


def _non_negative(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def check(text: Any) -> Any:
        value = parse(text)
        if value < 0:
            raise ValueError(f"{text!r} must not be negative")
        return value

    return check


@dataclass(frozen=True)
class _Setting:
    name: str
    parse: Callable[[Any], Any]
    default: Callable[[], Any]
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "STORM_" + self.name.upper()


SETTINGS: tuple[_Setting, ...] = (
    _Setting("endpoint", _endpoint, default_endpoint, "ZeroMQ endpoint to bind (ipc://PATH)"),
    _Setting("pool_size", _positive(parse_size), lambda: "1GiB", "host pool size (e.g. 512MiB, 8GiB)"),
    _Setting("segment_size", _segment_size, lambda: "64GiB", "largest slab of the pool"),
    _Setting(
        "heartbeat_timeout",
        _positive(parse_duration),
        lambda: "5s",
        "expire a session after this long without a message (e.g. 5s, 500ms)",
    ),
    _Setting("quota", _non_negative(parse_size), lambda: "0", "default bytes per session (0: whole pool)"),
    _Setting(
        "max_quota", _non_negative(parse_size), lambda: "0", "largest quota a session may ask for (0: whole pool)"
    ),
    _Setting("log_level", _choice(LOG_LEVELS), lambda: "INFO", "DEBUG, INFO, WARNING or ERROR"),
    _Setting("group", _group, lambda: "", "share the socket and pool with this group (default: owner only)"),
    _Setting("curve_dir", _curve_dir, lambda: "", "CURVE keys (server.key_secret, authorized/*.key) for tcp://"),
    _Setting("metrics_port", _port, lambda: "0", "serve Prometheus metrics on this port (0: off)"),
    _Setting("metrics_host", str, lambda: "127.0.0.1", "address of the metrics endpoint"),
    _Setting("max_sessions", _non_negative(int), lambda: "1024", "sessions open at once (0: no cap)"),
    _Setting("max_tenant_sessions", _non_negative(int), lambda: "256", "sessions one uid keeps open (0: no cap)"),
    _Setting("max_extents", _non_negative(int), lambda: str(1 << 18), "extents one session holds (0: no cap)"),
    _Setting(
        "tenant_quota", _non_negative(parse_size), lambda: "0", "bytes one uid's sessions hold together (0: whole pool)"
    ),
    _Setting(
        "max_buffered",
        _positive(parse_size),
        lambda: "256MiB",
        "memory ZeroMQ may buffer for peers before every connection is dropped",
    ),
    _Setting(
        "max_connections_per_uid",
        _non_negative(int),
        lambda: "64",
        "connections one uid (over tcp://: one address) keeps open; more are refused (0: no cap)",
    ),
    _Setting("remove_on_exit", str, lambda: "", "the endpoint's directory, removed (once empty) when the daemon exits"),
    _Setting("spill_dir", _spill_dirs, lambda: "", "disk tier: PATH[,PATH...], one spill file in each (off if empty)"),
    _Setting("spill_size", _non_negative(parse_size), lambda: "0", "bytes of each spill file (with --spill-dir)"),
    _Setting("spill_high_water", _fraction, lambda: "80%", "host pool use past which the disk tier spills"),
    _Setting(
        "device_pool",
        parse_device_pool,
        lambda: "",
        "device tier: cuda:GPU-UUID=SIZE or fake:NAME=SIZE[@GBPS], comma-separated (off if empty)",
    ),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stormd",
        description="STORM host daemon: a shared host-memory pool for offloaded training activations.",
    )
    parser.add_argument("--config", metavar="FILE.toml", help="read settings from a TOML file")
    for setting in SETTINGS:
        parser.add_argument(
            setting.flag,
            dest=setting.name,
            default=None,
            help=f"{setting.help} [env {setting.env}; default {setting.default()}]".replace("%", "%%"),
        )
    return parser


def _read_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"--config: cannot read {path}: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config: {path} is not valid TOML: {e}") from e
    table = data.get("stormd", data)
    known = {s.name for s in SETTINGS}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"--config: {path}: unknown settings {unknown}; known: {sorted(known)}")
    return dict(table)


def load_config(args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None) -> DaemonConfig:
    """Resolve every setting with precedence flags > environment > file > defaults."""
    environ = os.environ if environ is None else environ
    file_values = _read_file(args.config) if args is not None and args.config else {}
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        flag_value = getattr(args, setting.name, None) if args is not None else None
        if flag_value is not None:
            raw, source = flag_value, setting.flag
        elif setting.env in environ:
            raw, source = environ[setting.env], setting.env
        elif setting.name in file_values:
            raw, source = file_values[setting.name], f"{setting.name} in the config file"
        else:
            raw, source = setting.default(), f"default {setting.name}"
        try:
            values[setting.name] = setting.parse(raw)
        except ValueError as e:
            raise ConfigError(f"{source}: {e}") from None
    if values["endpoint"].startswith("tcp://") and not values["curve_dir"]:
        raise ConfigError(
            f"endpoint {values['endpoint']!r}: tcp endpoints are refused unless CURVE keys are configured (--curve-dir)"
        )
    segments = -(-values["pool_size"] // values["segment_size"])
    if segments > MAX_SLABS:  # each slab holds an fd in the daemon
        raise ConfigError(
            f"segment_size {format_bytes(values['segment_size'])} splits the {format_bytes(values['pool_size'])} "
            f"pool into {segments} slabs, at most {MAX_SLABS}; raise --segment-size"
        )
    if values["spill_dir"] and values["spill_size"] == 0:
        raise ConfigError(
            "spill_dir is set but spill_size is 0: say how much of each directory to reserve (--spill-size)"
        )
    socket_dir = os.path.dirname(os.path.abspath(ipc_path(values["endpoint"]) or "/"))
    if values["remove_on_exit"] and os.path.abspath(values["remove_on_exit"]) != socket_dir:
        raise ConfigError(
            f"remove_on_exit {values['remove_on_exit']!r} is not the directory of endpoint {values['endpoint']!r}"
        )
    return DaemonConfig(**values)
