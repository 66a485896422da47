"""``stormctl``: talk to a running stormd (ping, stats, shutdown) and make CURVE keys."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from typing import Any

from client.settings import ClientSettings
from client.status import watch
from client.transport import DEFAULT_TIMEOUT_S, connect
from storm_service.endpoints import AUTHORIZED_DIR
from storm_service.errors import StormError
from storm_service.protocol import Op
from storm_service.units import format_bytes

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stormctl", description="Control and inspect a running stormd.")
    parser.add_argument(
        "--endpoint",
        default=ClientSettings.load().resolved_endpoint,
        help="daemon endpoint [env STORM_ENDPOINT; default %(default)s]",
    )
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds to wait for a reply")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("ping", help="check that the daemon answers")
    stats = commands.add_parser("stats", help="pool occupancy and sessions")
    stats.add_argument("--json", action="store_true", help="print one JSON object")
    status = commands.add_parser("status", help="a live view of the pool and the sessions (Ctrl-C quits)")
    status.add_argument("--once", action="store_true", help="print one snapshot and exit")
    status.add_argument("--json", action="store_true", help="one JSON object per refresh")
    status.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    commands.add_parser("shutdown", help="ask the daemon to stop cleanly")
    keygen = commands.add_parser("keygen", help="create CURVE keys for a tcp:// daemon and one client")
    keygen.add_argument("directory", help="where to write server.key(_secret), client.key(_secret), authorized/")
    return parser


def _print_stats(stats: dict[str, Any]) -> None:
    pool = stats["pool_bytes"]
    used = stats["used_bytes"]
    print(f"pool      {format_bytes(pool)} in {stats['slabs']} slab(s), {stats['free_slabs']} free")
    print(f"used      {format_bytes(used)} ({100 * used / pool:.1f}%) in {stats['extents']} extent(s)")
    print(f"reserved  {format_bytes(stats['reserved_bytes'])} (allocated ahead of copies, not yet committed)")
    print(f"free      {format_bytes(stats['free_bytes'])} (largest extent {format_bytes(stats['largest_free_bytes'])})")
    print(f"sessions  {stats['live_sessions']} live, {stats['expired_sessions']} expired")
    if stats["fenced_bytes"]:
        print(f"fenced    {format_bytes(stats['fenced_bytes'])} (expired sessions whose process may still run)")
    for s in stats["sessions"]:
        rank = "" if s["rank"] is None else f" rank {s['rank']}/{s['world_size']}"
        print(f"  #{s['id']:<4} pid {s['pid']:<8} {s['name'] or '-':<20}{rank} holds {format_bytes(s['used_bytes'])}")
    if stats["errors"]:
        print("errors    " + ", ".join(f"{code} {n}" for code, n in sorted(stats["errors"].items())))


def command_ping(args: argparse.Namespace) -> int:
    with connect(args.endpoint) as channel:
        result = channel.call(Op.PING, timeout_s=args.timeout)
    print(f"stormd pid {result['pid']} answered on {args.endpoint} (up {result['uptime_s']:.0f} s)")
    return 0


def command_stats(args: argparse.Namespace) -> int:
    with connect(args.endpoint) as channel:
        stats = channel.call(Op.STATS, timeout_s=args.timeout)
    if args.json:
        print(json.dumps(stats, sort_keys=True))
    else:
        _print_stats(stats)
    return 0


def command_status(args: argparse.Namespace) -> int:
    with connect(args.endpoint) as channel:
        return watch(channel, args.interval, args.once, args.json)


def command_shutdown(args: argparse.Namespace) -> int:
    with connect(args.endpoint) as channel:
        channel.call(Op.SHUTDOWN, timeout_s=args.timeout)
    print(f"stormd on {args.endpoint} is shutting down")
    return 0


def command_keygen(args: argparse.Namespace) -> int:
    from zmq.auth import create_certificates

    authorized = os.path.join(args.directory, AUTHORIZED_DIR)
    os.makedirs(authorized, mode=0o700, exist_ok=True)
    create_certificates(args.directory, "server")
    client_public, _ = create_certificates(args.directory, "client")
    shutil.copy(client_public, authorized)
    print(f"stormd --endpoint tcp://127.0.0.1:PORT --curve-dir {args.directory}")
    print(f"clients: STORM_CURVE_SERVER_KEY={os.path.join(args.directory, 'server.key')}")
    print(f"         STORM_CURVE_CLIENT_KEY={os.path.join(args.directory, 'client.key_secret')}")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "ping": command_ping,
    "stats": command_stats,
    "status": command_status,
    "shutdown": command_shutdown,
    "keygen": command_keygen,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except StormError as e:
        print(f"stormctl: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
