"""The transfer engine's parts, each against fakes: no daemon, no sockets, no threads.

Placement against a fake pool (the daemon's side of ``offload`` and ``free``), the
prefetcher against a slot table, and the CPU copier against an anonymous mapping.
"""

from __future__ import annotations

import gc
import mmap
from typing import Any

import pytest
import torch

from client.engine.copies import CpuCopier, PoolViews
from client.engine.failures import Failures
from client.engine.jobs import EngineStats, Offload
from client.engine.placement import Placement, pressure_policy
from client.engine.prefetch import Prefetcher
from client.engine.state import Slot, SlotTable
from client.handle import Handle
from client.reservations import Reservations
from storm_service.errors import PoolFullError
from storm_service.protocol import Op


class FakePool:
    """The daemon's ``offload`` and ``free`` over a byte budget, as the engine's Requests."""

    def __init__(self, capacity: int, refusals: int = 0) -> None:
        self.capacity = capacity
        self.used = 0
        self.refusals = refusals
        self.calls: list[tuple[Op, dict[str, Any]]] = []
        self.freed: list[int] = []
        self.sizes: dict[int, int] = {}
        self.failures = Failures(on_lost=lambda error: None)

    def call(self, op: Op, **fields: Any) -> dict[str, Any]:
        self.calls.append((op, fields))
        assert op is Op.OFFLOAD
        sizes = fields["sizes"]
        if self.refusals or self.used + sum(sizes) > self.capacity:
            self.refusals = max(self.refusals - 1, 0)
            raise PoolFullError(f"offload: {sum(sizes)} bytes requested, {self.capacity - self.used} free")
        extents = []
        for size in sizes:
            handle = len(self.sizes) + 1
            self.sizes[handle] = size
            extents.append({"handle": handle, "slab": 0, "offset": self.used, "size_bytes": size})
            self.used += size
        return {"extents": extents}

    def post_free(self, ids: list[int]) -> None:
        self.freed.extend(ids)
        self.used -= sum(self.sizes.pop(i) for i in ids)


def _jobs(sizes: list[int], layer_id: int = 0, first_seq: int = 0) -> list[Offload]:
    jobs = []
    for seq, size in enumerate(sizes, start=first_seq):
        tensor = torch.zeros(size, dtype=torch.uint8)
        handle = Handle((size,), torch.uint8, tensor.device, size, layer_id, seq)
        jobs.append(Offload(Slot(handle), tensor, None, tensor, tensor._version, tensor.data_ptr(), 0))
    return jobs


def _placement(pool: FakePool, policy: str, served: list[int] | None = None) -> Placement:
    return Placement(
        policy=pressure_policy(policy, wait_timeout_s=5.0),
        reservations=Reservations(idle_s=2.0),
        stats=EngineStats(),
        requests=pool,  # type: ignore[arg-type]
        serve_while_waiting=lambda: served.append(1) if served is not None else None,
    )


def test_a_layer_is_placed_with_one_request():
    pool = FakePool(1 << 20)
    placement = _placement(pool, "error")
    jobs = _jobs([512, 1024, 2048])
    placement.place_layer(jobs)
    assert [op for op, _ in pool.calls] == [Op.OFFLOAD]
    assert all(job.slot.placed for job in jobs)
    assert placement.stats.offloaded_bytes == 512 + 1024 + 2048


def test_a_repeated_layer_is_reserved_ahead_and_spares_go_back_when_shapes_change():
    pool = FakePool(1 << 20)
    placement = _placement(pool, "error")
    for _ in range(3):
        placement.place_layer(_jobs([512, 512]))
        placement.return_spares(placement.reservations.end_run())
    pool.calls.clear()
    first = _jobs([512])
    placement.place_layer(first)  # the profile [512, 512] is reserved ahead: one request for both
    second = _jobs([512], first_seq=1)
    placement.place_layer(second)  # takes the spare: no request
    assert len(pool.calls) == 1 and second[0].slot.placed
    placement.place_layer(_jobs([4096], layer_id=1))  # a new layer ends the run
    assert placement.return_spares(placement.reservations.end_run()) is False


@pytest.mark.parametrize("policy", ["keep", "error", "wait"])
def test_pool_full_goes_to_the_policy(policy):
    pool = FakePool(1024)
    served: list[int] = []
    placement = _placement(pool, policy, served)
    if policy == "wait":
        pool.refusals = 3  # refused three times, then room appears
    jobs = _jobs([4096] if policy != "wait" else [512])
    placement.place_layer(jobs)
    slot = jobs[0].slot
    if policy == "keep":
        assert slot.kept is jobs[0].tensor and not slot.placed
        assert placement.stats.kept_tensors == 1
    elif policy == "error":
        assert isinstance(slot.error, PoolFullError) and not slot.placed
        with pytest.raises(PoolFullError) as raised:
            pool.failures.raise_pending()
        assert str(raised.value) == str(slot.error)
    else:
        assert slot.placed and served, "wait must serve queued frees and fetches while it retries"


def test_an_offload_failing_after_its_step_reported_an_error_does_not_fail_the_next_step():
    """NOTE [Error epochs]: late failures of an abandoned step are dropped; the next step's are kept."""
    pool = FakePool(1024)
    placement = _placement(pool, "error", [])
    early, late = _jobs([4096]), _jobs([4096], first_seq=1)  # both submitted in epoch 0
    placement.place_layer(early)
    with pytest.raises(PoolFullError):
        pool.failures.raise_pending()  # the training thread gives up on the step
    placement.place_layer(late)  # its queued offload fails after the report
    pool.failures.raise_pending()  # nothing: that failure belonged to the step already reported
    assert isinstance(late[0].slot.error, PoolFullError), "the late handle itself still fails"
    for job in (fresh := _jobs([4096], first_seq=2)):
        job.epoch = pool.failures.epoch
    placement.place_layer(fresh)
    with pytest.raises(PoolFullError):
        pool.failures.raise_pending()


def test_error_policy_places_when_room_appeared_since_the_refusal():
    pool = FakePool(1 << 20, refusals=1)  # the layer's request is refused; the policy asks once more
    placement = _placement(pool, "error")
    jobs = _jobs([512])
    placement.place_layer(jobs)
    assert jobs[0].slot.placed and jobs[0].slot.error is None


def test_our_own_spares_are_given_back_before_the_policy_decides():
    pool = FakePool(2048)
    placement = _placement(pool, "error")
    for _ in range(3):  # a profile of two 512-byte tensors, reserved ahead from the third run
        placement.place_layer(_jobs([512, 512]))
        placement.return_spares(placement.reservations.end_run())
    pool.used = 0
    pool.sizes.clear()
    placement.place_layer(_jobs([512]))  # reserves 2 x 512, takes one
    big = _jobs([1536], layer_id=0, first_seq=5)
    placement.place_layer(big)  # only fits once the spare 512 is given back
    assert big[0].slot.placed and pool.freed


def _table(sizes_by_layer: list[list[int]]) -> tuple[SlotTable, list[Slot]]:
    table = SlotTable()
    slots = []
    seq = 0
    for layer_id, sizes in enumerate(sizes_by_layer):
        for size in sizes:
            slots.append(table.add(Handle((size,), torch.uint8, torch.device("cpu"), size, layer_id, seq)))
            seq += 1
    return table, slots


def test_prefetch_takes_earlier_handles_within_the_budget_and_whole_cpu_layers():
    table, slots = _table([[100] * 4, [100] * 4, [100] * 4])
    requested: list[int] = []
    prefetcher = Prefetcher(
        250, table, lambda slot, prefetch: (requested.append(slot.handle.seq), prefetcher.requested(slot, prefetch))
    )
    last = slots[-1]
    prefetcher.taken(last)
    prefetcher.before(last)
    # Budget 250 covers two tensors; on the CPU it runs on to the end of the layer it reached.
    assert requested == [10, 9, 8]
    assert prefetcher.inflight_bytes == 300
    prefetcher.before(slots[7])  # more than half the budget in flight: no refill yet
    assert requested == [10, 9, 8]


def test_a_second_take_of_one_handle_starts_a_new_pass():
    table, slots = _table([[100, 100]])
    prefetcher = Prefetcher(1 << 20, table, lambda slot, prefetch: prefetcher.requested(slot, prefetch))
    prefetcher.taken(slots[1])
    first_pass = slots[1].taken_pass
    prefetcher.taken(slots[1])  # retain_graph: backward runs again
    assert slots[1].taken_pass == first_pass + 1


class _AnonymousSegment:
    def __init__(self, size_bytes: int) -> None:
        self.mmap = mmap.mmap(-1, size_bytes)
        self.bytes = torch.frombuffer(self.mmap, dtype=torch.uint8)

    def view(self, offset: int, size_bytes: int) -> torch.Tensor:
        return self.bytes[offset : offset + size_bytes]


def test_cpu_copier_copies_contiguous_and_strided_sources_and_aliases_the_extent():
    segment = _AnonymousSegment(1 << 16)
    views = PoolViews([segment])  # type: ignore[list-item]
    copier = CpuCopier(views)
    source = torch.arange(64, dtype=torch.float32).view(8, 8)
    jobs = []
    for seq, tensor in enumerate([source, source.t()]):
        handle = Handle(tuple(tensor.shape), tensor.dtype, tensor.device, tensor.numel() * 4, 0, seq)
        slot = Slot(handle, id=seq + 1, segment=0, offset=seq * 512)
        jobs.append(Offload(slot, tensor, None, tensor, tensor._version, tensor.data_ptr(), 0))
    copier.copy_out(jobs)
    assert torch.equal(views.view(jobs[0].slot), source)
    assert torch.equal(views.view(jobs[1].slot), source.t())
    released: list[Slot] = []
    alias = views.alias(jobs[0].slot, released.append)
    assert torch.equal(alias, source) and alias.data_ptr() == views.view(jobs[0].slot).data_ptr()
    del alias
    gc.collect()
    assert released == [jobs[0].slot]


def test_viewed_extents_track_live_aliases():
    table, slots = _table([[512, 512]])
    slots[0].segment, slots[0].offset = 0, 0
    with table.lock:
        table.viewed(slots[0], +1)
    assert table.viewed_extents() == [(0, 0, 512)]
    with table.lock:
        assert table.viewed(slots[0], -1) == 0
    assert table.viewed_extents() == []
