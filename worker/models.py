"""The worker's models and its synthetic data: a fixed teacher network to regress."""

from __future__ import annotations

import torch
from torch import nn

from client.modules import StormLayer, StormModel
from client.system import StormSystem

__all__ = ["TeacherData", "TransformerRegressor", "build_model", "plain_mlp_like"]

TEACHER_SEED = 1234


class TransformerRegressor(nn.Module):
    """A stack of ``nn.TransformerEncoderLayer`` between two projections: (batch, seq, in) -> (batch, seq, out)."""

    def __init__(self, input_size: int, hidden_size: int, output_size: int, num_layers: int, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(input_size, hidden_size)
        layer = nn.TransformerEncoderLayer(hidden_size, heads, 2 * hidden_size, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.head = nn.Linear(hidden_size, output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)))


def plain_mlp_like(model: StormModel) -> nn.Sequential:
    """The same MLP as ``model`` built from ``nn.Linear``, with the same weights."""
    layers: list[nn.Module] = []
    for module in model.layers:
        if isinstance(module, nn.ReLU):
            layers.append(nn.ReLU())
        else:
            assert isinstance(module, StormLayer)
            linear = module.linear
            plain = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
            plain.load_state_dict(linear.state_dict())
            layers.append(plain)
    return nn.Sequential(*layers)


def build_model(
    kind: str,
    input_size: int,
    hidden_size: int,
    output_size: int,
    num_layers: int,
    seed: int,
    system: StormSystem | None,
) -> nn.Module:
    """Build the model; its weights depend only on ``seed``, not on whether STORM is used."""
    torch.manual_seed(seed)
    if kind == "transformer":
        return TransformerRegressor(input_size, hidden_size, output_size, num_layers)
    model = StormModel(input_size, hidden_size, output_size, num_layers, system=system)
    return model if system is not None else plain_mlp_like(model)


class TeacherData:
    """Batches ``(x, teacher(x))`` from a fixed random teacher; ``seed`` picks the inputs."""

    def __init__(self, kind: str, input_size: int, output_size: int, batch: int, seq_len: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(TEACHER_SEED)
        self.w1 = torch.randn(input_size, 64, generator=generator) / input_size**0.5
        self.w2 = torch.randn(64, output_size, generator=generator) / 8.0
        self.shape = (batch, seq_len, input_size) if kind == "transformer" else (batch, input_size)
        self.generator = torch.Generator().manual_seed(seed)

    def next(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(self.shape, generator=self.generator)
        y = torch.tanh(x @ self.w1) @ self.w2
        return x.to(device), y.to(device)
