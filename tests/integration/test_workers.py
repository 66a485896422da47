"""storm-worker as a real process: several jobs on one daemon, and the embedded default."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = [sys.executable, "-m", "worker.main"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STORM_")}
    env.update(extra)
    return env


def _start(args: list[str], summary: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*WORKER, *args, "--threads", "1", "--summary", str(summary)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env or _env(),
    )


def _finish(proc: subprocess.Popen[str], summary: Path) -> dict:
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    return json.loads(summary.read_text())


@pytest.mark.parametrize("model", ["mlp", "transformer"])
def test_three_workers_share_one_daemon_and_match_runs_without_offload(daemon_factory, tmp_path, model):
    daemon = daemon_factory(pool_size="256MiB")
    common = ["--model", model, "--steps", "12", "--hidden", "64", "--layers", "3", "--batch", "32", "--lr", "5e-3"]
    runs = {}
    for seed in (1, 2, 3):
        runs[seed, True] = _start(
            [*common, "--seed", str(seed), "--endpoint", daemon.endpoint], tmp_path / f"s{seed}.json"
        )
        runs[seed, False] = _start([*common, "--seed", str(seed), "--no-offload"], tmp_path / f"n{seed}.json")
    results = {key: _finish(proc, tmp_path / f"{'s' if key[1] else 'n'}{key[0]}.json") for key, proc in runs.items()}
    for seed in (1, 2, 3):
        with_storm, without = results[seed, True], results[seed, False]
        assert with_storm["losses"] == without["losses"], f"seed {seed}"
        assert with_storm["final_loss"] < with_storm["first_loss"]
        assert with_storm["bytes_offloaded"] > 0 and with_storm["session_used_bytes_after"] == 0
    assert len({results[seed, True]["final_loss"] for seed in (1, 2, 3)}) == 3
    stats = daemon.stats()
    assert stats["used_bytes"] == 0 and stats["sessions"] == []


def test_worker_without_a_daemon_runs_a_private_one(tmp_path):
    runtime = tmp_path / "run"
    runtime.mkdir()
    summary = tmp_path / "summary.json"
    proc = _start(["--steps", "8"], summary, env=_env(XDG_RUNTIME_DIR=str(runtime)))
    result = _finish(proc, summary)
    assert result["embedded_daemon"] is True
    assert result["bytes_offloaded"] > 0 and result["final_loss"] < result["first_loss"]
    assert not os.path.exists(result["endpoint"][len("ipc://") :])


def test_worker_reports_an_unreachable_daemon_in_one_line(tmp_path):
    proc = _start(["--steps", "2", "--endpoint", f"ipc://{tmp_path}/none.sock"], tmp_path / "s.json")
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1
    lines = [line for line in output.splitlines() if line.startswith("storm-worker:")]
    assert len(lines) == 1 and "StormUnavailableError" in lines[0] and "none.sock" in lines[0]


def test_worker_with_two_hundred_layers_runs_to_completion(tmp_path):
    """Was: the end-of-run stats() of a model past 64 layers timed out (NOTE [Decoder limits])."""
    runtime = tmp_path / "run"
    runtime.mkdir()
    summary = tmp_path / "summary.json"
    args = ["--layers", "200", "--steps", "2", "--hidden", "16", "--batch", "8"]
    result = _finish(_start(args, summary, env=_env(XDG_RUNTIME_DIR=str(runtime))), summary)
    assert result["embedded_daemon"] is True
    assert result["bytes_offloaded"] > 0 and result["session_used_bytes_after"] == 0
