"""The disk tier in process: a server over a real pool and real spill files, driven by request frames.

Each test plays the client: it registers, offloads, writes bytes into the extents through
the daemon's own view of the slab (as a client's mapping would), commits, and fetches;
then it reads the bytes where the fetch reply says they are. ``Server.dispatch`` steps
the tier while a fetch is parked, as the loop does.
"""

from __future__ import annotations

import errno
import os
import select
from collections.abc import Iterator
from typing import Any

import pytest

from helpers import InProcess
from storm_service.config import build_parser, load_config
from storm_service.disk.files import SpillFile
from storm_service.disk.io import DiskIO
from storm_service.disk.tier import DiskTier
from storm_service.errors import ErrorCode
from storm_service.pool import Pool
from storm_service.protocol import Op
from storm_service.server import Server
from storm_service.tenants import Peer

MiB = 1 << 20


class Daemon(InProcess):
    """A server with a disk tier, and what a test needs to act as its clients."""

    def __init__(self, server: Server, tier: DiskTier) -> None:
        super().__init__(server)
        self.tier = tier
        self.pool = server.context.pool

    def register(self, quota: int | None = None, peer: Peer | None = None) -> str:
        fields = {"quota_bytes": quota} if quota is not None else {}
        return str(self.call(Op.REGISTER, None, peer, pid=os.getpid(), **fields)["token"])

    def offload(self, token: str, payloads: list[bytes]) -> list[int]:
        """Offload and commit ``payloads``; returns their handles."""
        extents = self.call(Op.OFFLOAD, token, sizes=[len(p) for p in payloads], layer_id=0)["extents"]
        for extent, payload in zip(extents, payloads, strict=True):
            self.pool.view(extent["slab"], extent["offset"], len(payload))[:] = payload
        handles = [extent["handle"] for extent in extents]
        self.call(Op.COMMIT, token, handles=handles)
        return handles

    def fetch(self, token: str, handles: list[int]) -> list[bytes]:
        """Each handle's bytes where the daemon says they are; asks again for what it did not answer."""
        got: list[bytes] = []
        while len(got) < len(handles):
            extents = self.call(Op.FETCH, token, handles=handles[len(got) :])["extents"]
            assert extents, "a fetch answered in process has its first extent back"
            got += [bytes(self.pool.view(e["slab"], e["offset"], e["size_bytes"])) for e in extents]
        return got

    def settle(self) -> None:
        """Let every write in flight finish and be taken, as the loop would."""
        while True:
            self.tier.balance()
            if not self.tier.io.pending():
                break
            select.select([self.tier.io.wakeup_fd], [], [], 1.0)
            self.tier.poll()
        self.tier.poll()

    def stats(self) -> dict[str, Any]:
        return self.call(Op.STATS)


def _payloads(count: int, size: int, seed: int) -> list[bytes]:
    return [bytes((seed * 31 + i * 7 + j) % 251 for j in range(size)) for i in range(count)]


@pytest.fixture
def make_daemon(tmp_path) -> Iterator[Any]:
    made: list[Server] = []

    def make(pool_mib: int = 16, spill_mib: int = 64, high_water: float = 0.5, directory: str | None = None) -> Daemon:
        spill_dir = directory or str(tmp_path)
        argv = ["--spill-dir", spill_dir, "--spill-size", f"{spill_mib}MiB", "--heartbeat-timeout", "1s"]
        config = load_config(build_parser().parse_args(argv), {})
        files = [SpillFile.open(spill_dir, spill_mib * MiB)]
        pool = Pool.create(pool_mib * MiB, pool_mib * MiB, alignment=max(512, files[0].alignment))
        tier = DiskTier(pool, files, DiskIO(files), high_water)
        server = Server(config, pool, tier=tier)
        made.append(server)
        return Daemon(server, tier)

    yield make
    for server in made:
        server.close()
        server.context.pool.close()


def test_past_the_high_water_the_oldest_extents_go_to_disk_and_come_back_bit_exact(make_daemon):
    daemon = make_daemon(pool_mib=16, high_water=0.5)
    token = daemon.register()
    payloads = _payloads(12, MiB, seed=1)
    handles = daemon.offload(token, payloads)  # 12 MiB in a 16 MiB pool: 4 MiB past the 8 MiB mark
    daemon.settle()
    stats = daemon.stats()
    assert daemon.pool.used_bytes <= daemon.tier.high_water_bytes
    assert stats["spilled_total_bytes"] >= 4 * MiB and stats["disk_used_bytes"] == stats["spilled_total_bytes"]
    on_disk = [h for h in handles if daemon.server.context.sessions.extents[h].residence.value == "disk"]
    assert on_disk == handles[: len(on_disk)], "the oldest extents go first"
    for index in reversed(range(len(handles))):  # backward: newest first
        assert daemon.fetch(token, [handles[index]]) == [payloads[index]]
        daemon.call(Op.FREE, token, handles=[handles[index]])
    stats = daemon.stats()
    assert stats["restored_total_bytes"] == stats["spilled_total_bytes"]
    assert (stats["used_bytes"], stats["disk_used_bytes"], daemon.pool.used_bytes) == (0, 0, 0)


def test_a_session_that_stopped_stepping_is_spilled_before_one_that_steps(make_daemon):
    daemon = make_daemon(pool_mib=16, high_water=0.6)
    idle, busy = daemon.register(), daemon.register()
    idle_handles = daemon.offload(idle, _payloads(4, MiB, seed=2))  # then it stops
    for step in range(3):  # busy steps: forward then backward, so its profile is short
        handles = daemon.offload(busy, _payloads(2, MiB, seed=step))
        daemon.fetch(busy, list(reversed(handles)))
        daemon.call(Op.FREE, busy, handles=handles)
    busy_handles = daemon.offload(busy, _payloads(6, MiB, seed=9))  # 10 MiB in use: past the 9.6 MiB mark
    daemon.settle()
    extents = daemon.server.context.sessions.extents
    assert extents[idle_handles[0]].residence.value == "disk"
    assert all(extents[h].residence.value == "host" for h in busy_handles)


def test_a_fetched_extent_stays_in_host_memory_and_a_freed_one_frees_both_tiers(make_daemon):
    daemon = make_daemon(pool_mib=16, high_water=0.25)
    token = daemon.register()
    payloads = _payloads(3, MiB, seed=3)
    handles = daemon.offload(token, payloads)
    assert daemon.fetch(token, handles[:1]) == payloads[:1]  # fetched before any spill: pinned
    daemon.call(Op.FREE, token, handles=handles[1:2])
    more = daemon.offload(token, _payloads(4, MiB, seed=4))
    daemon.settle()
    extents = daemon.server.context.sessions.extents
    assert extents[handles[0]].residence.value == "host"
    daemon.call(Op.FREE, token, handles=[h for h in handles if h in extents] + more)
    daemon.settle()
    assert (daemon.pool.used_bytes, daemon.stats()["disk_used_bytes"]) == (0, 0)


def test_each_tier_is_counted_against_the_quota_apart(make_daemon):
    """A session's quota bounds its host bytes, and the same share of the disk bounds its disk bytes."""
    daemon = make_daemon(pool_mib=16, spill_mib=16, high_water=0.25)
    small, big = daemon.register(quota=4 * MiB), daemon.register()
    small_handles = daemon.offload(small, _payloads(4, MiB, seed=5))
    big_handles = daemon.offload(big, _payloads(8, MiB, seed=6))
    daemon.settle()
    sessions = {s["id"]: s for s in daemon.stats()["sessions"]}
    first = sessions[min(sessions)]
    assert (first["used_bytes"], first["disk_bytes"]) == (0, 4 * MiB), "the oldest session went to disk first"
    small_handles += daemon.offload(small, _payloads(4, MiB, seed=7))  # its host quota is free again
    daemon.settle()
    sessions = {s["id"]: s for s in daemon.stats()["sessions"]}
    first, second = sessions[min(sessions)], sessions[max(sessions)]
    assert (first["used_bytes"], first["disk_bytes"]) == (4 * MiB, 4 * MiB), "4 MiB is its share of the disk"
    assert second["disk_bytes"] > 0, "the other session's bytes went instead"
    daemon.call(Op.FREE, small, handles=small_handles)
    daemon.call(Op.FREE, big, handles=big_handles)


def test_a_write_error_keeps_the_extent_in_host_memory(make_daemon):
    daemon = make_daemon(pool_mib=16, high_water=0.25)

    def fail_writes(op: str, file: int, offset: int, length: int) -> None:
        if op == "write":
            raise OSError(errno.ENOSPC, "injected: no space left")

    daemon.tier.io.inject = fail_writes
    token = daemon.register()
    payloads = _payloads(8, MiB, seed=7)
    handles = daemon.offload(token, payloads)
    daemon.settle()
    stats = daemon.stats()
    assert stats["spill_errors"] > 0 and stats["spilled_total_bytes"] == 0 and stats["disk_used_bytes"] == 0
    assert daemon.fetch(token, list(reversed(handles))) == list(reversed(payloads))


def test_a_read_error_loses_that_extent_only_and_for_its_session_only(make_daemon):
    daemon = make_daemon(pool_mib=16, high_water=0.5)
    victim, bystander = daemon.register(), daemon.register()
    lost = daemon.offload(victim, _payloads(8, MiB, seed=8))
    kept_payloads = _payloads(4, MiB, seed=9)
    kept = daemon.offload(bystander, kept_payloads)
    daemon.settle()
    extents = daemon.server.context.sessions.extents
    spilled = [h for h in lost if extents[h].residence.value == "disk"]
    assert spilled, "the victim's oldest went to disk"
    bad_offset = extents[spilled[0]].disk
    failed: list[tuple[int, int]] = []

    def fail_that_read(op: str, file: int, offset: int, length: int) -> None:
        if op == "read" and (file, offset) == bad_offset and not failed:  # once: the space is reused after
            failed.append((file, offset))
            raise OSError(errno.EIO, "injected: I/O error")

    daemon.tier.io.inject = fail_that_read
    reply = daemon.send(Op.FETCH, victim, handles=[spilled[0]])
    assert not reply.ok and reply.code == ErrorCode.ACTIVATION_LOST.value and "I/O error" in reply.message
    assert daemon.fetch(bystander, kept) == kept_payloads
    others = [h for h in lost if h != spilled[0]]
    assert len(daemon.fetch(victim, others)) == len(others), "the session goes on"
    daemon.call(Op.FREE, victim, handles=lost)
    assert daemon.stats()["restore_errors"] == 1


def test_a_fetch_of_an_extent_on_disk_waits_and_the_session_closing_meanwhile_frees_everything(make_daemon):
    daemon = make_daemon(pool_mib=16, high_water=0.25)
    token = daemon.register()
    daemon.offload(token, _payloads(8, MiB, seed=10))
    daemon.settle()
    assert daemon.stats()["disk_used_bytes"] > 0
    daemon.call(Op.UNREGISTER, token)
    daemon.server.context.sessions.reclaim(None)
    daemon.settle()
    assert (daemon.pool.used_bytes, daemon.stats()["disk_used_bytes"]) == (0, 0)


def test_on_a_filesystem_without_direct_io_the_tier_falls_back_to_buffered_and_stays_exact(make_daemon):
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm (tmpfs) on this machine")
    directory = os.path.join("/dev/shm", f"storm-spill-test-{os.getpid()}")
    os.mkdir(directory, 0o700)
    try:
        daemon = make_daemon(pool_mib=16, high_water=0.25, directory=directory)
        assert daemon.stats()["disk_files"][0]["direct"] is False
        token = daemon.register()
        payloads = _payloads(8, MiB, seed=11)
        handles = daemon.offload(token, payloads)
        daemon.settle()
        assert daemon.stats()["spilled_total_bytes"] > 0
        assert daemon.fetch(token, list(reversed(handles))) == list(reversed(payloads))
        assert os.listdir(directory) == []
    finally:
        os.rmdir(directory)


def _no_room_for_what_is_on_disk(daemon: Daemon, seed: int) -> tuple[str, list[int], list[int], str, list[int]]:
    """A session with extents on disk and the rest fetched (pinned: never spilled), and another session
    that reserves (offloads, never commits) every free byte: nothing can be read back or spilled.
    Returns the first session's token, its handles, those on disk, and the filler's token and handles."""
    token = daemon.register()
    handles = daemon.offload(token, _payloads(8, MiB // 4, seed=seed))
    daemon.settle()
    extents = daemon.server.context.sessions.extents
    on_disk = [h for h in handles if extents[h].residence.value == "disk"]
    daemon.fetch(token, [h for h in handles if h not in on_disk])
    filler, reserved = daemon.register(), []
    while (reply := daemon.send(Op.OFFLOAD, filler, sizes=[MiB // 4], layer_id=0)).ok:
        reserved.append(reply.result["extents"][0]["handle"])
    return token, handles, on_disk, filler, reserved


def test_freeing_an_extent_a_fetch_waits_for_leaves_the_daemon_serving(make_daemon):
    daemon = make_daemon(pool_mib=16, high_water=0.1)
    token, handles, on_disk, filler, reserved = _no_room_for_what_is_on_disk(daemon, seed=12)
    assert daemon.call(Op.FETCH, token, handles=on_disk[:1])["extents"] == [], "no room: answered with nothing"
    daemon.call(Op.FREE, token, handles=on_disk[:1])  # the extent it waited for
    daemon.call(Op.FREE, filler, handles=reserved)
    daemon.settle()
    rest = [h for h in handles if h != on_disk[0]]
    assert len(daemon.fetch(token, rest)) == len(rest)
    daemon.call(Op.FREE, token, handles=rest)
    daemon.settle()
    assert (daemon.pool.used_bytes, daemon.stats()["disk_used_bytes"]) == (0, 0)


def test_asking_again_and_again_for_an_extent_with_no_room_keeps_one_entry(make_daemon):
    daemon = make_daemon(pool_mib=16, high_water=0.1)
    token, _, on_disk, filler, reserved = _no_room_for_what_is_on_disk(daemon, seed=13)
    wanted = on_disk[0]
    for _ in range(8):  # each waits out the in-process deadline (the heartbeat timeout, 1 s)
        assert daemon.call(Op.FETCH, token, handles=[wanted])["extents"] == []
    assert list(daemon.tier._wanted) == [wanted]
    daemon.call(Op.FREE, filler, handles=reserved)


def test_fetching_back_from_disk_never_takes_a_session_past_its_quota(make_daemon):
    daemon = make_daemon(pool_mib=16, high_water=0.1)
    token = daemon.register(quota=4 * MiB)
    handles: list[int] = []
    for index in range(12):  # one at a time: what goes to disk leaves room in the quota
        handles += daemon.offload(token, _payloads(1, MiB, seed=index))
        daemon.settle()
    session = daemon.stats()["sessions"][0]
    assert session["disk_bytes"] > 4 * MiB
    fetched = 0
    with pytest.raises(AssertionError, match=r"QUOTA_EXCEEDED.*fill its 4\.0 MiB quota"):
        for handle in reversed(handles):  # fetched, never freed
            daemon.fetch(token, [handle])
            fetched += 1
            assert daemon.stats()["sessions"][0]["used_bytes"] <= 4 * MiB
    assert fetched == 4
    daemon.call(Op.FREE, token, handles=handles)
