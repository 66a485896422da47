"""STORM's control plane: protocol round trip next to a raw pyzmq echo, and ops/s with 1-8 clients.

    .venv/bin/python -m benchmarks.control_plane [--quick]

Latency: ``Channel.call(Op.HEARTBEAT, token)`` against a private stormd after a REGISTER,
next to a REQ/REP echo of the same encoded frame over ipc:// (echo server in its own
process), in alternating blocks. Throughput: N client processes each register and do
heartbeats, or offload+commit+free cycles (each a waited call), for a fixed time.

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


def echo_server(endpoint: str) -> None:
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


def latencies(endpoint: str, raw_endpoint: str, blocks: int, per_block: int) -> dict[str, list[float]]:
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
    return out


def codec_us(n: int = 20000) -> float:
    """In-process cost of the four msgpack steps of one heartbeat (no sockets)."""
    token = "x" * 43
    t = time.perf_counter()
    for i in range(n):
        request = decode_request(encode_request(i + 1, Op.HEARTBEAT, token))
        decode_reply(encode_ok(request.id, {"used_bytes": 0}))
    return (time.perf_counter() - t) / n * 1e6


def main(argv: list[str] | None = None) -> int:
    from benchmarks.common import percentile, print_table, save_plot, target, write_json
    from worker.embedded import EmbeddedDaemon

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--duration", type=float, default=None, help="seconds per throughput run (default 2, quick 0.5)")
    args = p.parse_args(argv)
    duration = args.duration or (0.5 if args.quick else 2.0)
    blocks, per_block = (4, 250) if args.quick else (10, 1000)
    tmp = tempfile.mkdtemp(prefix="storm-bench-")
    raw_endpoint = f"ipc://{tmp}/echo.sock"
    echo = mp.get_context("spawn").Process(target=echo_server, args=(raw_endpoint,))
    echo.start()
    results: dict[str, Any] = {"quick": args.quick, "duration_s": duration}
    with EmbeddedDaemon("64MiB", heartbeat_timeout="30s") as daemon:
        lat = latencies(daemon.endpoint, raw_endpoint, blocks, per_block)
        echo.join(10)
        rows: list[list[Any]] = []
        for kind in ("storm", "raw"):
            values = lat[kind]
            stats = {"p50_us": percentile(values, 50), "p99_us": percentile(values, 99), "n": len(values)}
            results[f"{kind}_rtt"] = stats
            rows.append([kind, stats["p50_us"], stats["p99_us"], len(values)])
        results["ratio_p50"] = results["storm_rtt"]["p50_us"] / results["raw_rtt"]["p50_us"]
        results["ratio_p99"] = results["storm_rtt"]["p99_us"] / results["raw_rtt"]["p99_us"]
        results["msgpack_codec_us"] = codec_us()
        rows.append(["STORM/raw", results["ratio_p50"], results["ratio_p99"], None])
        print_table(["round trip over ipc://", "p50 us", "p99 us", "n"], rows, "heartbeat round trip")
        codec = results["msgpack_codec_us"]
        print(f"msgpack encode+validate+decode of one heartbeat request and its reply: {codec:.1f} us")
        results["throughput"] = {}
        for mode in ("heartbeat", "cycle"):
            results["throughput"][mode] = {n: throughput(daemon.endpoint, mode, n, duration) for n in (1, 2, 4, 8)}
    shutil.rmtree(tmp, ignore_errors=True)
    rows = [[n, results["throughput"]["heartbeat"][n], results["throughput"]["cycle"][n]] for n in (1, 2, 4, 8)]
    print_table(["clients", "heartbeat ops/s", "offload+commit+free ops/s"], rows, "aggregate daemon throughput")
    print()
    ratio = results["ratio_p50"]
    results["targets"] = [target("STORM round trip p50 <= 1.2 x raw pyzmq", ratio <= 1.2, f"ratio {ratio:.2f}")]
    write_json("control_plane", results)
    save_plot("control_plane", lambda plt: plot(plt, results, lat))
    return 0


def plot(plt: Any, results: dict[str, Any], lat: dict[str, list[float]]) -> None:
    _fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    hi = max(results["storm_rtt"]["p99_us"], results["raw_rtt"]["p99_us"]) * 1.5
    for kind in ("storm", "raw"):
        values = sorted(v for v in lat[kind] if v <= hi)
        ax1.plot(values, [i / len(lat[kind]) for i in range(len(values))], label=kind)
    ax1.set_xlabel("round trip, us")
    ax1.set_ylabel("CDF")
    ax1.legend()
    for mode, ops in results["throughput"].items():
        ax2.plot(list(ops), list(ops.values()), marker="o", label=mode)
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("client processes")
    ax2.set_ylabel("aggregate ops/s")
    ax2.legend()


if __name__ == "__main__":
    sys.exit(main())
