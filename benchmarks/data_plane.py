"""STORM's data plane: offload+fetch throughput through StormSystem next to plain copies.

    .venv/bin/python -m benchmarks.data_plane [--quick]

For each size (64 KiB ... 256 MiB, powers of 4), one repetition moves a batch of
tensors (up to 256 MiB in all) out and back, interleaved across three variants:

  storm_alias offload x batch, fetch each in place (``fetch(alias=True)``, what the autograd
              hooks use on the CPU: the tensor reads the pool, no copy back), free, flush()
  storm_into  the same with ``fetch(out=...)`` copying each tensor back into a pre-faulted one
  storm_copy  the same with ``fetch()`` copying each tensor back into a fresh one
  copy        warm ``copy_`` into a pre-faulted /dev/shm arena and back into pre-faulted
              tensors (the floor: no protocol, no allocation)
  copy_fresh  the same, but back into a fresh ``torch.empty`` (what fetch must return)

GB/s counts the bytes of both directions. Median of the repetitions.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch

from benchmarks.common import ShmArena, median, print_table, save_plot, target, write_json
from client.system import StormSystem
from worker.embedded import EmbeddedDaemon

KiB, MiB = 1 << 10, 1 << 20
VARIANTS = ("storm_alias", "storm_into", "storm_copy", "copy", "copy_fresh")


def batch_for(size: int, total: int) -> int:
    return max(1, min(256, total // size))


def run_storm(
    system: StormSystem, src: torch.Tensor, batch: int, alias: bool, into: list[torch.Tensor] | None = None
) -> float:
    t = time.perf_counter()
    handles = [system.offload(src) for _ in range(batch)]
    if into is None:
        outs = [system.fetch(h, alias=alias) for h in reversed(handles)]
    else:
        outs = [system.fetch(h, out=out) for h, out in zip(reversed(handles), into, strict=True)]
    for h in handles:
        system.free(h)
    system.flush()
    elapsed = time.perf_counter() - t
    assert torch.equal(outs[-1], src)
    return elapsed


def run_copy(slots: list[torch.Tensor], outs: list[torch.Tensor] | None, src: torch.Tensor) -> float:
    t = time.perf_counter()
    for slot in slots:
        slot.copy_(src)
    for i, slot in enumerate(reversed(slots)):
        if outs is None:
            torch.empty_like(slot).copy_(slot)
        else:
            outs[i].copy_(slot)
    return time.perf_counter() - t


def measure(system: StormSystem, arena: ShmArena, size: int, total: int, reps: int) -> dict[str, Any]:
    batch = batch_for(size, total)
    src = torch.randn(size // 4)
    arena.reset()
    slots = [arena.alloc(size).view(torch.float32) for _ in range(batch)]
    outs = [torch.empty_like(src) for _ in range(batch)]
    for out in outs:
        out.fill_(0)  # pre-fault
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    run = {
        "storm_alias": lambda: run_storm(system, src, batch, alias=True),
        "storm_into": lambda: run_storm(system, src, batch, alias=False, into=outs),
        "storm_copy": lambda: run_storm(system, src, batch, alias=False),
        "copy": lambda: run_copy(slots, outs, src),
        "copy_fresh": lambda: run_copy(slots, None, src),
    }
    for v in VARIANTS:  # warm-up
        run[v]()
    for _ in range(reps):
        for v in VARIANTS:
            times[v].append(run[v]())
    moved = 2 * size * batch
    result: dict[str, Any] = {"size": size, "batch": batch, "reps": reps}
    for v in VARIANTS:
        result[f"{v}_gbps"] = moved / median(times[v]) / 1e9
    result["ratio_storm_copy"] = result["storm_alias_gbps"] / result["copy_gbps"]
    result["ratio_storm_into_copy"] = result["storm_into_gbps"] / result["copy_gbps"]
    result["ratio_storm_copy_copy"] = result["storm_copy_gbps"] / result["copy_gbps"]
    result["ratio_storm_copy_fresh"] = result["storm_copy_gbps"] / result["copy_fresh_gbps"]
    return result


def label(size: int) -> str:
    return f"{size // MiB} MiB" if size >= MiB else f"{size // KiB} KiB"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="sizes up to 16 MiB, 32 MiB per repetition")
    p.add_argument("--reps", type=int, default=None, help="repetitions per variant (default 7, quick 3)")
    args = p.parse_args(argv)
    top, total = (16 * MiB, 32 * MiB) if args.quick else (256 * MiB, 256 * MiB)
    reps = args.reps or (3 if args.quick else 7)
    sizes = [64 * KiB * 4**i for i in range(10) if 64 * KiB * 4**i <= top]
    rows, results = [], {"quick": args.quick, "sizes": []}
    with EmbeddedDaemon(f"{2 * total // MiB}MiB") as daemon, StormSystem(daemon.endpoint, name="data-plane") as system:
        arena = ShmArena(total + 256 * KiB)
        for size in sizes:
            r = measure(system, arena, size, total, reps)
            results["sizes"].append(r)
            rows.append([label(size), r["batch"], *(r[f"{v}_gbps"] for v in VARIANTS)])
            rows[-1] += [f"{r[k]:.0%}" for k in ("ratio_storm_copy", "ratio_storm_into_copy", "ratio_storm_copy_copy")]
            rows[-1] += [f"{r['ratio_storm_copy_fresh']:.0%}"]
            print(f"  {label(size)} done", flush=True)
        stats = system.stats().as_dict()
    results["engine_round_trips"] = stats["engine_round_trips"]
    results["prefetch"] = {k: stats[k] for k in ("prefetch_hits", "prefetch_waits", "fetch_misses")}
    heads = ["size", "batch", "STORM alias GB/s", "STORM out= GB/s", "STORM copy GB/s", "copy GB/s"]
    heads += ["copy->fresh GB/s", "alias/copy", "out=/copy", "STORM copy/copy", "STORM copy/fresh"]
    print_table(heads, rows, "offload+fetch throughput (bytes of both directions)")
    print()
    big = [r for r in results["sizes"] if r["size"] >= MiB]
    worst = min(big, key=lambda r: r["ratio_storm_copy"])
    results["targets"] = [
        target(
            "STORM (in-place fetch, the autograd path) >= 80% of warm copy for 1 MiB and up",
            worst["ratio_storm_copy"] >= 0.8,
            f"worst {worst['ratio_storm_copy']:.0%} at {label(worst['size'])}",
        )
    ]
    into = [f"{r['ratio_storm_into_copy']:.0%}" for r in big]
    print(f"fetch(out=), 1 MiB and up: {', '.join(into)} of warm copy (offload copies on one thread, by design)")
    write_json("data_plane", results)
    save_plot("data_plane", lambda plt: plot(plt, results))
    return 0


def plot(plt: Any, results: dict[str, Any]) -> None:
    _fig, ax = plt.subplots(figsize=(7, 4))
    sizes = [r["size"] for r in results["sizes"]]
    names = (
        "STORM, in-place fetch",
        "STORM, fetch(out=)",
        "STORM, fetch copies",
        "copy (pre-faulted)",
        "copy back to fresh",
    )
    for v, name in zip(VARIANTS, names, strict=True):
        ax.plot(sizes, [r[f"{v}_gbps"] for r in results["sizes"]], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [label(s) for s in sizes], fontsize=8)
    ax.set_xlabel("tensor size")
    ax.set_ylabel("GB/s (out + back)")
    ax.legend()


if __name__ == "__main__":
    sys.exit(main())
