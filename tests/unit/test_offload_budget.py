"""The budget policy's plan of the link (NOTE [Offload budget]) and the layer profile, without a daemon."""

from __future__ import annotations

import time

import pytest
import torch

from client.selection import MIN_TRUST, Budget, LayerProfile


def _profile(layer_s: dict[str, float], offered: dict[str, int]) -> LayerProfile:
    profile = LayerProfile()
    profile.layer_s = dict(layer_s)
    profile.order = list(layer_s)
    profile.offered = dict(offered)
    return profile


def _take_all(budget: Budget, layers: dict[str, list[int]]) -> dict[str, int]:
    taken: dict[str, int] = {}
    for layer, sizes in layers.items():
        for nbytes in sizes:
            if budget.take(layer, nbytes):
                taken[layer] = taken.get(layer, 0) + nbytes
    return taken


def test_a_layer_offloads_what_the_link_carries_before_the_window_would_wait():
    # Four layers of 10 ms, each saving ten 1 MB tensors; the link carries 100 MB/s: 1 MB per layer time.
    layers = {str(k): [1_000_000] * 10 for k in range(4)}
    profile = _profile({name: 0.010 for name in layers}, {name: 10_000_000 for name in layers})
    budget = Budget(profile, bytes_per_s=100e6, cap_bytes=0, window=2)
    taken = _take_all(budget, layers)
    assert "3" not in taken  # the last layer: backward needs it at once
    # Over the forward (40 ms) the link carries at most 4 MB; the plan never exceeds it.
    assert sum(taken.values()) <= budget.hideable_bytes == 4_000_000
    assert sum(taken.values()) >= 3_000_000  # and uses most of the three layers' time before the last
    # Every planned copy ends before its deadline: re-running the plan gives the same answer.
    again = Budget(profile, bytes_per_s=100e6, cap_bytes=0, window=2)
    assert _take_all(again, layers) == taken


def test_a_tensor_larger_than_one_layer_time_goes_when_the_window_leaves_room():
    # A 1.6 MB tensor takes 16 ms at 100 MB/s, more than a 10 ms layer; saved at the start
    # of layer 0, its copy ends before layer 2 starts (20 ms), so it may go.
    profile = _profile({str(k): 0.010 for k in range(4)}, {str(k): 1_600_000 for k in range(4)})
    budget = Budget(profile, bytes_per_s=100e6, cap_bytes=0, window=2)
    assert budget.take("0", 1_600_000)
    # Layer 1's would queue behind it (the link is free at 16 ms) and end at 32 ms, after
    # layer 3 starts (30 ms), where the window would wait for it: it stays.
    assert budget.take("1", 1_600_000) is False
    # Layer 2's starts at 20 ms and ends by the end of forward (40 ms).
    assert budget.take("2", 1_600_000)


def test_nothing_goes_on_a_first_step_or_without_bandwidth_and_the_cap_holds():
    empty = Budget(LayerProfile(), bytes_per_s=1e9, cap_bytes=0, window=2)
    assert empty.take("0", 1) is False
    profile = _profile({"0": 1.0, "1": 1.0}, {"0": 10, "1": 10})
    assert Budget(profile, bytes_per_s=0.0, cap_bytes=0, window=2).take("0", 1) is False
    capped = Budget(profile, bytes_per_s=1e9, cap_bytes=5, window=2)
    assert capped.take("0", 4) and not capped.take("0", 2) and capped.take("0", 1)


def test_the_profile_keeps_each_layers_shortest_time_and_the_last_forwards_order():
    profile = LayerProfile()
    cpu = torch.device("cpu")
    for _ in range(2):
        for name in ("a", "b"):
            profile.enter(name, cpu)
            profile.offer(name, 100)
        profile.end()
    assert profile.order == ["a", "b"] and profile.last == "b" and profile.steps == 2
    assert profile.offered == {"a": 100, "b": 100}
    assert set(profile.layer_s) == {"a", "b"} and all(t >= 0 for t in profile.layer_s.values())
    shortest = dict(profile.layer_s)
    profile.enter("a", cpu, waited_s=0.0)
    time.sleep(0.05)
    profile.end(waited_s=0.05)  # all of it waiting on the link: not the layer's compute
    assert profile.layer_s["a"] <= shortest["a"] and profile.order == ["a"]


@pytest.mark.parametrize("window", [0, 1, 3])
def test_plans_for_any_window_stay_within_the_forward(window):
    layers = {str(k): [400_000] * 5 for k in range(6)}
    profile = _profile({name: 0.010 for name in layers}, {name: 2_000_000 for name in layers})
    budget = Budget(profile, bytes_per_s=100e6, cap_bytes=0, window=window)
    assert sum(_take_all(budget, layers).values()) <= budget.hideable_bytes


def test_a_forward_that_waited_on_the_link_halves_the_next_plans_rate_and_clean_ones_restore_it():
    profile = LayerProfile()
    cpu = torch.device("cpu")

    def forward(waited_s: float) -> None:
        profile.layer_s["a"] = 1.0  # a planned forward of one second
        profile.enter("a", cpu, waited_s=0.0)
        profile.end(waited_s=waited_s)

    forward(0.5)  # waited half of it on the link: over-planned
    assert profile.trust == 0.5
    forward(0.5)
    assert profile.trust == 0.25
    for _ in range(10):
        forward(0.0)
    assert profile.trust == 1.0  # grows back, never past the measured rate
    for _ in range(20):
        forward(1.0)
    assert profile.trust == MIN_TRUST
