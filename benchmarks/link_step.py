"""Offload over an emulated device link: what each selection policy costs and saves.

On a GPU a copy over PCIe is slow next to the compute (an H200 runs a large transformer
layer in about 0.5 ms; its saved tensors take about 8 ms over a 50 GB/s link: K = 16).
Here the link emulator (``link_gbps``, NOTE [Link emulator]) restores that ratio: the
rate is set from this machine's measured layer time and saved bytes per layer so that
copying a layer's saved bytes takes K times its forward compute.

Side by side in one run, steps interleaved round-robin: no offload, plain activation
checkpointing (``torch.utils.checkpoint`` per layer), and STORM's ``all``, ``budget``
and ``checkpoint`` at several K. For each: median step time, the heap bytes live at
the end of forward (this CPU's "device memory": glibc's allocated bytes, large tensors
being their own mappings), bytes offloaded per step, and bytes still being copied when
forward ends. Targets (docs/benchmarks.md, "Over an emulated link"):

* ``budget`` <= 1.05 x no-offload step time, offloading >= 80 % of what the link can
  hide (``bandwidth x forward layer time``, from the measured figures);
* ``checkpoint`` <= 1.05 x plain checkpointing, with >= 80 % of the checkpointed inputs'
  bytes off the device at the end of forward;
* ``all`` ends forward with no more than ``max_inflight_layers`` layers still copying.

    .venv/bin/python -m benchmarks.link_step [--steps N] [--ks 4,16,64] [--layers 8]
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import time
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from benchmarks.common import median, print_table, target, write_json
from client import StormSystem, offload_saved_tensors
from client.selection import WARMUP_STEPS, profile_for
from worker.embedded import EmbeddedDaemon

WINDOW = 2
KEEP_LAST = 1
"""As on a GPU: the last layer's activations stay, since backward needs them first."""


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


_libc = ctypes.CDLL(None)
_libc.mallinfo2.restype = _MallInfo2


def heap_bytes() -> int:
    """Bytes malloc has handed out and not taken back (arenas plus its own mappings)."""
    info = _libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


class Block(nn.Module):
    """A decoder block as large language models have it: RMSNorm, causal attention, SwiGLU."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        hidden = 8 * width // 3
        self.attn_norm = nn.RMSNorm(width)
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.out = nn.Linear(width, width, bias=False)
        self.mlp_norm = nn.RMSNorm(width)
        self.gate = nn.Linear(width, hidden, bias=False)
        self.up = nn.Linear(width, hidden, bias=False)
        self.down = nn.Linear(hidden, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, width = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(batch, seq, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attn = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(attn.transpose(1, 2).reshape(batch, seq, width))
        h = self.mlp_norm(x)
        return x + self.down(nn.functional.silu(self.gate(h)) * self.up(h))


def build(layers: int, width: int, heads: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[Block(width, heads) for _ in range(layers)])


class Variant:
    """One way to run the step; records step time, end-of-forward heap and copies in flight."""

    def __init__(self, name: str, model: nn.Sequential, system: StormSystem | None, select: str | None) -> None:
        self.name = name
        self.model = model
        self.system = system
        self.select = select
        self.times: list[float] = []
        self.heap: list[int] = []
        self.inflight: list[int] = []
        self.offloaded: list[int] = []
        self.layer_max: int = 0
        """The most one layer offloaded in a step."""
        self.losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.name == "plain checkpoint":  # every layer but the last, as STORM's with KEEP_LAST
            h = x
            for index, layer in enumerate(self.model):
                h = layer(h) if index >= len(self.model) - KEEP_LAST else checkpoint(layer, h, use_reentrant=False)
            return h
        return self.model(x)

    def step(self, x: torch.Tensor, record: bool) -> None:
        base = heap_bytes()
        started = time.perf_counter()
        offloaded = 0
        if self.system is None:
            out = self.forward(x)
        else:
            with offload_saved_tensors(self.system, module=self.model, select=self.select, min_bytes=0) as moved:
                out = self.forward(x)
            offloaded = moved.offloaded_bytes
            self.layer_max = max(self.layer_max, *moved.layer_bytes.values(), 0)
        end_heap = heap_bytes() - base
        inflight = self.system.inflight_bytes() if self.system is not None else 0
        loss = out.square().mean()
        loss.backward()
        for p in self.model.parameters():
            p.grad = None
        elapsed = time.perf_counter() - started
        if record:
            self.times.append(elapsed)
            self.heap.append(end_heap)
            self.inflight.append(inflight)
            self.offloaded.append(offloaded)
            self.losses.append(float(loss.detach()))


def calibrate(model: nn.Sequential, x: torch.Tensor, daemon: EmbeddedDaemon) -> dict[str, float]:
    """Forward seconds per layer and saved bytes per layer, no offload (median of 3)."""
    times = []
    for _ in range(3):
        started = time.perf_counter()
        with torch.no_grad():
            h = x
            for layer in model:
                h = layer(h)
        times.append((time.perf_counter() - started) / len(model))
    with StormSystem(daemon.endpoint, name="calibrate") as system:
        with offload_saved_tensors(system, module=model, min_bytes=0) as moved:
            loss = model(x).square().mean()
        loss.backward()
        model.zero_grad(set_to_none=True)
    per_layer = moved.offloaded_bytes / len(model)
    return {"layer_s": median(times), "saved_per_layer": per_layer, "input_per_layer": x.numel() * x.element_size()}


def run(
    layers: int, width: int, heads: int, batch: int, seq: int, ks: list[float], steps: int, warmup: int
) -> dict[str, Any]:
    x = torch.randn(batch, seq, width)
    base_model = build(layers, width, heads)
    pool = f"{max(512, int(3 * layers * width * seq * batch * 4 * 12 / 2**20))}MiB"
    with EmbeddedDaemon(pool) as daemon:
        cal = calibrate(base_model, x, daemon)
        systems: list[StormSystem] = []
        variants = [Variant("no offload", build(layers, width, heads), None, None)]
        variants.append(Variant("plain checkpoint", build(layers, width, heads), None, None))
        gbps_of: dict[float, float] = {}
        try:
            for k in ks:
                gbps = cal["saved_per_layer"] / (k * cal["layer_s"]) / 1e9
                gbps_of[k] = gbps
                for select in ("all", "budget", "checkpoint"):
                    system = StormSystem(
                        daemon.endpoint,
                        name=f"{select}-K{k:g}",
                        link_gbps=gbps,
                        max_inflight_layers=WINDOW,
                        keep_last_layers=KEEP_LAST,
                    )
                    systems.append(system)
                    variants.append(Variant(f"{select} K={k:g}", build(layers, width, heads), system, select))
            for _ in range(warmup):  # budget measures its layers in the first WARMUP_STEPS
                for variant in variants:
                    variant.step(x, record=False)
            for _ in range(steps):
                for variant in variants:
                    variant.step(x, record=True)
            bounds = {v.name: _hideable(v) for v in variants if v.select == "budget" and v.system is not None}
        finally:
            for system in systems:
                system.close()
    return {"calibration": cal, "gbps": gbps_of, "variants": variants, "bounds": bounds, "ks": ks}


def _hideable(variant: Variant) -> float:
    """Bytes per forward the link can carry behind the measured layer times but the last's
    (NOTE [Offload budget]): the measured bandwidth times their sum."""
    assert variant.system is not None
    stats = variant.system.transfer_stats()
    bandwidth = stats.copy_out_bytes / max(stats.copy_out_s, 1e-9)
    profile = profile_for(variant.model)
    return bandwidth * sum(seconds for name, seconds in profile.layer_s.items() if name != profile.last)


def report(result: dict[str, Any], layers: int) -> dict[str, Any]:
    variants: list[Variant] = result["variants"]
    cal = result["calibration"]
    by_name = {v.name: v for v in variants}
    none_s = median(by_name["no offload"].times)
    ckpt_s = median(by_name["plain checkpoint"].times)
    rows = []
    out_rows = []
    for v in variants:
        step = median(v.times)
        ref = ckpt_s if "checkpoint" in v.name else none_s
        row = {
            "variant": v.name,
            "step_ms": step * 1e3,
            "ratio": step / ref,
            "vs": "plain checkpoint" if "checkpoint" in v.name else "no offload",
            "end_forward_heap_MiB": median(v.heap) / 2**20,
            "offloaded_MiB": median(v.offloaded) / 2**20,
            "inflight_MiB": median(v.inflight) / 2**20,
        }
        out_rows.append(row)
        rows.append([row[key] for key in row])
    print_table(list(out_rows[0]), rows, title="Step over an emulated link (medians; ratio against the column 'vs')")
    targets = []
    for k in result["ks"]:
        budget = by_name[f"budget K={k:g}"]
        bound = result["bounds"][budget.name]
        share = median(budget.offloaded) / bound if bound else 0.0
        ratio = median(budget.times) / none_s
        print(f"K={k:g}: link {result['gbps'][k]:.3f} GB/s; budget hides at most {bound / 2**20:.1f} MiB per forward")
        targets.append(
            target(
                f"budget K={k:g}: <= 1.05 x no offload, >= 80 % of hideable",
                ratio <= 1.05 and share >= 0.8,
                f"{ratio:.3f} x, {share * 100:.0f} % of {bound / 2**20:.1f} MiB",
            )
        )
        ck = by_name[f"checkpoint K={k:g}"]
        ck_ratio = median(ck.times) / ckpt_s
        off = 1 - median(ck.inflight) / max(median(ck.offloaded), 1)
        targets.append(
            target(
                f"checkpoint K={k:g}: <= 1.05 x plain checkpoint, >= 80 % of inputs off at end of forward",
                ck_ratio <= 1.05 and off >= 0.8,
                f"{ck_ratio:.3f} x, {off * 100:.0f} % off",
            )
        )
        al = by_name[f"all K={k:g}"]
        window_bytes = WINDOW * al.layer_max
        targets.append(
            target(
                f"all K={k:g}: copying at end of forward <= {WINDOW} layers",
                max(al.inflight) <= window_bytes,
                f"max {max(al.inflight) / 2**20:.1f} MiB, bound {window_bytes / 2**20:.1f} MiB",
            )
        )
    losses_equal = all(v.losses == by_name["no offload"].losses for v in variants if "checkpoint" not in v.name)
    targets.append(target("losses equal no offload (all, budget)", losses_equal, "bitwise, every measured step"))
    return {"calibration": cal, "gbps": result["gbps"], "rows": out_rows, "targets": targets, "layers": layers}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=WARMUP_STEPS + 1)
    parser.add_argument("--ks", default="4,16,64", help="link slowness factors K (copy time / compute time)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args(argv)
    ks = [float(k) for k in args.ks.split(",")]
    result = run(args.layers, args.width, args.heads, args.batch, args.seq, ks, args.steps, args.warmup)
    write_json("link_step", report(result, args.layers))
    _plot(result)
    return 0


def _plot(result: dict[str, Any]) -> None:
    from benchmarks.common import save_plot

    variants: list[Variant] = result["variants"]

    def draw(plt: Any) -> None:
        _, ax = plt.subplots(figsize=(7, 4))
        for select in ("all", "budget", "checkpoint"):
            points = [
                (median(v.offloaded) / 2**20, median(v.times) * 1e3, v.name.split("=")[1])
                for v in variants
                if v.name.startswith(select + " ")
            ]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=select)
            for mib, ms, k in points:
                ax.annotate(f"K={k}", (mib, ms), fontsize=7)
        for v in variants[:2]:
            ax.axhline(median(v.times) * 1e3, linestyle="--", linewidth=0.8, label=v.name)
        ax.set_xlabel("MiB offloaded per step")
        ax.set_ylabel("step ms (median)")
        ax.legend(fontsize=7)

    save_plot("link_step", draw)


if __name__ == "__main__":
    sys.exit(main())
