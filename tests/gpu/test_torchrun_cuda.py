"""storm-worker under torchrun on one GPU: a DDP rank on CUDA as a client of the daemon. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from helpers import torchrun_worker

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _torchrun(args: list[str], tmp_path, tag: str) -> dict:
    return torchrun_worker([*args, "--device", "cuda"], tmp_path, tag, ranks=1)[0]


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
