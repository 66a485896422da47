"""``stormctl status``: a refreshing view of the pool and of who holds what."""

from __future__ import annotations

import json
import signal
import sys
import time
from typing import Any, TextIO

from client.transport import Channel
from storm_service.protocol import Op
from storm_service.units import format_bytes

__all__ = ["snapshot", "render", "watch"]

_CLEAR = "\x1b[H\x1b[2J"
_BAR = 40


def snapshot(stats: dict[str, Any], previous: dict[str, Any] | None, interval_s: float) -> dict[str, Any]:
    """The daemon's stats plus per-session offload/fetch rates (bytes/s) since ``previous``."""
    before = {s["id"]: s for s in previous["sessions"]} if previous else {}
    sessions = []
    for session in stats["sessions"]:
        old = before.get(session["id"])
        rates = {"offload_bytes_per_s": None, "fetch_bytes_per_s": None}
        if old is not None and interval_s > 0:
            rates = {
                "offload_bytes_per_s": (session["offloaded_bytes"] - old["offloaded_bytes"]) / interval_s,
                "fetch_bytes_per_s": (session["fetched_bytes"] - old["fetched_bytes"]) / interval_s,
            }
        sessions.append(session | rates)
    return stats | {"sessions": sessions}


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e9:.2f} GB/s"


def render(view: dict[str, Any]) -> str:
    pool, used = view["pool_bytes"], view["used_bytes"]
    lines = [
        f"stormd pid {view['daemon_pid']}  up {view['uptime_s']:.0f} s",
        f"pool  {_bar(used, pool)} ({100 * used / pool:.1f}%)",
        f"free  {format_bytes(view['free_bytes'])}, largest extent {format_bytes(view['largest_free_bytes'])},"
        f" {format_bytes(view.get('reserved_bytes', 0))} reserved ahead of copies",
    ]
    if view.get("device_tier"):
        lines += _device_lines(view)
    if view.get("disk_tier"):
        lines += _disk_lines(view)
    lines.append(f"sessions  {view['live_sessions']} live, {view['expired_sessions']} expired")
    if view["sessions"]:
        lines.append(
            f"  {'id':>4} {'pid':>8} {'rank':>6} {'held':>11} {'device':>11} {'disk':>11} {'peak':>11} {'offload':>12}"
            f" {'fetch':>12}  name"
        )
    for s in view["sessions"]:
        rank = "-" if s["rank"] is None else f"{s['rank']}/{s['world_size']}"
        lines.append(
            f"  {s['id']:>4} {s['pid']:>8} {rank:>6} {format_bytes(s['used_bytes']):>11}"
            f" {format_bytes(s.get('device_bytes', 0)):>11} {format_bytes(s.get('disk_bytes', 0)):>11}"
            f" {format_bytes(s['peak_bytes']):>11} {_rate(s['offload_bytes_per_s']):>12}"
            f" {_rate(s['fetch_bytes_per_s']):>12}  {s['name']}"
        )
    if view["errors"]:
        lines.append("errors  " + ", ".join(f"{code} {n}" for code, n in sorted(view["errors"].items())))
    if view["dropped_replies"]:
        lines.append(f"dropped replies  {view['dropped_replies']}")
    return "\n".join(lines)


def _bar(used: int, size: int) -> str:
    filled = round(_BAR * used / size) if size else 0
    return f"[{'#' * filled}{'.' * (_BAR - filled)}] {format_bytes(used)} / {format_bytes(size)}"


def _device_lines(view: dict[str, Any]) -> list[str]:
    """The device tier: a bar per device, its links, and what moved to the host (NOTE [Device tier])."""
    lines = []
    for device in view["devices"]:
        links = ", ".join(
            f"{client} {link['peer_gbps']:.0f} vs host {link['host_gbps']:.0f} GB/s"
            + ("" if link["enabled"] else " (off)")
            for client, link in device["links"].items()
        )
        lines.append(
            f"device {_bar(device['used_bytes'], device['size_bytes'])} {device['name']} ({device['backend']})"
        )
        lines.append(f"      from {links or 'no client device'}")
    lines.append(
        f"      moved to the host {format_bytes(view['device_evicted_bytes'])} in {view['device_evictions']} extents"
        f" (past {round(100 * view['devices'][0]['high_water_bytes'] / max(view['devices'][0]['size_bytes'], 1))}%)"
    )
    return lines


def _disk_lines(view: dict[str, Any]) -> list[str]:
    """The disk tier: a bar of its use, totals and rates (NOTE [Disk tier])."""
    size, used = view["disk_bytes"], view["disk_used_bytes"]
    return [
        f"disk  {_bar(used, size)} (spills past {format_bytes(view['high_water_bytes'])} of the pool)",
        f"      spilled {format_bytes(view['spilled_total_bytes'])} at {_rate(view['spill_bytes_per_s'] or None)},"
        f" restored {format_bytes(view['restored_total_bytes'])} at {_rate(view['restore_bytes_per_s'] or None)};"
        f" fetches found {view['restore_hits']} back in time, waited for {view['restore_waits']}",
    ]


def watch(channel: Channel, interval_s: float, once: bool, as_json: bool, out: TextIO = sys.stdout) -> int:
    """Print the view every ``interval_s`` until Ctrl-C (or once); returns the exit status."""
    # A shell may start us with SIGINT ignored (a background job): Ctrl-C must still quit.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    previous: dict[str, Any] | None = None
    last = time.monotonic()
    tty = out.isatty() and not as_json
    try:
        while True:
            stats = channel.call(Op.STATS)
            now = time.monotonic()
            view = snapshot(stats, previous, now - last)
            previous, last = stats, now
            if as_json:
                out.write(json.dumps(view, sort_keys=True) + "\n")
            else:
                out.write((_CLEAR if tty else "") + render(view) + "\n" + ("" if tty else "\n"))
            out.flush()
            if once:
                return 0
            time.sleep(interval_s)
    except KeyboardInterrupt:
        return 0
