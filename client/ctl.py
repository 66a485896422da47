"""``stormctl``: talk to a running stormd (ping, stats, shutdown)."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import zmq

from client.transport import DEFAULT_TIMEOUT_S, Channel
from storm_service.errors import StormError
from storm_service.protocol import Op
from storm_service.runtime import default_endpoint
from storm_service.units import format_bytes

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stormctl", description="Control and inspect a running stormd.")
    parser.add_argument(
        "--endpoint",
        default=os.environ.get("STORM_ENDPOINT") or default_endpoint(),
        help="daemon endpoint [env STORM_ENDPOINT; default %(default)s]",
    )
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds to wait for a reply")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("ping", help="check that the daemon answers")
    stats = commands.add_parser("stats", help="pool occupancy and sessions")
    stats.add_argument("--json", action="store_true", help="print one JSON object")
    commands.add_parser("shutdown", help="ask the daemon to stop cleanly")
    return parser


def _print_stats(stats: dict[str, Any]) -> None:
    pool = stats["pool_bytes"]
    used = stats["used_bytes"]
    print(f"pool      {format_bytes(pool)} in {stats['segments']} segment(s)")
    print(f"used      {format_bytes(used)} ({100 * used / pool:.1f}%) in {stats['extents']} extent(s)")
    print(f"free      {format_bytes(stats['free_bytes'])} (largest extent {format_bytes(stats['largest_free_bytes'])})")
    print(f"sessions  {len(stats['sessions'])} live, {stats['expired_sessions']} expired")
    for s in stats["sessions"]:
        rank = "" if s["rank"] is None else f" rank {s['rank']}/{s['world_size']}"
        print(f"  #{s['id']:<4} pid {s['pid']:<8} {s['name'] or '-':<20}{rank} holds {format_bytes(s['used_bytes'])}")
    if stats["errors"]:
        print("errors    " + ", ".join(f"{code} {n}" for code, n in sorted(stats["errors"].items())))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    context = zmq.Context()
    channel = Channel(context, args.endpoint, itertools.count(1))
    try:
        if args.command == "ping":
            result = channel.call(Op.PING, timeout_s=args.timeout)
            print(f"stormd pid {result['pid']} answered on {args.endpoint} (up {result['uptime_s']:.0f} s)")
        elif args.command == "stats":
            stats = channel.call(Op.STATS, timeout_s=args.timeout)
            if args.json:
                print(json.dumps(stats, sort_keys=True))
            else:
                _print_stats(stats)
        else:
            channel.call(Op.SHUTDOWN, timeout_s=args.timeout)
            print(f"stormd on {args.endpoint} is shutting down")
        return 0
    except StormError as e:
        print(f"stormctl: {e}", file=sys.stderr)
        return 1
    finally:
        channel.close()
        context.term()


if __name__ == "__main__":
    sys.exit(main())
