"""Reserving ahead (NOTE [Reservations]): one offload request per layer, space given back."""

from __future__ import annotations

import time

import torch
from torch import nn

from client import StormSystem, offload_saved_tensors


def _wait_for(predicate, timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _session(daemon) -> dict:
    [session] = daemon.stats()["sessions"]
    return session


def test_steady_state_costs_one_offload_request_per_layer(daemon):
    torch.manual_seed(0)
    layers = 3
    layer = nn.TransformerEncoderLayer(64, 4, 256, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
    x = torch.randn(4, 128, 64)
    with StormSystem(daemon.endpoint) as system:
        per_step = []
        for _ in range(4):
            before = system.stats()
            with offload_saved_tensors(system, module=encoder.layers, min_bytes=0):
                loss = encoder(x).square().mean()
            loss.backward()
            after = system.stats()
            per_step.append({k: after[k] - before[k] for k in after if isinstance(after[k], int)})
        assert after["used_bytes"] == after["reserved_bytes"] == 0
    first, steady = per_step[0], per_step[-1]
    # Many tensors per layer, and the same every step.
    assert steady["offloaded_tensors"] == first["offloaded_tensors"] >= 5 * layers
    # Saved tensors outside encoder.layers form one more group (layer id None).
    assert steady["offload_round_trips"] <= layers + 1 < first["offloaded_tensors"]
    assert steady["fetch_round_trips"] <= layers + 1
    assert steady["blocking_round_trips"] == 1  # the stats() call that measured it


def test_spare_reservations_are_given_back_when_idle(daemon):
    size = 64 << 10
    with StormSystem(daemon.endpoint, reserve_idle_s=0.5) as system:
        step1 = [system.offload(torch.ones(size // 4), layer_id=0) for _ in range(6)]
        system.flush()  # layer 0's profile is now six tensors of this size
        for handle in step1:
            system.free(handle)
        step2 = [system.offload(torch.ones(size // 4), layer_id=0) for _ in range(2)]
        system.flush()
        session = _session(daemon)
        assert session["used_bytes"] == 2 * size and session["reserved_bytes"] == 4 * size
        _wait_for(lambda: _session(daemon)["reserved_bytes"] == 0, what="the spares to be freed")
        assert system.stats()["returned_reservation_bytes"] == 4 * size
        for handle in step2:
            assert torch.equal(system.fetch(handle), torch.ones(size // 4))
            system.free(handle)
        assert system.stats()["used_bytes"] == 0


def test_spares_are_given_back_when_the_pool_is_full(daemon_factory):
    daemon = daemon_factory(pool_size="4MiB")
    mib = 1 << 20
    with StormSystem(daemon.endpoint, policy="keep", reserve_idle_s=60) as system:
        step1 = [system.offload(torch.ones(mib // 4), layer_id=0) for _ in range(3)]
        system.flush()
        for handle in step1:
            system.free(handle)
        kept = system.offload(torch.ones(mib // 4), layer_id=0)  # reserves 3 MiB, uses 1
        system.flush()
        assert _session(daemon)["reserved_bytes"] == 2 * mib
        # 1.5 MiB tensors cannot use the 1 MiB spares, and only 1 MiB is free: the spares go.
        big = [system.offload(torch.full((3 * mib // 8,), 2.0), layer_id=1) for _ in range(2)]
        stats = system.stats()
        assert stats["kept_tensors"] == 0 and stats["returned_reservation_bytes"] == 2 * mib
        assert all(torch.equal(system.fetch(h), torch.full((3 * mib // 8,), 2.0)) for h in big)
        assert torch.equal(system.fetch(kept), torch.ones(mib // 4))
