"""Fenced sessions are bounded: they count against the caps on sessions, and one that holds nothing is not fenced.

Without the first, a user could open, bind and abandon sessions forever: each one fenced
keeps a pidfd while its process lives, and the daemon ran out of fds and stopped.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest

from storm_service.errors import SessionLimitError
from storm_service.pool import Pool
from storm_service.sessions import SessionTable
from storm_service.tenants import Limits

MiB = 1 << 20


@pytest.fixture
def live_pidfd() -> Iterator[int]:
    """A pidfd of a process that runs until the test ends."""
    process = subprocess.Popen(["sleep", "600"])
    pidfd = os.pidfd_open(process.pid)
    yield pidfd
    process.kill()
    process.wait()


def _table(**caps: int) -> SessionTable:
    return SessionTable(Pool.create(64 * MiB, 64 * MiB, backed=False), Limits(**caps))


def test_a_fenced_session_counts_against_its_tenants_cap_until_its_process_exits(live_pidfd):
    table = _table(max_tenant_sessions=2)
    held = [table.open(pid=1, name=f"job-{i}", quota_bytes=64 * MiB, tenant="uid 7") for i in range(2)]
    for session in held:
        table.reserve(session, [4096], layer_id=None)
        session.pidfd = os.dup(live_pidfd)
        table.close(session, fence=True)
    assert table.fenced_bytes == 2 * 4096
    with pytest.raises(SessionLimitError, match="uid 7 has 2 sessions"):
        table.open(pid=1, name="one more", quota_bytes=MiB, tenant="uid 7")
    table.open(pid=1, name="another tenant", quota_bytes=MiB, tenant="uid 8")


def test_the_daemons_cap_counts_fenced_sessions_too(live_pidfd):
    table = _table(max_sessions=1)
    session = table.open(pid=1, name="job", quota_bytes=MiB, tenant="uid 7")
    table.reserve(session, [4096], layer_id=None)
    session.pidfd = os.dup(live_pidfd)
    table.close(session, fence=True)
    with pytest.raises(SessionLimitError, match="1 sessions are open"):
        table.open(pid=1, name="next", quota_bytes=MiB, tenant="uid 8")


def test_a_session_holding_nothing_is_not_fenced_and_frees_its_slot(live_pidfd):
    table = _table(max_tenant_sessions=1)
    session = table.open(pid=1, name="empty", quota_bytes=MiB, tenant="uid 7")
    session.pidfd = os.dup(live_pidfd)
    table.close(session, fence=True)
    table.reclaim(None)
    assert table.fenced_bytes == 0 and session.pidfd is None, "its pidfd is closed with it"
    table.open(pid=1, name="next", quota_bytes=MiB, tenant="uid 7")
