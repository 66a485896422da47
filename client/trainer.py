"""The seed's trainer: StormModel, Adam and MSE, one call per step."""

from __future__ import annotations

import torch
from torch import nn

from client.modules import StormModel
from client.system import StormSystem

__all__ = ["StormTrainer"]


class StormTrainer:
    """Trains a :class:`StormModel` with Adam on mean squared error."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        output_size: int,
        learning_rate: float,
        num_layers: int = 3,
        system: StormSystem | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.model = StormModel(input_size, hidden_size, output_size, num_layers, system=system).to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=learning_rate)
        self.loss_fn = nn.MSELoss()

    def train_step(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """One forward, backward and optimizer step; returns the (detached) loss."""
        loss = self.loss_fn(self.model(input), target)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()
