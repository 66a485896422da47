"""The seed's autograd function, made to save memory: offload what backward needs.

``StormForwardFunction`` is a linear layer whose forward keeps its *input* (the only
activation its backward needs) in the daemon's pool instead of on the device; backward
fetches it, computes the three gradients, and autograd's release of the saved tensor
frees the extent (NOTE [Storage records] in ``client/hooks.py``). The gradient formulas
are the ones PyTorch's own ``addmm``/``mm`` backward uses, in the same order, so the
gradients are bit-identical to ``nn.Linear``'s (``tests/integration/test_exactness.py``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from client.defaults import default_system
from client.handle import Handle
from client.hooks import active_offloader
from client.system import StormSystem

__all__ = ["StormForwardFunction", "fetch_activation_from_cpu", "offload_activation_to_cpu"]


class StormForwardFunction(torch.autograd.Function):
    """``F.linear(input, weight, bias)`` whose saved input lives in the STORM pool.

    Call it as ``StormForwardFunction.apply(input, weight, bias, layer_id, system)``;
    ``bias``, ``layer_id`` and ``system`` may be None (None: the process's default system).
    Inputs of any leading shape work: ``(batch, in)``, ``(batch, seq, in)``, ...
    """

    @staticmethod
    def forward(
        ctx: Any,
        input: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        layer_id: int | None,
        system: StormSystem | None,
    ) -> torch.Tensor:
        ctx.save_for_backward(input, weight, bias)
        return F.linear(input, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        input, weight, bias = ctx.saved_tensors  # unpack fetches the input from the pool
        out_features, in_features = weight.shape
        grad_2d = grad_output.reshape(-1, out_features)  # (N, out)
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = grad_2d.mm(weight).view(input.shape)  # (..., in)
        if ctx.needs_input_grad[1]:
            grad_weight = grad_2d.t().mm(input.reshape(-1, in_features))  # (out, in)
        if bias is not None and ctx.needs_input_grad[2]:
            grad_bias = grad_2d.sum(0)  # (out,)
        return grad_input, grad_weight, grad_bias, None, None

    @classmethod
    def apply(
        cls,
        input: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        layer_id: int | None = None,
        system: StormSystem | None = None,
    ) -> torch.Tensor:
        # Saved tensors are packed inside apply, after forward returns: the hooks must
        # be active around apply itself, not only inside forward.
        with active_offloader(system or default_system(), layer_id):
            return super().apply(input, weight, bias, layer_id, system)


def offload_activation_to_cpu(
    activation: torch.Tensor, layer_id: int | None = None, system: StormSystem | None = None
) -> Handle:
    """Start moving ``activation`` into the host pool; returns its handle at once."""
    return (system or default_system()).offload(activation, layer_id=layer_id)


def fetch_activation_from_cpu(handle: Handle, system: StormSystem | None = None, free: bool = True) -> torch.Tensor:
    """Bring an offloaded activation back to its device; frees the extent unless ``free=False``."""
    system = system or default_system()
    tensor = system.fetch(handle)
    if free:
        system.free(handle)
    return tensor
