"""Crashes: a client SIGKILLed mid-step loses its memory to the pool, and nobody else notices."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

VICTIM = textwrap.dedent(
    """
    import sys, time, torch
    from client import StormModel, StormSystem
    phase = sys.argv[2]
    system = StormSystem(sys.argv[1], name="victim-" + phase)
    model = StormModel(64, 512, 8, num_layers=6, system=system)

    def stall(*_):
        system.flush()
        print(phase, system.session_id, flush=True)
        time.sleep(120)

    x = torch.randn(256, 64, requires_grad=True)
    if phase == "forward":
        model.layers[6].register_forward_pre_hook(stall)
    out = model(x)
    if phase == "backward":
        out.register_hook(stall)
    out.sum().backward()
    """
)


def _worker(endpoint: str | None, seed: int, summary, steps: int = 25) -> subprocess.Popen[str]:
    mode = ["--endpoint", endpoint] if endpoint else ["--no-offload"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("STORM_")}
    args = ["--seed", str(seed), "--steps", str(steps), "--lr", "5e-3", "--threads", "1", "--summary", str(summary)]
    return subprocess.Popen(
        [sys.executable, "-m", "worker.main", *mode, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


class PlainRuns:
    """The runs without STORM the STORM runs are compared with, made once for the module:
    they depend on the seed only, not on the phase the victim is killed in."""

    def __init__(self, directory) -> None:
        self.directory = directory
        self.procs: dict[int, subprocess.Popen[str]] = {}
        self.outputs: dict[int, str] = {}

    def start(self, seeds) -> None:
        for seed in seeds:
            if seed not in self.procs:
                self.procs[seed] = _worker(None, seed, self.directory / f"plain{seed}.json")

    def losses_of(self, seed: int) -> list[float]:
        proc = self.procs[seed]
        if seed not in self.outputs:
            self.outputs[seed], _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, self.outputs[seed]
        return json.loads((self.directory / f"plain{seed}.json").read_text())["losses"]


@pytest.fixture(scope="module")
def plain_runs(tmp_path_factory):
    runs = PlainRuns(tmp_path_factory.mktemp("plain"))
    yield runs
    for seed, proc in runs.procs.items():
        if seed not in runs.outputs:  # a test failed before it read them
            proc.kill()
            proc.communicate()


def _session_ids(daemon) -> set[int]:
    return {s["id"] for s in daemon.stats()["sessions"]}


@pytest.mark.parametrize("phase", ["forward", "backward"])
def test_killed_client_memory_returns_and_other_jobs_are_unaffected(daemon_factory, tmp_path, plain_runs, phase):
    daemon = daemon_factory(pool_size="256MiB", heartbeat_timeout="5s")
    workers = {seed: _worker(daemon.endpoint, seed, tmp_path / f"storm{seed}.json") for seed in (4, 5)}
    plain_runs.start((4, 5))  # the first test here starts them; the next one reuses their losses
    victim = subprocess.Popen([sys.executable, "-c", VICTIM, daemon.endpoint, phase], stdout=subprocess.PIPE, text=True)
    said, session_id = victim.stdout.readline().split()
    assert said == phase
    held = next(s for s in daemon.stats()["sessions"] if s["id"] == int(session_id))["used_bytes"]
    assert held > 0
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = time.monotonic()
    while int(session_id) in _session_ids(daemon):
        assert time.monotonic() - killed_at < 5.0, "the killed client's session outlived the heartbeat timeout"
        time.sleep(0.05)

    for seed in (4, 5):
        output, _ = workers[seed].communicate(timeout=300)
        assert workers[seed].returncode == 0, output
        ours = json.loads((tmp_path / f"storm{seed}.json").read_text())
        assert ours["losses"] == plain_runs.losses_of(seed)
    stats = daemon.stats()
    assert stats["used_bytes"] == 0 and stats["sessions"] == [] and stats["expired_sessions"] >= 1


def test_worker_exits_with_one_clear_line_when_the_daemon_dies(daemon_factory, tmp_path):
    daemon = daemon_factory(pool_size="128MiB")
    worker = _worker(daemon.endpoint, 6, tmp_path / "s.json", steps=100_000)
    deadline = time.monotonic() + 60
    while not any(s["offloaded_bytes"] for s in daemon.stats()["sessions"]):
        assert time.monotonic() < deadline and worker.poll() is None, "the worker never started training"
        time.sleep(0.05)
    daemon.kill()
    killed_at = time.monotonic()
    output, _ = worker.communicate(timeout=30)
    assert time.monotonic() - killed_at < 5.0
    assert worker.returncode == 1, output
    lines = [line for line in output.splitlines() if line.startswith("storm-worker:")]
    assert len(lines) == 1 and "StormUnavailableError" in lines[0] and daemon.endpoint in lines[0], output
    assert "Traceback" not in output
