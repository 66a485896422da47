"""The CUDA paths: pinned pool, D2H/H2D streams ordered with events. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from client import StormModel, StormSystem, offload_saved_tensors
from worker.models import plain_mlp_like

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture
def system(daemon):
    with StormSystem(daemon.endpoint) as system:
        yield system


def test_pool_is_pinned_and_transfer_streams_are_exposed(system):
    assert all(segment.pinned for segment in system.segments)
    assert isinstance(system.transfer_d2h_stream, torch.cuda.Stream)
    assert isinstance(system.transfer_h2d_stream, torch.cuda.Stream)
    assert system.transfer_d2h_stream != system.transfer_h2d_stream


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
def test_cuda_tensor_round_trips_on_its_device(system, dtype):
    tensor = (torch.randn(1024, 257, device="cuda") * 100).to(dtype)
    handle = system.offload(tensor)
    back = system.fetch(handle)
    assert back.device == tensor.device and back.dtype == dtype
    assert torch.equal(back, tensor)
    system.free(handle)
    assert system.stats()["used_bytes"] == 0


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
    assert system.stats()["used_bytes"] == 0


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
