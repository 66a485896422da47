"""storm-worker under torchrun: two DDP ranks as clients of one daemon."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch


def _torchrun(args: list[str], tmp_path, tag: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STORM_")}
    env["GLOO_SOCKET_IFNAME"] = "lo"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "worker.main",
        *args,
        "--steps",
        "5",
        "--threads",
        "1",
        "--save-params",
        str(tmp_path / f"{tag}.pt"),
        "--summary",
        str(tmp_path / f"{tag}-{{rank}}.json"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return [json.loads((tmp_path / f"{tag}-{rank}.json").read_text()) for rank in (0, 1)]


def test_ddp_ranks_with_storm_end_with_the_same_parameters_as_without(daemon_factory, tmp_path):
    daemon = daemon_factory(pool_size="128MiB")
    with_storm = _torchrun(["--endpoint", daemon.endpoint], tmp_path, "storm")
    without = _torchrun(["--no-offload"], tmp_path, "plain")
    assert [s["rank"] for s in with_storm] == [0, 1] and all(s["world_size"] == 2 for s in with_storm)
    assert all(s["bytes_offloaded"] > 0 for s in with_storm)
    for ours, theirs in zip(with_storm, without, strict=True):
        assert ours["losses"] == theirs["losses"]
    params = torch.load(tmp_path / "storm.pt")
    reference = torch.load(tmp_path / "plain.pt")
    assert len(params) == len(reference) > 0
    assert all(torch.equal(a, b) for a, b in zip(params, reference, strict=True))
    stats = daemon.stats()
    assert stats["used_bytes"] == 0 and stats["sessions"] == []
