"""Shared helpers for the benchmarks: results, tables, plots, memory probes, the copy-only floor.

matplotlib is imported lazily (only in :func:`save_plot`): without it every benchmark
still prints its table and writes its JSON, and says that it skipped the plot.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import platform
import statistics
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MIN_BYTES = 64 << 10  # the default of client.hooks.offload_saved_tensors
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


# -- results ---------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "malloc_mmap_threshold_env": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def write_json(name: str, data: dict[str, Any]) -> str:
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"{name}.json")
    with open(path + ".tmp", "w") as f:
        json.dump({"machine": machine_info(), **data}, f, indent=1, default=float)
        f.write("\n")
    os.replace(path + ".tmp", path)
    print(f"wrote {os.path.relpath(path)}")
    return path


def save_plot(name: str, draw: Callable[[Any], None]) -> str | None:
    """Call ``draw(plt)`` and save ``results/<name>.png``; skip with a note without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: skipped {name}.png (pip install matplotlib)")
        return None
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"{name}.png")
    draw(plt)
    plt.tight_layout()
    plt.savefig(path, dpi=80)
    plt.close("all")
    print(f"wrote {os.path.relpath(path)}")
    return path


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "") -> None:
    cells = [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    if title:
        print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
    for row in cells:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return "-" if value is None else str(value)


def target(label: str, ok: bool | None, detail: str) -> dict[str, Any]:
    """Print a PASS/FAIL line (N/A where the figure is undefined); targets are goals, not assertions."""
    print(f"{'N/A' if ok is None else 'PASS' if ok else 'FAIL'}: {label} ({detail})")
    return {"target": label, "pass": ok, "detail": detail}


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


MiB = float(1 << 20)


# -- private memory -------------------------------------------------------------------


def rss_anon() -> int:
    """This process's private anonymous resident bytes (``RssAnon``; excludes /dev/shm)."""
    with open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith(b"RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


class RssSampler:
    """A background thread that tracks the peak of ``RssAnon`` every ~``interval_s``."""

    def __init__(self, interval_s: float = 0.001) -> None:
        self.interval_s = interval_s
        self.peak = rss_anon()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, rss_anon())

    def reset(self) -> int:
        """Start a new window; returns the current value (the window's baseline)."""
        now = rss_anon()
        self.peak = now
        return now

    def window_peak(self) -> int:
        self.peak = max(self.peak, rss_anon())
        return self.peak

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def cpu_seconds(path: str) -> float:
    """utime + stime of ``/proc/<pid>/stat`` or ``/proc/self/task/<tid>/stat``, in seconds."""
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_stat_path(name: str) -> str | None:
    """The /proc stat file of this process's Python thread called ``name``."""
    for thread in threading.enumerate():
        if thread.name == name and thread.native_id is not None:
            return f"/proc/self/task/{thread.native_id}/stat"
    return None


def set_mmap_threshold(nbytes: int) -> bool:
    """glibc ``mallopt(M_MMAP_THRESHOLD, nbytes)``: blocks >= nbytes are mmapped and unmapped on free."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, int(nbytes)))
    except OSError:
        return False


# -- the copy-only floor: saved tensors into a pre-faulted /dev/shm arena, no daemon --------


class ShmArena:
    """A /dev/shm file mapped with MAP_POPULATE (and touched), handed out by a bump allocator."""

    def __init__(self, size_bytes: int, alignment: int = 512) -> None:
        self.size_bytes = size_bytes
        self.alignment = alignment
        self.path = f"/dev/shm/storm-bench-{uuid.uuid4().hex[:12]}"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, size_bytes)
            self._mm = mmap.mmap(fd, size_bytes, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        finally:
            os.close(fd)
        os.unlink(self.path)  # the mapping keeps the memory; nothing to clean up later
        self.bytes = torch.frombuffer(self._mm, dtype=torch.uint8)
        self.bytes[::4096].fill_(0)  # touch every page (MAP_POPULATE already did)
        self.top = 0
        self.high_water = 0

    def alloc(self, nbytes: int) -> torch.Tensor:
        start = self.top
        end = start + nbytes
        if end > self.size_bytes:
            raise MemoryError(f"arena of {self.size_bytes} bytes is full ({end} needed)")
        self.top = -(-end // self.alignment) * self.alignment
        self.high_water = max(self.high_water, self.top)
        return self.bytes[start:end]

    def reset(self) -> None:
        self.top = 0


class _FloorRecord:
    __slots__ = ("pending", "restored", "slot", "tensor_ref")

    def __init__(self, slot: torch.Tensor, tensor: torch.Tensor) -> None:
        self.slot = slot
        self.tensor_ref = weakref.ref(tensor)
        self.pending = 0
        self.restored: torch.Tensor | None = None


class CopyFloor:
    """Saved-tensor hooks that copy each saved storage into the arena and back: the copy-only floor.

    Same selection rule as ``offload_saved_tensors`` (parameters, subclasses and tensors
    under 64 KiB stay) and the same storage sharing (a storage saved twice is copied
    once), so it moves exactly the bytes STORM moves, synchronously on the training
    thread, with no daemon, no transfer thread and no protocol.
    """

    def __init__(self, arena: ShmArena, min_bytes: int = MIN_BYTES) -> None:
        self.arena = arena
        self.min_bytes = min_bytes
        self.copied_bytes = 0
        self._records: dict[int, _FloorRecord] = {}

    def pack(self, tensor: torch.Tensor) -> Any:
        if (
            type(tensor) is not torch.Tensor
            or isinstance(tensor._base, torch.nn.Parameter)  # views of weights stay, as in STORM
            or tensor.numel() * tensor.element_size() < self.min_bytes
        ):
            return tensor
        storage = tensor.untyped_storage()
        record = self._records.get(storage.data_ptr())
        if record is None or record.tensor_ref() is None:
            whole = torch.empty(0, dtype=torch.uint8).set_(storage)
            slot = self.arena.alloc(whole.numel())
            slot.copy_(whole)
            self.copied_bytes += whole.numel()
            record = self._records[storage.data_ptr()] = _FloorRecord(slot, tensor)
        record.pending += 1
        return (record, tensor.dtype, tensor.size(), tensor.stride(), tensor.storage_offset())

    @staticmethod
    def unpack(packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        record, dtype, size, stride, offset = packed
        restored = record.restored
        if restored is None:
            restored = torch.empty_like(record.slot)
            restored.copy_(record.slot)
            record.restored = restored
        record.pending -= 1
        if record.pending <= 0:
            record.restored = None
        return torch.empty(0, dtype=dtype).set_(restored.untyped_storage(), offset, size, stride)

    @contextmanager
    def step(self) -> Iterator[None]:
        """One forward under the hooks; the arena is reset at the start of the next step."""
        self.arena.reset()
        self._records.clear()
        with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
            yield
