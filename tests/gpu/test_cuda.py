"""The CUDA paths: pool pinned as copies reach it, D2H/H2D streams ordered with events. Skipped without CUDA."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn

from client import IntegrityError, StormModel, StormSystem, offload_saved_tensors
from worker.models import plain_mlp_like

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture
def system(daemon):
    with StormSystem(daemon.endpoint) as system:
        yield system


def test_pool_is_pinned_where_copies_went_and_transfer_streams_are_exposed(system):
    x = torch.randn(256, 1024, device="cuda")
    handle = system.offload(x)
    system.flush()
    assert system.buffer(handle).as_tensor(torch.float32, (256, 1024)).is_pinned()  # NOTE [Lazy pinning]
    assert isinstance(system.transfer_d2h_stream, torch.cuda.Stream)
    assert isinstance(system.transfer_h2d_stream, torch.cuda.Stream)
    assert system.transfer_d2h_stream != system.transfer_h2d_stream
    system.free(handle)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
def test_cuda_tensor_round_trips_on_its_device(system, dtype):
    tensor = (torch.randn(1024, 257, device="cuda") * 100).to(dtype)
    handle = system.offload(tensor)
    back = system.fetch(handle)
    assert back.device == tensor.device and back.dtype == dtype
    assert torch.equal(back, tensor)
    system.free(handle)
    assert system.stats().used_bytes == 0


def test_fetch_into_a_cuda_tensor(system):
    tensor = torch.randn(512, 300, device="cuda")
    handle = system.offload(tensor)
    out = torch.zeros_like(tensor)
    assert system.fetch(handle, out=out) is out
    assert torch.equal(out, tensor)
    with pytest.raises(ValueError, match="needs"):
        system.fetch(handle, out=torch.zeros(512, 300))  # on the CPU: refused, nothing lost
    assert torch.equal(system.fetch(handle), tensor)
    system.free(handle)


def test_offload_is_ordered_after_the_kernel_that_produced_the_tensor(system):
    # A long kernel writes the tensor; the D2H copy must wait for it (event on the producer's stream).
    a = torch.randn(4096, 4096, device="cuda")
    produced = a @ a
    handle = system.offload(produced)
    expected = produced.clone()
    assert torch.equal(system.fetch(handle), expected)
    system.free(handle)


def test_storm_model_gradients_equal_on_cuda(system):
    torch.manual_seed(0)
    model = StormModel(64, 256, 8, num_layers=4, system=system).cuda()
    reference = plain_mlp_like(model).cuda()
    x = torch.randn(128, 64, device="cuda")
    model(x).square().mean().backward()
    reference(x).square().mean().backward()
    for ours, theirs in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(ours.grad, theirs.grad)
    assert system.stats().used_bytes == 0


def test_transformer_with_generic_offload_on_cuda_saves_device_memory(system):
    torch.manual_seed(1)
    layer = nn.TransformerEncoderLayer(256, 8, 1024, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False).cuda()
    x = torch.randn(16, 256, 256, device="cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    out = encoder(x)
    plain_held = torch.cuda.memory_allocated() - base
    out.mean().backward()
    expected = [p.grad.clone() for p in encoder.parameters()]
    encoder.zero_grad()
    del out
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    with offload_saved_tensors(system, module=encoder.layers):
        out = encoder(x)
    system.flush()
    storm_held = torch.cuda.memory_allocated() - base
    out.mean().backward()
    assert storm_held < plain_held / 2
    for p, want in zip(encoder.parameters(), expected, strict=True):
        assert torch.equal(p.grad, want)


def test_gru_and_chunk_views_on_cuda_are_bitwise_equal(system):
    """NOTE [Storage records] on the device: spans of one gate buffer, written between packs."""
    for i in range(20):
        torch.manual_seed(i)
        a = nn.GRU(32, 64, num_layers=2, batch_first=True).cuda()
        b = copy.deepcopy(a)
        x = torch.randn(4, 16, 32, device="cuda")
        a(x)[0].square().sum().backward()
        with offload_saved_tensors(system, min_bytes=0):
            out = b(x)[0]
        out.square().sum().backward()
        for p, q in zip(a.parameters(), b.parameters(), strict=True):
            assert torch.equal(p.grad, q.grad), f"run {i}"
    system.flush()
    assert system.stats().used_bytes == 0


def test_a_chunk_written_behind_a_long_kernel_does_not_reach_an_earlier_pack(system):
    """A long kernel delays the D2H copy; the other chunk is written in the meantime."""

    def weight_grad(offload: bool) -> torch.Tensor:
        torch.manual_seed(0)
        gates = torch.randn(256, 3 * 1024, device="cuda")  # chunks along the last dim: strided views
        weight = torch.randn(1024, 1024, device="cuda", requires_grad=True)
        reset, update, _ = gates.chunk(3, dim=1)
        writer = torch.empty(0, device="cuda").set_(
            gates.untyped_storage(), update.storage_offset(), update.size(), update.stride()
        )
        with offload_saved_tensors(system, min_bytes=0) if offload else contextlib.nullcontext():
            torch.cuda._sleep(100_000_000)  # the producer stream is busy: the copy of `reset` waits
            first = reset @ weight
            writer.fill_(7.0)  # queued behind the sleep, racing the copy of `reset`'s span
            second = update @ weight
        (first.sum() + second.square().sum()).backward()
        return weight.grad

    for _ in range(5):
        assert torch.equal(weight_grad(offload=True), weight_grad(offload=False))


def test_verify_mode_hashes_on_the_device_and_catches_a_flipped_byte(daemon):
    with StormSystem(daemon.endpoint, verify=True) as system:
        handles = []
        offload = system.offload

        def spy(tensor, **kwargs):
            handles.append(offload(tensor, **kwargs))
            return handles[-1]

        system.offload = spy  # type: ignore[method-assign]
        x = torch.randn(64, 128, device="cuda", requires_grad=True)
        with offload_saved_tensors(system, min_bytes=0):
            loss = x.tanh().square().sum()
        system.flush()
        victim = handles[-1]
        extent = system.buffer(victim).as_tensor(torch.uint8, (victim.size_bytes,))
        extent[-1] ^= 0x01
        with pytest.raises(IntegrityError, match=f"handle {system.locate(victim)[0]}"):
            loss.backward()
