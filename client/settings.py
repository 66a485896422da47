"""The client's settings: one table, each with its ``STORM_*`` variable and default.

``StormSystem(...)`` arguments win over the variables, which win over the defaults;
a variable that does not parse is an error naming it. The daemon's settings are in
``storm_service/config.py``; these are the training process's. Importing this module
does not import torch (``stormctl`` reads its endpoint and keys from here).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from client.transport import DEFAULT_TIMEOUT_S, CurveKeys
from storm_service.endpoints import default_endpoint
from storm_service.units import parse_size

__all__ = ["POLICIES", "ClientSettings"]

POLICIES = ("keep", "wait", "error")
"""What happens when the pool or quota is full (client/engine/placement.py)."""


def _flag(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("", "0", "false", "no", "off"):
        return False
    raise ValueError("expected 1/true/yes/on or 0/false/no/off")


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 < value < math.inf:
        raise ValueError("expected a positive number of seconds")
    return value


def _policy(text: str) -> str:
    if text not in POLICIES:
        raise ValueError(f"expected one of {', '.join(POLICIES)}")
    return text


@dataclass(frozen=True)
class ClientSettings:
    """One training process's settings (``StormSystem`` keyword ↔ ``STORM_<NAME>``)."""

    endpoint: str = ""
    """``STORM_ENDPOINT``: the daemon's endpoint; empty means ``default_endpoint()``."""
    timeout_s: float = DEFAULT_TIMEOUT_S
    """``STORM_TIMEOUT_S``: how long a control request may wait for its reply."""
    fetch_timeout_s: float = 120.0
    """``STORM_FETCH_TIMEOUT_S``: how long a fetch or flush may wait for its copies."""
    policy: str = "keep"
    """``STORM_POLICY``: when the pool or quota is full: keep, wait or error."""
    wait_timeout_s: float = 30.0
    """``STORM_WAIT_TIMEOUT_S``: how long policy ``wait`` retries."""
    prefetch_bytes: int = 64 << 20
    """``STORM_PREFETCH_BYTES``: fetched-but-unused bytes backward prefetch keeps in flight."""
    reserve_idle_s: float = 2.0
    """``STORM_RESERVE_IDLE_S``: spare reservations untaken this long are given back."""
    verify: bool = False
    """``STORM_VERIFY``: checksum saved tensors at pack, check them at unpack (NOTE [Verify mode])."""
    mmap_threshold_bytes: int = 1 << 20
    """``STORM_MMAP_THRESHOLD``: glibc's fixed mmap threshold; 0 leaves glibc alone
    (NOTE [Freed activations leave the process])."""
    curve_server_key: str = ""
    """``STORM_CURVE_SERVER_KEY``: the daemon's public certificate file, for ``tcp://``."""
    curve_client_key: str = ""
    """``STORM_CURVE_CLIENT_KEY``: this client's certificate file (with its secret), for ``tcp://``."""

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> ClientSettings:
        """Defaults, then ``STORM_*`` variables, then ``overrides`` that are not None."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in fields(cls):
            variable = _VARIABLES[field.name]
            text = environ.get(variable)
            if text is not None and text != "":
                try:
                    values[field.name] = _PARSERS.get(field.name, str)(text)
                except ValueError as e:
                    raise ValueError(f"{variable}={text!r}: {e}") from e
        values.update({name: value for name, value in overrides.items() if value is not None})
        settings = cls(**values)
        settings._check()
        return settings

    @property
    def resolved_endpoint(self) -> str:
        return self.endpoint or default_endpoint()

    def curve_keys(self) -> CurveKeys | None:
        """The CURVE keys named by ``curve_server_key`` and ``curve_client_key`` (None unless both are)."""
        return CurveKeys.load(self.curve_server_key, self.curve_client_key)

    def _check(self) -> None:
        for name in ("timeout_s", "fetch_timeout_s", "wait_timeout_s", "reserve_idle_s"):
            value = getattr(self, name)
            if not 0 < value < math.inf:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        for name in ("prefetch_bytes", "mmap_threshold_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be a number of bytes >= 0, got {getattr(self, name)!r}")


_VARIABLES = {
    "endpoint": "STORM_ENDPOINT",
    "timeout_s": "STORM_TIMEOUT_S",
    "fetch_timeout_s": "STORM_FETCH_TIMEOUT_S",
    "policy": "STORM_POLICY",
    "wait_timeout_s": "STORM_WAIT_TIMEOUT_S",
    "prefetch_bytes": "STORM_PREFETCH_BYTES",
    "reserve_idle_s": "STORM_RESERVE_IDLE_S",
    "verify": "STORM_VERIFY",
    "mmap_threshold_bytes": "STORM_MMAP_THRESHOLD",
    "curve_server_key": "STORM_CURVE_SERVER_KEY",
    "curve_client_key": "STORM_CURVE_CLIENT_KEY",
}
_PARSERS: dict[str, Callable[[str], Any]] = {
    "timeout_s": _seconds,
    "fetch_timeout_s": _seconds,
    "wait_timeout_s": _seconds,
    "reserve_idle_s": _seconds,
    "policy": _policy,
    "prefetch_bytes": parse_size,
    "verify": _flag,
    "mmap_threshold_bytes": parse_size,
}
