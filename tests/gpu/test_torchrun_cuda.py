"""storm-worker under torchrun on one GPU: a DDP rank on CUDA as a client of the daemon. Skipped without CUDA."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _torchrun(args: list[str], tmp_path, tag: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STORM_")}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "1",
        "-m",
        "worker.main",
        *args,
        "--device",
        "cuda",
        "--steps",
        "5",
        "--save-params",
        str(tmp_path / f"{tag}.pt"),
        "--summary",
        str(tmp_path / f"{tag}-{{rank}}.json"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads((tmp_path / f"{tag}-0.json").read_text())


def test_a_cuda_rank_with_storm_ends_with_the_same_parameters_as_without(daemon_factory, tmp_path):
    daemon = daemon_factory(pool_size="1GiB")
    with_storm = _torchrun(["--endpoint", daemon.endpoint, "--min-bytes", "0"], tmp_path, "storm")
    without = _torchrun(["--no-offload"], tmp_path, "plain")
    assert with_storm["world_size"] == 1 and with_storm["device"] == "cuda:0"
    assert with_storm["bytes_offloaded"] > 0
    assert with_storm["losses"] == without["losses"]
    params = torch.load(tmp_path / "storm.pt")
    reference = torch.load(tmp_path / "plain.pt")
    assert len(params) == len(reference) > 0
    assert all(torch.equal(a, b) for a, b in zip(params, reference, strict=True))
    stats = daemon.stats()
    assert stats["used_bytes"] == 0 and stats["sessions"] == []
