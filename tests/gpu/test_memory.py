"""What offload is for, on a real device: a lower forward peak and unchanged gradients. Skipped without CUDA."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from client import StormSystem, offload_saved_tensors

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_the_forward_peak_with_offload_is_at_most_half_of_plain_without_flush(daemon_factory):
    """Copies in flight are bounded (max_inflight_layers), so the peak drops during forward itself."""
    daemon = daemon_factory(pool_size="8GiB")
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(2048, 2048), nn.GELU()) for _ in range(24)]).cuda()
    x = torch.randn(8192, 2048, device="cuda")  # 64 MiB per saved tensor, two per layer: 3 GiB in all

    def forward_peak(context: contextlib.AbstractContextManager) -> int:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with context:
            loss = model(x).square().mean()
        peak = torch.cuda.max_memory_allocated() - base
        loss.backward()
        model.zero_grad(set_to_none=True)
        return peak

    plain = forward_peak(contextlib.nullcontext())
    with StormSystem(daemon.endpoint) as system:
        forward_peak(offload_saved_tensors(system, module=model))  # the first step pins and reserves
        offloaded = forward_peak(offload_saved_tensors(system, module=model))
        assert system.stats().kept_tensors == 0
    assert offloaded <= plain / 2, f"forward peak {offloaded >> 20} MiB with offload, {plain >> 20} MiB plain"


def test_transformer_gradients_with_offload_are_bitwise_those_without(daemon_factory):
    daemon = daemon_factory(pool_size="2GiB")
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(512, 8, 2048, dropout=0.0, batch_first=True, norm_first=True)
    plain = nn.TransformerEncoder(layer, 6, enable_nested_tensor=False).cuda()
    ours = copy.deepcopy(plain)
    x = torch.randn(8, 512, 512, device="cuda")
    with sdpa_kernel(SDPBackend.MATH), StormSystem(daemon.endpoint) as system:  # deterministic attention
        for _ in range(2):  # the second step runs on reserved extents and pinned chunks
            plain(x).square().mean().backward()
            with offload_saved_tensors(system, module=ours.layers):
                loss = ours(x).square().mean()
            loss.backward()
            for p, q in zip(plain.parameters(), ours.parameters(), strict=True):
                assert torch.equal(p.grad, q.grad)
                p.grad = q.grad = None
        assert system.stats().offloaded_bytes > 0
