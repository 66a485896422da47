"""Training step time with and without offloading, side by side in one run.

Variants, interleaved a,b,c,d,a,b,c,d,... on identical model copies fed identical data:
  a  no offload
  b  torch.autograd.graph.save_on_cpu()            (on a CPU-only host this copies nothing)
  c  copy-only floor: saved storages copied into a pre-faulted /dev/shm arena and back
     on the training thread (benchmarks.common.CopyFloor), no daemon
  d  STORM: a real stormd (EmbeddedDaemon), StormSystem + offload_saved_tensors

Private-memory growth (RssAnon) is measured in fresh subprocesses, one per (model,
variant, malloc setting), so that one variant's freed heap cannot hide another's growth.

    .venv/bin/python -m benchmarks.step_time [--quick] [--steps N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

import torch
from torch import nn

from benchmarks.common import (
    MIN_BYTES,
    CopyFloor,
    RssSampler,
    ShmArena,
    cpu_seconds,
    median,
    rss_anon,
    save_plot,
    thread_stat_path,
    write_json,
)
from benchmarks.step_time_report import VARIANTS, plot, report
from client.hooks import offload_saved_tensors
from client.system import StormSystem
from worker.embedded import EmbeddedDaemon
from worker.models import TeacherData

MODELS: dict[str, dict[str, int | str]] = {
    # The seed's width and depth; batch 128 instead of 512 keeps a step near 1 s on 2 cores
    # (bytes offloaded per FLOP of a Linear layer do not depend on the batch).
    "seed_mlp": {"kind": "mlp", "hidden": 2048, "layers": 24, "batch": 128},
    "heavy_mlp": {"kind": "mlp", "hidden": 256, "layers": 24, "batch": 16384},
    "transformer": {"kind": "transformer", "hidden": 512, "layers": 6, "batch": 8, "seq": 256},
}
QUICK: dict[str, dict[str, int | str]] = {
    "seed_mlp": {"kind": "mlp", "hidden": 1024, "layers": 8, "batch": 64},
    "heavy_mlp": {"kind": "mlp", "hidden": 256, "layers": 8, "batch": 4096},
    "transformer": {"kind": "transformer", "hidden": 256, "layers": 2, "batch": 4, "seq": 128},
}
MMAP_THRESHOLD = 1 << 20
PROBED = ("a", "c", "d")
"""Variants whose private memory is probed: c shows what any synchronous offload leaves."""


class Transformer(nn.Module):
    def __init__(self, d: int, layers: int) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, 8, 4 * d, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


def build(cfg: dict[str, Any]) -> tuple[nn.Module, nn.Module, TeacherData]:
    """(model, module whose children are STORM's layers, data); same weights and data every call."""
    torch.manual_seed(0)  # as the worker: weights depend only on the seed
    h = cfg["hidden"]
    if cfg["kind"] == "mlp":
        model: nn.Module = nn.Sequential(*[m for _ in range(cfg["layers"]) for m in (nn.Linear(h, h), nn.ReLU())])
        layers = model
    else:
        model = Transformer(h, cfg["layers"])
        layers = model.encoder.layers
    data = TeacherData(cfg["kind"], h, h, cfg["batch"], cfg.get("seq", 1), seed=0)
    return model, layers, data


def saved_bytes(model: nn.Module, data: TeacherData) -> int:
    """Bytes of distinct storages >= 64 KiB that one forward saves for backward."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if type(t) is torch.Tensor and t.numel() * t.element_size() >= MIN_BYTES:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x, y = data.next(torch.device("cpu"))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        nn.functional.mse_loss(model(x), y)
    return sum(seen.values())


class Runner:
    """One variant's model, optimizer and data, and its per-step timings."""

    def __init__(self, variant: str, cfg: dict[str, Any], floor: CopyFloor | None, system: StormSystem | None) -> None:
        self.variant, self.floor, self.system = variant, floor, system
        self.model, self.layers, self.data = build(cfg)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-4)
        self.times: list[float] = []
        self.fwd: list[float] = []
        self.bwd: list[float] = []
        self.losses: list[float] = []
        self.cpu: list[float] = []

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.variant == "b":
            with torch.autograd.graph.save_on_cpu():
                return nn.functional.mse_loss(self.model(x), y)
        if self.variant == "c":
            assert self.floor is not None
            with self.floor.step():
                return nn.functional.mse_loss(self.model(x), y)
        if self.variant == "d":
            with offload_saved_tensors(self.system, module=self.layers):
                return nn.functional.mse_loss(self.model(x), y)
        return nn.functional.mse_loss(self.model(x), y)

    def step(self, record: bool, sampler: RssSampler | None = None) -> dict[str, int]:
        x, y = self.data.next(torch.device("cpu"))
        mem: dict[str, int] = {}
        base = sampler.reset() if sampler else 0
        c0 = time.process_time()
        t0 = time.perf_counter()
        loss = self.forward(x, y)
        t1 = time.perf_counter()
        if sampler:
            mem["fwd_peak"] = sampler.window_peak() - base
            mem["after_fwd"] = rss_anon() - base
            sampler.reset()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.system is not None:
            self.system.flush()  # no STORM work spills into the next variant's step
        t2 = time.perf_counter()
        c2 = time.process_time()
        if sampler:
            mem["bwd_peak"] = sampler.window_peak() - base
            mem["base"] = base
        if record:
            self.times.append(t2 - t0)
            self.fwd.append(t1 - t0)
            self.bwd.append(t2 - t1)
            self.losses.append(loss.item())
            self.cpu.append(c2 - c0)
        return mem


def storm_setup(cfg: dict[str, Any]) -> tuple[int, nn.Module, TeacherData]:
    model, _, data = build(cfg)
    need = saved_bytes(model, data)
    return int((need * 1.25 + (64 << 20)) // (1 << 20)) << 20, model, data


def run_model(name: str, cfg: dict[str, Any], warmup: int, steps: int) -> dict[str, Any]:
    pool_bytes, _, _ = storm_setup(cfg)
    with EmbeddedDaemon(f"{pool_bytes >> 20}MiB") as daemon, StormSystem(daemon.endpoint, name="bench") as system:
        floor = CopyFloor(ShmArena(pool_bytes))
        runners = {v: Runner(v, cfg, floor if v == "c" else None, system if v == "d" else None) for v in VARIANTS}
        for _ in range(warmup):
            for v in VARIANTS:
                runners[v].step(record=False)
        before = system.stats().as_dict()
        floor.copied_bytes = 0
        daemon_stat = f"/proc/{daemon.pid}/stat"  # the daemon's CPU time
        transfer_stat = thread_stat_path("storm-transfer")
        cpu0 = cpu_seconds(daemon_stat), cpu_seconds(transfer_stat) if transfer_stat else 0.0
        for _ in range(steps):
            for v in VARIANTS:
                runners[v].step(record=True)
        cpu1 = cpu_seconds(daemon_stat), cpu_seconds(transfer_stat) if transfer_stat else 0.0
        after = system.stats().as_dict()
    delta = {k: after[k] - before[k] for k in after if isinstance(after[k], int | float) and k in before}
    fetches = delta["prefetch_hits"] + delta["prefetch_waits"] + delta["fetch_misses"]
    med = {v: median(runners[v].times) for v in VARIANTS}
    out: dict[str, Any] = {
        "config": cfg,
        "pool_bytes": pool_bytes,
        "steps": steps,
        "median_s": med,
        "median_fwd_s": {v: median(runners[v].fwd) for v in VARIANTS},
        "median_bwd_s": {v: median(runners[v].bwd) for v in VARIANTS},
        "all_s": {v: runners[v].times for v in VARIANTS},
        "median_process_cpu_s": {v: median(runners[v].cpu) for v in VARIANTS},
        "daemon_cpu_s_per_step": (cpu1[0] - cpu0[0]) / steps,
        "transfer_thread_cpu_s_per_step": (cpu1[1] - cpu0[1]) / steps,
        "ratio_d_c": med["d"] / med["c"],
        "ratio_d_a": med["d"] / med["a"],
        "ratio_b_a": med["b"] / med["a"],
        "ratio_c_a": med["c"] / med["a"],
        "storm_offloaded_bytes_per_step": delta["offloaded_bytes"] / steps,
        "floor_copied_bytes_per_step": floor.copied_bytes / steps,
        # the second stats() call counts itself once; everything else is training-thread traffic
        "blocking_round_trips_per_step": (delta["blocking_round_trips"] - 1) / steps,
        "engine_round_trips_per_step": delta["engine_round_trips"] / steps,
        "offload_round_trips_per_step": delta["offload_round_trips"] / steps,
        "fetch_round_trips_per_step": delta["fetch_round_trips"] / steps,
        "offloaded_tensors_per_step": delta["offloaded_tensors"] / steps,
        "prefetch_hit_rate": delta["prefetch_hits"] / fetches if fetches else None,
        "prefetch": {k: delta[k] for k in ("prefetch_hits", "prefetch_waits", "fetch_misses")},
        "fetch_wait_s_per_step": delta["fetch_wait_s"] / steps,
        "kept_tensors": delta["kept_tensors"],
        "max_abs_loss_diff_d_a": max(abs(p - q) for p, q in zip(runners["d"].losses, runners["a"].losses, strict=True)),
    }
    return out


def memory_probe(cfg: dict[str, Any], variant: str, quick: bool) -> dict[str, Any]:
    """Run in a fresh process: peak RssAnon growth over the pre-forward value, fwd and bwd."""
    pool_bytes, _, _ = storm_setup(cfg)
    with EmbeddedDaemon(f"{pool_bytes >> 20}MiB") as daemon, StormSystem(daemon.endpoint, name="probe") as system:
        floor = CopyFloor(ShmArena(pool_bytes)) if variant == "c" else None
        runner = Runner(variant, cfg, floor, system if variant == "d" else None)
        sampler = RssSampler()
        runner.step(record=False)
        mems = [runner.step(record=True, sampler=sampler) for _ in range(1 if quick else 2)]
        sampler.close()
    return {
        "fwd_peak_growth": max(m["fwd_peak"] for m in mems),
        "after_fwd_growth": max(m["after_fwd"] for m in mems),
        "bwd_peak_growth": max(m["bwd_peak"] for m in mems),
        "base": mems[-1]["base"],
        "step_s": median(runner.times),
    }


def run_probe(cfg: dict[str, Any], variant: str, quick: bool, threshold: bool) -> dict[str, Any]:
    env = dict(os.environ)
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    cmd = [sys.executable, "-m", "benchmarks.step_time", "--probe", json.dumps(cfg), variant]
    cmd += ["--quick"] if quick else []
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, timeout=600)
    return json.loads(done.stdout.strip().splitlines()[-1])


MODEL_KEYS = {"mlp": ("hidden", "layers", "batch"), "transformer": ("hidden", "layers", "batch", "seq")}


def parse_model(spec: str) -> tuple[str, dict[str, int | str]]:
    """``mlp:hidden=512,layers=16,batch=8192`` -> (a name, a model config)."""
    kind, _, rest = spec.partition(":")
    if kind not in MODEL_KEYS:
        raise argparse.ArgumentTypeError(f"{spec!r}: the kind must be one of {', '.join(MODEL_KEYS)}")
    cfg: dict[str, int | str] = {"kind": kind}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key not in MODEL_KEYS[kind] or not value.isdigit() or int(value) < 1:
            raise argparse.ArgumentTypeError(f"{spec!r}: {item!r} is not one of {'=N, '.join(MODEL_KEYS[kind])}=N")
        cfg[key] = int(value)
    missing = [key for key in MODEL_KEYS[kind] if key not in cfg]
    if missing:
        raise argparse.ArgumentTypeError(f"{spec!r}: missing {', '.join(missing)}")
    return kind + "".join(f"_{key[0]}{cfg[key]}" for key in MODEL_KEYS[kind]), cfg


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small models, few steps (smoke run)")
    p.add_argument("--steps", type=int, default=None, help="measured steps per variant (default 9, quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per variant (default 2, quick 1)")
    p.add_argument("--models", default=None, help="comma-separated subset of " + ",".join(MODELS))
    p.add_argument(
        "--model",
        action="append",
        default=[],
        type=parse_model,
        metavar="KIND:KEY=N,...",
        help="another model, e.g. mlp:hidden=512,layers=16,batch=8192 or "
        "transformer:hidden=256,layers=4,batch=16,seq=256 (repeatable; alone, only these run)",
    )
    p.add_argument("--out", default="step_time", help="results/<OUT>.json and .png (default step_time)")
    p.add_argument("--probe", nargs=2, metavar=("CONFIG", "VARIANT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe:
        print(json.dumps(memory_probe(json.loads(args.probe[0]), args.probe[1], args.quick)))
        return 0
    steps = args.steps or (3 if args.quick else 9)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    table = QUICK if args.quick else MODELS
    default = "" if args.model and args.models is None else ",".join(MODELS)
    unknown = [n for n in (args.models or default).split(",") if n and n not in table]
    if unknown:
        p.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)} or use --model")
    configs = {n: dict(table[n]) for n in (args.models or default).split(",") if n} | dict(args.model)
    results: dict[str, Any] = {"quick": args.quick, "warmup": warmup, "models": {}}
    for name, cfg in configs.items():
        t = time.perf_counter()
        r = results["models"][name] = run_model(name, cfg, warmup, steps)
        r["memory"] = {
            env: {v: run_probe(cfg, v, args.quick, env == "mmap_threshold_1MiB") for v in PROBED}
            for env in ("default_malloc", "mmap_threshold_1MiB")
            if not args.quick or name == "heavy_mlp"
        }
        print(f"[{name}: {time.perf_counter() - t:.0f} s]", flush=True)
    report(results)
    write_json(args.out, results)
    save_plot(args.out, lambda plt: plot(plt, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
