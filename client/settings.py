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

__all__ = ["POLICIES", "SELECTIONS", "ClientSettings"]

POLICIES = ("auto", "keep", "wait", "error", "spill")
"""What happens when the pool or quota is full (client/engine/placement.py)."""
SELECTIONS = ("all", "budget", "checkpoint")
"""Which saved tensors are offloaded (client/selection.py)."""


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


def _one_of(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return text

    return parse


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("expected a whole number >= 0")
    return value


def _rate(text: str) -> float:
    value = float(text)
    if not 0 <= value < math.inf:
        raise ValueError("expected a number of GB/s >= 0 (0: no limit)")
    return value


@dataclass(frozen=True)
class ClientSettings:
    """One training process's settings (``StormSystem`` keyword ↔ ``STORM_<NAME>``)."""

    endpoint: str = ""
    """``STORM_ENDPOINT``: the daemon's endpoint; empty means ``default_endpoint()``."""
    timeout_s: float = DEFAULT_TIMEOUT_S
    """``STORM_TIMEOUT_S``: how long a control request may wait for its reply."""
    fetch_timeout_s: float = 120.0
    """``STORM_FETCH_TIMEOUT_S``: how long a fetch or flush may wait for its copies."""
    policy: str = "auto"
    """``STORM_POLICY``: when the pool or quota is full: keep, wait, error or spill; auto is spill
    where the daemon has a disk tier, keep elsewhere."""
    wait_timeout_s: float = 30.0
    """``STORM_WAIT_TIMEOUT_S``: how long policy ``wait`` retries."""
    prefetch_bytes: int = 64 << 20
    """``STORM_PREFETCH_BYTES``: fetched-but-unused bytes backward prefetch keeps in flight."""
    reserve_idle_s: float = 2.0
    """``STORM_RESERVE_IDLE_S``: spare reservations untaken this long are given back."""
    select: str = "all"
    """``STORM_SELECT``: which saved tensors leave the device: all, budget or checkpoint."""
    max_inflight_layers: int = 2
    """``STORM_MAX_INFLIGHT_LAYERS``: layers whose copies may still run when the next layer
    starts offloading; it waits for older ones (NOTE [Bounded copies in flight]). 0: no bound."""
    keep_last_layers: int = 0
    """``STORM_KEEP_LAST_LAYERS``: with ``module=``, the last layers' saved tensors stay on the
    device, since backward needs them first."""
    budget_cap_bytes: int = 0
    """``STORM_BUDGET_CAP``: with ``select="budget"``, the most bytes one layer may offload (0: no cap)."""
    link_gbps: float = 0.0
    """``STORM_LINK_GBPS``: throttle pool copies to this many GB/s each way, to emulate a
    device link on the CPU (NOTE [Link emulator]). 0: no limit."""
    pin: bool = True
    """``STORM_PIN``: page-lock the pool chunks CUDA copies touch (NOTE [Lazy pinning]); off: pageable copies."""
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
        for name, choices in (("policy", POLICIES), ("select", SELECTIONS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        if not 0 <= self.link_gbps < math.inf:
            raise ValueError(f"link_gbps must be a number of GB/s >= 0 (0: no limit), got {self.link_gbps!r}")
        for name in (
            "prefetch_bytes",
            "mmap_threshold_bytes",
            "max_inflight_layers",
            "keep_last_layers",
            "budget_cap_bytes",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")


_VARIABLES = {
    "endpoint": "STORM_ENDPOINT",
    "timeout_s": "STORM_TIMEOUT_S",
    "fetch_timeout_s": "STORM_FETCH_TIMEOUT_S",
    "policy": "STORM_POLICY",
    "wait_timeout_s": "STORM_WAIT_TIMEOUT_S",
    "prefetch_bytes": "STORM_PREFETCH_BYTES",
    "reserve_idle_s": "STORM_RESERVE_IDLE_S",
    "select": "STORM_SELECT",
    "max_inflight_layers": "STORM_MAX_INFLIGHT_LAYERS",
    "keep_last_layers": "STORM_KEEP_LAST_LAYERS",
    "budget_cap_bytes": "STORM_BUDGET_CAP",
    "link_gbps": "STORM_LINK_GBPS",
    "pin": "STORM_PIN",
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
    "policy": _one_of(POLICIES),
    "select": _one_of(SELECTIONS),
    "max_inflight_layers": _count,
    "keep_last_layers": _count,
    "budget_cap_bytes": parse_size,
    "link_gbps": _rate,
    "prefetch_bytes": parse_size,
    "pin": _flag,
    "verify": _flag,
    "mmap_threshold_bytes": parse_size,
}
