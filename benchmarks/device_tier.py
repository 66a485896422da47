"""The device tier on a GPU: copies into a lent device slab vs into the pinned host pool, and step time with it.

    .venv/bin/python -m benchmarks.device_tier [--quick] [--steps N] [--pool-gpu INDEX]
    .venv/bin/python -m benchmarks.device_tier --fake [--steps N]

Two daemons side by side: one lends ``--device-pool cuda:<pool GPU>=SIZE`` (the last
visible GPU; with one GPU, the training GPU itself, which measures the mechanism but
saves no memory), one has the host pool only. Copies: ``benchmarks.gpu_step.bandwidth``
through each at several sizes, so the same code times a copy into an extent of the
daemon's memory with CUDA events (device to device through the IPC slab, or device to
the pinned host pool) and STORM's offload and fetch; whether the extent really was device
memory is checked and reported, never assumed. The links the daemon measured at start
are reported beside them. Steps: the GPT-like stack of benchmarks/gpu_step.py, no
offload vs STORM through each daemon, interleaved: median step, its ratio to no offload,
and whether every loss equals no offload's bit for bit. Printed, and saved to
``benchmarks/results/device_tier.json``. Without CUDA it says so and exits 0.

``--fake`` runs on any machine, through the fake backend: CPU training (the models of
benchmarks/spill.py) with no STORM, with the host pool only, and with a fake device of
twice and of half a step's activations (half: its oldest move to the host every step),
interleaved. Its device is host memory, so it measures what the tier's own work costs
(placement, the daemon's moves to the host, lending), never a link: saved to
``benchmarks/results/device_tier_fake.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

import torch

from benchmarks import spill
from benchmarks.common import median, print_table, write_json
from benchmarks.gpu_step import FULL, QUICK, Runner, bandwidth, saved_bytes
from benchmarks.step_time import MODELS
from client.engine.ipc import DeviceSegment
from client.engine.placement import gpu_uuid
from client.system import StormSystem
from client.transport import connect
from storm_service.protocol import Op
from worker.embedded import EmbeddedDaemon

SIZES_MIB = (16, 64, 256)
QUICK_SIZES_MIB = (16, 64)
MiB = 1 << 20


@contextlib.contextmanager
def lending(pool_mib: int, device_pool: str) -> Iterator[EmbeddedDaemon]:
    """An embedded daemon with ``STORM_DEVICE_POOL`` (``--device-pool``'s variable) set for it alone."""
    before = os.environ.get("STORM_DEVICE_POOL")
    os.environ["STORM_DEVICE_POOL"] = device_pool
    try:
        daemon = EmbeddedDaemon(f"{pool_mib}MiB", heartbeat_timeout="30s")
    finally:
        if before is None:
            del os.environ["STORM_DEVICE_POOL"]
        else:
            os.environ["STORM_DEVICE_POOL"] = before
    with daemon:
        yield daemon


def daemon_stats(endpoint: str) -> dict[str, Any]:
    """The daemon's ``stats`` (no session): the device tier's fields, and ``devices`` with their links."""
    with connect(endpoint) as channel:
        return dict(channel.call(Op.STATS))


def lands_on_device(system: StormSystem, size: int) -> bool:
    """Whether an offload of ``size`` bytes from the current GPU lands in a device slab."""
    handle = system.offload(torch.empty(size // 4, device="cuda"))
    where = system.locate(handle)
    on_device = where is not None and isinstance(system.segments[where[1]], DeviceSegment)
    system.free(handle)
    system.flush()
    return on_device


def copies(systems: dict[str, StormSystem], sizes_mib: tuple[int, ...], reps: int) -> dict[str, Any]:
    """Per size: ``bandwidth`` through each daemon, and where the device tier's extent was."""
    out: dict[str, Any] = {}
    for size_mib in sizes_mib:
        size = size_mib * MiB
        row: dict[str, Any] = {"device_slab": lands_on_device(systems["device"], size)}
        for name, system in systems.items():
            row[name] = bandwidth(system, size, reps)
        out[f"{size_mib}MiB"] = row
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--steps", type=int, default=None, help="measured steps per variant (default 10, quick 3)")
    p.add_argument("--pool-gpu", type=int, default=None, help="CUDA index of the lending GPU (default: the last)")
    p.add_argument("--fake", action="store_true", help="the tier's own cost on CPU, through a fake device")
    args = p.parse_args(argv)
    if args.fake:
        return fake(args.steps or 4)
    if not torch.cuda.is_available():
        print("benchmarks.device_tier needs a CUDA GPU (the device tier lends GPU memory); nothing measured")
        return 0
    device = torch.device("cuda", 0)
    pool_gpu = torch.cuda.device_count() - 1 if args.pool_gpu is None else args.pool_gpu
    cfg = QUICK if args.quick else FULL
    steps = args.steps or (3 if args.quick else 10)
    need = saved_bytes(cfg, device)
    host_mib = int((need * 2.5 + (1 << 30)) // MiB)
    device_mib = int((need * 1.25 + (256 << 20)) // MiB)
    device_pool = f"cuda:{gpu_uuid(pool_gpu)}={device_mib}MiB"
    results: dict[str, Any] = {
        "config": cfg,
        "steps": steps,
        "saved_bytes_per_step": need,
        "client_gpu": f"cuda:0 {gpu_uuid(0)}",
        "device_pool": device_pool,
        "host_pool_mib": host_mib,
    }
    with (
        lending(host_mib, device_pool) as tier,
        EmbeddedDaemon(f"{host_mib}MiB", heartbeat_timeout="30s") as host_only,
    ):
        results["links"] = daemon_stats(tier.endpoint).get("devices", [])
        systems = {"device": StormSystem(tier.endpoint), "host": StormSystem(host_only.endpoint)}
        try:
            results["copies"] = copies(systems, QUICK_SIZES_MIB if args.quick else SIZES_MIB, 5 if args.quick else 10)
            runners = [Runner("plain", cfg, device, None)]
            runners += [Runner(f"storm:{name}", cfg, device, system) for name, system in systems.items()]
            for _ in range(2):
                for runner in runners:
                    runner.step(record=False)
            for _ in range(steps):
                for runner in runners:
                    runner.step(record=True)
            stats = daemon_stats(tier.endpoint)
            results["device_tier_stats"] = {key: value for key, value in stats.items() if key.startswith("device_")}
        finally:
            for system in systems.values():
                system.close()
    plain = median(runners[0].times)
    results["variants"] = {
        r.name: {
            "median_s": median(r.times),
            "step_ratio_vs_plain": median(r.times) / plain,
            "losses_equal_plain": r.losses == runners[0].losses,
            "all_s": r.times,
        }
        for r in runners
    }
    report(results)
    write_json("device_tier", results)
    return 0


def report(results: dict[str, Any]) -> None:
    rows = [
        [device["name"], client, link["peer_gbps"], link["host_gbps"], link["enabled"]]
        for device in results["links"]
        for client, link in device["links"].items()
    ]
    print_table(["device", "from", "D2D GB/s", "D2H GB/s", "tier on"], rows, "links the daemon measured at start")
    rows = [
        [
            size,
            row["device_slab"],
            row["device"]["pool_d2h_gbps"],
            row["host"]["pool_d2h_gbps"],
            row["device"]["pool_h2d_gbps"],
            row["host"]["pool_h2d_gbps"],
            row["device"]["storm_offload_gbps"],
            row["host"]["storm_offload_gbps"],
        ]
        for size, row in results["copies"].items()
    ]
    headers = ["size", "on device", "D2D out", "D2H out", "D2D back", "H2D back", "offload dev", "offload host"]
    print_table(headers, rows, "GB/s: into the device slab vs into the pinned host pool (and back)")
    rows = [
        [name, v["median_s"], v["step_ratio_vs_plain"], v["losses_equal_plain"]]
        for name, v in results["variants"].items()
    ]
    print_table(["variant", "median s", "x plain", "loss=="], rows, f"GPT-like stack {results['config']}")
    print(f"device tier: {results['device_tier_stats']}")


def fake(steps: int) -> int:
    """CPU training through fake devices of 2x and 0.5x a step's activations, against the host pool alone."""
    results: dict[str, Any] = {"steps": steps, "models": {}}
    for name in ("heavy_mlp", "transformer"):
        cfg = dict(MODELS[name])
        need = spill.activation_bytes(cfg)
        host_mib = int(2 * need // MiB) + 64
        cases = {"host pool": None, "device 2x": 2 * need, "device 0.5x": need // 2}
        runners = [spill.Runner("none", cfg, None)]
        daemons: list[EmbeddedDaemon] = []
        with contextlib.ExitStack() as stack:
            for case, device_bytes in cases.items():
                pool = f"fake:spare={device_bytes // MiB}MiB" if device_bytes else ""
                daemon = stack.enter_context(lending(host_mib, pool))
                daemons.append(daemon)
                system = stack.enter_context(StormSystem(daemon.endpoint, name=case))
                runners.append(spill.Runner(case, cfg, system))
            reference, *ours = runners
            for record in [False] + [True] * steps:
                theirs, _ = reference.step(record)
                for runner in ours:
                    runner.exact.append(spill.same(runner.step(record)[0], theirs))
            evicted = [daemon_stats(d.endpoint).get("device_evicted_bytes", 0) for d in daemons]
        none_s = median(reference.times)
        results["models"][name] = {
            "activation_bytes": need,
            "none_s": none_s,
            "cases": {
                r.name: {
                    "median_s": median(r.times),
                    "ratio_to_none": median(r.times) / none_s,
                    "exact_every_step": all(r.exact),
                    "moved_to_host_bytes_per_step": moved / (steps + 1),
                    "all_s": r.times,
                }
                for r, moved in zip(ours, evicted, strict=True)
            },
        }
    rows = [
        [model, case, c["median_s"], c["ratio_to_none"], c["moved_to_host_bytes_per_step"] / MiB, c["exact_every_step"]]
        for model, m in results["models"].items()
        for case, c in m["cases"].items()
    ]
    print_table(["model", "case", "median s", "x none", "MiB moved/step", "exact"], rows, "fake device tier, CPU")
    write_json("device_tier_fake", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
