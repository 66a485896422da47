"""Load and soak: N client processes x M cycles of offload -> fetch -> verify -> free.

    .venv/bin/python -m benchmarks.load [--clients 8] [--cycles 2000] [--pool-size 64MiB] [--seed 0]
    .venv/bin/python -m benchmarks.load --worst-case [--bystanders 2] [--fragments 131072]

Each client is a ``StormSystem(policy="wait")`` in its own process (multiprocessing
"spawn": torch and fork do not mix). A cycle offloads a tensor of random bytes, of a
log-uniform size between 1 KiB and 8 MiB, from a seeded generator; two to four
(a random target each cycle) stay in flight per client, and the oldest is fetched,
compared with ``torch.equal`` and freed. With 8 clients the pool (64 MiB by default)
fills now and then: a full pool makes the engine wait and retry (POOL_FULL replies,
counted by the daemon), never keep the tensor (``kept_tensors`` must stay 0).

Reported: cycles, mismatches, errors by type, the daemon's bytes and sessions left
after every client closed (must be 0 and none), the daemon's VmRSS at start, after
warm-up (10 % of the cycles) and at the end, wall time and cycles/s, and POOL_FULL
replies. ``run_load`` is the core; ``tests/integration/test_load.py`` reuses it.

``--worst-case`` measures instead what one client's heaviest requests cost everyone
else (NOTE [Bounded work per request] in storm_service/sessions.py): bystander processes
ping the daemon every 2 ms and record each round trip while one client fragments the
pool (``--fragments`` one-block extents between as many one-block holes, built by
offloads and frees of 4096 extents each), sends one offload of 4096 sizes of 2 to 8
blocks (none fits a hole), and unregisters with every extent still held. Reported:
the bystanders' ping p50, p99 and max during that pattern (target: p99 under 10 ms), the
worst-case client's time per request, and how long the daemon took to reclaim what it
held. Results: ``benchmarks/results/load_worst_case.json``.
Module-level imports stay torch-free: the spawned clients re-import this module.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import math
import multiprocessing as mp
import os
import random
import sys
import time
import traceback
from typing import Any

from client.transport import Channel
from storm_service.protocol import Op

KiB = 1 << 10
MiB = 1 << 20
MIN_BYTES = 1 * KiB
MAX_BYTES = 8 * MiB
MAX_IN_FLIGHT = 4
MIN_IN_FLIGHT = 2
"""Each cycle a client keeps a random 2 to 4 tensors in flight (enough to fill the pool now and then)."""
ENGINE_COUNTERS = (
    "offloaded_tensors",
    "offloaded_bytes",
    "fetched_tensors",
    "fetched_bytes",
    "prefetch_hits",
    "prefetch_waits",
    "fetch_misses",
    "fetch_wait_s",
    "kept_tensors",
    "kept_bytes",
    "engine_round_trips",
    "offload_round_trips",
    "fetch_round_trips",
    "freed_tensors",
    "returned_reservation_bytes",
    "blocking_round_trips",
)
WARMUP_FRACTION = 0.1
START_TIMEOUT_S = 120.0
"""Spawned clients import torch: seconds each on a loaded 2-core box."""


def random_size(rng: random.Random) -> int:
    """Log-uniform in [MIN_BYTES, MAX_BYTES]."""
    return min(MAX_BYTES, int(math.exp(rng.uniform(math.log(MIN_BYTES), math.log(MAX_BYTES)))))


def _client(
    endpoint: str, index: int, cycles: int, seed: int, budget: int | None, barrier: Any, progress: Any, results: Any
) -> None:
    """One client process: register, run its cycles, report, close."""
    result: dict[str, Any] = {"index": index, "cycles": 0, "mismatches": 0, "errors": {}, "bytes": 0}
    errors: collections.Counter[str] = collections.Counter()
    try:
        import numpy as np
        import torch

        from client.system import StormSystem
        from storm_service.errors import StormError

        torch.set_num_threads(1)
        rng = random.Random(seed * 1_000_003 + index)
        system = StormSystem(endpoint, name=f"load-{index}", policy="wait", wait_timeout_s=60, timeout_s=10)
        try:
            barrier.wait(START_TIMEOUT_S)
            pending: collections.deque[tuple[Any, Any]] = collections.deque()

            held = 0

            def settle_oldest() -> None:
                nonlocal held
                handle, original = pending.popleft()
                held -= original.numel()
                try:
                    fetched = system.fetch(handle)
                    if fetched.dtype != original.dtype or not torch.equal(fetched, original):
                        result["mismatches"] += 1
                    result["cycles"] += 1
                    result["bytes"] += original.numel()
                except StormError as e:
                    errors[type(e).__name__] += 1
                finally:
                    system.free(handle)
                with progress.get_lock():
                    progress.value += 1

            for _ in range(cycles):
                size = random_size(rng)
                while budget is not None and pending and held + size > budget:
                    settle_oldest()
                data = torch.from_numpy(np.random.default_rng(rng.getrandbits(64)).integers(0, 256, size, np.uint8))
                try:
                    pending.append((system.offload(data), data))
                    held += size
                except StormError as e:
                    errors[type(e).__name__] += 1
                    with progress.get_lock():
                        progress.value += 1
                target = rng.randint(MIN_IN_FLIGHT, MAX_IN_FLIGHT)
                while len(pending) >= target:
                    settle_oldest()
            while pending:
                settle_oldest()
            stats = system.stats().as_dict()
            result["engine"] = {k: stats[k] for k in ENGINE_COUNTERS}
            result["peak_bytes"] = stats["peak_bytes"]
        finally:
            system.close()
    except BaseException as e:  # report instead of dying silently
        errors[type(e).__name__] += 1
        result["traceback"] = traceback.format_exc()
    result["errors"] = dict(errors)
    results.put(result)


def _sessionless_stats(endpoint: str) -> dict[str, Any]:
    import zmq

    context = zmq.Context()
    channel = Channel(context, endpoint, itertools.count(1))
    try:
        return channel.call(Op.STATS, None, 10.0)
    finally:
        channel.close()
        context.term()


def vm_rss(pid: int) -> int:
    """VmRSS of ``pid`` in bytes (includes the pool pages the daemon touched); 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * KiB
    except OSError:
        pass
    return 0


def run_load(
    endpoint: str, clients: int = 8, cycles: int = 2000, seed: int = 0, fair_share: bool = False
) -> dict[str, Any]:
    """Run ``clients`` processes x ``cycles`` against the daemon at ``endpoint``; return the figures.

    NOTE [Wait-policy deadlock]
      With ``policy="wait"`` a client whose offload waits for room cannot fetch (or so
      free) its own older tensors: its fetch is queued behind the waiting offload on the
      transfer thread. When the extents all clients hold leave no hole big enough for
      any of their pending offloads, every client waits until ``wait_timeout_s`` (60 s)
      and fails with PoolFullError. Seen with 4 clients in 32 MiB (1 run in 12), never
      in 64 MiB with 8. ``fair_share`` caps each client's bytes in flight at
      pool/clients, which rules that out (but leaves less pressure); the tests use it.
    """
    before = _sessionless_stats(endpoint)
    daemon_pid = int(before["daemon_pid"])
    budget = before["pool_bytes"] // clients if fair_share else None
    rss_start = vm_rss(daemon_pid)
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(clients + 1)
    progress = ctx.Value("q", 0)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_client, args=(endpoint, i, cycles, seed, budget, barrier, progress, results), daemon=True)
        for i in range(clients)
    ]
    for proc in procs:
        proc.start()
    barrier.wait(START_TIMEOUT_S)
    started = time.perf_counter()
    total = clients * cycles
    rss_warm = None
    rss_peak = rss_start
    collected: list[dict[str, Any]] = []
    while len(collected) < clients:
        try:
            collected.append(results.get(timeout=0.25))
        except Exception:  # queue.Empty
            if all(not p.is_alive() for p in procs) and results.empty():
                break
        rss_peak = max(rss_peak, vm_rss(daemon_pid))
        if rss_warm is None and progress.value >= WARMUP_FRACTION * total:
            rss_warm = vm_rss(daemon_pid)
    wall_s = time.perf_counter() - started
    for proc in procs:
        proc.join(30)
    after = _sessionless_stats(endpoint)
    rss_end = vm_rss(daemon_pid)
    errors: collections.Counter[str] = collections.Counter()
    engine: collections.Counter[str] = collections.Counter()
    for r in collected:
        errors.update(r["errors"])
        engine.update(r.get("engine", {}))
    lost = clients - len(collected)
    if lost:
        errors["ClientLost"] += lost
    done = sum(r["cycles"] for r in collected)
    rss_warm = rss_warm if rss_warm is not None else rss_start
    return {
        "clients": clients,
        "cycles_per_client": cycles,
        "seed": seed,
        "per_client_budget_bytes": budget,
        "pool_bytes": after["pool_bytes"],
        "cycles": done,
        "mismatches": sum(r["mismatches"] for r in collected),
        "errors": dict(errors),
        "bytes_verified": sum(r["bytes"] for r in collected),
        "wall_s": wall_s,
        "cycles_per_s": done / wall_s if wall_s > 0 else 0.0,
        "end_used_bytes": after["used_bytes"],
        "end_extents": after["extents"],
        "end_sessions": len(after["sessions"]),
        "daemon_pid": daemon_pid,
        "daemon_rss": {"start": rss_start, "warm": rss_warm, "end": rss_end, "peak": rss_peak},
        "daemon_rss_growth_after_warmup": rss_end - rss_warm,
        "pool_full_replies": after["errors"].get("POOL_FULL", 0) - before["errors"].get("POOL_FULL", 0),
        "daemon_errors": after["errors"],
        "daemon_requests": after["requests"],
        "expired_sessions": after["expired_sessions"] - before["expired_sessions"],
        "kept_tensors": engine.get("kept_tensors", 0),
        "session_peak_bytes_max": max((r.get("peak_bytes", 0) for r in collected), default=0),
        "engine": dict(engine),
        "client_exitcodes": [p.exitcode for p in procs],
        "tracebacks": [r["traceback"] for r in collected if "traceback" in r],
    }


PING_INTERVAL_S = 0.002
PING_TIMEOUT_S = 600.0
OFFLOAD_SIZES = 4096
"""Sizes per request of the worst-case client (``protocol.MAX_BATCH``)."""


def _bystander(endpoint: str, started: Any, stop: Any, results: Any) -> None:
    """Ping every PING_INTERVAL_S until ``stop``; report each round trip's seconds."""
    import zmq

    context = zmq.Context()
    channel = Channel(context, endpoint, itertools.count(1))
    rtts: list[float] = []
    try:
        channel.call(Op.PING, None, 10.0)
        started.wait(START_TIMEOUT_S)
        while not stop.is_set():
            sent = time.perf_counter()
            channel.call(Op.PING, None, PING_TIMEOUT_S)  # a stall is measured whole, not cut at a timeout
            rtts.append(time.perf_counter() - sent)
            time.sleep(PING_INTERVAL_S)
    finally:
        results.put(rtts)
        channel.close()
        context.term()


def _worst_case_client(endpoint: str, fragments: int, seed: int) -> dict[str, Any]:
    """Fragment the pool, offload 4096 sizes that fit no hole, unregister holding it all; seconds per request."""
    import zmq

    context = zmq.Context()
    channel = Channel(context, endpoint, itertools.count(1))
    rng = random.Random(seed)
    timings: dict[str, list[float]] = {"offload 4096 x 512 B": [], "free 4096": [], "offload 4096 sizes": []}

    def timed(name: str, op: Op, token: str, **fields: Any) -> dict[str, Any]:
        started = time.perf_counter()
        result = channel.call(op, token, 120.0, **fields)
        timings.setdefault(name, []).append(time.perf_counter() - started)
        return result

    try:
        token = channel.call(Op.REGISTER, None, 10.0, pid=os.getpid(), name="worst-case")["token"]
        handles: list[int] = []
        for _ in range(2 * fragments // OFFLOAD_SIZES):
            extents = timed("offload 4096 x 512 B", Op.OFFLOAD, token, sizes=[512] * OFFLOAD_SIZES)["extents"]
            handles += [e["handle"] for e in extents]
        every_other = handles[::2]
        for start in range(0, len(every_other), OFFLOAD_SIZES):
            timed("free 4096", Op.FREE, token, handles=every_other[start : start + OFFLOAD_SIZES])
        timed("offload 4096 sizes", Op.OFFLOAD, token, sizes=[rng.randint(2, 8) * 512 for _ in range(OFFLOAD_SIZES)])
        held = channel.call(Op.STATS, token, 10.0)["session"]["handles"]
        timed("unregister", Op.UNREGISTER, token)
        started = time.perf_counter()
        while channel.call(Op.STATS, None, 10.0).get("reclaiming_bytes", 0):  # a daemon before slices: 0
            time.sleep(0.001)
        reclaim_s = time.perf_counter() - started
    finally:
        channel.close()
        context.term()
    return {"extents_held_at_unregister": held, "reclaim_s": reclaim_s, "requests_s": timings}


def run_worst_case(endpoint: str, bystanders: int = 2, fragments: int = 1 << 17, seed: int = 0) -> dict[str, Any]:
    from benchmarks.common import percentile

    ctx = mp.get_context("spawn")
    started, stop, results = ctx.Event(), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_bystander, args=(endpoint, started, stop, results)) for _ in range(bystanders)]
    for proc in procs:
        proc.start()
    time.sleep(1.0)  # the bystanders' first pings: spawned interpreters are up
    started.set()
    began = time.perf_counter()
    try:
        client = _worst_case_client(endpoint, fragments, seed)
    finally:
        stop.set()
    wall_s = time.perf_counter() - began
    rtts = [rtt for _ in procs for rtt in results.get(timeout=60)]
    for proc in procs:
        proc.join(30)
    requests = {
        name: {"count": len(times), "mean_ms": 1e3 * sum(times) / len(times), "max_ms": 1e3 * max(times)}
        for name, times in client.pop("requests_s").items()
    }
    return {
        "bystanders": bystanders,
        "fragments": fragments,
        "wall_s": wall_s,
        "pings": len(rtts),
        "ping_ms": {
            "p50": 1e3 * percentile(rtts, 50),
            "p99": 1e3 * percentile(rtts, 99),
            "max": 1e3 * max(rtts),
        },
        "worst_case_requests": requests,
        **client,
    }


def print_worst_case(result: dict[str, Any]) -> None:
    from benchmarks.common import print_table, target

    ping = result["ping_ms"]
    rows = [
        ("bystanders x pings", f"{result['bystanders']} x {result['pings'] // result['bystanders']}"),
        ("bystander ping p50 / p99 / max", f"{ping['p50']:.2f} / {ping['p99']:.2f} / {ping['max']:.1f} ms"),
        ("extents held at unregister", result["extents_held_at_unregister"]),
        ("reclaimed after unregister in", f"{1e3 * result['reclaim_s']:.0f} ms"),
        ("wall time", f"{result['wall_s']:.1f} s"),
    ]
    for name, r in result["worst_case_requests"].items():
        rows.append((f"worst case: {name} (x{r['count']})", f"mean {r['mean_ms']:.1f} ms, max {r['max_ms']:.1f} ms"))
    print_table(["figure", "value"], rows, title="Bystanders while one client fragments, offloads and unregisters")
    result["target"] = target("bystander ping p99 < 10 ms", ping["p99"] < 10, f"{ping['p99']:.2f} ms")


def print_report(result: dict[str, Any]) -> None:
    from benchmarks.common import print_table

    rss = result["daemon_rss"]
    rows = [
        ("clients x cycles", f"{result['clients']} x {result['cycles_per_client']}"),
        ("pool", f"{result['pool_bytes'] / MiB:.0f} MiB"),
        ("cycles verified", result["cycles"]),
        ("mismatches", result["mismatches"]),
        ("errors", ", ".join(f"{k}: {v}" for k, v in sorted(result["errors"].items())) or "none"),
        ("GiB verified", f"{result['bytes_verified'] / (1 << 30):.2f}"),
        ("wall time", f"{result['wall_s']:.1f} s"),
        ("cycles/s", f"{result['cycles_per_s']:.0f}"),
        ("POOL_FULL replies (waits)", result["pool_full_replies"]),
        ("kept tensors", result["kept_tensors"]),
        ("sessions expired", result["expired_sessions"]),
        ("bytes held at end", result["end_used_bytes"]),
        ("sessions at end", result["end_sessions"]),
        ("daemon VmRSS start", f"{rss['start'] / MiB:.1f} MiB"),
        ("daemon VmRSS after warm-up", f"{rss['warm'] / MiB:.1f} MiB"),
        ("daemon VmRSS end", f"{rss['end'] / MiB:.1f} MiB"),
        ("daemon VmRSS peak", f"{rss['peak'] / MiB:.1f} MiB"),
        ("growth after warm-up", f"{result['daemon_rss_growth_after_warmup'] / MiB:+.2f} MiB"),
    ]
    print_table(["figure", "value"], rows, title="STORM load / soak")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--cycles", type=int, default=2000, help="cycles per client")
    p.add_argument("--pool-size", default="64MiB")
    p.add_argument("--heartbeat-timeout", default="5s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--fair-share", action="store_true", help="cap each client's bytes in flight at pool/clients (no deadlock)"
    )
    p.add_argument("--worst-case", action="store_true", help="bystanders' ping while one client runs the worst case")
    p.add_argument("--bystanders", type=int, default=2)
    p.add_argument("--fragments", type=int, default=1 << 17, help="one-block extents left between holes")
    args = p.parse_args(argv)

    from benchmarks.common import write_json
    from worker.embedded import EmbeddedDaemon

    if args.worst_case:
        pool_bytes = 2 * args.fragments * 512 + 8 * OFFLOAD_SIZES * 512
        with EmbeddedDaemon(f"{-(-pool_bytes // MiB)}MiB", args.heartbeat_timeout) as daemon:
            worst = run_worst_case(daemon.endpoint, args.bystanders, args.fragments, args.seed)
        print_worst_case(worst)
        write_json("load_worst_case", worst)
        return 0

    with EmbeddedDaemon(args.pool_size, args.heartbeat_timeout) as daemon:
        result = run_load(daemon.endpoint, args.clients, args.cycles, args.seed, args.fair_share)
        alive = daemon.alive
    result["daemon_alive_at_end"] = alive
    print_report(result)
    for tb in result["tracebacks"]:
        print(tb, file=sys.stderr)
    write_json("load", result)
    ok = (
        alive
        and result["mismatches"] == 0
        and not result["errors"]
        and result["end_used_bytes"] == 0
        and result["end_sessions"] == 0
        and result["kept_tensors"] == 0
    )
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
