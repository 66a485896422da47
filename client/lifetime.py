"""A StormSystem's close when nobody asked for it: at exit, and never in a forked child."""

from __future__ import annotations

import atexit
import os
import weakref
from typing import Protocol

__all__ = ["close_at_exit"]


class _Closable(Protocol):
    def close(self) -> None: ...


def close_at_exit(system: _Closable) -> None:
    """Close ``system`` when the process exits, unless it is gone by then."""
    atexit.register(_close_at_exit, weakref.ref(system))


def _close_at_exit(ref: weakref.ref[_Closable]) -> None:
    system = ref()
    if system is not None:
        system.close()


def _forget_parent_systems() -> None:
    """In a forked child, the parent's systems are never closed, not even at exit (NOTE [Fork]).

    Closing one would wait on the parent's copies, unregister its pinned memory (CUDA
    calls, which a forked child must not make) and end its session; the child only drops
    the at-exit closes it inherited, so its exit, however it exits, leaves them alone.
    """
    atexit.unregister(_close_at_exit)


os.register_at_fork(after_in_child=_forget_parent_systems)
