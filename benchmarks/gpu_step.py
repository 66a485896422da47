"""GPU step: no offload vs save_on_cpu(pin_memory=True) vs STORM per selection policy; pinning by page size.

    .venv/bin/python -m benchmarks.gpu_step [--quick] [--steps N]

A GPT-like stack (pre-norm nn.TransformerEncoderLayer with a causal mask, bf16
autocast, SGD), variants interleaved on identical model copies and data: no offload,
``save_on_cpu(pin_memory=True)``, and STORM with ``select`` = all, budget and
checkpoint (a policy this client does not accept is skipped with the reason). For each:
the median step and its ratio to no offload, ``torch.cuda.max_memory_allocated`` growth
over the step, the bytes still allocated on the device when forward ends (and, for
STORM, those whose copies were still in flight), the bytes offloaded per step, and
whether every step's loss equals no offload's bit for bit. Then D2H/H2D GB/s into an
extent of STORM's pool vs a ``torch.empty(..., pin_memory=True)`` buffer.

Pinning by page size (NOTE [Huge pages]): a mapping backed by 4 KiB pages vs one backed
by 2 MiB pages (transparent huge pages in /dev/shm where its mount allows, else
hugetlbfs pages where some are reserved, else anonymous transparent huge pages),
prefaulted (``MADV_POPULATE_WRITE``) and, with CUDA, registered with
``cudaHostRegister``: GB/s of each. Without CUDA only the prefault figures are measured
and the rest is skipped. ``--cpu-dry-run`` runs the step code with tiny sizes on the CPU
(no timing value; for checking the script without a GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import mmap
import os
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from benchmarks.common import MIN_BYTES, median, print_table, save_plot, write_json
from client.hooks import offload_saved_tensors
from client.system import StormSystem
from storm_service.shm import SHM_DIR, huge_page_bytes, huge_page_policy
from worker.embedded import EmbeddedDaemon

SELECTIONS = ("all", "budget", "checkpoint")
FULL = {"d": 1024, "heads": 16, "layers": 12, "batch": 8, "seq": 1024}
QUICK = {"d": 512, "heads": 8, "layers": 4, "batch": 4, "seq": 512}
DRY = {"d": 64, "heads": 4, "layers": 2, "batch": 2, "seq": 64}
GiB = float(1 << 30)
_MADV_POPULATE_WRITE = 23  # Linux 5.14; Python's mmap module does not export it
_MAP_HUGETLB = 0x40000


class GPT(nn.Module):
    def __init__(self, d: int, heads: int, layers: int) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device)
        return self.encoder(x, mask=mask, is_causal=True)


class Runner:
    """One variant: its own model copy, optimizer and data stream (all seeded alike)."""

    def __init__(self, name: str, cfg: dict[str, int], device: torch.device, system: StormSystem | None) -> None:
        torch.manual_seed(0)
        self.name, self.device, self.system = name, device, system
        self.model = GPT(cfg["d"], cfg["heads"], cfg["layers"]).to(device)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-4)
        self.gen = torch.Generator(device=device).manual_seed(0)
        self.shape = (cfg["batch"], cfg["seq"], cfg["d"])
        self.times: list[float] = []
        self.peaks: list[int] = []
        self.held_after_forward: list[int] = []
        self.inflight_after_forward: list[int] = []
        self.losses: list[float] = []

    def context(self) -> Any:
        if self.name == "save_on_cpu":
            return torch.autograd.graph.save_on_cpu(pin_memory=self.device.type == "cuda")
        if self.system is not None:
            return offload_saved_tensors(self.system, module=self.model.encoder.layers)
        return nullcontext()

    def step(self, record: bool) -> None:
        x = torch.randn(self.shape, generator=self.gen, device=self.device)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if cuda else 0
        t = time.perf_counter()
        with self.context(), torch.autocast(self.device.type, dtype=torch.bfloat16):
            loss = self.model(x).float().pow(2).mean()
        held = torch.cuda.memory_allocated() - base if cuda else 0
        inflight = self.system.inflight_bytes() if self.system is not None else 0
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.system is not None:
            self.system.flush()
        if cuda:
            torch.cuda.synchronize()
        self.losses.append(loss.item())
        if record:
            self.times.append(time.perf_counter() - t)
            self.peaks.append(torch.cuda.max_memory_allocated() - base if cuda else 0)
            self.held_after_forward.append(held)
            self.inflight_after_forward.append(inflight)


def saved_bytes(cfg: dict[str, int], device: torch.device) -> int:
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if type(t) is torch.Tensor and t.numel() * t.element_size() >= MIN_BYTES:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    runner = Runner("plain", cfg, device, None)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast(device.type, torch.bfloat16):
        runner.model(torch.randn(runner.shape, device=device)).float().pow(2).mean()
    del runner
    return sum(seen.values())


def storm_systems(endpoint: str) -> tuple[dict[str, StormSystem], dict[str, str]]:
    """One StormSystem per selection policy this client accepts; the others with the reason."""
    systems: dict[str, StormSystem] = {}
    skipped: dict[str, str] = {}
    for select in SELECTIONS:
        try:
            systems[select] = StormSystem(endpoint, select=select)
        except (TypeError, ValueError) as e:
            skipped[select] = str(e)
            print(f"STORM select={select!r} skipped: {e}")
    return systems, skipped


def bandwidth(system: StormSystem, size: int, reps: int) -> dict[str, float]:
    """GB/s of D2H and H2D copies into a pool extent vs a pinned torch buffer; STORM offload/fetch."""
    n = size // 4
    gpu = torch.randn(n, device="cuda")
    handle = system.offload(gpu)  # an extent of our own, pinned by its copy (NOTE [Lazy pinning])
    system.flush()
    pool = system.buffer(handle).as_tensor(torch.float32, (n,))
    pinned = torch.empty(n, pin_memory=True)
    out: dict[str, float] = {"pool_is_pinned": float(pool.is_pinned()), "pinned_is_pinned": float(pinned.is_pinned())}

    def timed(dst: torch.Tensor, src: torch.Tensor) -> float:
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        return size * reps / (start.elapsed_time(end) / 1e3) / 1e9

    for _ in range(2):  # interleaved twice; keep the best of each (peak)
        for name, host in (("pool", pool), ("pinned", pinned)):
            out[f"{name}_d2h_gbps"] = max(out.get(f"{name}_d2h_gbps", 0.0), timed(host, gpu))
            out[f"{name}_h2d_gbps"] = max(out.get(f"{name}_h2d_gbps", 0.0), timed(gpu, host))
    system.free(handle)
    offload_s, fetch_s = [], []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        h = system.offload(gpu)
        system.locate(h)  # waits until the offload is placed
        offload_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        system.fetch(h)
        torch.cuda.synchronize()
        fetch_s.append(time.perf_counter() - t)
        system.free(h)
    system.flush()
    out["storm_offload_gbps"] = size / median(offload_s) / 1e9
    out["storm_fetch_gbps"] = size / median(fetch_s) / 1e9
    return out


# -- pinning by page size (NOTE [Huge pages]) ---------------------------------------------


@contextlib.contextmanager
def _mapping(kind: str, huge: bool, size: int) -> Iterator[mmap.mmap]:
    """A fresh mapping of ``size`` bytes of ``kind``, backed by huge pages or not (nothing faulted yet)."""
    if kind == "shmem":
        path = os.path.join(SHM_DIR, f"stormbench-{os.getpid()}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        finally:
            os.close(fd)
            os.unlink(path)
    elif kind == "hugetlb" and huge:
        mm = mmap.mmap(-1, size, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS | _MAP_HUGETLB)
    else:
        shared = mmap.MAP_SHARED if kind == "hugetlb" else mmap.MAP_PRIVATE
        mm = mmap.mmap(-1, size, flags=shared | mmap.MAP_ANONYMOUS)
    if not (kind == "hugetlb" and huge):  # hugetlbfs pages are huge whatever the advice
        mm.madvise(mmap.MADV_HUGEPAGE if huge else mmap.MADV_NOHUGEPAGE)
    try:
        yield mm
    finally:
        mm.close()


def huge_page_kind(size: int) -> str | None:
    """Where 2 MiB pages come from on this host: shmem (as the pool), hugetlb or anonymous THP; None if nowhere."""
    if huge_page_policy(SHM_DIR) != "never":
        return "shmem"
    with open("/proc/meminfo") as f:
        free_huge = next((int(line.split()[1]) for line in f if line.startswith("HugePages_Free:")), 0)
    if free_huge * (2 << 20) >= size:
        return "hugetlb"
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return None if "[never]" in f.read() else "anonymous"
    except OSError:
        return None


def page_sizes(size: int, cuda: bool, rounds: int = 2) -> dict[str, Any]:
    """Prefault (and with CUDA, register) GB/s of a 4 KiB-page vs a 2 MiB-page mapping of ``size`` bytes.

    The kinds alternate for ``rounds`` rounds and the best of each is kept: in a VM the
    first touch of guest memory also pays the host's faults (measured here: 0.5 GB/s for
    2 MiB pages on first touch, 11 GB/s once the guest's memory had been touched).
    """
    kind = huge_page_kind(size)
    if kind is None:
        print("pinning by page size skipped: this host has no huge pages (THP off, no hugetlbfs pages)")
        return {"skipped": "no huge pages on this host"}
    out: dict[str, Any] = {"kind": kind, "size_bytes": size}
    cudart = torch.cuda.cudart() if cuda else None

    def best(key: str, seconds: float) -> None:
        out[key] = max(out.get(key, 0.0), size / seconds / 1e9)

    for _ in range(rounds):
        for label, huge in (("4KiB", False), ("2MiB", True)):
            with _mapping(kind, huge, size) as mm:
                t = time.perf_counter()
                mm.madvise(_MADV_POPULATE_WRITE)
                best(f"{label}_prefault_gbps", time.perf_counter() - t)
                window = (ctypes.c_char * size).from_buffer(mm)
                address = ctypes.addressof(window)
                out[f"{label}_huge_bytes"] = huge_page_bytes([(address, size)])
                if cudart is not None:
                    t = time.perf_counter()
                    err = int(cudart.cudaHostRegister(address, size, 0))
                    if err != 0:
                        out[f"{label}_register_error"] = err
                    else:
                        best(f"{label}_register_gbps", time.perf_counter() - t)
                        t = time.perf_counter()
                        cudart.cudaHostUnregister(address)
                        best(f"{label}_unregister_gbps", time.perf_counter() - t)
                del window
    if cudart is None:
        print("cudaHostRegister by page size skipped: no CUDA device (prefault figures only)")
    return out


# -- main -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--steps", type=int, default=None, help="measured steps per variant (default 10, quick 3)")
    p.add_argument("--cpu-dry-run", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    results: dict[str, Any] = {"page_sizes": page_sizes(1 << 30, cuda)}
    print_table(["pinning by page size", "value"], list(results["page_sizes"].items()))
    if not cuda and not args.cpu_dry_run:
        print("no CUDA device: the step comparison is skipped")
        write_json("gpu_step_page_sizes_cpu", results)
        return 0
    device = torch.device("cpu" if args.cpu_dry_run else "cuda")
    cfg = DRY if args.cpu_dry_run else (QUICK if args.quick else FULL)
    steps = args.steps or (3 if args.quick or args.cpu_dry_run else 10)
    need = saved_bytes(cfg, device)
    pool = int((need * 2.5 + (1 << 30)) // (1 << 20))
    results.update({"config": cfg, "steps": steps, "saved_bytes_per_step": need, "pool_mib": pool})
    with EmbeddedDaemon(f"{pool}MiB", heartbeat_timeout="30s") as daemon:
        t0 = time.perf_counter()
        systems, results["skipped_selections"] = storm_systems(daemon.endpoint)
        results["storm_setup_s"] = (time.perf_counter() - t0) / max(len(systems), 1)
        runners = [Runner("plain", cfg, device, None), Runner("save_on_cpu", cfg, device, None)]
        runners += [Runner(f"storm:{select}", cfg, device, system) for select, system in systems.items()]
        for _ in range(2):
            for runner in runners:
                runner.step(record=False)
        before = {select: system.stats().as_dict() for select, system in systems.items()}
        for _ in range(steps):
            for runner in runners:
                runner.step(record=True)
        for select, system in systems.items():
            after = system.stats().as_dict()
            moved = after["offloaded_bytes"] - before[select]["offloaded_bytes"]
            results[f"storm:{select}"] = {
                "offloaded_bytes_per_step": moved / steps,
                "kept_tensors": after["kept_tensors"] - before[select]["kept_tensors"],
            }
        if device.type == "cuda" and systems:
            results["bandwidth_256MiB"] = bandwidth(next(iter(systems.values())), 256 << 20, 5 if args.quick else 10)
        for system in systems.values():
            system.close()
    plain = median(runners[0].times)
    variants = results["variants"] = {
        r.name: {
            "median_s": median(r.times),
            "step_ratio_vs_plain": median(r.times) / plain,
            "peak_alloc_growth_bytes": max(r.peaks),
            "held_after_forward_bytes": median(r.held_after_forward),
            "inflight_after_forward_bytes": median(r.inflight_after_forward),
            "losses_equal_plain": r.losses == runners[0].losses,
            "all_s": r.times,
        }
        for r in runners
    }
    rows = [
        [
            name,
            v["median_s"],
            v["step_ratio_vs_plain"],
            v["peak_alloc_growth_bytes"] / GiB,
            v["held_after_forward_bytes"] / GiB,
            v["inflight_after_forward_bytes"] / GiB,
            results.get(name, {}).get("offloaded_bytes_per_step", 0) / GiB,
            v["losses_equal_plain"],
        ]
        for name, v in variants.items()
    ]
    headers = ["variant", "median s", "x plain", "peak GiB", "held@fwd GiB", "in flight GiB", "offl. GiB", "loss=="]
    print_table(headers, rows, f"GPT-like stack {cfg}")
    if "bandwidth_256MiB" in results:
        rows = [[k, v] for k, v in results["bandwidth_256MiB"].items()]
        print_table(["256 MiB copies", "GB/s (or flag)"], rows, "host<->device bandwidth")
    if not args.cpu_dry_run:
        write_json("gpu_step", results)
        save_plot("gpu_step", lambda plt: plot(plt, results))
    return 0


def plot(plt: Any, results: dict[str, Any]) -> None:
    _fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    variants = results["variants"]
    ax1.bar(list(variants), [r["median_s"] for r in variants.values()])
    ax1.set_ylabel("median step, s")
    ax2.bar(list(variants), [r["peak_alloc_growth_bytes"] / GiB for r in variants.values()])
    ax2.set_ylabel("peak allocated growth, GiB")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", labelrotation=30)


if __name__ == "__main__":
    sys.exit(main())
