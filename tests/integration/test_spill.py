"""Training through a daemon whose pool is too small for the model: the disk tier holds the rest.

Every step's gradients are compared with ``torch.equal`` against the same seeded model
trained without STORM; the daemon's stats must show that bytes really went to disk and
came back, and that nothing is left in either tier after backward.
"""

from __future__ import annotations

import os
import re
import socket
import urllib.request
from collections.abc import Callable

import pytest
import torch
from torch import nn

from client import StormSystem
from client.status import render, snapshot
from helpers import assert_steps_equal, in_threads, train_steps, wait_for
from storm_service.errors import PoolFullError
from storm_service.units import format_bytes

MiB = 1 << 20


def _mlp() -> nn.Module:
    return nn.Sequential(*[nn.Sequential(nn.Linear(512, 512), nn.GELU(), nn.LayerNorm(512)) for _ in range(8)])


def _transformer() -> nn.Module:
    layer = nn.TransformerEncoderLayer(128, 4, 512, dropout=0.1, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=4, enable_nested_tensor=False)


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], str]] = {
    "mlp": (_mlp, (512, 512), "16MiB"),  # 26 MiB saved per step, in 1 MiB tensors
    "transformer": (_transformer, (16, 128, 128), "32MiB"),  # 132 MiB per step, up to 4 MiB a tensor
}


def _grads(
    make: Callable[[], nn.Module], shape: tuple[int, ...], seed: int, system: StormSystem | None, start=None
) -> list:
    """Loss and gradients of two steps; ``start`` (model, inputs) instead of drawing them from ``seed``."""
    return train_steps(*(start or _start(make, shape, seed)), system)


def _start(make: Callable[[], nn.Module], shape: tuple[int, ...], seed: int) -> tuple[nn.Module, list]:
    torch.manual_seed(seed)
    return make(), [torch.randn(shape) for _ in range(2)]


def _spill_daemon(daemon_factory, spill_dir, pool: str = "16MiB", spill: str = "512MiB", high_water: str = "50%"):
    return daemon_factory(
        pool_size=pool,
        extra_args=["--spill-dir", str(spill_dir), "--spill-size", spill, "--spill-high-water", high_water],
    )


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_model_several_times_larger_than_the_pool_trains_bit_exact_through_the_disk(daemon_factory, tmp_path, name):
    make, shape, pool = MODELS[name]
    daemon = _spill_daemon(daemon_factory, tmp_path, pool=pool)
    with StormSystem(daemon.endpoint) as system:
        for seed in range(3):
            ours = _grads(make, shape, seed, system)
            theirs = _grads(make, shape, seed, None)
            for step_ours, step_theirs in zip(ours, theirs, strict=True):
                assert all(torch.equal(a, b) for a, b in zip(step_ours, step_theirs, strict=True)), (name, seed)
        assert system.stats().used_bytes == 0
    stats = daemon.stats()
    assert stats["spilled_total_bytes"] > stats["pool_bytes"], "the disk tier held more than the pool"
    assert stats["restored_total_bytes"] > 0 and stats["restore_errors"] == 0
    assert (stats["used_bytes"], stats["disk_used_bytes"]) == (0, 0)
    assert os.listdir(tmp_path) == [], "spill files have no name"


def test_several_sessions_spill_under_one_budget_and_each_stays_exact(daemon_factory, tmp_path):
    daemon = _spill_daemon(daemon_factory, tmp_path)
    make, shape, _ = MODELS["mlp"]
    # Torch's seed is global: draw every job's model and inputs here, train them at once, compare after.
    starts = {seed: _start(make, shape, seed) for seed in range(3)}
    expected = {seed: _grads(make, shape, seed, None) for seed in range(3)}

    def train(seed: int) -> None:
        with StormSystem(daemon.endpoint, name=f"job-{seed}") as system:
            ours = _grads(make, shape, seed, system, starts[seed])
        assert_steps_equal(ours, expected[seed], f"job {seed}")

    in_threads(train, list(range(3)))
    stats = daemon.stats()
    assert stats["spilled_total_bytes"] > 0
    assert (stats["used_bytes"], stats["disk_used_bytes"], stats["live_sessions"]) == (0, 0, 0)


def test_spill_files_too_small_keep_the_rest_in_host_memory_and_training_stays_exact(daemon_factory, tmp_path):
    """ENOSPC of the tier: the spill files fill up; what does not fit stays where the policy says."""
    daemon = _spill_daemon(daemon_factory, tmp_path, spill="4MiB")
    make, shape, _ = MODELS["mlp"]
    with StormSystem(daemon.endpoint, wait_timeout_s=0.5) as system:
        ours = _grads(make, shape, 0, system)
        kept = system.stats().kept_tensors
    theirs = _grads(make, shape, 0, None)
    for step_ours, step_theirs in zip(ours, theirs, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(step_ours, step_theirs, strict=True))
    stats = daemon.stats()
    assert stats["disk_full"] > 0 and kept > 0, "the spill policy keeps what neither tier can hold"
    assert (stats["used_bytes"], stats["disk_used_bytes"]) == (0, 0)


def test_a_daemon_killed_while_spilling_leaves_no_spill_space_behind(daemon_factory, tmp_path):
    spill_bytes = 256 * MiB
    daemon = _spill_daemon(daemon_factory, tmp_path, pool="32MiB", spill="256MiB", high_water="25%")
    free_while_running = os.statvfs(tmp_path)
    system = StormSystem(daemon.endpoint)
    try:
        handles = [system.offload(torch.full((MiB,), float(i))) for i in range(24)]
        wait_for(lambda: daemon.stats()["spilled_total_bytes"] > 0, what="a spill")
        assert os.listdir(tmp_path) == []
        daemon.kill()
    finally:
        system.close()
    del handles
    free_after = os.statvfs(tmp_path)
    returned = (free_after.f_bavail - free_while_running.f_bavail) * free_after.f_frsize
    assert returned >= spill_bytes * 0.9, f"only {returned} of the {spill_bytes} reserved bytes came back"
    assert os.listdir(tmp_path) == []


def test_stats_status_and_metrics_show_each_tier(daemon_factory, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    daemon = daemon_factory(
        pool_size="16MiB",
        extra_args=["--spill-dir", str(tmp_path), "--spill-size", "64MiB", "--metrics-port", str(port)],
    )
    assert daemon.stats()["disk_tier"] is True and daemon.stats()["disk_used_bytes"] == 0
    with StormSystem(daemon.endpoint) as system:
        handles = [system.offload(torch.full((MiB // 4,), float(i))) for i in range(20)]  # 20 MiB
        system.flush()
        stats = wait_for(lambda: (s := daemon.stats())["disk_used_bytes"] > 0 and not s["spilling_bytes"] and s)
        assert stats["disk_bytes"] == 64 * MiB and stats["spilled_total_bytes"] >= stats["disk_used_bytes"]
        session = stats["sessions"][0]
        assert session["used_bytes"] + session["disk_bytes"] == 20 * MiB
        text = render(snapshot(stats, None, 1.0))
        assert "disk  [" in text and format_bytes(session["disk_bytes"]) in text
        scraped = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        metrics = {m[1]: float(m[2]) for m in re.finditer(r"^(storm_disk_[a-z_]+) ([0-9.e+]+)$", scraped, re.M)}
        assert metrics["storm_disk_bytes"] == 64 * MiB and metrics["storm_disk_used_bytes"] > 0
        for index in reversed(range(len(handles))):
            assert torch.equal(system.fetch(handles[index]), torch.full((MiB // 4,), float(index)))
            system.free(handles[index])
    stats = daemon.stats()
    assert stats["restored_total_bytes"] > 0 and (stats["used_bytes"], stats["disk_used_bytes"]) == (0, 0)


def test_a_session_holding_fetched_extents_that_fill_the_pool_gets_a_clear_error_not_a_hang(daemon_factory, tmp_path):
    daemon = _spill_daemon(daemon_factory, tmp_path, spill="64MiB")
    with StormSystem(daemon.endpoint, fetch_timeout_s=30) as system:
        handles = [system.offload(torch.full((MiB // 4,), float(i))) for i in range(24)]  # 24 MiB, 16 MiB pool
        system.flush()
        with pytest.raises(PoolFullError, match="fetched and not freed"):
            for handle in reversed(handles):  # fetched, never freed: the pool fills with them
                system.fetch(handle)
    assert daemon.stats()["live_sessions"] == 0


def test_the_memory_plot_draws_host_and_disk_bytes(daemon_factory, tmp_path):
    pytest.importorskip("matplotlib")
    from worker.memplot import plot_traces, trace

    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    daemon = _spill_daemon(daemon_factory, spill_dir)
    make, shape, _ = MODELS["mlp"]
    with StormSystem(daemon.endpoint) as system:
        traced = trace("STORM", lambda: _grads(make, shape, 0, system), daemon.endpoint)
    assert len(traced.disk_bytes) == len(traced.pool_bytes) and max(traced.disk_bytes) > 0
    plot_traces([traced], str(tmp_path / "mem.png"), "host and disk")
    assert (tmp_path / "mem.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_one_batch_of_offloads_larger_than_the_pool_spills_instead_of_waiting(daemon_factory, tmp_path):
    """The transfer thread places a whole batch before it copies: what it placed must be stored (and
    so become spillable) before it waits for room, or a batch larger than the pool waits forever."""
    daemon = _spill_daemon(daemon_factory, tmp_path)
    tensors = [torch.full((MiB // 4,), float(i)) for i in range(24)]  # 24 MiB for a 16 MiB pool
    # A slow link holds the transfer thread on the first copy while the rest queue up: one batch.
    with StormSystem(daemon.endpoint, link_gbps=0.02, wait_timeout_s=5) as system:
        handles = [system.offload(tensor, layer_id=0) for tensor in tensors]
        system.flush()
        assert system.stats().kept_tensors == 0, "every tensor went to the pool or to disk"
        assert daemon.stats()["spilled_total_bytes"] > 0
        for handle, tensor in reversed(list(zip(handles, tensors, strict=True))):
            assert torch.equal(system.fetch(handle), tensor)
            system.free(handle)
