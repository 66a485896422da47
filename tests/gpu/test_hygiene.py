"""NOTE [Device hygiene] and NOTE [Lazy pinning] on a real device. Skipped without CUDA."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from client import StormSystem
from storm_service.shm import PIN_CHUNK_BYTES

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _run(script: str, *args: str) -> dict:
    """Run ``script`` in a fresh interpreter; it prints one JSON line last."""
    result = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=150, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_new_system_makes_no_cuda_context_and_pins_nothing(daemon, context_probe):
    script = context_probe + textwrap.dedent(
        """
        import json, sys
        import torch
        from client import StormSystem

        system = StormSystem(sys.argv[1])
        constructed = {"torch_initialized": torch.cuda.is_initialized(), "context_0": primary_context_active(0)}
        x = torch.randn(1024, 1024, device="cuda")
        back = system.fetch(system.offload(x))
        copier = system._engine.copier
        print(json.dumps({
            **constructed,
            "equal": torch.equal(back, x),
            "devices": copier.devices,
            "pinned_bytes": copier.pinned_bytes(),
        }))
        system.close()
        """
    )
    report = _run(script, daemon.endpoint)
    assert report["torch_initialized"] is False and report["context_0"] is False
    assert report["equal"] and report["devices"] == [0]
    assert 0 < report["pinned_bytes"] <= PIN_CHUNK_BYTES  # the chunk the 4 MiB extent lies in


def test_the_first_offload_pins_only_the_chunks_it_touches(daemon_factory):
    daemon = daemon_factory(pool_size="2GiB")
    with StormSystem(daemon.endpoint) as system:
        x = torch.randn(16 << 20, device="cuda")  # 64 MiB
        handle = system.offload(x)
        system.flush()
        extent = system.buffer(handle).as_tensor(torch.float32, tuple(x.shape))
        assert extent.is_pinned()
        assert system._engine.copier.pinned_bytes() <= 2 * PIN_CHUNK_BYTES  # of 2 GiB
        assert torch.equal(system.fetch(handle), x)


def test_with_pinning_off_copies_are_pageable_and_still_exact(daemon, monkeypatch):
    monkeypatch.setenv("STORM_PIN", "0")
    with StormSystem(daemon.endpoint) as system:
        assert system.settings.pin is False
        x = torch.randn(1024, 1024, device="cuda")
        handle = system.offload(x)
        assert torch.equal(system.fetch(handle), x)
        assert system._engine.copier.pinned_bytes() == 0
        assert not system.buffer(handle).as_tensor(torch.float32, (1024, 1024)).is_pinned()


def test_transfer_streams_belong_to_the_current_device(daemon):
    with StormSystem(daemon.endpoint) as system:
        d2h, h2d = system.transfer_d2h_stream, system.transfer_h2d_stream
        assert isinstance(d2h, torch.cuda.Stream) and isinstance(h2d, torch.cuda.Stream) and d2h != h2d
        assert d2h.device == torch.device("cuda", torch.cuda.current_device())
        assert system.transfer_d2h_stream == d2h  # made once per device


def test_a_16_gib_pool_keeps_its_session_through_construction_and_first_offload(daemon_factory, host_bytes_free):
    if host_bytes_free < (16 << 30) + (8 << 30):
        pytest.skip(f"needs 24 GiB of free host memory and /dev/shm, has {host_bytes_free >> 30} GiB")
    daemon = daemon_factory(pool_size="16GiB")  # the default heartbeat timeout (5 s)
    started = time.monotonic()
    with StormSystem(daemon.endpoint) as system:
        constructed_s = time.monotonic() - started
        x = torch.randn(64 << 20, device="cuda")  # 256 MiB
        handle = system.offload(x)
        assert torch.equal(system.fetch(handle), x)
        stats = system.stats()  # a round trip on the same session: it was never expired
        assert system.lost is None and stats.handles == 1
        assert system._engine.copier.pinned_bytes() <= 2 * PIN_CHUNK_BYTES
    assert daemon.stats()["expired_sessions"] == 0, f"constructed in {constructed_s:.1f} s"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_a_tensor_on_the_second_device_makes_no_context_on_the_first(daemon, context_probe):
    script = context_probe + textwrap.dedent(
        """
        import json, sys
        import torch
        from client import StormSystem

        storm = sys.argv[2] == "storm"
        system = StormSystem(sys.argv[1]) if storm else None
        x = torch.randn(2048, 2048, device="cuda:1")
        if storm:
            back = system.fetch(system.offload(x))
            devices = system._engine.copier.devices
        else:
            back, devices = x.cpu().to("cuda:1"), []
        torch.cuda.synchronize(1)
        print(json.dumps({
            "equal": torch.equal(back, x) and back.device == x.device,
            "devices": devices,
            "context_0": primary_context_active(0),
            "context_1": primary_context_active(1),
        }))
        """
    )
    plain = _run(script, daemon.endpoint, "plain")
    storm = _run(script, daemon.endpoint, "storm")
    assert storm["equal"] and storm["devices"] == [1] and storm["context_1"]
    assert storm["context_0"] == plain["context_0"]  # STORM adds no context on cuda:0 (torch alone may)
