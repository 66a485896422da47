"""The extent allocator at scale: allocate and free with 10^5 and 10^6 live extents, fragmented.

    .venv/bin/python -m benchmarks.allocator [--quick] [--budget-s 10]

The worst case for an allocator that scans its free list: the range is cut into
one-block extents and every other one is freed, so ``n`` live extents sit between ``n``
one-block holes. Then, timed per operation:

* **offload** — 4096 allocations of 2 to 8 blocks (seeded sizes): none fits a hole, so a
  scan walks every hole before it reaches the free tail;
* **free (merge)** — those 4096 extents freed in random order;
* **unregister** — every one of the ``n`` interleaved extents freed (each merges with
  the holes on both sides), what closing a fragmented session costs.

Two allocators run the same operations: ``storm_service.allocator.ExtentAllocator``
(indexed free space, NOTE [Indexed free space]) and ``LinearAllocator``, the scan with
list edits it replaced, kept here as the baseline. A phase stops after ``--budget-s``
seconds; its per-operation figures then come from the operations done, and its total is
extrapolated (marked ``~``). Results: ``benchmarks/results/allocator.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import bisect
import gc
import random
import sys
import time
from collections.abc import Callable
from typing import Any, Protocol

from benchmarks.common import percentile, print_table, save_plot, write_json
from storm_service.allocator import ExtentAllocator

ALIGN = 512
OFFLOAD_SIZES = 4096
"""Sizes in the one large offload (``protocol.MAX_BATCH``)."""


class _Allocator(Protocol):
    def allocate(self, size_bytes: int) -> int | None: ...
    def free(self, offset: int) -> int: ...


class LinearAllocator:
    """The allocator before indexed free space: best fit by scanning a sorted list of free offsets."""

    def __init__(self, size_bytes: int, alignment: int = ALIGN) -> None:
        self.alignment = alignment
        self.size_bytes = size_bytes - size_bytes % alignment
        self._free_offsets: list[int] = [0]
        self._free_len: dict[int, int] = {0: self.size_bytes}
        self._live: dict[int, int] = {}

    def allocate(self, size_bytes: int) -> int | None:
        need = -(-size_bytes // self.alignment) * self.alignment
        best, best_len = -1, 0
        for offset in self._free_offsets:
            length = self._free_len[offset]
            if length >= need and (best < 0 or length < best_len):
                best, best_len = offset, length
                if length == need:
                    break
        if best < 0:
            return None
        del self._free_len[best]
        index = bisect.bisect_left(self._free_offsets, best)
        if best_len == need:
            del self._free_offsets[index]
        else:
            self._free_offsets[index] = best + need
            self._free_len[best + need] = best_len - need
        self._live[best] = need
        return best

    def free(self, offset: int) -> int:
        length = self._live.pop(offset)
        index = bisect.bisect_left(self._free_offsets, offset)
        start, end = offset, offset + length
        if index < len(self._free_offsets) and self._free_offsets[index] == end:
            end += self._free_len.pop(end)
            del self._free_offsets[index]
        if index > 0:
            before = self._free_offsets[index - 1]
            if before + self._free_len[before] == start:
                self._free_len[before] += end - start
                return length
        self._free_offsets.insert(index, start)
        self._free_len[start] = end - start
        return length


ALLOCATORS: dict[str, Callable[[int], _Allocator]] = {"indexed": ExtentAllocator, "linear": LinearAllocator}


def _fragmented(make: Callable[[int], _Allocator], live: int) -> tuple[_Allocator, list[int], float]:
    """``live`` one-block extents between ``live`` one-block holes, and a free tail for the offload."""
    started = time.perf_counter()
    allocator = make((2 * live + 8 * OFFLOAD_SIZES) * ALIGN)
    offsets = [allocator.allocate(ALIGN) for _ in range(2 * live)]
    for offset in offsets[::2]:
        assert offset is not None
        allocator.free(offset)
    return allocator, [o for o in offsets[1::2] if o is not None], time.perf_counter() - started


def _timed(operations: list[Callable[[], object]], budget_s: float) -> dict[str, Any]:
    """Run ``operations`` in order until done or ``budget_s`` has passed; per-operation figures."""
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    for operation in operations:
        started = time.perf_counter()
        operation()
        ended = time.perf_counter()
        times.append(ended - started)
        if ended > deadline:
            break
    done = len(times)
    mean = sum(times) / done
    return {
        "operations": len(operations),
        "done": done,
        "mean_us": mean * 1e6,
        "p99_us": percentile(times, 99) * 1e6,
        "max_us": max(times) * 1e6,
        "total_s": mean * len(operations),
        "extrapolated": done < len(operations),
    }


def run_one(name: str, live: int, budget_s: float, seed: int = 0) -> dict[str, Any]:
    gc.collect()
    allocator, held, build_s = _fragmented(ALLOCATORS[name], live)
    rng = random.Random(seed)
    sizes = [rng.randint(2, 8) * ALIGN for _ in range(OFFLOAD_SIZES)]
    placed: list[int] = []

    def allocate(size: int) -> Callable[[], object]:
        def run() -> None:
            offset = allocator.allocate(size)
            assert offset is not None, "the free tail holds every offload size"
            placed.append(offset)

        return run

    phases = {"offload": _timed([allocate(size) for size in sizes], budget_s)}
    rng.shuffle(placed)
    phases["free (merge)"] = _timed([lambda o=o: allocator.free(o) for o in placed], budget_s)
    phases["unregister"] = _timed([lambda o=o: allocator.free(o) for o in held], budget_s)
    return {"allocator": name, "live_extents": live, "build_s": build_s, "phases": phases}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="10^4 and 10^5 live extents, 2 s per phase")
    p.add_argument("--budget-s", type=float, default=10.0, help="most seconds one phase of one allocator runs")
    args = p.parse_args(argv)
    sizes = (10**4, 10**5) if args.quick else (10**5, 10**6)
    budget_s = 2.0 if args.quick else args.budget_s
    runs = []
    for live in sizes:
        for name in ALLOCATORS:
            print(f"{name}: {live} live extents ...", flush=True)
            runs.append(run_one(name, live, budget_s))
    rows = []
    for run in runs:
        for phase, f in run["phases"].items():
            total = f"{'~' if f['extrapolated'] else ''}{f['total_s']:.3g} s"
            rows.append(
                (run["allocator"], run["live_extents"], phase, f"{f['done']}/{f['operations']}", f["mean_us"],
                 f["p99_us"], f["max_us"], total)
            )  # fmt: skip
    print_table(
        ["allocator", "live extents", "phase", "ops timed", "mean µs", "p99 µs", "max µs", "phase total"],
        rows,
        title="Extent allocator, fragmented range (every other block free)",
    )
    write_json("allocator", {"budget_s": budget_s, "offload_sizes": OFFLOAD_SIZES, "runs": runs})

    def draw(plt: Any) -> None:
        phases = list(runs[0]["phases"])
        fig, axes = plt.subplots(1, len(phases), figsize=(4 * len(phases), 3.2))
        for axis, phase in zip(axes, phases, strict=True):
            labels = [f"{r['allocator']}\n{r['live_extents']:.0e}" for r in runs]
            axis.bar(labels, [r["phases"][phase]["mean_us"] for r in runs])
            axis.set_yscale("log")
            axis.set_title(f"{phase}: µs per operation")
        fig.suptitle("fragmented range: indexed vs linear free list")

    save_plot("allocator", draw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
