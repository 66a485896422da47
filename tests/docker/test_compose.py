"""docker/docker-compose.yml end to end: one stormd container, two training workers.

The workers share the daemon's IPC namespace (its /dev/shm pool) and reach it over the
ipc:// socket in a shared volume, with no network. Each trains 40 steps with its
activations offloaded to the daemon's pool, then lingers until the daemon holds no
session (so ``--abort-on-container-exit`` cannot cut the other worker short) and writes
a JSON summary to the results bind mount. Compose then stops the daemon with SIGTERM.

Needs a Docker engine: see docker_engine.py for when one is started and when the test
is skipped. Takes a few minutes (base image, wheels, image build, training on CPU).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from docker_engine import Engine, EngineUnavailable, log, tail

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker" / "docker-compose.yml"
BUILD_CONTEXT = ROOT / "docker" / "build-context.sh"
WORKERS = ("worker-a", "worker-b")
STEPS = 40

BUILD_TIMEOUT_S = 900
UP_TIMEOUT_S = 600


def _read_summary(results: Path, worker: str, logs: str) -> dict[str, Any]:
    path = results / f"{worker}.json"
    assert path.exists(), f"{worker} wrote no summary at {path}; compose logs end:\n{tail(logs, 80)}"
    return json.loads(path.read_text())


@pytest.mark.docker
@pytest.mark.timeout(1200)
def test_two_workers_share_one_daemon(docker_engine: Engine, tmp_path: Path) -> None:
    timings = docker_engine.timings
    try:
        base = docker_engine.base_image()
    except EngineUnavailable as e:
        pytest.skip(f"no base image: {e}")

    start = time.monotonic()
    built = subprocess.run(
        ["bash", str(BUILD_CONTEXT)],
        env={**os.environ, "PYTHON": sys.executable},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, f"build-context.sh failed:\n{tail(built.stdout + built.stderr)}"
    timings["wheels"] = time.monotonic() - start
    log(built.stdout.strip())

    project = f"stormci{os.getpid()}{secrets.token_hex(3)}"
    results = tmp_path / "results"
    results.mkdir()
    results.chmod(0o777)  # the containers run as uid 10001
    env = {"STORM_BASE": base, "STORM_IMAGE": f"storm-offload:{project}", "STORM_RESULTS_DIR": str(results)}

    def compose(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        return docker_engine.compose(
            "-f", str(COMPOSE_FILE), "-p", project, *args, env=env, timeout=timeout, check=check
        )

    def exit_code(service: str) -> int | None:
        ids = compose("ps", "-q", service, check=False).stdout.split()
        if not ids:
            return None
        return int(docker_engine.docker("inspect", "-f", "{{.State.ExitCode}}", ids[0]).stdout.strip())

    try:
        start = time.monotonic()
        compose("build", timeout=BUILD_TIMEOUT_S)
        timings["build"] = time.monotonic() - start

        start = time.monotonic()
        try:
            up = compose("up", "--no-color", "--abort-on-container-exit", timeout=UP_TIMEOUT_S, check=False)
            up_output = up.stdout
        except subprocess.TimeoutExpired as e:
            out = e.output.decode(errors="replace") if isinstance(e.output, bytes) else (e.output or "")
            pytest.fail(f"docker-compose up did not end within {UP_TIMEOUT_S} s; its output ends:\n{tail(out, 80)}")
        timings["up"] = time.monotonic() - start
        logs = compose("logs", "--no-color", check=False).stdout
        log(f"compose up exited with {up.returncode}; logs end:\n{tail(logs, 30)}")

        codes = {service: exit_code(service) for service in (*WORKERS, "stormd")}
        for worker in WORKERS:
            assert codes[worker] == 0, (
                f"{worker} exited with {codes[worker]}; compose output ends:\n{tail(up_output, 80)}"
            )

        summaries = {worker: _read_summary(results, worker, logs) for worker in WORKERS}
        for worker, summary in summaries.items():
            losses = summary["losses"]
            assert len(losses) == STEPS, f"{worker}: {len(losses)} losses for {STEPS} steps"
            assert losses[-1] < losses[0], f"{worker}: loss did not fall: {losses[0]} -> {losses[-1]}"
            assert summary["offload"] is True, f"{worker} trained without STORM: {summary}"
            assert summary.get("embedded_daemon") in (None, False), f"{worker} used a private daemon: {summary}"
            assert summary["bytes_offloaded"] > 0, f"{worker} offloaded nothing: {summary}"
            assert summary["daemon_sessions_after"] == 0, f"{worker}: daemon still held sessions: {summary}"
            assert summary["daemon_used_bytes_after"] == 0, f"{worker}: daemon still held bytes: {summary}"
        assert summaries["worker-a"]["losses"] != summaries["worker-b"]["losses"], "both workers ran the same seed"

        daemon_logs = compose("logs", "--no-color", "stormd", check=False).stdout
        assert re.search(r"stormd: stopped\s*$", daemon_logs, re.MULTILINE), (
            f"stormd did not log a clean shutdown; its log ends:\n{tail(daemon_logs)}"
        )
        assert codes["stormd"] == 0, f"stormd exited with {codes['stormd']}; its log ends:\n{tail(daemon_logs)}"
    finally:
        down = compose("down", "-v", "--rmi", "all", "--remove-orphans", timeout=300, check=False)
        if down.returncode != 0:
            log(f"docker-compose down failed:\n{tail(down.stdout)}")
        log("timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
