"""The link emulator's arithmetic and the bounded window of layers in flight, against fakes."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from client.engine.jobs import EngineStats
from client.engine.link import D2H, H2D, Link
from client.engine.state import Slot
from client.engine.window import InflightWindow
from client.handle import Handle


def test_a_lane_is_busy_until_its_last_transfer_ends_and_the_lanes_are_apart():
    link = Link(gbps=1.0)  # 10**9 bytes per second
    assert link.arrival(D2H, 1_000_000, started=10.0) == pytest.approx(10.001)
    # Sent while the lane is busy: queued behind the first transfer.
    assert link.arrival(D2H, 2_000_000, started=10.0005) == pytest.approx(10.003)
    # The other direction is a lane of its own (full duplex).
    assert link.arrival(H2D, 1_000_000, started=10.0005) == pytest.approx(10.0015)
    # Sent after the lane went idle: starts when sent.
    assert link.arrival(D2H, 1_000_000, started=20.0) == pytest.approx(20.001)


def test_carry_blocks_until_the_bytes_would_have_arrived():
    link = Link(gbps=0.1)
    started = time.monotonic()
    link.carry(D2H, 2_000_000, started)  # 20 ms at 0.1 GB/s
    assert time.monotonic() - started >= 0.02


@pytest.mark.parametrize("gbps", [0.0, -1.0, float("nan")])
def test_a_link_needs_a_positive_rate(gbps):
    with pytest.raises(ValueError, match="rate"):
        Link(gbps)


def _slot(seq: int, layer_id: int | None) -> Slot:
    handle = Handle(
        shape=(4,), dtype=torch.float32, device=torch.device("cpu"), size_bytes=16, layer_id=layer_id, seq=seq
    )
    return Slot(handle)


def _window(max_layers: int) -> tuple[InflightWindow, list[Slot], EngineStats]:
    waited: list[Slot] = []
    stats = EngineStats()

    def wait(slot: Slot) -> None:
        waited.append(slot)
        slot.stored.set()  # the fake transfer thread finishes it when asked

    return InflightWindow(max_layers, wait, stats), waited, stats


def test_entering_layer_k_waits_for_layer_k_minus_2_only():
    window, waited, stats = _window(2)
    layers = [[_slot(3 * k + i, k) for i in range(3)] for k in range(4)]
    for slot in layers[0] + layers[1]:
        window.admit(slot)
    assert waited == []  # layers 0 and 1 may both be in flight
    window.admit(layers[2][0])
    assert waited == layers[0]  # layer 2 starts once layer 0 is stored
    for slot in layers[2][1:]:
        window.admit(slot)
    assert waited == layers[0]  # more offloads of the same layer never wait
    window.admit(layers[3][0])
    assert waited == layers[0] + layers[1]
    assert stats.window_waits == 2


def test_layers_already_stored_cost_no_wait():
    window, waited, stats = _window(1)
    first = _slot(0, 0)
    window.admit(first)
    first.stored.set()
    window.admit(_slot(1, 1))
    assert waited == [] and stats.window_waits == 0


def test_offloads_without_a_layer_id_are_one_layer_and_zero_means_no_bound():
    window, waited, _ = _window(1)
    for seq in range(5):
        window.admit(_slot(seq, None))
    assert waited == []
    unbounded, waited, _ = _window(0)
    for seq in range(5):
        unbounded.admit(_slot(seq, seq))
    assert waited == []


def test_the_wait_happens_before_the_new_layer_is_admitted():
    stats = EngineStats()
    window = InflightWindow(1, lambda slot: slot.stored.wait(5), stats)
    old = _slot(0, 0)
    window.admit(old)
    admitted = threading.Event()
    thread = threading.Thread(target=lambda: (window.admit(_slot(1, 1)), admitted.set()))
    thread.start()
    assert not admitted.wait(0.05)  # held back while layer 0's copy runs
    old.stored.set()
    assert admitted.wait(5)
    thread.join()
