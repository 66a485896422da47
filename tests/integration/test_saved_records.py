"""Each saved tensor comes back with the bytes its own view held when it was packed.

The defect class of NOTE [Storage records] (client/records.py): packs of views of one
storage, storages that share an address, bits a rebuilt tensor must carry, and tensors
that read the pool after their owner stops holding it.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from client import SourceModifiedError, StormSystem, offload_saved_tensors
from client.hooks import DEFAULT_MIN_BYTES


@pytest.fixture
def system(daemon):
    with StormSystem(daemon.endpoint) as system:
        yield system


def _grads(module: nn.Module) -> list[torch.Tensor]:
    return [p.grad for p in module.parameters()]


def _assert_same_grads(reference: nn.Module, ours: nn.Module, what: str) -> None:
    for (name, p), q in zip(reference.named_parameters(), ours.parameters(), strict=True):
        assert q.grad is not None, f"{what}: {name} got no gradient"
        assert torch.equal(p.grad, q.grad), f"{what}: {name} differs by {(p.grad - q.grad).abs().max():.3g}"


def _assert_pool_empty(system: StormSystem) -> None:
    gc.collect()
    system.flush()
    assert system.stats().used_bytes == 0


def _assert_equal_runs(system, runs, build, make_data, loss, what, min_bytes=0, seed=None):
    """``runs`` times: one seeded model and its data, plainly and under STORM; gradients must be equal."""
    for i in range(runs):
        torch.manual_seed(i if seed is None else seed)
        a = build()
        b = copy.deepcopy(a)
        data = make_data()
        loss(a, data).backward()
        with offload_saved_tensors(system, min_bytes=min_bytes):
            total = loss(b, data)
        total.backward()
        _assert_same_grads(a, b, f"{what} run {i}")
    _assert_pool_empty(system)


def _output_loss(module, x):
    return module(x)[0].square().sum()


def test_gru_gradients_equal_200_times_in_a_row(system):
    def build():
        return nn.GRU(20, 32, batch_first=True, num_layers=2)

    _assert_equal_runs(system, 200, build, lambda: torch.randn(6, 12, 20), _output_loss, "GRU", seed=3)


@pytest.mark.parametrize(
    ("name", "build", "shape"),
    [
        ("gru-64-512-default-min-bytes", lambda: nn.GRU(64, 512), (20, 64, 64)),
        ("lstm-proj", lambda: nn.LSTM(16, 32, num_layers=2, proj_size=8), (9, 3, 16)),
        ("lstm-bidirectional", lambda: nn.LSTM(16, 24, bidirectional=True), (7, 3, 16)),
    ],
)
def test_recurrent_layers_at_default_min_bytes(system, name, build, shape):
    _assert_equal_runs(system, 10, build, lambda: torch.randn(shape), _output_loss, name, DEFAULT_MIN_BYTES)


def test_lstm_with_packed_sequences(system):
    lengths = torch.tensor([7, 5, 2])

    def loss(module, x):
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths)
        out, _ = nn.utils.rnn.pad_packed_sequence(module(packed)[0])
        return out.square().sum()

    def build():
        return nn.LSTM(8, 16, num_layers=2, proj_size=4)

    _assert_equal_runs(system, 20, build, lambda: torch.randn(7, 3, 8), loss, "packed LSTM")


@pytest.mark.parametrize("cell_type", [nn.GRUCell, nn.LSTMCell, nn.RNNCell])
def test_cell_loops(system, cell_type):
    def loss(cell, xs):
        state = None
        outs = []
        for x in xs:
            state = cell(x, state)
            outs.append(state[0] if isinstance(state, tuple) else state)
        return torch.stack(outs).square().sum()

    _assert_equal_runs(system, 20, lambda: cell_type(12, 24), lambda: torch.randn(8, 5, 12), loss, cell_type.__name__)


@pytest.mark.parametrize(
    "fn",
    [
        pytest.param(lambda z, w: (z.conj().imag * w.real).sum(), id="conj-imag-is-a-negative-view"),
        pytest.param(lambda z, w: (z @ w.mH).real.sum() + (z @ w.mH).imag.square().sum(), id="matmul-mH"),
        pytest.param(lambda z, w: (torch.fft.rfft(z.real, dim=-1).conj() * w[..., :3]).imag.sum(), id="rfft-conj"),
    ],
)
def test_conjugate_and_negative_bits_survive(system, fn):
    torch.manual_seed(0)
    z = torch.randn(4, 4, dtype=torch.complex64, requires_grad=True)
    w = torch.randn(4, 4, dtype=torch.complex64, requires_grad=True)
    fn(z, w).backward()
    expected = z.grad.clone(), w.grad.clone()
    z.grad = w.grad = None
    with offload_saved_tensors(system, min_bytes=0) as moved:
        loss = fn(z, w)
    loss.backward()
    assert moved.packed_tensors > 0
    assert torch.equal(z.grad, expected[0])
    assert torch.equal(w.grad, expected[1])
    _assert_pool_empty(system)


def test_nested_tensors_stay_in_place(system):
    torch.manual_seed(0)
    linear = nn.Linear(6, 6)
    parts = [torch.randn(3, 6), torch.randn(5, 6)]
    nested = torch.nested.nested_tensor(parts, requires_grad=True)
    with offload_saved_tensors(system, min_bytes=0) as moved:
        out = (nested * 2).sin()
    out = torch.cat([t for t in out.unbind()]) if out.is_nested else out
    out.sum().backward()
    assert moved.skipped_tensors > 0
    expected = [2 * (2 * p).cos() for p in parts]
    for got, want in zip(nested.grad.unbind(), expected, strict=True):
        assert torch.allclose(got, want)
    del linear
    _assert_pool_empty(system)


def test_two_storages_over_one_buffer_are_two_records(system):
    """Storages at one address are told apart by identity: the smaller one is saved first."""
    buffer = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    weight = torch.randn(32, 32, requires_grad=True)
    small, full = torch.from_numpy(buffer[:8]), torch.from_numpy(buffer)
    assert small.data_ptr() == full.data_ptr()
    assert small.untyped_storage().nbytes() < full.untyped_storage().nbytes()

    def loss():
        return (small @ weight).square().sum() + (full @ weight).sin().sum()

    loss().backward()
    expected = weight.grad.clone()
    weight.grad = None
    with offload_saved_tensors(system, min_bytes=0) as moved:
        total = loss()
    total.backward()
    assert moved.offloaded_storages >= 2
    assert torch.equal(weight.grad, expected)
    _assert_pool_empty(system)


def test_reused_addresses_never_match_an_old_record(system):
    """Allocate, save, free, repeat: the allocator hands the same address back each time."""
    addresses = set()

    def weight_grad(offload: bool) -> torch.Tensor:
        weight = torch.ones(16, 16, requires_grad=True)
        with offload_saved_tensors(system, min_bytes=0) if offload else contextlib.nullcontext():
            losses = []
            for i in range(30):
                x = torch.full((32, 16), float(i))
                addresses.add(x.data_ptr())
                losses.append((x @ weight).sum())
                del x
        torch.stack(losses).sum().backward()
        return weight.grad

    assert torch.equal(weight_grad(offload=True), weight_grad(offload=False))
    assert len(addresses) < 60, "the allocator never reused an address; the test proves nothing"
    _assert_pool_empty(system)


def test_a_small_view_costs_only_its_span(daemon, system):
    dataset = torch.randn(10_000, 1024)  # 40 MB
    batch = dataset[4096:4128]  # 128 KiB
    weight = torch.randn(1024, 8, requires_grad=True)
    (batch @ weight).square().sum().backward()
    expected, weight.grad = weight.grad, None
    with offload_saved_tensors(system) as moved:
        loss = (batch @ weight).square().sum()
    loss.backward()
    assert torch.equal(weight.grad, expected)
    assert moved.offloaded_bytes <= batch.numel() * 4 + 64
    assert moved.span_saved_bytes >= dataset.numel() * 4 - batch.numel() * 4 - 64
    assert system.stats().span_saved_bytes >= moved.span_saved_bytes
    carrier = system.offload(torch.ones(1))  # savings reach the daemon with the next commit
    system.flush()
    (session,) = [s for s in daemon.stats()["sessions"] if s["id"] == system.session_id]
    assert session["span_saved_bytes"] >= moved.span_saved_bytes
    system.free(carrier)
    _assert_pool_empty(system)


def test_tensor_saved_three_times_and_its_transpose_are_copied_once(system):
    x = torch.randn(64, 64).relu()
    w = torch.randn(64, 64, requires_grad=True)

    def loss():
        return (x @ w).sum() + (x.t() @ w).sum() + (w @ x).sum() + (x * w).sum()

    loss().backward()
    expected, w.grad = w.grad, None
    with offload_saved_tensors(system, min_bytes=0) as moved:
        total = loss()
    total.backward()
    assert torch.equal(w.grad, expected)
    assert moved.offloaded_storages == 1
    assert moved.shared_packs >= 3
    assert moved.dedup_saved_bytes >= 3 * x.numel() * 4
    _assert_pool_empty(system)


def test_chunks_written_after_an_earlier_chunk_was_saved(system):
    """The GRU pattern by hand: save one chunk, fill another in place, save it.

    Like the CPU GRU kernel, the write goes through a tensor with a version counter of
    its own, so autograd sees no in-place change of a saved tensor (none happened).
    """

    def weight_grad(seed: int, offload: bool) -> torch.Tensor:
        torch.manual_seed(seed)
        gates = torch.randn(16, 3 * 64)  # (batch, 3 * hidden): chunks along the last dim are strided views
        weight = torch.randn(64, 64, requires_grad=True)
        reset, update, new = gates.chunk(3, dim=1)
        writer = torch.empty(0).set_(gates.untyped_storage(), update.storage_offset(), update.size(), update.stride())
        with offload_saved_tensors(system, min_bytes=0) if offload else contextlib.nullcontext():
            first = reset @ weight
            writer.sigmoid_()  # written in place after `reset` was packed
            second = update @ weight
            third = new.tanh() @ weight
        (first.sum() + second.square().sum() + third.sum()).backward()
        return weight.grad

    for i in range(50):
        assert torch.equal(weight_grad(i, offload=True), weight_grad(i, offload=False)), f"run {i}"
    _assert_pool_empty(system)


def test_in_place_change_before_the_copy_fails_the_fetch(daemon):
    """A source changed before its copy was done cannot be vouched for (NOTE [Modified sources])."""
    with StormSystem(daemon.endpoint) as system:
        tensor = torch.randn(256, 256)
        os.kill(daemon.proc.pid, signal.SIGSTOP)  # the transfer thread now waits on the daemon before copying
        try:
            handle = system.offload(tensor)
            tensor.add_(1)
        finally:
            os.kill(daemon.proc.pid, signal.SIGCONT)
        with pytest.raises(SourceModifiedError, match="changed in place"):
            system.fetch(handle)
        system.free(handle)
        after = torch.randn(8, 8)
        offloaded = after.clone()
        handle = system.offload(after)
        system.flush()
        after.add_(1)  # the copy is done: the stored bytes are the ones offloaded
        assert torch.equal(system.fetch(handle), offloaded)
        system.free(handle)


_ESCAPE = """
import sys, torch
from client import StormSystem, offload_saved_tensors

class PassThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, saved):
        ctx.save_for_backward(saved)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        (saved,) = ctx.saved_tensors
        return saved, None  # the unpacked saved tensor becomes leaf.grad

endpoint = sys.argv[1]
owner = StormSystem(endpoint)
leaf = torch.zeros(4096, requires_grad=True)
saved = torch.arange(4096, dtype=torch.float32)
with offload_saved_tensors(owner, min_bytes=0):
    out = PassThrough.apply(leaf, saved)
out.sum().backward()
kept = owner.offload(torch.ones(1024))
owner.flush()
view = owner.buffer(kept).as_tensor(torch.float32, (1024,))
owner.close()
other = StormSystem(endpoint)
handles = [other.offload(torch.full((1 << 16,), -1.0)) for _ in range(32)]
other.flush()
assert torch.equal(leaf.grad, saved), "leaf.grad changed after its session closed"
view.sum()  # reading a pool view after close must not crash the process
assert torch.equal(leaf.grad, saved)
for handle in handles:
    other.free(handle)
other.close()
print("escaped tensors kept their bytes")
"""


def test_tensors_that_escape_keep_their_bytes_after_close(daemon):
    """A saved tensor returned as a gradient outlives the session; nobody else's offload may change it."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_ESCAPE), daemon.endpoint],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "escaped tensors kept their bytes" in result.stdout


class _SaveSecond(torch.autograd.Function):
    """Saves only its second input; the gradient of the first is that saved tensor."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(w)
        return x.sum().reshape(1)

    @staticmethod
    def backward(ctx, grad):
        (w,) = ctx.saved_tensors
        return w.clone(), None


@pytest.mark.parametrize("pool_size", ["256MiB", "8MiB"], ids=["stored", "kept-pool-full"])
def test_a_saved_tensor_changed_in_place_is_refused_at_unpack(daemon_factory, pool_size):
    """Whenever the change happened (during the copy, after it, or to a tensor kept in place
    because the pool was full), backward refuses as plain autograd does, never mixed bytes."""
    daemon = daemon_factory(pool_size=pool_size)
    with StormSystem(daemon.endpoint, policy="keep") as system:
        for _ in range(5):
            x = torch.zeros(4 << 20, requires_grad=True)
            w = torch.rand(4 << 20) + 0.5  # 16 MiB: the in-place op below runs while it is copied
            with offload_saved_tensors(system, min_bytes=0):
                y = _SaveSecond.apply(x, w)
            w.pow_(1.37)
            with pytest.raises(SourceModifiedError, match="changed in place"):
                torch.autograd.grad(y, x)
            del y
        _assert_pool_empty(system)


def test_a_storage_freed_before_its_copy_fails_the_fetch_instead_of_reading_it(daemon_factory):
    """FSDP-style ``resize_(0)`` after the pack and before the copy: the copy must not read it.

    The daemon is stopped so that the transfer thread waits on it before copying. (A
    resize that lands *while* the copy runs cannot be seen: see NOTE [Modified sources].)
    Its pool has slabs of 64 MiB (an eighth of it), so that the 64 MiB source fits in one.
    """
    daemon = daemon_factory(pool_size="512MiB")
    with StormSystem(daemon.endpoint) as system:
        x = torch.randn(16, requires_grad=True)
        w = torch.randn(16 << 20)  # 64 MiB: its pages go back to the OS when freed
        os.kill(daemon.proc.pid, signal.SIGSTOP)
        try:
            with offload_saved_tensors(system, min_bytes=0):
                y = _SaveSecond.apply(x, w).sum()
            w.untyped_storage().resize_(0)
        finally:
            os.kill(daemon.proc.pid, signal.SIGCONT)
        with pytest.raises(SourceModifiedError, match="freed or resized"):
            torch.autograd.grad(y, x)
        del y
        _assert_pool_empty(system)
