"""Selection policies (all, budget, checkpoint), offload_checkpoint, and the bounded window, end to end.

Gradients are compared bitwise with the same model run without STORM (plain autograd,
or ``torch.utils.checkpoint`` for the checkpoint policy), several times over.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from client import StormSystem, offload_checkpoint, offload_saved_tensors
from client.selection import WARMUP_STEPS

REPEATS = 3


@pytest.fixture
def system(module_daemon):
    with StormSystem(module_daemon.endpoint) as system:
        yield system


def _block(width: int = 64, dropout: float = 0.1) -> nn.Module:
    return nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * width, width))


def _stack(layers: int = 6, width: int = 64, dropout: float = 0.1) -> nn.Sequential:
    torch.manual_seed(7)
    return nn.Sequential(*[_block(width, dropout) for _ in range(layers)])


def _grads(model: nn.Module, x: torch.Tensor | None = None) -> list[torch.Tensor]:
    grads = [p.grad.clone() for p in model.parameters()]
    if x is not None:
        grads.append(x.grad.clone())
    return grads


def _assert_equal(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> None:
    assert len(ours) == len(theirs)
    for index, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert torch.equal(a, b), f"gradient {index} differs"


def test_offload_checkpoint_matches_torch_checkpoint_bitwise_with_dropout(system):
    block = _block()
    for seed in range(REPEATS):
        x = torch.randn(32, 16, 64, requires_grad=True)
        torch.manual_seed(seed)
        checkpoint(block, x, use_reentrant=False).square().mean().backward()
        expected = _grads(block, x)
        block.zero_grad()
        x.grad = None
        torch.manual_seed(seed)
        out = offload_checkpoint(block, x, system=system, layer_id=0)
        # The input is in the pool, not held by the graph, until backward recomputes.
        assert system.stats().layer_bytes == {0: x.numel() * 4}
        out.square().mean().backward()
        _assert_equal(_grads(block, x), expected)
        block.zero_grad()
        x.grad = None
    system.flush()
    assert system.stats().used_bytes == 0


def test_offload_checkpoint_keeps_kwargs_and_non_tensors_and_retains_the_graph(system):
    def layer(x: torch.Tensor, scale: float, *, bias: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x * scale + bias)

    x = torch.randn(64, 64, requires_grad=True)
    bias = torch.randn(64, requires_grad=True)
    (layer(x, 0.5, bias=bias) ** 2).sum().backward()
    expected = [x.grad.clone(), bias.grad.clone()]
    x.grad = bias.grad = None
    loss = (offload_checkpoint(layer, x, 0.5, bias=bias, system=system) ** 2).sum()
    loss.backward(retain_graph=True)
    first = [x.grad.clone(), bias.grad.clone()]
    loss.backward()  # recomputes again: fetched again from the pool
    _assert_equal(first, expected)
    _assert_equal([x.grad, bias.grad], [2 * g for g in expected])
    del loss
    system.flush()
    assert system.stats().used_bytes == 0


def test_offload_checkpoint_without_grad_offloads_nothing_and_refuses_reentrant(system):
    with torch.no_grad():
        out = offload_checkpoint(torch.sin, torch.randn(1024), system=system)
    assert out.shape == (1024,)
    assert system.stats().offloaded_tensors == 0
    with pytest.raises(ValueError, match="non-reentrant"):
        offload_checkpoint(torch.sin, torch.randn(4), system=system, use_reentrant=True)


def test_select_checkpoint_checkpoints_each_child_and_offloads_only_its_input(system):
    model = _stack()
    reference = copy.deepcopy(model)
    for seed in range(REPEATS):
        x = torch.randn(16, 32, 64)
        torch.manual_seed(seed)
        h = x
        for block in reference:
            h = checkpoint(block, h, use_reentrant=False)
        h.square().mean().backward()
        torch.manual_seed(seed)
        with offload_saved_tensors(system, module=model, select="checkpoint", min_bytes=0) as moved:
            out = model(x)
        assert set(moved.layer_bytes) == {str(i) for i in range(6)}
        assert all(nbytes == x.numel() * 4 for nbytes in moved.layer_bytes.values())
        assert moved.offloaded_storages == 6 and moved.packed_tensors == 0
        out.square().mean().backward()
        _assert_equal(_grads(model), _grads(reference))
        model.zero_grad()
        reference.zero_grad()
    # The children are themselves again outside the block.
    assert all("forward" not in block.__dict__ for block in model)
    system.flush()
    assert system.stats().used_bytes == 0


def test_per_layer_selections_need_a_module(system):
    for select in ("budget", "checkpoint"):
        with pytest.raises(ValueError, match="needs module="), offload_saved_tensors(system, select=select):
            pass
    with pytest.raises(ValueError, match="select must be one of"), offload_saved_tensors(system, select="some"):
        pass


def test_keep_last_layers_leaves_the_last_children_on_the_device(module_daemon):
    model = _stack(layers=4, dropout=0.0)
    reference = copy.deepcopy(model)
    x = torch.randn(8, 64)
    reference(x).square().sum().backward()
    with StormSystem(module_daemon.endpoint, keep_last_layers=2) as system:
        with offload_saved_tensors(system, module=model, min_bytes=0) as moved:
            out = model(x)
        assert set(moved.layer_bytes) == {"0", "1"}
        assert set(moved.left_bytes) == {"2", "3"}
        out.square().sum().backward()
    _assert_equal(_grads(model), _grads(reference))


def test_budget_measures_first_then_offloads_within_what_the_link_carries(module_daemon):
    model = _stack(layers=6, width=128, dropout=0.0)
    reference = copy.deepcopy(model)
    x = torch.randn(64, 128)
    reference(x).square().sum().backward()
    expected = _grads(reference)
    with StormSystem(module_daemon.endpoint, select="budget", link_gbps=0.5) as system:
        chosen = []
        for _ in range(WARMUP_STEPS + 2):
            with offload_saved_tensors(system, module=model, min_bytes=0) as moved:
                out = model(x)
            out.square().sum().backward()
            _assert_equal(_grads(model), expected)
            model.zero_grad()
            chosen.append(moved)
        first, later = chosen[0], chosen[WARMUP_STEPS:]
        for moved in chosen[:WARMUP_STEPS]:  # the first steps measure
            assert moved.offloaded_bytes == 0 and sum(moved.left_bytes.values()) > 0
        for moved in later:
            assert moved.offloaded_bytes > 0
            assert moved.offloaded_bytes + sum(moved.left_bytes.values()) == sum(first.left_bytes.values())
        # Never more per layer than bandwidth * layer time.
        stats = system.transfer_stats()
        bandwidth = stats.copy_out_bytes / stats.copy_out_s
        assert bandwidth <= 0.5e9 * 1.05
        system.flush()
        assert system.stats().used_bytes == 0


def test_budget_cap_bounds_each_layer(module_daemon):
    model = _stack(layers=3, width=128, dropout=0.0)
    x = torch.randn(64, 128)
    cap = 40_000
    with StormSystem(module_daemon.endpoint, select="budget", budget_cap_bytes=cap) as system:
        for _ in range(WARMUP_STEPS + 1):
            with offload_saved_tensors(system, module=model, min_bytes=0) as moved:
                out = model(x)
            out.sum().backward()
            assert all(nbytes <= cap for nbytes in moved.layer_bytes.values())
        assert moved.offloaded_bytes > 0


def test_the_window_bounds_what_is_still_copying_when_forward_ends(module_daemon):
    # A slow link: without the bound, forward would end with nearly every copy pending.
    model = _stack(layers=8, width=256, dropout=0.0)
    x = torch.randn(128, 256)
    with StormSystem(module_daemon.endpoint, link_gbps=0.02, max_inflight_layers=2) as system:
        with offload_saved_tensors(system, module=model, min_bytes=0) as moved:
            out = model(x)
            pending = system.inflight_bytes()
        per_layer = max(moved.layer_bytes.values())
        assert len(moved.layer_bytes) == 8
        assert pending <= 2 * per_layer < moved.offloaded_bytes / 2
        assert system.transfer_stats().window_waits > 0
        out.sum().backward()
        system.flush()
        assert system.stats().used_bytes == 0
    # Without the bound, on a link slow enough that forward (milliseconds here) outruns it.
    with StormSystem(module_daemon.endpoint, link_gbps=0.005, max_inflight_layers=0) as unbounded:
        with offload_saved_tensors(unbounded, module=model, min_bytes=0):
            out = model(x)
            assert unbounded.inflight_bytes() > 2 * per_layer  # what the bound prevents
        out.sum().backward()


def test_a_prefetch_that_finds_no_device_memory_is_fetched_on_demand(system, monkeypatch):
    tensors = [torch.full((64, 1024), float(i)) for i in range(8)]
    handles = [system.offload(t, layer_id=i) for i, t in enumerate(tensors)]
    system.flush()
    wanted = []

    def prepare_fetch(slot):
        if slot.handle is not wanted[-1]:  # the fetch asked for succeeds; every prefetch finds no memory
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return None, None

    monkeypatch.setattr(system._engine.copier, "prepare_fetch", prepare_fetch)
    for handle, tensor in zip(reversed(handles), reversed(tensors), strict=True):
        wanted.append(handle)
        assert torch.equal(system.fetch(handle), tensor)
        system.free(handle)
    stats = system.transfer_stats()
    assert stats.prefetch_oom > 0
    assert stats.prefetch_hits + stats.prefetch_waits == 0  # nothing was prefetched
    assert stats.fetch_misses == len(handles)  # each was fetched when asked for instead


def test_fetches_of_stored_handles_do_not_wait_behind_queued_offloads(module_daemon):
    # A slow link (about 0.2 s per 8 MiB layer): a fetch of a stored handle is served before
    # the offloads queued ahead of it, so it returns long before they are all copied.
    with StormSystem(module_daemon.endpoint, link_gbps=0.04, max_inflight_layers=0) as system:
        first = torch.randn(256, 1024)
        handle = system.offload(first, layer_id=0)
        system.flush()
        queued = [system.offload(torch.randn(2048, 1024), layer_id=i) for i in range(1, 6)]
        assert torch.equal(system.fetch(handle), first)
        assert system.inflight_bytes() > 0  # the offloads behind it were still copying
        for h in queued:
            system.free(h)
        system.free(handle)
