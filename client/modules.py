"""Modules of the seed design: a Linear-like layer and the MLP built from it."""

from __future__ import annotations

import torch
from torch import nn

from client.autograd import StormForwardFunction
from client.hooks import offload_saved_tensors
from client.system import StormSystem

__all__ = ["StormLayer", "StormModel"]


class StormLayer(nn.Module):
    """``nn.Linear`` whose saved input is offloaded to the STORM pool.

    The parameters live in ``self.linear`` (an ``nn.Linear``, initialised as usual), so
    a state dict moves between a ``StormLayer`` and ``nn.Linear`` by key prefix alone.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        layer_id: int,
        bias: bool = True,
        system: StormSystem | None = None,
    ) -> None:
        super().__init__()
        self.linear = nn.Linear(input_size, output_size, bias=bias)
        self.layer_id = layer_id
        self.system = system

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return StormForwardFunction.apply(input, self.linear.weight, self.linear.bias, self.layer_id, self.system)

    def extra_repr(self) -> str:
        return f"layer_id={self.layer_id}"


class StormModel(nn.Module):
    """The seed's MLP: ``num_layers`` StormLayers with ReLU between them.

    Every activation backward needs is offloaded: each layer's input, and each ReLU's
    output (which is the next layer's input, so it is stored once).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        output_size: int,
        num_layers: int = 3,
        bias: bool = True,
        system: StormSystem | None = None,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"StormModel: num_layers must be at least 1, got {num_layers}")
        sizes = [input_size] + [hidden_size] * (num_layers - 1) + [output_size]
        layers: list[nn.Module] = []
        for layer_id in range(num_layers):
            if layer_id:
                layers.append(nn.ReLU())
            layers.append(StormLayer(sizes[layer_id], sizes[layer_id + 1], layer_id, bias=bias, system=system))
        self.layers = nn.Sequential(*layers)
        self.system = system

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        with offload_saved_tensors(self.system, min_bytes=0):
            return self.layers(input)
