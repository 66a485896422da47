"""GPU step time and peak device memory: no offload vs save_on_cpu(pin_memory=True) vs STORM.

    .venv/bin/python -m benchmarks.gpu_step [--quick]

Needs CUDA; without it, prints "no CUDA device: skipped" and exits 0. A GPT-like stack
(pre-norm nn.TransformerEncoderLayer with a causal mask, bf16 autocast, SGD), variants
interleaved a,b,d,a,b,d,... on identical model copies. Reports the median step time,
``torch.cuda.max_memory_allocated`` growth over the step, and D2H/H2D GB/s into an
extent of STORM's pinned pool vs a ``torch.empty(..., pin_memory=True)`` buffer.
Sized to finish well under 5 minutes on one GPU. ``--cpu-dry-run`` exercises the code
with tiny sizes on the CPU (no timing value; for checking the script without a GPU).
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from benchmarks.common import MIN_BYTES, median, print_table, save_plot, write_json
from client.hooks import offload_saved_tensors
from client.system import StormSystem
from worker.embedded import EmbeddedDaemon

VARIANTS = ("a", "b", "d")
NAMES = {"a": "no offload", "b": "save_on_cpu(pin)", "d": "STORM"}
FULL = {"d": 1024, "heads": 16, "layers": 12, "batch": 8, "seq": 1024}
QUICK = {"d": 512, "heads": 8, "layers": 4, "batch": 4, "seq": 512}
DRY = {"d": 64, "heads": 4, "layers": 2, "batch": 2, "seq": 64}
GiB = float(1 << 30)


class GPT(nn.Module):
    def __init__(self, d: int, heads: int, layers: int) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device)
        return self.encoder(x, mask=mask, is_causal=True)


class Runner:
    def __init__(self, variant: str, cfg: dict[str, int], device: torch.device, system: StormSystem | None) -> None:
        torch.manual_seed(0)
        self.variant, self.device, self.system = variant, device, system
        self.model = GPT(cfg["d"], cfg["heads"], cfg["layers"]).to(device)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-4)
        self.gen = torch.Generator(device=device).manual_seed(0)
        self.shape = (cfg["batch"], cfg["seq"], cfg["d"])
        self.times: list[float] = []
        self.peaks: list[int] = []

    def context(self) -> Any:
        if self.variant == "b":
            return torch.autograd.graph.save_on_cpu(pin_memory=self.device.type == "cuda")
        if self.variant == "d":
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
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.system is not None:
            self.system.flush()
        if cuda:
            torch.cuda.synchronize()
        if record:
            self.times.append(time.perf_counter() - t)
            self.peaks.append(torch.cuda.max_memory_allocated() - base if cuda else 0)


def saved_bytes(cfg: dict[str, int], device: torch.device) -> int:
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if type(t) is torch.Tensor and t.numel() * t.element_size() >= MIN_BYTES:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    runner = Runner("a", cfg, device, None)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast(device.type, torch.bfloat16):
        runner.model(torch.randn(runner.shape, device=device)).float().pow(2).mean()
    del runner
    return sum(seen.values())


def bandwidth(system: StormSystem, size: int, reps: int) -> dict[str, float]:
    """GB/s of D2H and H2D copies into a pool extent vs a pinned torch buffer; STORM offload/fetch."""
    n = size // 4
    gpu = torch.randn(n, device="cuda")
    handle = system.offload(torch.zeros(n))  # an extent of our own to copy into
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--steps", type=int, default=None, help="measured steps per variant (default 10, quick 3)")
    p.add_argument("--cpu-dry-run", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu_dry_run:
        print("no CUDA device: skipped")
        return 0
    device = torch.device("cpu" if args.cpu_dry_run else "cuda")
    cfg = DRY if args.cpu_dry_run else (QUICK if args.quick else FULL)
    steps = args.steps or (3 if args.quick or args.cpu_dry_run else 10)
    need = saved_bytes(cfg, device)
    pool = int((need * 1.25 + (512 << 20)) // (1 << 20))
    results: dict[str, Any] = {"config": cfg, "steps": steps, "saved_bytes_per_step": need, "pool_mib": pool}
    t0 = time.perf_counter()
    with EmbeddedDaemon(f"{pool}MiB", heartbeat_timeout="30s") as daemon, StormSystem(daemon.endpoint) as system:
        results["storm_setup_s"] = time.perf_counter() - t0
        runners = {v: Runner(v, cfg, device, system if v == "d" else None) for v in VARIANTS}
        for _ in range(2):
            for v in VARIANTS:
                runners[v].step(record=False)
        before = system.stats().as_dict()
        for _ in range(steps):
            for v in VARIANTS:
                runners[v].step(record=True)
        after = system.stats().as_dict()
        fetches = sum(after[k] - before[k] for k in ("prefetch_hits", "prefetch_waits", "fetch_misses"))
        results["prefetch_hit_rate"] = (after["prefetch_hits"] - before["prefetch_hits"]) / max(fetches, 1)
        results["storm_offloaded_bytes_per_step"] = (after["offloaded_bytes"] - before["offloaded_bytes"]) / steps
        results["kept_tensors"] = after["kept_tensors"] - before["kept_tensors"]
        if device.type == "cuda":
            results["bandwidth_256MiB"] = bandwidth(system, 256 << 20, 5 if args.quick else 10)
    variants = results["variants"] = {
        v: {"median_s": median(r.times), "peak_alloc_growth_bytes": max(r.peaks), "all_s": r.times}
        for v, r in runners.items()
    }
    rows = [[f"{v}: {NAMES[v]}", r["median_s"], r["peak_alloc_growth_bytes"] / GiB] for v, r in variants.items()]
    print_table(["variant", "median step s", "peak alloc growth GiB"], rows, f"GPT-like stack {cfg}")
    moved, hits = results["storm_offloaded_bytes_per_step"] / GiB, results["prefetch_hit_rate"]
    print(f"STORM: {moved:.2f} GiB offloaded per step, prefetch hit rate {hits:.2f}")
    if "bandwidth_256MiB" in results:
        bw = results["bandwidth_256MiB"]
        rows = [[k, v] for k, v in bw.items()]
        print_table(["256 MiB copies", "GB/s (or flag)"], rows, "host<->device bandwidth")
    if not args.cpu_dry_run:
        write_json("gpu_step", results)
        save_plot("gpu_step", lambda plt: plot(plt, results))
    return 0


def plot(plt: Any, results: dict[str, Any]) -> None:
    _fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
    variants = results["variants"]
    labels = [NAMES[v] for v in variants]
    ax1.bar(labels, [r["median_s"] for r in variants.values()])
    ax1.set_ylabel("median step, s")
    ax2.bar(labels, [r["peak_alloc_growth_bytes"] / GiB for r in variants.values()])
    ax2.set_ylabel("peak allocated growth, GiB")


if __name__ == "__main__":
    sys.exit(main())
