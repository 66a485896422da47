"""The device tier in process, through the fake backend: a server over a real host pool and fake devices.

Each test plays the client as tests/integration/test_disk_tier.py does: it offloads, writes
bytes where the reply says (a fake device slab is a memfd, mapped here as a client maps
it), commits, fetches, and reads the bytes where the fetch reply says they are now. The
loop's call of the tier (``balance``) is made by :meth:`Daemon.settle`.
"""

from __future__ import annotations

import mmap
import os
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from helpers import InProcess
from storm_service.config import build_parser, load_config
from storm_service.device import tier as tier_module
from storm_service.device.backend import DeviceError
from storm_service.device.fake import FakeDevice, FakeMemory
from storm_service.device.setup import open_devices
from storm_service.device.tier import DeviceTier
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
    """A server with a device tier, and what a test needs to act as its clients."""

    def __init__(self, server: Server) -> None:
        super().__init__(server)
        self.sessions = server.context.sessions
        assert self.sessions.device is not None
        self.device: DeviceTier = self.sessions.device
        self.pool = server.context.pool
        self._maps: dict[int, mmap.mmap] = {}

    def register(self, quota: int | None = None, peer: Peer | None = None, pid_ns: int | None = None) -> str:
        fields: dict[str, Any] = {"quota_bytes": quota} if quota is not None else {}
        fields["pid_ns"] = self.sessions.own_pid_ns if pid_ns is None else pid_ns
        return str(self.call(Op.REGISTER, None, peer, pid=os.getpid(), **fields)["token"])

    def view(self, slab: int, offset: int, size: int) -> memoryview:
        """An extent's bytes as a client sees them: a fake device slab mapped from its memfd, or the host pool."""
        if not self.device.holds(slab):
            return self.pool.view(slab, offset, size)
        lent = self.device.lent_to(slab)
        assert lent is not None and isinstance(lent.memory, FakeMemory)
        if slab not in self._maps:
            self._maps[slab] = mmap.mmap(lent.memory.fd, lent.size_bytes, flags=mmap.MAP_SHARED)
        return memoryview(self._maps[slab])[offset : offset + size]

    def offload(self, token: str, payloads: list[bytes], peer: Peer | None = None, **fields: Any) -> list[dict]:
        """Offload and commit ``payloads``; returns their extents as the offload reply gave them."""
        extents = self.call(Op.OFFLOAD, token, peer, sizes=[len(p) for p in payloads], layer_id=0, **fields)
        for extent, payload in zip(extents["extents"], payloads, strict=True):
            self.view(extent["slab"], extent["offset"], len(payload))[:] = payload
        self.call(Op.COMMIT, token, peer, handles=[e["handle"] for e in extents["extents"]])
        return list(extents["extents"])

    def fetch(self, token: str, handles: list[int]) -> list[tuple[dict, bytes]]:
        """Each handle's place and bytes, where the daemon says they are now."""
        extents = self.call(Op.FETCH, token, handles=handles)["extents"]
        assert len(extents) == len(handles)
        return [(e, bytes(self.view(e["slab"], e["offset"], e["size_bytes"]))) for e in extents]

    def settle(self) -> None:
        """What the loop does between messages and at each tick: the device tier balances and keeps house
        (and the disk tier, if any, balances)."""
        for _ in range(64):
            self.device.balance(self.sessions.sessions)
            self.device.housekeep()
            if self.sessions.tier is None:
                continue
            self.sessions.tier.balance()
            while self.sessions.tier.io.pending():
                self.sessions.tier.poll()
            self.sessions.tier.poll()

    def stats(self) -> dict[str, Any]:
        return self.call(Op.STATS)

    def close(self) -> None:
        for mapping in self._maps.values():
            mapping.close()
        self.server.close()


def _importer(daemon: Daemon, slab: Any) -> subprocess.Popen:
    """A process the fd socket lent ``slab`` to, as it records one (NOTE [Importers]); the caller kills it."""
    process = subprocess.Popen(["sleep", "600"])
    pidfd = os.pidfd_open(process.pid)
    try:
        assert daemon.device.importers.add(process.pid, pidfd)
    finally:
        os.close(pidfd)
    slab.lent(process.pid)
    return process


def _payloads(count: int, size: int, seed: int) -> list[bytes]:
    return [bytes((seed * 31 + i * 7 + j) % 251 for j in range(size)) for i in range(count)]


@pytest.fixture
def make_daemon(tmp_path) -> Iterator[Any]:
    made: list[Daemon] = []

    def make(
        device_pool: str = "fake:gpu1=16MiB",
        pool_mib: int = 32,
        spill_mib: int = 0,
        backends: list | None = None,
        quota: str = "0",
    ) -> Daemon:
        argv = ["--heartbeat-timeout", "1s", "--device-pool", device_pool, "--quota", quota]
        config = load_config(build_parser().parse_args(argv), {})
        pool = Pool.create(pool_mib * MiB, pool_mib * MiB)
        tier = None
        if spill_mib:
            files = [SpillFile.open(str(tmp_path), spill_mib * MiB)]
            tier = DiskTier(pool, files, DiskIO(files), 0.5)
        device = DeviceTier(backends or open_devices(config.device_pool), 16 * MiB, pool)
        daemon = Daemon(Server(config, pool, tier=tier, device=device))
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        daemon.close()


def test_an_offload_from_the_host_lands_on_the_fake_device_and_comes_back_bit_exact(make_daemon):
    daemon = make_daemon()
    token = daemon.register()
    payloads = _payloads(4, 64 << 10, seed=1)
    extents = daemon.offload(token, payloads)
    assert all(daemon.device.holds(e["slab"]) for e in extents), "the device is the fastest tier with room"
    assert [data for _, data in daemon.fetch(token, [e["handle"] for e in extents])] == payloads
    stats = daemon.stats()
    held = sum(daemon.pool.round_up(len(p)) for p in payloads)
    assert (stats["device_bytes"], stats["device_used_bytes"], stats["used_bytes"]) == (16 * MiB, held, 0)
    assert stats["sessions"][0]["device_bytes"] == held
    assert stats["devices"][0]["links"]["cpu"] == {
        "peer_gbps": 370.0,
        "host_gbps": 50.0,
        "measured": False,
        "enabled": True,
    }
    daemon.call(Op.FREE, token, handles=[e["handle"] for e in extents])
    stats = daemon.stats()
    assert (stats["device_used_bytes"], stats["sessions"][0]["device_bytes"]) == (0, 0)


def test_a_full_device_sends_the_rest_to_the_host_and_every_byte_stays_exact(make_daemon):
    daemon = make_daemon("fake:gpu1=16MiB")
    token = daemon.register()
    payloads = _payloads(40, 1 * MiB, seed=2)  # 40 MiB: more than the device and its slabs
    extents = [e for p in payloads for e in daemon.offload(token, [p])]
    on_device = [e for e in extents if daemon.device.holds(e["slab"])]
    assert 0 < len(on_device) < len(extents)
    got = daemon.fetch(token, [e["handle"] for e in extents])
    assert [data for _, data in got] == payloads


def test_past_the_high_water_the_oldest_activations_move_to_the_host_and_the_fetch_says_where(make_daemon):
    daemon = make_daemon("fake:gpu1=16MiB")
    token = daemon.register()
    payloads = _payloads(15, 1 * MiB, seed=3)  # 15 of 16 MiB: past 90 %
    extents = [e for p in payloads for e in daemon.offload(token, [p])]
    assert all(daemon.device.holds(e["slab"]) for e in extents)
    daemon.settle()
    stats = daemon.stats()
    assert stats["device_evictions"] >= 1 and stats["device_used_bytes"] <= stats["devices"][0]["high_water_bytes"]
    got = daemon.fetch(token, [e["handle"] for e in extents])
    assert [data for _, data in got] == payloads, "an extent moved to the host reads the same bytes"
    moved = [not daemon.device.holds(place["slab"]) for place, _ in got]
    assert moved[0] and not moved[-1], "the oldest (wanted last by backward) moved, the newest stayed"
    assert moved == sorted(moved, reverse=True), "evicted in commit order"
    assert stats["used_bytes"] == sum(len(payloads[i]) for i, m in enumerate(moved) if m)


def test_a_device_full_below_its_high_water_makes_room_for_the_next_offload(make_daemon):
    daemon = make_daemon("fake:gpu1=64MiB", pool_mib=128)  # four 16 MiB slabs: one 10 MiB extent each
    token = daemon.register()
    payloads = _payloads(6, 10 * MiB, seed=22)
    first = [daemon.offload(token, [p])[0] for p in payloads[:5]]
    assert [daemon.device.holds(e["slab"]) for e in first] == [True] * 4 + [False]
    assert daemon.stats()["device_used_bytes"] < daemon.stats()["devices"][0]["high_water_bytes"]
    daemon.settle()
    assert daemon.stats()["device_evictions"] == 1, "the oldest moved to the host: room for one more"
    newest = daemon.offload(token, payloads[5:])[0]
    assert daemon.device.holds(newest["slab"])
    got = daemon.fetch(token, [e["handle"] for e in [*first, newest]])
    assert [data for _, data in got] == payloads


def test_a_session_that_stopped_stepping_leaves_the_device_before_one_that_steps(make_daemon):
    daemon = make_daemon("fake:gpu1=16MiB")
    idle, busy = daemon.register(), daemon.register()
    idle_extents = daemon.offload(idle, _payloads(4, MiB, seed=20))  # then it stops
    for step in range(3):  # busy steps: forward then backward, so its profile is short
        extents = daemon.offload(busy, _payloads(2, MiB, seed=step))
        daemon.fetch(busy, [e["handle"] for e in reversed(extents)])
        daemon.call(Op.FREE, busy, handles=[e["handle"] for e in extents])
    busy_extents = daemon.offload(busy, _payloads(11, MiB, seed=21))  # 15 MiB in use: past 90 % of 16
    daemon.settle()
    extents = daemon.sessions.extents
    assert extents[idle_extents[0]["handle"]].residence.value == "host", "the idle job's oldest moved"
    assert all(extents[e["handle"]].residence.value == "device" for e in busy_extents)


def test_an_extent_a_fetch_answered_for_is_never_moved(make_daemon):
    daemon = make_daemon("fake:gpu1=16MiB")
    token = daemon.register()
    first = daemon.offload(token, _payloads(1, 1 * MiB, seed=4))
    place, _ = daemon.fetch(token, [first[0]["handle"]])[0]  # pinned: the client may read it in place
    daemon.offload(token, _payloads(14, 1 * MiB, seed=5))
    daemon.settle()
    assert daemon.stats()["device_evictions"] >= 1
    again, data = daemon.fetch(token, [first[0]["handle"]])[0]
    assert (again["slab"], again["offset"]) == (place["slab"], place["offset"])
    assert data == _payloads(1, 1 * MiB, seed=4)[0]


def test_a_device_whose_peer_path_is_slower_than_the_host_path_gets_nothing(make_daemon):
    daemon = make_daemon("fake:slow=16MiB@10")  # 10 GB/s against a host path of 50
    token = daemon.register()
    extents = daemon.offload(token, _payloads(2, 64 << 10, seed=6))
    assert not any(daemon.device.holds(e["slab"]) for e in extents)
    assert daemon.stats()["devices"][0]["links"]["cpu"]["enabled"] is False


def test_a_session_bound_to_a_process_the_daemon_cannot_watch_gets_the_host_pool(make_daemon):
    """No pidfd of its process (another pid namespace hides it): the fd socket would refuse it every device
    slab, so nothing of it is placed on a device, where its copy would fail."""
    daemon = make_daemon()
    token = daemon.register()
    session = daemon.sessions.by_token(token)
    session.uid, session.pidfd = os.getuid(), None  # bound on the fd socket, with no pidfd to be had
    extents = daemon.offload(token, _payloads(2, 64 << 10, seed=25))
    assert not any(daemon.device.holds(e["slab"]) for e in extents)


def test_the_fastest_of_several_devices_is_filled_first(make_daemon):
    daemon = make_daemon("fake:nvlink=16MiB@370,fake:pcie=16MiB@100")
    token = daemon.register()
    extents = daemon.offload(token, _payloads(2, 64 << 10, seed=7))
    names = {daemon.device.lent_to(e["slab"]).backend.name for e in extents}  # type: ignore[union-attr]
    assert names == {"nvlink"}


def test_an_offload_from_an_unknown_device_goes_to_the_host_and_a_hostile_device_name_is_refused(make_daemon):
    daemon = make_daemon()
    token = daemon.register()
    unknown = daemon.offload(token, _payloads(1, 4096, seed=8), device="GPU-00000000-0000-0000-0000-000000000000")
    assert not daemon.device.holds(unknown[0]["slab"]), "no link is known from that device: the host path"
    for bad in ("x" * 65, "", 7):
        reply = daemon.send(Op.OFFLOAD, token, sizes=[4096], device=bad)
        assert reply.code == ErrorCode.BAD_REQUEST.value, bad
    assert daemon.stats()["extents"] == 1


def test_one_quota_bounds_what_a_session_holds_on_the_device_and_the_host_together(make_daemon):
    daemon = make_daemon("fake:gpu1=16MiB", quota="6MiB")
    token = daemon.register()
    daemon.offload(token, _payloads(4, 1 * MiB, seed=9))  # on the device
    reply = daemon.send(Op.OFFLOAD, token, sizes=[3 * MiB])
    assert reply.code == ErrorCode.QUOTA_EXCEEDED.value, "4 MiB on the device + 3 MiB > a 6 MiB quota"
    daemon.call(Op.OFFLOAD, token, sizes=[2 * MiB])


def test_the_default_quota_is_every_memory_tier_and_binds_across_them(make_daemon):
    daemon = make_daemon("fake:gpu1=16MiB", pool_mib=16)
    reply = daemon.call(Op.REGISTER, pid=os.getpid(), pid_ns=daemon.sessions.own_pid_ns)
    assert reply["quota_bytes"] == 32 * MiB, "host pool and device tier together"
    asked = daemon.call(Op.REGISTER, pid=os.getpid(), pid_ns=daemon.sessions.own_pid_ns, quota_bytes=16 * MiB)
    token = str(asked["token"])
    daemon.offload(token, _payloads(15, MiB, seed=23))
    assert daemon.send(Op.OFFLOAD, token, sizes=[2 * MiB]).code == ErrorCode.QUOTA_EXCEEDED.value


def test_device_memory_moving_to_another_tenant_is_freed_only_once_its_importers_are_gone(make_daemon):
    daemon = make_daemon("fake:gpu1=16MiB")  # slabs of 16 MiB / 8 = 2 MiB, at least 16 MiB: one slab
    backend = daemon.device.devices[0].backend
    assert isinstance(backend, FakeDevice)
    alice, bob = Peer(uid=1001, pid=os.getpid()), Peer(uid=1002, pid=os.getpid())
    token_a = daemon.register(peer=alice)
    extents = daemon.offload(token_a, _payloads(1, 4096, seed=10), peer=alice)
    slab = daemon.device.lent_to(extents[0]["slab"])
    assert slab is not None and slab.tenant == "uid 1001"
    importer = _importer(daemon, slab)  # alice's process, as the fd socket records it when it lends the slab
    daemon.call(Op.FREE, token_a, alice, handles=[extents[0]["handle"]])
    token_b = daemon.register(peer=bob)
    moved = daemon.offload(token_b, _payloads(1, 4096, seed=11), peer=bob)
    assert daemon.device.lent_to(moved[0]["slab"]).tenant == "uid 1002"  # type: ignore[union-attr]
    assert moved[0]["slab"] != extents[0]["slab"], "renewed: a fresh allocation under a new id"
    assert bytes(daemon.view(moved[0]["slab"], 0, 4096)) == _payloads(1, 4096, seed=11)[0]
    daemon.settle()
    assert backend.freed == 0 and daemon.stats()["device_retired_bytes"] == 16 * MiB, "alice may still map it"
    daemon.call(Op.UNREGISTER, token_a, alice)
    daemon.sessions.reclaim(None)
    daemon.settle()
    assert backend.freed == 0, "alice's session is gone, but her process may still map the memory"
    importer.kill()
    importer.wait()
    daemon.settle()
    assert backend.freed == 1 and daemon.stats()["device_retired_bytes"] == 0


def test_tenants_taking_turns_on_a_slab_cannot_make_the_daemon_hold_ever_more_device_memory(make_daemon):
    daemon = make_daemon("fake:gpu1=16MiB")  # one slab
    alice, bob = Peer(uid=1001, pid=os.getpid()), Peer(uid=1002, pid=os.getpid())
    tokens = {alice: daemon.register(peer=alice), bob: daemon.register(peer=bob)}
    placed, importers = {}, []
    for turn, peer in enumerate([alice, bob, alice, bob]):
        extent = daemon.offload(tokens[peer], _payloads(1, 4096, seed=turn), peer=peer)[0]
        placed[turn] = daemon.device.holds(extent["slab"])
        if placed[turn]:  # what the fd socket records when it lends the slab; the process lives on
            importers.append(_importer(daemon, daemon.device.lent_to(extent["slab"])))
        daemon.call(Op.FREE, tokens[peer], peer, handles=[extent["handle"]])
    assert placed == {0: True, 1: True, 2: False, 3: True}, "alice's second turn would retire a second slab"
    stats = daemon.stats()
    assert stats["device_retired_bytes"] == 16 * MiB, "at most the device's size waits for importers"
    assert daemon.device.devices[0].pool.renew_failures == 1
    for importer in importers:
        importer.kill()
        importer.wait()
    daemon.settle()
    assert daemon.stats()["device_retired_bytes"] == 0


def test_a_client_in_another_pid_namespace_is_told_why_it_gets_no_cuda_like_memory(make_daemon):
    class IpcBound(FakeDevice):
        needs_pid_namespace = True

    spec = load_config(build_parser().parse_args(["--device-pool", "fake:ipc=16MiB"]), {}).device_pool[0]
    daemon = make_daemon(backends=[IpcBound(spec)])
    reply = daemon.call(Op.REGISTER, pid=os.getpid(), pid_ns=(daemon.sessions.own_pid_ns or 0) + 1)
    assert reply["device_tier"] is False and "pid namespace" in reply["device_tier_refused"]
    extents = daemon.offload(str(reply["token"]), _payloads(1, 4096, seed=12))
    assert not daemon.device.holds(extents[0]["slab"])
    shared = daemon.call(Op.REGISTER, pid=os.getpid(), pid_ns=daemon.sessions.own_pid_ns)
    assert shared["device_tier"] is True and shared["device_tier_refused"] == ""
    assert daemon.device.holds(daemon.offload(str(shared["token"]), _payloads(1, 4096, seed=13))[0]["slab"])


def test_device_host_and_disk_together_hold_three_times_the_memory_and_every_byte_comes_back(make_daemon):
    daemon = make_daemon("fake:gpu1=16MiB", pool_mib=16, spill_mib=128)
    token = daemon.register()
    payloads = _payloads(48, 1 * MiB, seed=14)
    handles = []
    for payload in payloads:
        handles += [e["handle"] for e in daemon.offload(token, [payload])]
        daemon.settle()
    stats = daemon.stats()
    assert stats["device_evicted_bytes"] > 0 and stats["spilled_total_bytes"] > 0
    for handle, payload in reversed(list(zip(handles, payloads, strict=True))):  # backward's order
        for _ in range(200):
            reply = daemon.send(Op.FETCH, token, handles=[handle])
            if reply.ok and reply.result["extents"]:
                break
            daemon.settle()
        place = reply.result["extents"][0]
        assert bytes(daemon.view(place["slab"], place["offset"], len(payload))) == payload
        daemon.call(Op.FREE, token, handles=[handle])
    stats = daemon.stats()
    assert (stats["device_used_bytes"], stats["used_bytes"], stats["disk_used_bytes"]) == (0, 0, 0)


def test_a_failed_move_off_the_device_keeps_the_activation_there_and_moves_on(make_daemon, monkeypatch):
    daemon = make_daemon("fake:gpu1=16MiB")
    token = daemon.register()
    payloads = _payloads(15, 1 * MiB, seed=15)
    extents = [e for p in payloads for e in daemon.offload(token, [p])]
    calls = []

    def broken(self: FakeMemory, offset: int, into: memoryview) -> None:
        calls.append(offset)
        raise DeviceError("an uncorrectable ECC error")

    monkeypatch.setattr(FakeMemory, "read", broken)
    daemon.settle()
    stats = daemon.stats()
    assert stats["device_evict_errors"] == len(calls) == len(extents), "each tried once, none again"
    assert stats["used_bytes"] == 0, "no host space kept for a move that failed"
    monkeypatch.undo()
    daemon.settle()
    assert daemon.stats()["device_evictions"] == 0
    got = daemon.fetch(token, [e["handle"] for e in extents])
    assert [data for _, data in got] == payloads
    assert all(daemon.device.holds(place["slab"]) for place, _ in got)


def test_a_closed_session_gives_its_device_space_back(make_daemon):
    daemon = make_daemon()
    token = daemon.register()
    daemon.offload(token, _payloads(8, 256 << 10, seed=16))
    daemon.call(Op.OFFLOAD, token, sizes=[1 * MiB])  # reserved, never committed
    assert daemon.stats()["device_reserved_bytes"] == 1 * MiB
    daemon.call(Op.UNREGISTER, token)
    daemon.sessions.reclaim(None)
    stats = daemon.stats()
    assert (stats["device_used_bytes"], stats["device_reserved_bytes"]) == (0, 0)
    assert daemon.device.devices[0].pool.used_bytes == 0


def test_a_move_copies_a_piece_per_loop_step_and_a_fetch_meanwhile_keeps_the_extent_where_it_is(
    make_daemon, monkeypatch
):
    piece = 256 << 10
    monkeypatch.setattr(tier_module, "EVICT_BYTES_PER_BALANCE", piece)
    daemon = make_daemon("fake:gpu1=16MiB")
    token = daemon.register()
    payloads = _payloads(16, MiB, seed=24)  # the whole device: past the high water
    extents = [daemon.offload(token, [p])[0] for p in payloads]
    device = daemon.device.devices[0]
    for pieces in range(1, 4):
        daemon.device.balance(daemon.sessions.sessions)
        assert device.move is not None and device.move.done == pieces * piece, "one piece per loop step"
    assert daemon.stats()["device_evictions"] == 0
    daemon.device.balance(daemon.sessions.sessions)  # the last piece
    assert daemon.stats()["device_evictions"] == 1 and device.move is None
    daemon.device.balance(daemon.sessions.sessions)  # 15 of 16 MiB: still past 90 %, the next oldest starts
    moving = device.move
    assert moving is not None and moving.extent.handle == extents[1]["handle"] and moving.done == piece
    place, data = daemon.fetch(token, [extents[1]["handle"]])[0]
    assert device.move is None, "fetched: it stays, and the move's host space goes back"
    assert (place["slab"], place["offset"], data) == (extents[1]["slab"], extents[1]["offset"], payloads[1])
    assert daemon.stats()["used_bytes"] == MiB, "the host holds the one moved, nothing of the dropped move"
    assert daemon.fetch(token, [extents[0]["handle"]])[0][1] == payloads[0]


def test_a_device_full_of_tiny_extents_begins_a_bounded_number_of_moves_per_loop_step(make_daemon):
    daemon = make_daemon("fake:gpu1=16MiB")
    tokens = [daemon.register() for _ in range(8)]
    for index in range(15 * 256):  # 15 MiB in 4 KiB extents, spread over 8 sessions
        token = tokens[index % len(tokens)]
        daemon.call(Op.COMMIT, token, handles=[daemon.call(Op.OFFLOAD, token, sizes=[4096])["extents"][0]["handle"]])
    daemon.device.balance(daemon.sessions.sessions)
    assert daemon.stats()["device_evictions"] == tier_module.MOVES_PER_BALANCE
