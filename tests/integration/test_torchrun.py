"""storm-worker under torchrun: two DDP ranks as clients of one daemon."""

from __future__ import annotations

import torch

from helpers import torchrun_worker


def _torchrun(args: list[str], tmp_path, tag: str) -> list[dict]:
    return torchrun_worker([*args, "--threads", "1"], tmp_path, tag, ranks=2)


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
