"""What operators use: stormctl status, Prometheus metrics, --config, and the memory plot."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import torch

from client import StormSystem


def _stormctl(daemon, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "client.ctl", "--endpoint", daemon.endpoint, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_status_once_with_no_sessions(shared_daemon):
    result = _stormctl(shared_daemon, "status", "--once")
    assert result.returncode == 0, result.stderr
    assert "sessions  0 live" in result.stdout and "largest extent" in result.stdout


def test_status_json_lists_every_session_with_rates_and_quits_on_ctrl_c(shared_daemon):
    daemon = shared_daemon  # it holds nothing between tests: these five sessions are all it lists
    systems = [StormSystem(daemon.endpoint, name=f"job-{i}") for i in range(5)]
    handles = [s.offload(torch.randn(256, 256)) for s in systems]
    for s in systems:
        s.flush()
    proc = subprocess.Popen(
        [sys.executable, "-m", "client.ctl", "--endpoint", daemon.endpoint, "status", "--json", "--interval", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    first = json.loads(proc.stdout.readline())
    for s, h in zip(systems, handles, strict=True):
        s.fetch(h)
    second = json.loads(proc.stdout.readline())
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=10) == 0, proc.stderr.read()
    for s in systems:
        s.close()
    assert {s["name"] for s in first["sessions"]} == {f"job-{i}" for i in range(5)}
    assert all(s["used_bytes"] > 0 for s in first["sessions"])
    assert all(s["fetch_bytes_per_s"] is not None for s in second["sessions"])


def test_metrics_endpoint_moves_while_a_worker_trains(daemon_factory, tmp_path):
    port = _free_port()
    daemon = daemon_factory(extra_args=["--metrics-port", str(port)])

    def scrape() -> dict[str, float]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        return {
            m.group(1): float(m.group(2))
            for m in re.finditer(r"^([a-z_]+(?:\{[^}]*\})?) ([0-9.e+-]+)$", text, re.MULTILINE)
        }

    before = scrape()
    assert before["storm_pool_bytes"] == 64 << 20 and before["storm_sessions"] == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("STORM_")}
    worker = subprocess.Popen(
        [sys.executable, "-m", "worker.main", "--endpoint", daemon.endpoint, "--steps", "400", "--threads", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    deadline = time.monotonic() + 60
    during = scrape()
    while during["storm_sessions"] < 1 or during.get("storm_offloaded_bytes_total", 0) == 0:
        assert time.monotonic() < deadline and worker.poll() is None, "the worker never showed up in the metrics"
        time.sleep(0.1)
        during = scrape()
    assert worker.wait(timeout=300) == 0
    after = scrape()
    assert after["storm_sessions"] == 0 and after["storm_pool_used_bytes"] == 0
    assert after["storm_offloaded_bytes_total"] > during["storm_offloaded_bytes_total"] > 0
    assert after['storm_requests_total{op="offload"}'] > 0
    assert after['storm_request_seconds_count{op="commit"}'] > 0


def test_config_file_settings_yield_to_environment_and_flags(daemon_factory, tmp_path):
    config = tmp_path / "stormd.toml"
    config.write_text('[stormd]\npool_size = "32MiB"\nheartbeat_timeout = "7s"\nquota = "1MiB"\n')
    daemon = daemon_factory(pool_size="48MiB", extra_args=["--config", str(config)])
    assert daemon.stats()["pool_bytes"] == 48 << 20  # the flag wins over the file
    with StormSystem(daemon.endpoint) as system:
        assert system.quota_bytes == 1 << 20  # the file wins over the default


def test_worker_plot_draws_private_memory_and_pool_bytes(tmp_path):
    plot = tmp_path / "mem.png"
    env = {k: v for k, v in os.environ.items() if not k.startswith("STORM_")}
    env["XDG_RUNTIME_DIR"] = str(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "worker.main", "--steps", "3", "--plot", str(plot), "--summary", str(tmp_path / "s")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
