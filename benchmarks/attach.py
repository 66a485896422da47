"""Attaching to the daemon: ``StormSystem()`` and the first offload, at 1, 4 and 16 GiB pools.

A client maps only the slabs its extents lie in, when the first such extent arrives
(NOTE [Slabs] in storm_service/slabs.py), so attaching should cost the same whatever
the pool's size; the first offload maps one slab, 1/8 of the pool by default, so with a
fixed ``--segment-size`` it should not grow either. Sizes the machine's memory
(MemAvailable, less 2 GiB) cannot hold are skipped. Run:
``.venv/bin/python -m benchmarks.attach [--segment-size 256MiB]``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch

from benchmarks.common import median, print_table, write_json
from client import StormSystem
from worker.embedded import daemon_answers

SIZES_GIB = (1, 4, 16)
REPEATS = 5
HEADROOM_BYTES = 2 << 30


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _attach(endpoint: str) -> tuple[float, float]:
    """Seconds for ``StormSystem()``, then for the first offload (flushed)."""
    started = time.perf_counter()
    system = StormSystem(endpoint)
    constructed = time.perf_counter()
    system.offload(torch.ones(1 << 18))  # 1 MiB
    system.flush()
    offloaded = time.perf_counter()
    system.close()
    return constructed - started, offloaded - constructed


def _measure(size_gib: int, segment_size: str | None) -> dict[str, Any]:
    directory = tempfile.mkdtemp(prefix="storm-bench-")
    endpoint = f"ipc://{directory}/stormd.sock"
    slabs = ["--segment-size", segment_size] if segment_size else []
    daemon = subprocess.Popen(
        [sys.executable, "-m", "storm_service.daemon", "--endpoint", endpoint, "--pool-size", f"{size_gib}GiB", *slabs],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        started = time.perf_counter()
        while not daemon_answers(endpoint, timeout_s=0.5):
            if daemon.poll() is not None:
                raise RuntimeError(f"stormd with a {size_gib} GiB pool did not start")
        start_s = time.perf_counter() - started
        runs = [_attach(endpoint) for _ in range(REPEATS)]
    finally:
        daemon.terminate()
        daemon.wait(60)
        subprocess.run(["rm", "-rf", directory], check=False)
    return {
        "pool_gib": size_gib,
        "daemon_start_s": start_s,
        "construct_s": median([r[0] for r in runs]),
        "first_offload_s": median([r[1] for r in runs]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--segment-size", help="the daemon's largest slab (default: its own, 1/8 of the pool here)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    available = _mem_available() - HEADROOM_BYTES
    results, skipped = [], []
    for size in SIZES_GIB:
        if size << 30 > available:
            skipped.append(size)
            continue
        results.append(_measure(size, args.segment_size))
    rows = [
        [
            r["pool_gib"],
            f"{r['daemon_start_s']:.2f}",
            f"{r['construct_s'] * 1e3:.1f}",
            f"{r['first_offload_s'] * 1e3:.1f}",
        ]
        for r in results
    ]
    title = f"attach cost, slabs of at most {args.segment_size}" if args.segment_size else "attach cost"
    print_table(["pool GiB", "daemon start s", "StormSystem() ms", "first offload ms"], rows, title)
    if skipped:
        print(f"skipped {skipped} GiB: MemAvailable less headroom is {available >> 30} GiB")
    name = "attach_fixed_slabs" if args.segment_size else "attach"
    data = {"repeats": REPEATS, "segment_size": args.segment_size, "results": results, "skipped_gib": skipped}
    write_json(name, {**data, "pid": os.getpid()})


if __name__ == "__main__":
    main()
