"""What the tests share besides fixtures: a daemon process as a test sees it, the /dev/shm
segments, and a deadline wait. Import it as ``from helpers import ...`` (tests/ is on
sys.path because tests/conftest.py lives there; ``from conftest import`` would be
ambiguous, since tests/docker has a conftest.py of its own).
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import pytest
import torch
import zmq

from client import offload_saved_tensors
from client.settings import ClientSettings
from client.transport import Channel
from storm_service.protocol import MAX_MESSAGE_BYTES, MAX_SIZE_BYTES, Op, decode_reply, encode_request
from storm_service.shm import SEGMENT_PREFIX, SHM_DIR

__all__ = [
    "BAD_FRAMES",
    "SEGMENT_PREFIX",
    "SHM_DIR",
    "DaemonProcess",
    "StartDaemon",
    "mapped_segments",
    "recorded_segments",
    "storm_segments",
    "wait_for",
]

BAD_FRAMES: dict[str, tuple[list[bytes], str, int | None]] = {
    "garbage": ([b"\xc1\xff\x00garbage"], "BAD_REQUEST", None),
    "not-a-map": ([msgpack.packb([1, 2, 3])], "BAD_REQUEST", None),
    "multi-frame": ([encode_request(7, Op.PING), b"second"], "BAD_REQUEST", None),
    "wrong-type": ([encode_request(7, Op.REGISTER, pid="1")], "BAD_REQUEST", 7),
    "bool-for-int": ([encode_request(7, Op.REGISTER, pid=True)], "BAD_REQUEST", 7),
    "unknown-op": ([msgpack.packb({"v": 2, "id": 7, "op": "format_disk"})], "UNKNOWN_OP", 7),
    "op-is-a-list": ([msgpack.packb({"v": 2, "id": 7, "op": ["ping"]})], "UNKNOWN_OP", 7),
    "old-version": ([msgpack.packb({"v": 0, "id": 7, "op": "ping"})], "UNSUPPORTED_VERSION", 7),
    "oversized-value": ([encode_request(7, Op.OFFLOAD, "t", sizes=[MAX_SIZE_BYTES + 1])], "BAD_REQUEST", 7),
    "oversized-batch": ([encode_request(7, Op.FREE, "t", handles=[1] * 4097)], "BAD_REQUEST", 7),
    "just-over-max": ([b"\x00" * (MAX_MESSAGE_BYTES + 10)], "BAD_REQUEST", None),
}
"""Bad input by name: the frames of one message, the error code it gets and the reply's id.
A message of several frames is refused by the serving loop; the rest by ``Server.dispatch``."""

# One id sequence for every channel of the test process, so that two channels used on
# one session never reuse a request id (the daemon would answer a replay).
_REQUEST_IDS = itertools.count(1)


def storm_segments() -> set[str]:
    """Names of every STORM segment now in /dev/shm."""
    return {name for name in os.listdir(SHM_DIR) if name.startswith(SEGMENT_PREFIX)}


def mapped_segments() -> set[str]:
    """STORM segments some live process maps (another test session's daemon, say)."""
    mapped: set[str] = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    path = line.rstrip("\n").rsplit(" ", 1)[-1]
                    if path.startswith(f"{SHM_DIR}/{SEGMENT_PREFIX}"):
                        mapped.add(os.path.basename(path))
        except OSError:
            continue
    return mapped


def wait_for(predicate: Callable[[], Any], timeout_s: float = 10.0, what: str = "condition") -> Any:
    """Poll ``predicate`` every 50 ms until it returns something truthy, and return that;
    fail naming ``what`` once ``timeout_s`` has passed."""
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.05)
    return value


@dataclass
class DaemonProcess:
    """A running (or stopped) stormd subprocess and where it serves."""

    endpoint: str
    socket_dir: str
    proc: subprocess.Popen[bytes]
    log_path: str

    @property
    def socket_path(self) -> str:
        return self.endpoint[len("ipc://") :]

    def channel(self) -> Channel:
        """A connected channel to this daemon; the caller closes it."""
        return Channel(
            zmq.Context.instance(),
            self.endpoint,
            _REQUEST_IDS,
            alive=lambda: self.proc.poll() is None,
            curve=ClientSettings.load().curve_keys(),
        )

    def stats(self) -> dict[str, Any]:
        """One STATS call without a session token."""
        channel = self.channel()
        try:
            return channel.call(Op.STATS)
        finally:
            channel.close()

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self, timeout_s: float = 10) -> int:
        """SIGTERM the daemon and wait for it; returns its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"stormd did not stop within {timeout_s} s of SIGTERM; log:\n{self.log()}")

    def kill(self) -> None:
        """SIGKILL the daemon and reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


StartDaemon = Callable[..., DaemonProcess]
"""The ``daemon_factory`` fixture: ``start(pool_size=, heartbeat_timeout=, extra_args=, endpoint=)``."""


def recorded_segments(daemon: DaemonProcess) -> set[str] | None:
    """The segment names a daemon recorded in its endpoint lock file (NOTE [Endpoint lock]),
    or None when there is no readable record."""
    try:
        with open(daemon.socket_path + ".lock") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    names = record.get("segments") if isinstance(record, dict) else None
    return {n for n in names if isinstance(n, str)} if isinstance(names, list) else None


def run_as(uid: int, gid: int, work: Callable[[], Any]) -> Any:
    """Run ``work`` in a forked child that dropped to ``uid`` and ``gid``; return its JSON-able result.

    The child must make its own ZeroMQ context (a parent's must not be used after fork).
    An exception in the child fails the test with its type and message. Needs root.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 0
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            payload = json.dumps({"result": work()})
        except BaseException as e:
            payload, status = json.dumps({"error": f"{type(e).__name__}: {e}"}), 1
        with os.fdopen(write_end, "w") as out:
            out.write(payload)
        os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end) as result:
        data = json.loads(result.read() or "{}")
    os.waitpid(pid, 0)
    assert "result" in data, f"as uid {uid}: {data.get('error', 'no result')}"
    return data["result"]


def torchrun_worker(args: list[str], summaries: Any, tag: str, ranks: int) -> list[dict[str, Any]]:
    """Run ``storm-worker`` under ``torchrun --standalone`` with ``ranks`` processes, 5 steps;
    returns each rank's summary. Parameters are saved to ``summaries / f"{tag}.pt"``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STORM_")}
    env["GLOO_SOCKET_IFNAME"] = "lo"
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)),
        *("-m", "worker.main", *args, "--steps", "5"),
        *("--save-params", str(summaries / f"{tag}.pt"), "--summary", str(summaries / f"{tag}-{{rank}}.json")),
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return [json.loads((summaries / f"{tag}-{rank}.json").read_text()) for rank in range(ranks)]


def train_steps(model: Any, inputs: list[Any], system: Any) -> list[list[Any]]:
    """Loss and gradients of one step per input, everything saved offloaded through ``system`` (None: no STORM)."""
    out = []
    for x in inputs:
        model.zero_grad()
        if system is None:
            loss = model(x).square().mean()
        else:
            with offload_saved_tensors(system, min_bytes=0):
                loss = model(x).square().mean()
        loss.backward()
        out.append([loss.detach()] + [p.grad.clone() for p in model.parameters()])
    return out


class InProcess:
    """Plays clients of a ``Server`` in this process, through ``dispatch``: request frames in, replies out."""

    _ids = itertools.count(1)

    def __init__(self, server: Any) -> None:
        self.server = server

    def call(self, op: Op, token: str | None = None, peer: Any = None, **fields: Any) -> dict[str, Any]:
        reply = self.send(op, token, peer, **fields)
        assert reply.ok, (reply.code, reply.message)
        return dict(reply.result)

    def send(self, op: Op, token: str | None = None, peer: Any = None, **fields: Any) -> Any:
        request_id = next(self._ids)
        reply = decode_reply(self.server.dispatch(encode_request(request_id, op, token, **fields), peer))
        assert reply.id == request_id
        return reply


def assert_steps_equal(ours: list[list[Any]], theirs: list[list[Any]], what: object) -> None:
    """Every loss and gradient of every step ``torch.equal``; the message names the step and tensor."""
    for step, (a_step, b_step) in enumerate(zip(ours, theirs, strict=True)):
        for index, (a, b) in enumerate(zip(a_step, b_step, strict=True)):
            assert torch.equal(a, b), f"{what}: step {step} tensor {index} off by {(a - b).abs().max()}"


def in_threads(work: Callable[[Any], None], keys: list[Any]) -> None:
    """Run ``work(key)`` for every key at once, one thread each; re-raise what any of them raised."""
    failures: list[BaseException] = []

    def run(key: Any) -> None:
        try:
            work(key)
        except BaseException as e:  # re-raised on the caller's thread
            failures.append(e)

    threads = [threading.Thread(target=run, args=(key,)) for key in keys]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures
