"""Load: several client processes offload, fetch, verify and free against one live stormd.

The CI-sized run is 4 clients x 60 cycles in a 32 MiB pool; the full 8 x 2000 soak in a
64 MiB pool is marked slow. Both reuse :func:`benchmarks.load.run_load`, with each
client's bytes in flight capped at its fair share of the pool (NOTE [Wait-policy
deadlock] in benchmarks/load.py: without the cap, a rare run stalls for the 60 s wait).
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from benchmarks.load import run_load  # the repository root is not on sys.path under pytest

if TYPE_CHECKING:
    from helpers import DaemonProcess, StartDaemon

MiB = 1 << 20
RSS_GROWTH_BOUND = 64 * MiB


def _check(result: dict[str, Any], daemon: DaemonProcess, clients: int, cycles: int) -> None:
    assert not result["tracebacks"], "\n".join(result["tracebacks"])
    assert result["errors"] == {}, result
    assert result["mismatches"] == 0, result
    assert result["cycles"] == clients * cycles, result
    assert result["kept_tensors"] == 0, result
    assert result["end_used_bytes"] == 0 and result["end_extents"] == 0, result
    assert result["end_sessions"] == 0, result
    rss = result["daemon_rss"]
    assert rss["end"] - rss["start"] < RSS_GROWTH_BOUND, rss
    assert result["client_exitcodes"] == [0] * clients, result
    assert daemon.proc.poll() is None, daemon.log()[-4000:]
    assert "Traceback" not in daemon.log()


def test_load_ci_sized(daemon_factory: StartDaemon) -> None:
    daemon = daemon_factory(pool_size="32MiB")
    result = run_load(daemon.endpoint, clients=4, cycles=60, seed=1, fair_share=True)
    _check(result, daemon, clients=4, cycles=60)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_load_full_soak(daemon_factory: StartDaemon) -> None:
    daemon = daemon_factory(pool_size="64MiB")
    result = run_load(daemon.endpoint, clients=8, cycles=2000, seed=0, fair_share=True)
    _check(result, daemon, clients=8, cycles=2000)
