"""Models with many layers against a real daemon: per-layer stats never cost the session.

Was: a STATS reply whose ``layer_bytes`` map had more than 64 entries (the reply
decoder's old map bound) was dropped by the client as malformed; ``stats()`` timed out,
the session was marked lost and backward failed. NOTE [Decoder limits] in
``storm_service/protocol.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from client import StormSystem, offload_saved_tensors
from storm_service.protocol import MAX_SESSION_LAYERS

LAYERS = 1000


def _deep_model(layers: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(layers)])


@pytest.fixture
def system(daemon):
    with StormSystem(daemon.endpoint) as system:
        yield system


def test_thousand_layer_model_reports_every_layer_and_trains_exactly(system):
    assert LAYERS < MAX_SESSION_LAYERS
    model = _deep_model(LAYERS)
    reference = copy.deepcopy(model)
    x = torch.randn(4, 8)  # (batch, features)

    with offload_saved_tensors(system, module=model, min_bytes=0):
        loss = model(x).square().sum()
    stats = system.stats().as_dict()
    # Each child block saves its ReLU output (the next block's Linear input shares it).
    assert set(stats["layer_bytes"]) == set(range(LAYERS))
    assert sum(stats["layer_bytes"].values()) == stats["used_bytes"] + stats["reserved_bytes"] > 0
    loss.backward()

    reference(x).square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert p.grad is not None and torch.equal(p.grad, q.grad), name
    assert system.lost is None
    system.flush()
    after = system.stats().as_dict()
    assert after["used_bytes"] == after["pool_used_bytes"] == 0
