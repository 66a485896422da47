"""Training through the disk tier: step time, exact gradients, and spill and restore against the disk's own pace.

For each model (benchmarks/step_time.py's builders), one run with a pool large enough
for everything measures the activation bytes a step offloads (``offloaded_bytes``).
Then, side by side in one process, steps interleaved round-robin on identical model
copies fed identical batches:

  none   no STORM
  P %    STORM against a daemon of its own with the disk tier (``--spill-dir``, high
         water 50 %), the pool P % of those bytes (a multiple of 16 MiB, at least 16 MiB)

Every step of every case (the warm-up and the plot step too) compares the loss and each
gradient with the no-STORM copy's by ``torch.equal``. From each daemon's ``stats``:
bytes spilled and read back per measured step, the restore hit rate (extents read back
before their fetch / all extents read back that a fetch asked for) and the tier's spill
and restore rates (bytes over the wall time some I/O of the kind was in flight: ``Busy``
in storm_service/disk/held.py), against ``raw_throughput`` of the same directory for
as many bytes as the tier wrote, measured after the steps.

The throughput cases isolate the tier from training: 512 MiB of 4 MiB tensors offloaded
as fast as one client can, spilled past 25 % of the pool, then fetched newest first (each
checked), against raw_throughput of the same bytes measured just before. In a 64 MiB
pool the client waits for the room the spills make; in a pool that holds all of it
(576 MiB) it never waits, and up to SPILL_IN_FLIGHT_BYTES (storm_service/disk/spill.py) are
queued for the disk. One
step of the smallest pool is sampled (host and disk bytes, every few ms) for docs/spill.png.

    .venv/bin/python -m benchmarks.spill [--steps N] [--models heavy_mlp,transformer]
        [--fractions 1,0.5,0.25] [--spill-dir DIR] [--out spill] [--plot docs/spill.png]
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import torch
from torch import nn

from benchmarks.common import MiB, cpu_seconds, median, print_table, target, write_json
from benchmarks.step_time import MODELS, build, parse_model, storm_setup
from client import StormSystem, offload_saved_tensors
from client.transport import connect
from storm_service.disk.raw import raw_throughput
from storm_service.protocol import Op
from worker.embedded import EmbeddedDaemon, daemon_answers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLAB_BYTES = 16 << 20
"""Pools are whole multiples of this: the smallest slab."""
HIGH_WATER = "50%"
TARGET_SHARE = 0.8
"""The tier's spill and restore rates against raw (issue 14)."""
_PR_SET_PDEATHSIG = 1


# -- a daemon with the disk tier ------------------------------------------------------


def _die_with(parent: int) -> None:
    """In the child, before exec: SIGTERM when the benchmark dies (as worker/embedded.py does)."""
    if ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0 or os.getppid() != parent:
        os._exit(1)


class SpillDaemon:
    """``stormd`` with ``--spill-dir`` as a child process on a private ipc socket; SIGTERM on exit."""

    def __init__(self, pool_bytes: int, spill_dir: str, spill_bytes: int, high_water: str = HIGH_WATER) -> None:
        self._dir = tempfile.mkdtemp(prefix="storm-spill-bench-")
        self.endpoint = f"ipc://{os.path.join(self._dir, 'stormd.sock')}"
        self.pool_bytes = pool_bytes
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop)
        args = ["--endpoint", self.endpoint, "--pool-size", f"{pool_bytes >> 20}MiB", "--remove-on-exit", self._dir]
        args += ["--spill-dir", spill_dir, "--spill-size", f"{spill_bytes >> 20}MiB", "--spill-high-water", high_water]
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "storm_service.daemon", *args],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            preexec_fn=functools.partial(_die_with, os.getpid()),
        )
        deadline = time.monotonic() + 30.0
        while not daemon_answers(self.endpoint, timeout_s=0.2):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                log = self.log_tail()
                self.stop()
                raise RuntimeError(f"stormd with a disk tier did not start:\n{log}")

    @property
    def cpu_s(self) -> float:
        """CPU seconds the daemon has used (all its threads)."""
        return cpu_seconds(f"/proc/{self._proc.pid}/stat")

    def stats(self) -> dict[str, Any]:
        """The daemon's ``stats`` (no session: the whole pool and the disk tier)."""
        with connect(self.endpoint) as channel:
            return channel.call(Op.STATS)

    def log_tail(self, lines: int = 20) -> str:
        self._log.flush()
        self._log.seek(0)
        return b"\n".join(self._log.read().splitlines()[-lines:]).decode(errors="replace")

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(10.0)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._log.close()
        shutil.rmtree(self._dir, ignore_errors=True)


def pool_for(fraction: float, activation_bytes: int) -> int:
    """``fraction`` of a step's activation bytes, rounded up to whole slabs, at least one."""
    return max(SLAB_BYTES, math.ceil(fraction * activation_bytes / SLAB_BYTES) * SLAB_BYTES)


# -- training -------------------------------------------------------------------------


class Runner:
    """One case's model, optimizer, data and (except ``none``) session and the daemon it closes with."""

    def __init__(
        self, name: str, cfg: dict[str, Any], system: StormSystem | None, daemon: SpillDaemon | None = None
    ) -> None:
        self.name, self.system, self.daemon = name, system, daemon
        self.model, self.layers, self.data = build(cfg)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-4)
        self.times: list[float] = []
        self.exact: list[bool] = []

    def step(self, record: bool) -> tuple[list[torch.Tensor], tuple[float, float, float]]:
        """One step; returns [loss, *gradients] and when it started, its forward ended, and it ended."""
        x, y = self.data.next(torch.device("cpu"))
        started = time.perf_counter()
        if self.system is None:
            loss = nn.functional.mse_loss(self.model(x), y)
        else:
            with offload_saved_tensors(self.system, module=self.layers):
                loss = nn.functional.mse_loss(self.model(x), y)
        forward_end = time.perf_counter()
        loss.backward()
        # SGD without momentum or decay leaves the gradients alone, and zero_grad(set_to_none)
        # drops them from the parameters only: holding them here copies nothing.
        result = [loss.detach()] + [p.grad for p in self.model.parameters() if p.grad is not None]
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.system is not None:
            self.system.flush()  # no STORM work runs into the next case's step
        ended = time.perf_counter()
        if record:
            self.times.append(ended - started)
        return result, (started, forward_end, ended)

    def close(self) -> None:
        try:
            if self.system is not None:
                self.system.close()
        finally:
            if self.daemon is not None:
                self.daemon.stop()


def activation_bytes(cfg: dict[str, Any]) -> int:
    """Bytes one step offloads, from a run with a pool large enough for all of them (the second step)."""
    pool_bytes, _, _ = storm_setup(cfg)
    with EmbeddedDaemon(f"{pool_bytes >> 20}MiB") as daemon, StormSystem(daemon.endpoint, name="measure") as system:
        runner = Runner("measure", cfg, system)
        runner.step(record=False)
        before = system.stats().offloaded_bytes
        runner.step(record=False)
        return system.stats().offloaded_bytes - before


def same(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> bool:
    return len(ours) == len(theirs) and all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


class Sampler:
    """Host and disk bytes of a daemon, from its ``stats`` every ``interval_s``, on a thread."""

    def __init__(self, daemon: SpillDaemon, interval_s: float = 0.005) -> None:
        self.daemon, self.interval_s = daemon, interval_s
        self.samples: list[tuple[float, int, int, int, int]] = []
        """(perf_counter s, host bytes used, host bytes reserved, disk bytes used, bytes being spilled)"""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="spill-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with connect(self.daemon.endpoint) as channel:
            while not self._stop.is_set():
                s = channel.call(Op.STATS)
                tiers = s["used_bytes"], s["reserved_bytes"], s["disk_used_bytes"], s["spilling_bytes"]
                self.samples.append((time.perf_counter(), *tiers))
                self._stop.wait(self.interval_s)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


_DISK_FIELDS = ("spilled_total_bytes", "restored_total_bytes", "restore_hits", "restore_waits", "evicted_ahead")


def run_model(name: str, cfg: dict[str, Any], fractions: list[float], steps: int, spill_dir: str) -> dict[str, Any]:
    need = activation_bytes(cfg)
    spill_bytes = max(256 << 20, math.ceil(2 * need / SLAB_BYTES) * SLAB_BYTES)
    print(f"{name}: {need / MiB:.0f} MiB offloaded per step", flush=True)
    runners = [Runner("none", cfg, None)]
    try:
        for fraction in fractions:
            daemon = SpillDaemon(pool_for(fraction, need), spill_dir, spill_bytes)
            try:
                system = StormSystem(daemon.endpoint, name=f"spill-{fraction:.0%}")
            except BaseException:
                daemon.stop()
                raise
            runners.append(Runner(f"{fraction:.0%}", cfg, system, daemon))
        reference, *cases = runners

        def round_robin(record: bool) -> None:
            theirs, _ = reference.step(record)
            for runner in cases:
                ours, _ = runner.step(record)
                runner.exact.append(same(ours, theirs))

        round_robin(record=False)  # warm-up: the client learns its layers' reservations
        before = {r.name: r.daemon.stats() for r in cases if r.daemon}
        for _ in range(steps):
            round_robin(record=True)
        after = {r.name: r.daemon.stats() for r in cases if r.daemon}
        kept = {r.name: r.system.stats().kept_tensors for r in cases if r.system}
        # One more step of the smallest pool, sampled: bytes per tier over a step (not timed).
        smallest = cases[fractions.index(min(fractions))]
        assert smallest.daemon is not None
        theirs, _ = reference.step(record=False)
        sampler = Sampler(smallest.daemon)
        try:
            ours, (step_start, forward_end, ended) = smallest.step(record=False)
        finally:
            sampler.close()
        smallest.exact.append(same(ours, theirs))
        final = {r.name: r.daemon.stats() for r in cases if r.daemon}
    finally:
        for runner in runners:
            runner.close()
    none_s = median(reference.times)
    out: dict[str, Any] = {"config": cfg, "activation_bytes": need, "spill_bytes": spill_bytes, "steps": steps}
    out["cases"] = {"none": {"median_s": none_s, "all_s": reference.times}}
    for runner in cases:
        assert runner.daemon is not None
        delta = {k: after[runner.name][k] - before[runner.name][k] for k in _DISK_FIELDS}
        asked = delta["restore_hits"] + delta["restore_waits"]
        written = final[runner.name]["spilled_total_bytes"]
        raw = raw_throughput(spill_dir, max(written, 1 << 20)) if written else None
        spill_rate, restore_rate = (final[runner.name][k] for k in ("spill_bytes_per_s", "restore_bytes_per_s"))
        out["cases"][runner.name] = {
            "pool_bytes": runner.daemon.pool_bytes,
            "median_s": median(runner.times),
            "all_s": runner.times,
            "ratio_to_none": median(runner.times) / none_s,
            "exact_every_step": all(runner.exact),
            "exact": runner.exact,
            "spilled_bytes_per_step": delta["spilled_total_bytes"] / steps,
            "restored_bytes_per_step": delta["restored_total_bytes"] / steps,
            "restore_hits": delta["restore_hits"],
            "restore_waits": delta["restore_waits"],
            "restore_hit_rate": delta["restore_hits"] / asked if asked else None,
            "evicted_ahead": delta["evicted_ahead"],
            "kept_tensors": kept[runner.name],
            "spill_gb_s": spill_rate / 1e9,
            "restore_gb_s": restore_rate / 1e9,
            "tier_written_bytes": written,
            "raw": vars(raw) if raw else None,
            "spill_share_of_raw": spill_rate / 1e9 / raw.write_gb_s if raw else None,
            "restore_share_of_raw": restore_rate / 1e9 / raw.read_gb_s if raw and restore_rate else None,
            "disk_left": {k: final[runner.name][k] for k in ("used_bytes", "disk_used_bytes", "spill_errors")},
        }
    out["tier_samples"] = {
        "case": smallest.name,
        "pool_bytes": smallest.daemon.pool_bytes,
        "high_water_bytes": final[smallest.name]["high_water_bytes"],
        "forward_end_s": forward_end - step_start,
        "step_end_s": ended - step_start,
        "samples_are": ["s into the step", "used_bytes", "reserved_bytes", "disk_used_bytes", "spilling_bytes"],
        "samples": [(t - step_start, *tiers) for t, *tiers in sampler.samples],
    }
    return out


# -- the tier alone -------------------------------------------------------------------


def throughput(spill_dir: str, total_bytes: int, tensor_bytes: int, pool_bytes: int) -> dict[str, Any]:
    """Offload ``total_bytes`` in tensors of ``tensor_bytes`` into a small pool that spills past 25 %,
    wait for the spills, fetch them all newest first (checking each), and compare the tier's rates
    with raw_throughput of the same bytes measured just before."""
    raw = raw_throughput(spill_dir, total_bytes)
    daemon = SpillDaemon(pool_bytes, spill_dir, total_bytes + pool_bytes, high_water="25%")
    count = total_bytes // tensor_bytes
    try:
        with StormSystem(daemon.endpoint, name="spill-throughput") as system:
            cpu = [daemon.cpu_s, time.process_time()]
            started = time.perf_counter()
            handles = [system.offload(torch.full((tensor_bytes // 4,), float(i))) for i in range(count)]
            system.flush()
            offloaded = time.perf_counter()
            deadline = time.monotonic() + 120.0
            while (s := daemon.stats())["spilling_bytes"] or s["used_bytes"] > s["high_water_bytes"]:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"throughput: spills did not settle within 120 s: {s}")
                time.sleep(0.01)
            settled = time.perf_counter()
            cpu += [daemon.cpu_s, time.process_time()]
            spilled = daemon.stats()
            wrong = 0
            fetch_started = time.perf_counter()
            for i in reversed(range(count)):
                tensor = system.fetch(handles[i])
                wrong += int(not bool(tensor.eq(float(i)).all()))
                system.free(handles[i])
            system.flush()
            fetched = time.perf_counter()
            cpu += [daemon.cpu_s, time.process_time()]
            kept = system.stats().kept_tensors
        done = daemon.stats()
    finally:
        daemon.stop()
    asked = done["restore_hits"] + done["restore_waits"]
    return {
        "total_bytes": total_bytes,
        "tensor_bytes": tensor_bytes,
        "pool_bytes": pool_bytes,
        "raw": vars(raw),
        "spilled_bytes": spilled["spilled_total_bytes"],
        "restored_bytes": done["restored_total_bytes"],
        "spill_gb_s": spilled["spill_bytes_per_s"] / 1e9,
        "restore_gb_s": done["restore_bytes_per_s"] / 1e9,
        "spill_share_of_raw": spilled["spill_bytes_per_s"] / 1e9 / raw.write_gb_s,
        "restore_share_of_raw": done["restore_bytes_per_s"] / 1e9 / raw.read_gb_s,
        "offload_wall_s": offloaded - started,
        "settle_wall_s": settled - offloaded,
        "fetch_wall_s": fetched - fetch_started,
        "spill_phase_cpu_s": {"daemon": cpu[2] - cpu[0], "client": cpu[3] - cpu[1]},
        "fetch_phase_cpu_s": {"daemon": cpu[4] - cpu[2], "client": cpu[5] - cpu[3]},
        "restore_hit_rate": done["restore_hits"] / asked if asked else None,
        "restore_waits": done["restore_waits"],
        "kept_tensors": kept,
        "wrong_tensors": wrong,
        "evicted_ahead": done["evicted_ahead"],
    }


# -- report ---------------------------------------------------------------------------


def report(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, r in results["models"].items():
        for case, c in r["cases"].items():
            if case == "none":
                rows.append([name, case, None, c["median_s"], 1.0, *[None] * 10])
                continue
            rows.append(
                [
                    name,
                    case,
                    c["pool_bytes"] / MiB,
                    c["median_s"],
                    c["ratio_to_none"],
                    c["exact_every_step"],
                    c["spilled_bytes_per_step"] / MiB,
                    c["restored_bytes_per_step"] / MiB,
                    c["restore_hit_rate"],
                    c["restore_waits"],
                    c["evicted_ahead"],
                    c["spill_gb_s"],
                    c["restore_gb_s"],
                    f"{c['raw']['write_gb_s']:.2f}/{c['raw']['read_gb_s']:.2f}" if c["raw"] else None,
                    c["kept_tensors"],
                ]
            )
    headers = ["model", "case", "pool MiB", "step s", "/none", "exact", "spill MiB/st", "restore MiB/st"]
    headers += ["hit rate", "waits", "evicted", "spill GB/s", "restore GB/s", "raw w/r GB/s", "kept"]
    print_table(headers, rows, title="Training through the disk tier (medians; exact = torch.equal at every step)")
    targets = []
    inexact = [(n, case) for n, r in results["models"].items() for case, c in r["cases"].items() if case != "none"]
    inexact = [(n, case) for n, case in inexact if not results["models"][n]["cases"][case]["exact_every_step"]]
    if inexact:
        print(f"\n!!! GRADIENTS DIFFER from no STORM in {inexact}: see 'exact' per step in the JSON !!!\n")
    targets.append(target("loss and every gradient torch.equal to no STORM, every step", not inexact, str(inexact)))
    for t in results["throughput"]:
        pool = f"pool {t['pool_bytes'] / MiB:.0f} MiB"
        print(
            f"\nThe tier alone: {t['total_bytes'] / MiB:.0f} MiB in {t['tensor_bytes'] / MiB:.0f} MiB tensors, "
            f"{pool} (high water 25 %), {t['spilled_bytes'] / MiB:.0f} MiB spilled\n"
            f"  raw O_DIRECT write {t['raw']['write_gb_s']:.2f} GB/s, read {t['raw']['read_gb_s']:.2f} GB/s\n"
            f"  tier spill {t['spill_gb_s']:.2f} GB/s ({t['spill_share_of_raw']:.1%} of raw), "
            f"restore {t['restore_gb_s']:.2f} GB/s ({t['restore_share_of_raw']:.1%} of raw)\n"
            f"  wall: offload {t['offload_wall_s']:.2f} s, spills settle {t['settle_wall_s']:.2f} s more, "
            f"fetch all {t['fetch_wall_s']:.2f} s; hit rate {t['restore_hit_rate']}, kept {t['kept_tensors']}, "
            f"wrong {t['wrong_tensors']}\n"
            f"  CPU s while spilling: daemon {t['spill_phase_cpu_s']['daemon']:.2f}, client "
            f"{t['spill_phase_cpu_s']['client']:.2f}; while fetching: daemon {t['fetch_phase_cpu_s']['daemon']:.2f}, "
            f"client {t['fetch_phase_cpu_s']['client']:.2f}"
        )
        for kind, share in (("spill", t["spill_share_of_raw"]), ("restore", t["restore_share_of_raw"])):
            targets.append(
                target(f"the tier alone, {pool}: {kind} >= 80 % of raw", share >= TARGET_SHARE, f"{share:.1%}")
            )
        targets.append(
            target(
                f"the tier alone, {pool}: every tensor fetched equal",
                t["wrong_tensors"] == 0,
                f"{t['wrong_tensors']} wrong",
            )
        )
    for name, r in results["models"].items():
        for case, c in r["cases"].items():
            if case != "none" and c["raw"]:
                shares = (c["spill_share_of_raw"], c["restore_share_of_raw"])
                detail = ", ".join("-" if s is None else f"{s:.1%}" for s in shares)
                ok = None if None in shares else all(s >= TARGET_SHARE for s in shares)
                targets.append(target(f"{name} {case}: spill, restore >= 80 % of raw", ok, detail))
    return targets


def plot(path: str, models: dict[str, Any]) -> str | None:
    """One panel per model: host and disk bytes over the sampled step of its smallest pool."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: skipped {path} (the samples are in the JSON)")
        return None
    _, axes = plt.subplots(len(models), 1, figsize=(7, 3 * len(models)), squeeze=False)
    for ax, (name, result) in zip(axes[:, 0], models.items(), strict=True):
        samples = result["tier_samples"]
        points = samples["samples"]
        ms = [p[0] * 1e3 for p in points]
        ax.plot(ms, [p[1] / MiB for p in points], label="host pool used")
        ax.plot(ms, [p[2] / MiB for p in points], label="host pool reserved", linewidth=0.8)
        ax.plot(ms, [p[3] / MiB for p in points], label="disk used")
        ax.plot(ms, [p[4] / MiB for p in points], label="being spilled", linewidth=0.8)
        ax.axhline(samples["pool_bytes"] / MiB, color="grey", linestyle="--", linewidth=0.8, label="pool")
        ax.axhline(samples["high_water_bytes"] / MiB, color="grey", linestyle=":", linewidth=0.8, label="high water")
        ax.axvline(samples["forward_end_s"] * 1e3, color="black", linewidth=0.8, label="forward ends")
        ax.set_xlim(0, samples["step_end_s"] * 1e3)
        ax.set_xlabel("ms into the step")
        ax.set_ylabel("MiB")
        activations = result["activation_bytes"] / MiB
        ax.set_title(f"{name}: {activations:.0f} MiB of activations, pool {samples['case']} of it", fontsize=9)
        ax.legend(fontsize=7, loc="upper right")
    plt.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    plt.savefig(path, dpi=80)
    plt.close("all")
    print(f"wrote {os.path.relpath(path)}")
    return path


def _commit() -> str:
    """HEAD, with ``+dirty`` where tracked files differ from it (the code this run measured)."""
    head = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", REPO, "diff", "--quiet", "HEAD"], capture_output=True).returncode
    return head.stdout.strip() + ("+dirty" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4, help="measured steps per case, after one warm-up (default 4)")
    p.add_argument("--models", default=None, help="comma-separated subset of " + ",".join(MODELS))
    p.add_argument(
        "--model",
        action="append",
        default=[],
        type=parse_model,
        metavar="KIND:KEY=N,...",
        help="another model, as benchmarks.step_time takes it (repeatable; alone, only these run)",
    )
    p.add_argument("--fractions", default="1,0.5,0.25", help="pool sizes, as fractions of a step's activation bytes")
    p.add_argument(
        "--spill-dir",
        default=os.path.join(REPO, "benchmarks", "results", "spill-tmp"),
        help="made for the run (mode 0700), removed after; must not exist (default benchmarks/results/spill-tmp)",
    )
    p.add_argument("--throughput-bytes", default=512, type=int, help="MiB the throughput cases move (0: skip them)")
    p.add_argument("--out", default="spill", help="results/<OUT>.json (default spill)")
    p.add_argument("--plot", default=os.path.join(REPO, "docs", "spill.png"), help="bytes per tier over a step")
    args = p.parse_args(argv)
    names = (args.models if args.models is not None else "" if args.model else "heavy_mlp,transformer").split(",")
    unknown = [n for n in names if n and n not in MODELS]
    if unknown:
        p.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)} or use --model")
    configs = {n: dict(MODELS[n]) for n in names if n} | dict(args.model)
    fractions = [float(f) for f in args.fractions.split(",")]
    args.spill_dir = os.path.abspath(args.spill_dir)  # stormd takes absolute paths only
    if os.path.exists(args.spill_dir):
        p.error(f"--spill-dir {args.spill_dir} exists: the run makes it and removes it after")
    os.makedirs(args.spill_dir, mode=0o700)
    fs = subprocess.run(["df", "-T", args.spill_dir], capture_output=True, text=True).stdout.splitlines()[-1].split()
    results: dict[str, Any] = {"spill_dir": args.spill_dir, "filesystem": fs[:2], "high_water": HIGH_WATER}
    results["fractions"], results["models"], results["throughput"] = fractions, {}, []
    results["load_average_start"] = os.getloadavg()
    results["commit"] = _commit()
    started = time.perf_counter()
    try:
        total_bytes = args.throughput_bytes << 20
        for pool_bytes in (64 << 20, total_bytes + (64 << 20)) if total_bytes else ():
            t = time.perf_counter()
            results["throughput"].append(throughput(args.spill_dir, total_bytes, 4 << 20, pool_bytes))
            print(f"[throughput, pool {pool_bytes >> 20} MiB: {time.perf_counter() - t:.0f} s]", flush=True)
        for name, cfg in configs.items():
            t = time.perf_counter()
            results["models"][name] = run_model(name, cfg, fractions, args.steps, args.spill_dir)
            print(f"[{name}: {time.perf_counter() - t:.0f} s]", flush=True)
        left = os.listdir(args.spill_dir)
        results["left_in_spill_dir"] = left
    finally:
        shutil.rmtree(args.spill_dir, ignore_errors=True)
    results["wall_s"] = time.perf_counter() - started
    results["load_average_end"] = os.getloadavg()
    results["targets"] = report(results)
    if left:
        print(f"!!! the spill directory was not empty after the run: {left}")
    write_json(args.out, results)
    if results["models"]:
        plot(args.plot, results["models"])
    print(f"all done in {results['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
