"""Tables, PASS/FAIL lines and the plot of benchmarks.step_time (kept apart to keep that script short)."""

from __future__ import annotations

from typing import Any

from benchmarks.common import MiB, print_table, target

VARIANTS = ("a", "b", "c", "d")
NAMES = {"a": "no offload", "b": "save_on_cpu", "c": "copy floor", "d": "STORM"}


def report(results: dict[str, Any]) -> None:
    models = results["models"]
    rows = []
    for name, r in models.items():
        m = r["median_s"]
        rows.append([name, *(m[v] for v in VARIANTS), r["ratio_d_c"], r["ratio_d_a"], r["ratio_b_a"]])
    print_table(["model", *(f"{v} {NAMES[v]} s" for v in VARIANTS), "d/c", "d/a", "b/a"], rows, "median step time")
    rows = [
        [
            name,
            r["storm_offloaded_bytes_per_step"] / MiB,
            r["floor_copied_bytes_per_step"] / MiB,
            r["offloaded_tensors_per_step"],
            r["config"]["layers"],
            r["blocking_round_trips_per_step"],
            r["offload_round_trips_per_step"],
            r["fetch_round_trips_per_step"],
            r["prefetch_hit_rate"],
            r["fetch_wait_s_per_step"] * 1e3,
            r["median_fwd_s"]["c"],
            r["median_fwd_s"]["d"],
            r["median_bwd_s"]["c"],
            r["median_bwd_s"]["d"],
            r["max_abs_loss_diff_d_a"],
        ]
        for name, r in models.items()
    ]
    heads = ["model", "STORM MiB/step", "floor MiB/step", "tensors/step", "layers", "blocking RT/step"]
    heads += ["offload RT/step", "fetch RT/step", "hit rate"]
    heads += ["fetch wait ms", "fwd c s", "fwd d s", "bwd c s", "bwd d s", "|loss d-a|"]
    print_table(heads, rows, "STORM traffic (per measured step)")
    rows = [
        [
            name,
            *(r["median_process_cpu_s"][v] for v in VARIANTS),
            r["transfer_thread_cpu_s_per_step"],
            r["daemon_cpu_s_per_step"],
        ]
        for name, r in models.items()
    ]
    heads = ["model", *(f"cpu {v} s" for v in VARIANTS), "d: transfer thread s", "d: stormd s"]
    print_table(heads, rows, "CPU seconds per step (process: all threads; stormd is extra, in its own process)")
    rows = []
    probed = [v for v in VARIANTS if any(v in mem for r in models.values() for mem in r["memory"].values())]
    for name, r in models.items():
        for env, mem in r["memory"].items():
            rows.append([name, env, *(mem[v]["fwd_peak_growth"] / MiB for v in probed)])
            rows[-1] += [mem[v]["bwd_peak_growth"] / MiB for v in probed]
            rows[-1] += [(mem[v]["base"] + mem[v]["fwd_peak_growth"]) / MiB for v in probed]
            rows[-1] += [mem[v]["step_s"] for v in probed]
    heads = ["model", "malloc", *(f"fwd {v} MiB" for v in probed), *(f"bwd {v} MiB" for v in probed)]
    heads += [*(f"abs fwd peak {v}" for v in probed), *(f"probe {v} s" for v in probed)]
    print_table(heads, rows, "peak private memory (RssAnon) growth over the pre-forward value")
    print()
    checks = []
    for name in ("heavy_mlp", "transformer"):
        if name in models:
            ratio = models[name]["ratio_d_c"]
            checks.append(target(f"{name}: STORM step <= 1.05 x copy floor", ratio <= 1.05, f"d/c = {ratio:.3f}"))
    for name, r in models.items():
        groups = r["config"]["layers"] + 1  # the layers, and what autograd saves outside them
        off, fetch, blocking = (r[f"{k}_round_trips_per_step"] for k in ("offload", "fetch", "blocking"))
        detail = f"blocking {blocking:g}, offload {off:.1f}, fetch {fetch:.1f}; {groups} groups"
        ok = blocking == 0 and max(off, fetch) <= groups
        checks.append(target(f"{name}: no blocking round trip, <= 1 per layer group each way", ok, detail))
    for env, mem in models.get("heavy_mlp", {}).get("memory", {}).items():
        a, d = mem["a"]["fwd_peak_growth"], mem["d"]["fwd_peak_growth"]
        label = f"heavy_mlp ({env}): STORM forward private growth <= 20% of no offload"
        base = f"pre-forward RssAnon {mem['a']['base'] / MiB:.0f} MiB (a) vs {mem['d']['base'] / MiB:.0f} MiB (d)"
        if a < 16 * MiB:  # the no-offload run grew by less than one activation: glibc reused its heap
            checks.append(target(label, None, f"a grew {a / MiB:.1f} MiB, d {d / MiB:.1f} MiB; {base}"))
        else:
            detail = f"{d / MiB:.0f} MiB vs {a / MiB:.0f} MiB = {d / a:.0%}; {base}"
            checks.append(target(label, d <= 0.2 * a, detail))
    results["targets"] = checks


def plot(plt: Any, results: dict[str, Any]) -> None:
    models = results["models"]
    _fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.2
    for i, v in enumerate(VARIANTS):
        xs = [j + (i - 1.5) * width for j in range(len(models))]
        meds = [r["median_s"][v] for r in models.values()]
        lo = [m - min(r["all_s"][v]) for m, r in zip(meds, models.values(), strict=True)]
        hi = [max(r["all_s"][v]) - m for m, r in zip(meds, models.values(), strict=True)]
        ax1.bar(xs, meds, width, yerr=[lo, hi], capsize=2, label=f"{v}: {NAMES[v]}")
    ax1.set_xticks(range(len(models)), [name.replace("_", "\n") for name in models], fontsize=7)
    ax1.set_ylabel("step time, s (median, min-max)")
    ax1.legend(fontsize=8)
    labels: list[str] = []
    growth: dict[str, list[float]] = {}
    for name, r in models.items():
        for env, mem in r["memory"].items():
            labels.append(f"{name.replace('_', chr(10))}\n{'default' if env == 'default_malloc' else 'mmap 1MiB'}")
            for v, probe in mem.items():
                growth.setdefault(v, []).append(probe["fwd_peak_growth"] / MiB)
    xs = list(range(len(labels)))
    bar = 0.8 / max(len(growth), 1)
    for i, (v, values) in enumerate(growth.items()):
        offset = (i - (len(growth) - 1) / 2) * bar
        ax2.bar([x + offset for x in xs], values, bar, label=f"{v}: {NAMES[v]}", color=f"C{VARIANTS.index(v)}")
    ax2.set_xticks(xs, labels, fontsize=7)
    ax2.set_ylabel("peak RssAnon growth in forward, MiB")
    ax2.legend(fontsize=8)
