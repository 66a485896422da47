"""What verify mode costs: STORM step time with and without checksums, side by side in one run.

Two StormSystems on one daemon, one with ``verify=True``; identical model copies and data;
steps interleaved off, on, off, on, ... Prints the median step times, their ratio, and
the bytes hashed per step (each saved byte is hashed twice: at pack and at unpack).

    .venv/bin/python -m benchmarks.verify_cost [--steps N] [--models heavy_mlp,transformer]
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from benchmarks.common import median, write_json
from benchmarks.step_time import MODELS, Runner, storm_setup
from client.system import StormSystem
from worker.embedded import EmbeddedDaemon


def run_model(cfg: dict[str, Any], warmup: int, steps: int) -> dict[str, Any]:
    pool_bytes, _, _ = storm_setup(cfg)
    with (
        EmbeddedDaemon(f"{2 * pool_bytes >> 20}MiB") as daemon,
        StormSystem(daemon.endpoint, name="plain", verify=False) as plain,
        StormSystem(daemon.endpoint, name="verify", verify=True) as checked,
    ):
        runners = {"off": Runner("d", cfg, None, plain), "on": Runner("d", cfg, None, checked)}
        for _ in range(warmup):
            for runner in runners.values():
                runner.step(record=False)
        before = checked.stats().offloaded_bytes
        for _ in range(steps):
            for runner in runners.values():
                runner.step(record=True)
        hashed = checked.stats().offloaded_bytes - before
    med = {name: median(runner.times) for name, runner in runners.items()}
    return {
        "config": cfg,
        "steps": steps,
        "median_s": med,
        "ratio_on_off": med["on"] / med["off"],
        "offloaded_bytes_per_step": hashed / steps,
        "same_losses": runners["on"].losses == runners["off"].losses,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=9)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--models", default="heavy_mlp,transformer", help="comma-separated subset of " + ",".join(MODELS))
    args = p.parse_args(argv)
    results: dict[str, Any] = {"models": {}}
    print("| model | verify off s | verify on s | on/off | MiB offloaded/step | same losses |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in args.models.split(","):
        r = results["models"][name] = run_model(dict(MODELS[name]), args.warmup, args.steps)
        print(
            f"| {name} | {r['median_s']['off']:.3g} | {r['median_s']['on']:.3g} | {r['ratio_on_off']:.3f} "
            f"| {r['offloaded_bytes_per_step'] / 2**20:.0f} | {r['same_losses']} |",
            flush=True,
        )
    write_json("verify_cost", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
