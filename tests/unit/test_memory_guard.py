"""The memory guard (NOTE [Buffered messages]) never stops the daemon over a reading it cannot make."""

from __future__ import annotations

from storm_service.memory_guard import MemoryGuard


def test_the_memory_guard_skips_a_tick_it_cannot_read_instead_of_stopping_the_daemon():
    readings = iter([100, OSError(24, "Too many open files"), 10_000])

    def read() -> int:
        value = next(readings)
        if isinstance(value, OSError):
            raise value
        return value

    guard = MemoryGuard(max_buffered=1000, read=read)
    assert guard.excess(accounted=0) is None, "out of fds: no reading, no verdict"
    assert guard.excess(accounted=0) == (10_000, 1100)
