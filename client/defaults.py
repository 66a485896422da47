"""The process-wide default StormSystem, used wherever no system is passed."""

from __future__ import annotations

import threading

from client.system import StormSystem

__all__ = ["default_system", "set_default_system"]

_lock = threading.Lock()
_default: StormSystem | None = None


def default_system() -> StormSystem:
    """The process's default system, connecting on first use (endpoint from ``STORM_ENDPOINT``)."""
    global _default
    with _lock:
        if _default is None or _default._closed:
            _default = StormSystem()
        return _default


def set_default_system(system: StormSystem | None) -> None:
    """Make ``system`` the default (None forgets the current one without closing it)."""
    global _default
    with _lock:
        _default = system
