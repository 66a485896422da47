"""NOTE [Fork]: a forked child never uses, closes or unregisters the parent's StormSystem.

A fresh interpreter makes a system, offloads, and forks; the child tries the system,
reports what happened through a pipe and exits either with ``os._exit`` or normally
(atexit handlers and finalizers run, and must not close the parent's system). The
parent then checks that its session is intact. On CUDA the parent has made its streams
and pinned a chunk before the fork, and the child makes no CUDA call at all. A fresh
interpreter, because a normal exit from a child forked inside pytest would go on
running the test session.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    import torch
    from client import StormSystem
    from storm_service.errors import StormError

    endpoint, exit_mode, device = sys.argv[1:]
    system = StormSystem(endpoint)
    kept = torch.arange(65536.0, device=device)  # on CUDA: streams made, chunks pinned
    handle = system.offload(kept)
    system.flush()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        verdicts = {}
        for name, use in [
            ("offload", lambda: system.offload(torch.ones(4))),  # a CPU tensor: CUDA is the parent's
            ("fetch", lambda: system.fetch(handle)),
            ("flush", system.flush),
            ("transfer_d2h_stream", lambda: system.transfer_d2h_stream),
        ]:
            try:
                use()
                verdicts[name] = "worked in the child"
            except StormError as e:
                verdicts[name] = str(e)
        system.free(handle)  # no-ops in the child: the handle stays the parent's
        system.close()
        os.write(write, json.dumps(verdicts).encode())
        # From here on a close would come from the exit: it must not come at all.
        StormSystem.close = lambda self: os.write(write, b"|closed at exit")
        if exit_mode == "_exit":
            os._exit(0)
        sys.exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:  # read until the child is gone, exit handlers included
        verdicts, *after_exit = pipe.read().split("|")
    deadline = time.monotonic() + 60
    status = None
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    fresh = torch.randn(1024, device=device)
    report = {
        "verdicts": json.loads(verdicts or "{}"),
        "after_exit": after_exit,
        "child_exit": os.waitstatus_to_exitcode(status) if status is not None else "hung",
        "kept_intact": torch.equal(system.fetch(handle), kept),
        "fresh_round_trip": torch.equal(system.fetch(system.offload(fresh)), fresh),
        "session_handles": system.stats().handles,
    }
    print(json.dumps(report))
    """
)


CUDA = pytest.param(
    "cuda",
    marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")],
)


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("exit_mode", ["_exit", "normal"])
def test_a_forked_child_leaves_the_parents_session_alone(daemon, exit_mode, device):
    before = daemon.stats()
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, daemon.endpoint, exit_mode, device],
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["child_exit"] == 0  # it exited, within the bounded wait
    assert report["after_exit"] == []  # its exit closed nothing
    assert set(report["verdicts"]) == {"offload", "fetch", "flush", "transfer_d2h_stream"}
    for name, verdict in report["verdicts"].items():
        assert "forked child" in verdict and "create a StormSystem in the child" in verdict, name
    assert report["kept_intact"] and report["fresh_round_trip"]
    assert report["session_handles"] == 2  # both of the parent's handles, still held after the child left
    after = daemon.stats()
    unregistered = after["requests"].get("unregister", 0) - before["requests"].get("unregister", 0)
    assert unregistered == 1  # the parent's own close at its exit, never the child's
    assert after["expired_sessions"] == before["expired_sessions"]
    assert after["sessions"] == [] and after["used_bytes"] == 0
