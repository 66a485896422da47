"""Gradients with STORM equal gradients without it, bit for bit (``torch.equal``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from client import StormForwardFunction, StormModel, StormSystem, StormTrainer, offload_saved_tensors
from worker.models import plain_mlp_like


@pytest.fixture
def system(daemon):
    with StormSystem(daemon.endpoint) as system:
        yield system


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(32, 48), (4, 16, 48), (2, 3, 5, 48)])
def test_storm_model_gradients_equal_linear_relu_stack(system, shape, bias):
    torch.manual_seed(0)
    model = StormModel(48, 96, 7, num_layers=4, bias=bias, system=system)
    reference = plain_mlp_like(model)
    x = torch.randn(shape)
    target = torch.randn(*shape[:-1], 7)
    nn.functional.mse_loss(model(x), target).backward()
    nn.functional.mse_loss(reference(x), target).backward()
    for (name, ours), theirs in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(ours.grad, theirs.grad), name
    assert system.stats().used_bytes == 0


def test_input_gradient_equals_linear(system):
    torch.manual_seed(1)
    linear = nn.Linear(20, 30)
    x1 = torch.randn(8, 20, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    StormForwardFunction.apply(x1, linear.weight, linear.bias, 0, system).sum().backward()
    grad_w = linear.weight.grad.clone()
    linear.zero_grad()
    linear(x2).sum().backward()
    assert torch.equal(x1.grad, x2.grad)
    assert torch.equal(grad_w, linear.weight.grad)


def test_gradcheck_storm_forward_function(system):
    torch.manual_seed(2)
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: StormForwardFunction.apply(x, w, b, 7, system), (x, w, b))
    x3 = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: StormForwardFunction.apply(x, w, None, 8, system), (x3, w))
    assert system.stats().used_bytes == 0


def test_transformer_stack_gradients_equal_with_generic_offload(system):
    torch.manual_seed(3)
    layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)
    x = torch.randn(4, 24, 64)
    encoder(x).pow(2).mean().backward()
    expected = [p.grad.clone() for p in encoder.parameters()]
    encoder.zero_grad()
    with offload_saved_tensors(system, min_bytes=1024, module=encoder.layers) as moved:
        out = encoder(x)
    out.pow(2).mean().backward()
    for (name, p), want in zip(encoder.named_parameters(), expected, strict=True):
        assert torch.equal(p.grad, want), name
    assert moved.offloaded_bytes > 0 and moved.shared_packs > 0
    assert set(moved.layer_bytes) == {"0", "1", "2"}
    assert system.stats().used_bytes == 0


def test_trainer_losses_equal_training_without_storm(system):
    torch.manual_seed(4)
    trainer = StormTrainer(16, 64, 4, learning_rate=1e-2, num_layers=3, system=system)
    reference = plain_mlp_like(trainer.model)
    optimizer = torch.optim.Adam(reference.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(5)
    for _ in range(10):
        x = torch.randn(32, 16, generator=generator)
        y = torch.randn(32, 4, generator=generator)
        ours = trainer.train_step(x, y)
        loss = nn.functional.mse_loss(reference(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        assert torch.equal(ours, loss.detach())
    assert system.stats().used_bytes == 0
