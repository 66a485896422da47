"""Training through a real daemon's device tier, on the fake backend: every gradient exact.

The fake device is smaller than a step's activations, so the tier fills, moves its
oldest activations to the host pool, and (with a disk tier) the host spills to disk:
every path a byte can take between the tiers runs under a real model, and each step's
loss and gradients are compared with ``torch.equal`` against the same model without STORM.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import urllib.request

import pytest
import torch
from torch import nn

from client import StormSystem, offload_saved_tensors
from client.status import render, snapshot
from helpers import assert_steps_equal, in_threads, train_steps
from storm_service.errors import StormUnavailableError
from storm_service.units import format_bytes

MiB = 1 << 20


def _mlp() -> nn.Module:
    return nn.Sequential(*[nn.Sequential(nn.Linear(512, 512), nn.GELU(), nn.LayerNorm(512)) for _ in range(8)])


def _gru() -> nn.Module:
    class Recurrent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gru = nn.GRU(64, 128, num_layers=2, batch_first=True)
            self.head = nn.Linear(128, 64)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.gru(x)[0])

    return Recurrent()


def _transformer() -> nn.Module:
    layer = nn.TransformerEncoderLayer(128, 4, 512, dropout=0.1, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=4, enable_nested_tensor=False)


MODELS = {
    "mlp": (_mlp, (512, 512)),  # 26 MiB saved per step
    "gru": (_gru, (32, 64, 64)),
    "transformer": (_transformer, (16, 128, 128)),  # 132 MiB per step
}


def _start(name: str, seed: int, steps: int = 2) -> tuple[nn.Module, list[torch.Tensor]]:
    make, shape = MODELS[name]
    torch.manual_seed(seed)
    return make(), [torch.randn(shape) for _ in range(steps)]


def _steps(name: str, seed: int, system: StormSystem | None, start=None) -> list[list[torch.Tensor]]:
    """Loss and gradients of each step; ``start`` (model, inputs) instead of drawing them from ``seed``."""
    return train_steps(*(start or _start(name, seed)), system)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_model_larger_than_the_device_trains_bit_exact_through_the_device_tier(daemon_factory, name):
    daemon = daemon_factory(pool_size="512MiB", extra_args=["--device-pool", "fake:gpu1=16MiB"])
    with StormSystem(daemon.endpoint) as system:
        for seed in range(3):
            assert_steps_equal(_steps(name, seed, system), _steps(name, seed, None), (name, seed))
        assert system.stats().kept_tensors == 0
    stats = daemon.stats()
    assert stats["device_evicted_bytes"] > 0, "the device filled and its oldest activations moved to the host"
    assert (stats["device_used_bytes"], stats["used_bytes"], stats["device_reserved_bytes"]) == (0, 0, 0)


def test_device_host_and_disk_in_a_row_keep_three_jobs_exact(daemon_factory, tmp_path):
    daemon = daemon_factory(
        pool_size="16MiB",
        extra_args=[
            "--device-pool",
            "fake:gpu1=16MiB",
            "--spill-dir",
            str(tmp_path),
            "--spill-size",
            "512MiB",
            "--spill-high-water",
            "50%",
        ],
    )
    # Torch's seed is global: draw every job's model and inputs here, train them at once, compare after.
    starts = {seed: _start("mlp", seed) for seed in range(3)}
    expected = {seed: _steps("mlp", seed, None) for seed in range(3)}

    def train(seed: int) -> None:
        with StormSystem(daemon.endpoint, name=f"job-{seed}") as system:
            assert_steps_equal(_steps("mlp", seed, system, starts[seed]), expected[seed], seed)

    in_threads(train, list(range(3)))
    stats = daemon.stats()
    assert stats["device_evicted_bytes"] > 0 and stats["spilled_total_bytes"] > 0
    assert (stats["device_used_bytes"], stats["used_bytes"], stats["disk_used_bytes"]) == (0, 0, 0)


def test_stormctl_stats_status_and_metrics_report_the_device_tier(daemon_factory):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    daemon = daemon_factory(
        pool_size="64MiB", extra_args=["--device-pool", "fake:gpu1=32MiB", "--metrics-port", str(port)]
    )
    with StormSystem(daemon.endpoint) as system:
        tensors = [torch.full((MiB // 4,), float(i)) for i in range(8)]  # 8 MiB
        handles = [system.offload(t) for t in tensors]
        system.flush()
        run = subprocess.run(
            [sys.executable, "-m", "client.ctl", "--endpoint", daemon.endpoint, "stats", "--json"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 0, run.stderr
        stats = json.loads(run.stdout)
        assert (stats["device_bytes"], stats["device_used_bytes"]) == (32 * MiB, 8 * MiB)
        assert stats["used_bytes"] == 0 and stats["sessions"][0]["device_bytes"] == 8 * MiB
        text = render(snapshot(stats, None, 1.0))
        assert "device [" in text and "gpu1 (fake)" in text and format_bytes(8 * MiB) in text
        scraped = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        metrics = {m[1]: float(m[2]) for m in re.finditer(r"^(storm_device_[a-z_]+) ([0-9.e+]+)$", scraped, re.M)}
        assert metrics["storm_device_bytes"] == 32 * MiB and metrics["storm_device_used_bytes"] == 8 * MiB
        for handle, tensor in zip(handles, tensors, strict=True):
            assert torch.equal(system.fetch(handle), tensor)
        assert system.stats().copy_in_bytes == 8 * MiB


def test_a_cuda_device_pool_without_cuda_fails_at_start_with_what_to_do(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this host has CUDA: the GPU tests cover the CUDA backend")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "storm_service.daemon",
            "--endpoint",
            f"ipc://{tmp_path}/s.sock",
            "--pool-size",
            "16MiB",
            "--device-pool",
            "cuda:GPU-8f6a1c52-3c1e-4c1a-9d7e-0a1b2c3d4e5f=1GiB",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode != 0
    assert "--device-pool" in run.stderr and "fake:" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr, run.stderr


def test_a_daemon_killed_between_forward_and_backward_fails_backward_with_the_typed_error(daemon_factory):
    daemon = daemon_factory(pool_size="64MiB", extra_args=["--device-pool", "fake:gpu1=64MiB"])
    model, inputs = _start("mlp", 0)
    system = StormSystem(daemon.endpoint, prefetch_bytes=0)  # nothing confirmed ahead of backward
    try:
        with offload_saved_tensors(system, min_bytes=0):
            loss = model(inputs[0]).square().mean()
        system.flush()
        assert daemon.stats()["device_used_bytes"] > 0
        daemon.kill()
        with pytest.raises(StormUnavailableError, match=re.escape(daemon.endpoint)):
            loss.backward()
        assert all(p.grad is None or not p.grad.isnan().any() for p in model.parameters())
        fresh = daemon_factory(endpoint=daemon.endpoint, extra_args=["--device-pool", "fake:gpu1=64MiB"])
        assert_steps_equal(_steps("mlp", 1, system), _steps("mlp", 1, None), "after the restart")
        assert fresh.stats()["device_evicted_bytes"] == 0 and fresh.stats()["device_used_bytes"] == 0
    finally:
        system.close()


def test_the_memory_plot_draws_device_bytes(daemon_factory, tmp_path):
    pytest.importorskip("matplotlib")
    from worker.memplot import plot_traces, trace

    daemon = daemon_factory(pool_size="64MiB", extra_args=["--device-pool", "fake:gpu1=16MiB"])
    with StormSystem(daemon.endpoint) as system:
        traced = trace("STORM", lambda: _steps("mlp", 0, system), daemon.endpoint)
    assert len(traced.device_bytes) == len(traced.pool_bytes) and max(traced.device_bytes) > 0
    plot_traces([traced], str(tmp_path / "mem.png"), "device and host")
    assert (tmp_path / "mem.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_device_slab_is_lent_only_to_the_process_its_session_is_bound_to(daemon_factory):
    daemon = daemon_factory(pool_size="64MiB", extra_args=["--device-pool", "fake:gpu1=16MiB"])
    with StormSystem(daemon.endpoint) as system:
        handle = system.offload(torch.ones(1 << 18))
        system.flush()
        where = system.locate(handle)
        assert where is not None and where[1] >= 1 << 40, "it went to the device"
        probe = (
            "import sys\n"
            "from storm_service.errors import ForbiddenError\n"
            "from storm_service.fdpass import request_slab\n"
            "try:\n"
            "    request_slab(sys.argv[1], sys.argv[2], int(sys.argv[3]), 5)\n"
            "except ForbiddenError as e:\n"
            "    print('refused:', e)\n"
        )
        fd_socket = daemon.socket_path + ".fds"
        run = subprocess.run(
            [sys.executable, "-c", probe, fd_socket, system.token, str(where[1])],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "refused:" in run.stdout and "bound to" in run.stdout, (run.stdout, run.stderr)
        assert torch.equal(system.fetch(handle), torch.ones(1 << 18)), "the session's own process still reads it"
