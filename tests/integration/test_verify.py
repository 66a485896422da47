"""Verify mode: every byte handed back to autograd is proven to be the byte that was saved."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from client import IntegrityError, StormSystem, offload_saved_tensors


def _corrupting(system: StormSystem, layer_id: int) -> list:
    """Wrap ``system.offload`` to remember the handles of one layer."""
    handles = []
    offload = system.offload

    def spy(tensor, **kwargs):
        handle = offload(tensor, **kwargs)
        if kwargs.get("layer_id") == layer_id:
            handles.append(handle)
        return handle

    system.offload = spy  # type: ignore[method-assign]
    return handles


def test_a_flipped_byte_in_the_pool_raises_and_names_the_layer(daemon):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 8))
    with StormSystem(daemon.endpoint, verify=True) as system:
        handles = _corrupting(system, layer_id=1)
        with offload_saved_tensors(system, module=model, min_bytes=0):
            loss = model(torch.randn(16, 32)).square().sum()
        system.flush()
        assert handles, "the Tanh layer offloaded nothing; nothing to corrupt"
        victim = handles[0]
        extent = system.buffer(victim).as_tensor(torch.uint8, (victim.size_bytes,))
        extent[-1] ^= 0x01  # one bit of the last element's last byte
        with pytest.raises(IntegrityError) as raised:
            loss.backward()
        message = str(raised.value)
        assert "layer 1" in message
        assert "torch.float32" in message
        assert "(16, 64)" in message
        assert f"handle {system.locate(victim)[0]}" in message
        del loss


@pytest.mark.parametrize("env", ["1", "true"])
def test_storm_verify_variable_turns_it_on(daemon, monkeypatch, env):
    monkeypatch.setenv("STORM_VERIFY", env)
    with StormSystem(daemon.endpoint) as system:
        assert system.verify


def test_storm_verify_variable_refuses_nonsense(daemon, monkeypatch):
    monkeypatch.setenv("STORM_VERIFY", "maybe")
    with pytest.raises(ValueError, match="STORM_VERIFY"):
        StormSystem(daemon.endpoint)


def test_verify_mode_passes_exact_gradients_on_views_and_recurrent_layers(daemon):
    """No false alarms: chunks, transposes, gaps between elements, a GRU."""
    with StormSystem(daemon.endpoint, verify=True) as system:
        for i in range(20):
            torch.manual_seed(i)
            a = nn.GRU(8, 16, num_layers=2, batch_first=True)
            b = copy.deepcopy(a)
            x = torch.randn(3, 7, 8)

            def loss(module, x=x):
                out = module(x)[0]  # (batch, seq, hidden)
                first, second = out.chunk(2, dim=-1)
                return (first.sigmoid() * second.mT.mT.tanh()).sum() + out.transpose(0, 1)[::2].square().sum()

            loss(a).backward()
            with offload_saved_tensors(system, min_bytes=0):
                total = loss(b)
            total.backward()
            for p, q in zip(a.parameters(), b.parameters(), strict=True):
                assert torch.equal(p.grad, q.grad), f"run {i}"
        system.flush()
        assert system.stats().used_bytes == 0


def test_worker_verify_flag_trains_with_checksums(daemon, tmp_path):
    common = ["--model", "transformer", "--steps", "3", "--hidden", "32", "--layers", "2", "--batch", "4"]
    runs = {}
    for verify in (True, False):
        summary = tmp_path / f"verify-{verify}.json"
        flags = ["--verify"] if verify else []
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "worker.main",
                *common,
                *flags,
                "--endpoint",
                daemon.endpoint,
                "--summary",
                str(summary),
            ],
            capture_output=True,
            text=True,
            timeout=300,
            env={k: v for k, v in os.environ.items() if not k.startswith("STORM_")},
        )
        assert done.returncode == 0, done.stdout + done.stderr
        runs[verify] = json.loads(summary.read_text())
    assert runs[True]["verify"] is True and runs[False]["verify"] is False
    assert runs[True]["losses"] == runs[False]["losses"]
