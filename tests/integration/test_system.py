"""StormSystem against a real daemon: round trips, threads, leaks and pool pressure.

Most tests share the module's daemon (``shared_daemon``), which must hold nothing after
each; a test that needs a small pool, other daemon settings or a daemon to kill starts
its own.
"""

from __future__ import annotations

import gc
import os
import re
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
from torch import nn

from client import (
    PoolFullError,
    QuotaExceededError,
    StormError,
    StormModel,
    StormSystem,
    StormUnavailableError,
    fetch_activation_from_cpu,
    offload_activation_to_cpu,
    offload_saved_tensors,
)
from helpers import wait_for


@pytest.fixture
def system(shared_daemon):
    with StormSystem(shared_daemon.endpoint) as system:
        yield system


@pytest.mark.parametrize(
    "tensor",
    [
        torch.randn(300, 70),
        torch.randn(64, 33).t(),  # non-contiguous
        torch.randn(4, 5, 6, dtype=torch.float64),
        torch.randn(1000).to(torch.float16),
        torch.randn(1000).to(torch.bfloat16),
        torch.randint(-(2**40), 2**40, (123,)),
        torch.rand(77) > 0.5,
        torch.randn(10, 10, dtype=torch.complex64),
        torch.tensor(3.5),
        torch.empty(0, 8),
    ],
    ids=["f32", "transposed", "f64", "f16", "bf16", "i64", "bool", "c64", "scalar", "empty"],
)
def test_fetch_returns_tensor_offloaded(system, tensor):
    handle = system.offload(tensor, layer_id=1)
    back = system.fetch(handle)
    assert back.dtype == tensor.dtype and back.shape == tensor.shape and back.device == tensor.device
    assert torch.equal(back, tensor)
    system.free(handle)
    assert system.stats().used_bytes == 0


def test_fetch_into_a_given_tensor(system):
    activation = torch.randn(96, 130)
    handle = system.offload(activation)
    out = torch.zeros(96, 130)
    assert system.fetch(handle, out=out) is out and torch.equal(out, activation)
    out.zero_()
    assert system.fetch(handle, out=out) is out and torch.equal(out, activation)  # fetched twice
    system.free(handle)
    kept = torch.ones(8, 8)  # a tensor kept in place under pressure is copied the same way
    with StormSystem(system.endpoint, name="tiny", quota_bytes=512, policy="keep") as tiny:
        big = tiny.offload(kept.repeat(64, 1))
        assert torch.equal(tiny.fetch(big, out=torch.empty(512, 8)), kept.repeat(64, 1))


@pytest.mark.parametrize(
    "out, kwargs, message",
    [
        (torch.empty(96, 131), {}, r"out= is \(96, 131\) torch.float32 on cpu; .* needs \(96, 130\) torch.float32"),
        (torch.empty(96, 130, dtype=torch.float64), {}, "torch.float64"),
        (torch.empty(96, 130), {"alias": True}, "cannot also fill out="),
    ],
    ids=["shape", "dtype", "alias"],
)
def test_fetch_into_a_mismatched_tensor_is_refused_and_loses_nothing(system, out, kwargs, message):
    activation = torch.randn(96, 130)
    handle = system.offload(activation)
    with pytest.raises(ValueError, match=message):
        system.fetch(handle, out=out, **kwargs)
    assert torch.equal(system.fetch(handle), activation)
    system.free(handle)
    assert system.stats().used_bytes == 0


@pytest.mark.parametrize("budget_tensors", [6, 0])
def test_reverse_fetches_are_prefetched_in_whole_layers(shared_daemon, budget_tensors):
    daemon = shared_daemon  # its request counts are read as differences
    tensor_bytes, layers, per_layer = 64 << 10, 10, 4
    count = layers * per_layer
    with StormSystem(daemon.endpoint, prefetch_bytes=budget_tensors * tensor_bytes) as system:
        tensors = [torch.full((tensor_bytes // 4,), float(i)) for i in range(count)]
        handles = [system.offload(t, layer_id=i // per_layer) for i, t in enumerate(tensors)]
        before, fetch_requests = system.stats().as_dict(), daemon.stats()["requests"].get("fetch", 0)
        for handle, tensor in zip(reversed(handles), reversed(tensors), strict=True):
            assert torch.equal(system.fetch(handle), tensor)
            system.free(handle)
        after = system.stats().as_dict()
        fetch_requests = daemon.stats()["requests"]["fetch"] - fetch_requests
    counts = {k: after[k] - before[k] for k in ("prefetch_hits", "prefetch_waits", "fetch_misses", "fetch_round_trips")}
    if budget_tensors == 0:
        assert counts == {"prefetch_hits": 0, "prefetch_waits": 0, "fetch_misses": count, "fetch_round_trips": count}
        assert fetch_requests == count
    else:
        # Only the first fetch misses. Refills wait until half the budget is used and run
        # on to the end of a layer, so there are fewer fetch requests than layers.
        assert counts["fetch_misses"] == 1 and counts["prefetch_hits"] + counts["prefetch_waits"] == count - 1
        assert 2 <= fetch_requests == counts["fetch_round_trips"] < layers, counts


def test_offload_free_functions_round_trip(system):
    activation = torch.randn(256, 256)
    handle = offload_activation_to_cpu(activation, layer_id=5, system=system)
    stats = system.stats().as_dict()
    assert stats["layer_bytes"] == {5: stats["used_bytes"]} and stats["used_bytes"] >= activation.nbytes
    assert torch.equal(fetch_activation_from_cpu(handle, system=system), activation)
    assert system.stats().used_bytes == 0
    with pytest.raises(StormError, match="freed"):
        system.fetch(handle)


def test_buffer_views_the_pool_bytes(system):
    tensor = torch.arange(1024, dtype=torch.float32)
    handle = system.offload(tensor)
    buffer = system.buffer(handle)
    assert torch.equal(buffer.as_tensor(torch.float32, (1024,)), tensor)
    system.free(handle)


def test_threads_offload_and_fetch_concurrently(system):
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            generator = torch.Generator().manual_seed(seed)
            for _ in range(25):
                tensors = [torch.randn(int(n), generator=generator) for n in torch.randint(1, 50_000, (4,))]
                handles = [system.offload(t, layer_id=seed) for t in tensors]
                for t, h in zip(tensors, handles, strict=True):
                    assert torch.equal(system.fetch(h), t)
                    system.free(h)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert system.stats().used_bytes == 0


def test_session_holds_nothing_after_backward(system):
    model = StormModel(32, 128, 4, num_layers=5, system=system)
    loss = model(torch.randn(64, 32)).sum()
    forward = system.stats().as_dict()  # stats() flushes: every copy is committed, no space left reserved
    assert forward["used_bytes"] > 0 and forward["reserved_bytes"] == 0
    loss.backward()
    after = system.stats().as_dict()
    assert (after["used_bytes"], after["reserved_bytes"], after["handles"]) == (0, 0, 0)


def test_graph_dropped_without_backward_frees_its_handles(system):
    model = StormModel(32, 128, 4, num_layers=5, system=system)
    out = model(torch.randn(64, 32))
    assert system.stats().used_bytes > 0
    del out
    gc.collect()
    assert system.stats().used_bytes == 0

    def failing_forward() -> None:
        with offload_saved_tensors(system, min_bytes=0):
            hidden = torch.randn(64, 64, requires_grad=True).exp()
            raise RuntimeError(f"boom {hidden.shape}")

    with pytest.raises(RuntimeError, match="boom"):
        failing_forward()
    gc.collect()
    assert system.stats().used_bytes == 0


def test_retain_graph_backward_twice_gives_same_gradients(system):
    layer = nn.Linear(16, 16)
    x = torch.randn(8, 16, requires_grad=True)
    with offload_saved_tensors(system, min_bytes=0):
        loss = torch.tanh(layer(x)).sum()
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    x.grad = None
    loss.backward()
    assert torch.equal(first, x.grad)
    del loss
    gc.collect()
    assert system.stats().used_bytes == 0


def test_views_and_tensors_saved_twice_are_offloaded_once(system):
    x = torch.randn(64, 256, requires_grad=True)
    with offload_saved_tensors(system, min_bytes=0) as moved:
        y = x * 2
        z = (y * y).sum() + (y.view(256, 64) ** 2).sum()  # y saved by mul twice and by pow through a view
    assert moved.shared_packs == 2  # y saved by mul twice and by pow through a view: one storage
    assert moved.offloaded_storages == 1 and moved.offloaded_bytes == y.nbytes
    z.backward()
    assert torch.equal(x.grad, 8 * y.detach())  # d/dy of 2·Σy² is 4y, times dy/dx = 2


def test_keep_policy_leaves_tensors_in_place_when_pool_is_full(daemon_factory):
    daemon = daemon_factory(pool_size="1MiB")
    with StormSystem(daemon.endpoint, policy="keep") as system:
        big = torch.randn(512, 1024)  # 2 MiB: cannot fit
        handle = system.offload(big)
        assert torch.equal(system.fetch(handle), big)
        assert system.stats().kept_tensors == 1
        system.free(handle)


def test_error_policy_raises_pool_full_with_numbers(daemon_factory):
    daemon = daemon_factory(pool_size="1MiB")
    with StormSystem(daemon.endpoint, policy="error") as system:
        handle = system.offload(torch.randn(512, 1024))
        with pytest.raises(PoolFullError, match=r"offload: \d+ bytes requested, \d+ free"):
            system.fetch(handle)


def test_wait_policy_succeeds_once_space_is_freed(daemon_factory):
    daemon = daemon_factory(pool_size="4MiB")
    with StormSystem(daemon.endpoint, policy="wait", wait_timeout_s=20) as system:
        first = torch.randn(768, 1024)  # 3 MiB
        h1 = system.offload(first)
        system.flush()
        h2 = system.offload(torch.ones(768, 1024))  # waits: only 1 MiB free
        threading.Timer(0.3, system.free, args=(h1,)).start()
        assert torch.equal(system.fetch(h2), torch.ones(768, 1024))
        assert system.stats().kept_tensors == 0


def test_process_exit_without_close_leaves_nothing_in_the_daemon(shared_daemon):
    daemon = shared_daemon
    script = textwrap.dedent(
        f"""
        import torch
        from client import StormSystem
        system = StormSystem({daemon.endpoint!r})
        handles = [system.offload(torch.randn(1000, 100)) for _ in range(5)]
        system.flush()
        print(system.stats().used_bytes)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.strip()) > 0
    wait_for(lambda: daemon.stats()["used_bytes"] == 0 and not daemon.stats()["sessions"], what="release")


def test_killed_client_memory_returns_to_pool(shared_daemon):
    daemon = shared_daemon
    script = textwrap.dedent(
        f"""
        import sys, time, torch
        from client import StormSystem
        system = StormSystem({daemon.endpoint!r})
        system.offload(torch.randn(1000, 1000))
        system.flush()
        print("ready", flush=True)
        time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    assert daemon.stats()["used_bytes"] > 0
    proc.kill()
    proc.wait()
    wait_for(lambda: daemon.stats()["used_bytes"] == 0, timeout_s=8, what="the killed client's extents")


def test_daemon_death_raises_unavailable_quickly_and_a_restart_serves_new_work(daemon_factory):
    daemon = daemon_factory()
    system = StormSystem(daemon.endpoint)
    handle = system.offload(torch.randn(100, 100))
    system.flush()
    daemon.kill()
    started = time.monotonic()
    with pytest.raises(StormUnavailableError, match=re.escape(daemon.endpoint)):
        system.stats()
    assert time.monotonic() - started < 2.0
    with pytest.raises(StormUnavailableError, match=re.escape(daemon.endpoint)):
        system.fetch(handle)

    daemon_factory(endpoint=daemon.endpoint)  # a new daemon on the same endpoint
    fresh = torch.randn(50, 50)
    new_handle = system.offload(fresh)  # registers again for new work
    assert torch.equal(system.fetch(new_handle), fresh)
    with pytest.raises(StormUnavailableError, match="gone"):
        system.fetch(handle)  # never silently replaced by whatever the new daemon holds
    system.free(new_handle)
    assert system.stats().used_bytes == 0
    system.close()


def test_unavailable_daemon_fails_register_with_endpoint(tmp_path):
    endpoint = f"ipc://{tmp_path}/nobody.sock"
    with pytest.raises(StormUnavailableError, match=r"nobody\.sock"):
        StormSystem(endpoint, timeout_s=0.5)


def test_quota_defaults_to_the_daemons_and_requests_are_capped(daemon_factory):
    daemon = daemon_factory(pool_size="16MiB", extra_args=["--quota", "1MiB", "--max-quota", "2MiB"])
    with (
        StormSystem(daemon.endpoint, policy="error") as default,
        StormSystem(daemon.endpoint, quota_bytes=8 << 20, policy="error") as greedy,
    ):
        assert default.quota_bytes == 1 << 20
        assert greedy.quota_bytes == 2 << 20
        handle = default.offload(torch.randn(512, 1024))  # 2 MiB > its 1 MiB quota
        with pytest.raises(QuotaExceededError, match=r"offload: \d+ bytes requested, \d+ left of a 1048576-byte quota"):
            default.fetch(handle)
        fits = torch.randn(256, 1024)  # 1 MiB fits the capped 2 MiB quota
        assert torch.equal(greedy.fetch(greedy.offload(fits)), fits)


def test_a_forked_child_cannot_use_the_parents_system(system):
    """NOTE [Fork]: the child gets a clear error, and its exit leaves the parent's session alone."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what happened through the pipe, then leave without cleanup
        os.close(read)
        try:
            system.offload(torch.ones(4))
            verdict = b"offload worked in the child"
        except StormError as e:
            verdict = b"refused" if b"forked child" in str(e).encode() else str(e).encode()
        system.close()  # a no-op in the child
        os.write(write, verdict)
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        verdict = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    assert verdict == b"refused"
    handle = system.offload(torch.arange(16.0))
    assert torch.equal(system.fetch(handle), torch.arange(16.0))
    system.free(handle)
    assert system.stats().used_bytes == 0


@pytest.mark.parametrize("policy", ["error", "wait"])
def test_after_a_step_that_found_the_pool_full_the_next_steps_that_fit_succeed(daemon_factory, policy):
    """One refusal is reported once, and the refused step's memory comes back."""
    daemon = daemon_factory(pool_size="8MiB")
    model = nn.Sequential(*[nn.Sequential(nn.Linear(512, 512), nn.GELU()) for _ in range(6)])

    def step(system, batch):
        try:
            with offload_saved_tensors(system, min_bytes=0):
                loss = model(torch.randn(batch, 512)).sum()
            loss.backward()
            return "ok"
        except (PoolFullError, QuotaExceededError):
            return "full"

    with StormSystem(daemon.endpoint, policy=policy, wait_timeout_s=0.5) as system:
        assert step(system, 1024) == "full"
        gc.collect()
        assert [step(system, 8) for _ in range(5)] == ["ok"] * 5
        assert system.stats().used_bytes == 0
