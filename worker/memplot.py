"""``storm-worker --plot``: private memory and pool bytes over a few steps, with and without STORM.

With a disk tier the daemon's bytes on disk are drawn beside its host bytes, and with a
device tier its bytes on devices.

Private memory is the process's anonymous resident memory (``RssAnon``: what the
kernel cannot share or drop); the pool is the daemon's used bytes. Both are sampled
on background threads while the same model trains a few steps each way, so the saving
(activations moved from the process into the pool) shows in one picture.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from client.transport import connect
from storm_service.protocol import Op

__all__ = ["MemoryTrace", "private_bytes", "plot_traces", "trace"]

SAMPLE_S = 0.002


def private_bytes() -> int:
    """This process's anonymous resident memory in bytes (``RssAnon`` in /proc/self/status)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("RssAnon missing from /proc/self/status")


@dataclass
class MemoryTrace:
    label: str
    times_s: list[float] = field(default_factory=list)
    private_bytes: list[int] = field(default_factory=list)
    pool_times_s: list[float] = field(default_factory=list)
    pool_bytes: list[int] = field(default_factory=list)
    disk_bytes: list[int] = field(default_factory=list)
    """The daemon's bytes on disk at each pool sample (empty without a disk tier)."""
    device_bytes: list[int] = field(default_factory=list)
    """The daemon's bytes on devices at each pool sample (empty without a device tier)."""


def trace(label: str, run: Callable[[], None], endpoint: str | None) -> MemoryTrace:
    """Run ``run()`` while sampling private memory (and the pool, given an endpoint)."""
    result = MemoryTrace(label)
    stop = threading.Event()
    start = time.perf_counter()

    def sample_private() -> None:
        while not stop.is_set():
            result.times_s.append(time.perf_counter() - start)
            result.private_bytes.append(private_bytes())
            stop.wait(SAMPLE_S)

    def sample_pool() -> None:
        assert endpoint is not None
        with connect(endpoint) as channel:
            while not stop.is_set():
                stats = channel.call(Op.STATS)
                result.pool_times_s.append(time.perf_counter() - start)
                result.pool_bytes.append(stats["used_bytes"])
                if stats.get("disk_tier"):
                    result.disk_bytes.append(stats["disk_used_bytes"])
                if stats.get("device_tier"):
                    result.device_bytes.append(stats["device_used_bytes"])
                stop.wait(SAMPLE_S * 5)

    threads = [threading.Thread(target=sample_private, daemon=True)]
    if endpoint is not None:
        threads.append(threading.Thread(target=sample_pool, daemon=True))
    for thread in threads:
        thread.start()
    try:
        run()
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    return result


def plot_traces(traces: list[MemoryTrace], path: str, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit("storm-worker: --plot needs matplotlib: pip install 'storm-offload[plot]'") from e
    mib = 1 << 20
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for t in traces:
        base = t.private_bytes[0] if t.private_bytes else 0
        top.plot(t.times_s, [(b - base) / mib for b in t.private_bytes], label=t.label)
        if t.pool_bytes:
            bottom.plot(t.pool_times_s, [b / mib for b in t.pool_bytes], label=f"{t.label}: host")
        for tier, values, style in (("disk", t.disk_bytes, "--"), ("device", t.device_bytes, ":")):
            if values:
                bottom.plot(t.pool_times_s, [b / mib for b in values], linestyle=style, label=f"{t.label}: {tier}")
    top.set_ylabel("training process\nprivate memory growth (MiB)")
    bottom.set_ylabel("daemon bytes held (MiB)\nper tier")
    bottom.set_xlabel("time (s)")
    top.set_title(title)
    top.legend()
    bottom.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
