"""STORM's control plane: protocol round trip next to a raw pyzmq echo, and ops/s with 1-8 clients.

    .venv/bin/python -m benchmarks.control_plane [--quick]

Latency: ``Channel.call(Op.HEARTBEAT, token)`` against a private stormd after a REGISTER,
next to a REQ/REP echo of the same encoded frame over ipc:// (echo server in its own
process), in alternating blocks, from one client process. Three placements, each with a
fresh daemon and echo server: client and servers pinned to separate CPUs, all pinned to
one CPU, and unpinned (three fresh pairs, median ratio). Pinning treats both sides alike;
it is there because on a small VM a cross-CPU wake-up costs more than the whole Python
path, and where the scheduler happens to put each server process moves the raw figure
alone by 20 %. Throughput: N client processes each register and do heartbeats, or
offload+commit+free cycles (each a waited call), for a fixed time.

Module-level imports stay torch-free: client processes are spawned and re-import this module.
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import zmq

from client.transport import Channel
from storm_service.protocol import Op, decode_reply, decode_request, encode_ok, encode_request


def echo_server(endpoint: str, cpus: set[int] | None = None) -> None:
    if cpus is not None:
        os.sched_setaffinity(0, cpus)  # before the zmq context, so its I/O thread inherits it
    context = zmq.Context()
    socket = context.socket(zmq.REP)
    socket.bind(endpoint)
    while True:
        frame = socket.recv()
        if frame == b"stop":
            socket.send(b"stop")
            break
        socket.send(frame)
    socket.close(linger=0)
    context.term()


def register(channel: Channel, name: str) -> str:
    reply = channel.call(Op.REGISTER, None, 5.0, pid=os.getpid(), name=name)
    return str(reply["token"])


def client_worker(endpoint: str, mode: str, duration_s: float, barrier: Any, results: Any) -> None:
    context = zmq.Context()
    channel = Channel(context, endpoint, itertools.count(1))
    token = register(channel, f"bench-{os.getpid()}")
    barrier.wait()
    ops = 0
    end = time.perf_counter() + duration_s
    while time.perf_counter() < end:
        if mode == "heartbeat":
            channel.call(Op.HEARTBEAT, token)
            ops += 1
        else:
            extents = channel.call(Op.OFFLOAD, token, sizes=[1 << 20], layer_id=0)["extents"]
            handles = [e["handle"] for e in extents]
            channel.call(Op.COMMIT, token, handles=handles)
            channel.call(Op.FREE, token, handles=handles)
            ops += 3
    channel.call(Op.UNREGISTER, token)
    channel.close()
    context.term()
    results.put(ops)


def throughput(endpoint: str, mode: str, clients: int, duration_s: float) -> float:
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(clients + 1)
    results = ctx.Queue()
    work = (endpoint, mode, duration_s, barrier, results)
    procs = [ctx.Process(target=client_worker, args=work) for _ in range(clients)]
    for proc in procs:
        proc.start()
    barrier.wait(timeout=60)
    started = time.perf_counter()
    total = sum(results.get(timeout=60 + duration_s) for _ in procs)
    elapsed = max(time.perf_counter() - started, duration_s)
    for proc in procs:
        proc.join()
    return total / elapsed


PLACEMENTS = ("separate CPUs", "one CPU", "unpinned")
UNPINNED_REPEATS = 3
"""Unpinned, each server process lands where the scheduler puts it: fresh pairs, median ratio."""


def placement_cpus(placement: str) -> tuple[set[int], set[int]] | None:
    """(client CPUs, server CPUs) for a placement; None when unpinned or impossible here."""
    cpus = sorted(os.sched_getaffinity(0))
    if placement == "one CPU":
        return {cpus[0]}, {cpus[0]}
    if placement == "separate CPUs" and len(cpus) >= 2:
        return {cpus[0]}, {cpus[1]}
    return None


def pin_threads(pid: int, cpus: set[int]) -> None:
    """Pin every thread of ``pid`` (the zmq I/O thread too) to ``cpus``."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), cpus)


def latency_client(
    endpoint: str, raw_endpoint: str, blocks: int, per_block: int, cpus: set[int] | None, results: Any
) -> None:
    """Alternating blocks of STORM heartbeats and raw REQ/REP echoes; puts both lists of us."""
    if cpus is not None:
        os.sched_setaffinity(0, cpus)  # before the zmq context, so its I/O thread inherits it
    context = zmq.Context()
    channel = Channel(context, endpoint, itertools.count(1))
    token = register(channel, "bench-latency")
    raw = context.socket(zmq.REQ)
    raw.connect(raw_endpoint)
    frame = encode_request(1, Op.HEARTBEAT, token)
    out: dict[str, list[float]] = {"storm": [], "raw": []}
    for _ in range(200):  # warm both paths
        channel.call(Op.HEARTBEAT, token)
        raw.send(frame)
        raw.recv()
    clock = time.perf_counter_ns
    for _ in range(blocks):
        for _ in range(per_block):
            t = clock()
            channel.call(Op.HEARTBEAT, token)
            out["storm"].append((clock() - t) / 1e3)
        for _ in range(per_block):
            t = clock()
            raw.send(frame)
            raw.recv()
            out["raw"].append((clock() - t) / 1e3)
    raw.send(b"stop")
    raw.recv()
    channel.call(Op.UNREGISTER, token)
    raw.close(linger=0)
    channel.close()
    context.term()
    results.put(out)


def latencies(placement: str, blocks: int, per_block: int) -> dict[str, list[float]]:
    """One fresh stormd and one fresh echo server, pinned as ``placement`` says, and one client."""
    from worker.embedded import EmbeddedDaemon

    cpus = placement_cpus(placement)
    spawn = mp.get_context("spawn")
    tmp = tempfile.mkdtemp(prefix="storm-bench-")
    raw_endpoint = f"ipc://{tmp}/echo.sock"
    echo = spawn.Process(target=echo_server, args=(raw_endpoint, cpus[1] if cpus else None))
    echo.start()
    results = spawn.Queue()
    try:
        with EmbeddedDaemon("64MiB", heartbeat_timeout="30s") as daemon:
            if cpus is not None:
                pin_threads(daemon.pid, cpus[1])
            client = spawn.Process(
                target=latency_client,
                args=(daemon.endpoint, raw_endpoint, blocks, per_block, cpus[0] if cpus else None, results),
            )
            client.start()
            lat: dict[str, list[float]] = results.get(timeout=120)
            client.join(10)
    finally:
        echo.join(10)
        if echo.is_alive():
            echo.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    return lat


def codec_us(n: int = 20000) -> float:
    """In-process cost of the four msgpack steps of one heartbeat (no sockets)."""
    token = "x" * 43
    t = time.perf_counter()
    for i in range(n):
        request = decode_request(encode_request(i + 1, Op.HEARTBEAT, token))
        decode_reply(encode_ok(request.id, {"used_bytes": 0}))
    return (time.perf_counter() - t) / n * 1e6


def summarize(lat: dict[str, list[float]]) -> dict[str, Any]:
    from benchmarks.common import percentile

    out: dict[str, Any] = {
        kind: {"p50_us": percentile(lat[kind], 50), "p99_us": percentile(lat[kind], 99), "n": len(lat[kind])}
        for kind in ("storm", "raw")
    }
    out["ratio_p50"] = out["storm"]["p50_us"] / out["raw"]["p50_us"]
    out["ratio_p99"] = out["storm"]["p99_us"] / out["raw"]["p99_us"]
    return out


def main(argv: list[str] | None = None) -> int:
    from benchmarks.common import print_table, save_plot, target, write_json
    from worker.embedded import EmbeddedDaemon

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--duration", type=float, default=None, help="seconds per throughput run (default 2, quick 0.5)")
    args = p.parse_args(argv)
    duration = args.duration or (0.5 if args.quick else 2.0)
    blocks, per_block = (4, 250) if args.quick else (10, 1000)
    results: dict[str, Any] = {"quick": args.quick, "duration_s": duration, "latency": {}}
    curves: dict[str, dict[str, list[float]]] = {}
    rows: list[list[Any]] = []
    for placement in PLACEMENTS:
        if placement != "unpinned" and placement_cpus(placement) is None:
            print(f"skipped placement {placement!r}: needs 2 CPUs in this process's affinity set")
            continue
        runs = [
            latencies(placement, blocks, per_block) for _ in range(UNPINNED_REPEATS if placement == "unpinned" else 1)
        ]
        summaries = [summarize(lat) for lat in runs]
        middle = sorted(range(len(runs)), key=lambda i: summaries[i]["ratio_p50"])[len(runs) // 2]
        curves[placement] = runs[middle]
        results["latency"][placement] = summaries[middle] | {"ratios_p50": [x["ratio_p50"] for x in summaries]}
        shown = summaries[middle]
        rows.append(
            [
                placement,
                shown["storm"]["p50_us"],
                shown["raw"]["p50_us"],
                shown["ratio_p50"],
                shown["storm"]["p99_us"],
                shown["raw"]["p99_us"],
                shown["ratio_p99"],
            ]
        )
    print_table(
        ["placement", "STORM p50 us", "raw p50 us", "p50 ratio", "STORM p99 us", "raw p99 us", "p99 ratio"],
        rows,
        f"heartbeat round trip over ipc://, STORM vs raw pyzmq REQ/REP (unpinned: median of {UNPINNED_REPEATS})",
    )
    results["msgpack_codec_us"] = codec_us()
    print(
        f"msgpack encode+validate+decode of one heartbeat request and its reply: {results['msgpack_codec_us']:.1f} us"
    )
    results["throughput"] = {}
    with EmbeddedDaemon("64MiB", heartbeat_timeout="30s") as daemon:
        for mode in ("heartbeat", "cycle"):
            results["throughput"][mode] = {n: throughput(daemon.endpoint, mode, n, duration) for n in (1, 2, 4, 8)}
    rows = [[n, results["throughput"]["heartbeat"][n], results["throughput"]["cycle"][n]] for n in (1, 2, 4, 8)]
    print_table(["clients", "heartbeat ops/s", "offload+commit+free ops/s"], rows, "aggregate daemon throughput")
    print()
    results["targets"] = [
        target(
            f"STORM round trip p50 <= 1.2 x raw pyzmq, {placement}",
            r["ratio_p50"] <= 1.2,
            f"ratio {r['ratio_p50']:.2f}",
        )
        for placement, r in results["latency"].items()
    ]
    write_json("control_plane", results)
    save_plot("control_plane", lambda plt: plot(plt, results, curves))
    return 0


def plot(plt: Any, results: dict[str, Any], curves: dict[str, dict[str, list[float]]]) -> None:
    _fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    hi = 1.5 * max(r[kind]["p99_us"] for r in results["latency"].values() for kind in ("storm", "raw"))
    for (placement, lat), color in zip(curves.items(), ("C0", "C1", "C2"), strict=False):
        for kind, style in (("storm", "-"), ("raw", "--")):
            values = sorted(v for v in lat[kind] if v <= hi)
            ax1.plot(
                values,
                [i / len(lat[kind]) for i in range(len(values))],
                style,
                color=color,
                label=f"{kind}, {placement}",
            )
    ax1.set_xlabel("round trip, us")
    ax1.set_ylabel("CDF")
    ax1.legend(fontsize=7)
    for mode, ops in results["throughput"].items():
        ax2.plot(list(ops), list(ops.values()), marker="o", label=mode)
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("client processes")
    ax2.set_ylabel("aggregate ops/s")
    ax2.legend()


if __name__ == "__main__":
    sys.exit(main())
