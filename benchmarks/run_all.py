"""Run every benchmark in sequence, each in its own process (a clean heap for each).

    .venv/bin/python -m benchmarks.run_all [--quick]

step_time, control_plane and data_plane always; gpu_step only where torch sees CUDA.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import torch

BENCHMARKS = ("step_time", "control_plane", "data_plane")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="pass --quick to every benchmark (smoke run)")
    args = p.parse_args(argv)
    names = list(BENCHMARKS)
    if torch.cuda.is_available():
        names.append("gpu_step")
    else:
        print("no CUDA device: gpu_step skipped")
    failed = []
    started = time.perf_counter()
    for name in names:
        print(f"\n===== benchmarks.{name} =====", flush=True)
        t = time.perf_counter()
        cmd = [sys.executable, "-m", f"benchmarks.{name}", *(["--quick"] if args.quick else [])]
        rc = subprocess.run(cmd).returncode
        print(f"[benchmarks.{name}: exit {rc}, {time.perf_counter() - t:.0f} s]", flush=True)
        if rc != 0:
            failed.append(name)
    print(f"\nall done in {time.perf_counter() - started:.0f} s" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
