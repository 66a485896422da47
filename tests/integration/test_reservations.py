"""Reserving ahead (NOTE [Reservations]): one offload request per layer, space given back.

The tests share the module's daemon (``shared_daemon``: it holds nothing between tests,
so each test's session is its only one), except the one that needs a small pool."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from client import StormSystem, offload_saved_tensors
from helpers import wait_for


def _session(daemon) -> dict:
    [session] = daemon.stats()["sessions"]
    return session


def test_steady_state_costs_one_offload_request_per_layer(shared_daemon):
    daemon = shared_daemon
    torch.manual_seed(0)
    layers = 3
    layer = nn.TransformerEncoderLayer(64, 4, 256, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
    x = torch.randn(4, 128, 64)
    with StormSystem(daemon.endpoint) as system:
        per_step = []
        for _ in range(4):
            before = system.stats().as_dict()
            with offload_saved_tensors(system, module=encoder.layers, min_bytes=0):
                loss = encoder(x).square().mean()
            loss.backward()
            after = system.stats().as_dict()
            per_step.append({k: after[k] - before[k] for k in after if isinstance(after[k], int)})
        assert after["used_bytes"] == after["reserved_bytes"] == 0
    first, steady = per_step[0], per_step[-1]
    # Many tensors per layer, and the same every step.
    assert steady["offloaded_tensors"] == first["offloaded_tensors"] >= 5 * layers
    # Saved tensors outside encoder.layers form one more group (layer id None).
    assert steady["offload_round_trips"] <= layers + 1 < first["offloaded_tensors"]
    assert steady["fetch_round_trips"] <= layers + 1
    assert steady["blocking_round_trips"] == 1  # the stats() call that measured it


def _offload(system, count: int, size: int, layer_id: int, value: float = 1.0) -> list:
    handles = [system.offload(torch.full((size // 4,), value), layer_id=layer_id) for _ in range(count)]
    for handle in handles:
        system.locate(handle)  # waits until the offload is placed
    return handles


def _repeat_profile(system, count: int, size: int) -> None:
    """Two identical runs of layer 0: from the next run on, its profile is reserved ahead."""
    for _ in range(2):
        for handle in _offload(system, count, size, layer_id=0):
            system.free(handle)
        system.flush()


def test_untaken_reservations_are_given_back_at_the_end_of_the_run(shared_daemon):
    daemon = shared_daemon
    size = 64 << 10
    with StormSystem(daemon.endpoint) as system:
        _repeat_profile(system, 6, size)
        step2 = _offload(system, 2, size, layer_id=0)  # reserves six, takes two
        # The run is still open (commits are posted: wait for the daemon to apply them).
        wait_for(lambda: _session(daemon)["reserved_bytes"] == 4 * size, what="two of six reserved committed")
        system.flush()  # ends it: the four spares go back
        assert _session(daemon)["reserved_bytes"] == 0 and system.stats().returned_reservation_bytes == 4 * size
        for handle in step2:
            assert torch.equal(system.fetch(handle), torch.ones(size // 4))
            system.free(handle)
        assert system.stats().used_bytes == 0


def test_spare_reservations_are_given_back_when_idle(shared_daemon):
    daemon = shared_daemon
    size = 64 << 10
    with StormSystem(daemon.endpoint, reserve_idle_s=1.5) as system:
        _repeat_profile(system, 6, size)
        held = _offload(system, 2, size, layer_id=0)  # the run stays open: nothing ends it
        assert _session(daemon)["reserved_bytes"] > 0
        wait_for(lambda: _session(daemon)["reserved_bytes"] == 0, what="the spares to be given back")
        assert system.stats().returned_reservation_bytes == 4 * size
        assert all(torch.equal(system.fetch(h), torch.ones(size // 4)) for h in held)


def test_spares_are_given_back_when_the_pool_is_full(daemon_factory):
    daemon = daemon_factory(pool_size="4MiB")
    mib = 1 << 20
    with StormSystem(daemon.endpoint, policy="keep", reserve_idle_s=60) as system:
        _repeat_profile(system, 3, mib)
        first = _offload(system, 1, mib, layer_id=0)  # reserves 3 MiB, takes 1
        wait_for(lambda: _session(daemon)["reserved_bytes"] == 2 * mib, what="one of three reserved committed")
        # Same layer, 1.5 MiB tensors: no spare fits and only 1 MiB is free, so the spares go.
        big = _offload(system, 2, 3 * mib // 2, layer_id=0, value=2.0)
        stats = system.stats().as_dict()
        assert stats["kept_tensors"] == 0 and stats["returned_reservation_bytes"] == 2 * mib
        assert all(torch.equal(system.fetch(h), torch.full((3 * mib // 8,), 2.0)) for h in big)
        assert torch.equal(system.fetch(first[0]), torch.ones(mib // 4))


@pytest.mark.parametrize("idle_s", [0, -1.0, math.inf, math.nan])
def test_reserve_idle_s_must_be_a_positive_finite_number(idle_s):
    with pytest.raises(ValueError, match="reserve_idle_s must be a positive number of seconds"):
        StormSystem("ipc:///nonexistent/stormd.sock", reserve_idle_s=idle_s)
