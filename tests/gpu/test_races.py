"""Copies that race the compute around them, made visible with long sleep kernels. Skipped without CUDA.

Each test holds a stream busy with ``torch.cuda._sleep`` so that a copy, or the kernel
it must wait for, runs late; the ordering of NOTE [Device hygiene] must still give back
bit-identical bytes.
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch

from client import StormSystem

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture
def system(daemon_factory):
    daemon = daemon_factory(pool_size="4GiB")
    with StormSystem(daemon.endpoint) as system:
        yield system


def _sleep_ms(ms: float, cycles_per_ms: float) -> None:
    torch.cuda._sleep(int(ms * cycles_per_ms))


def test_a_producer_delayed_before_the_copy_is_waited_for(system, cycles_per_ms):
    source = torch.randn(4096, 4096, device="cuda")  # 64 MiB
    expected = source * 3
    produced = torch.zeros_like(source)
    torch.cuda.synchronize()
    _sleep_ms(200, cycles_per_ms)  # the producer's stream is busy...
    torch.mul(source, 3, out=produced)  # ...and writes the tensor only after the sleep
    handle = system.offload(produced)  # offloaded at once, long before that write
    assert torch.equal(system.fetch(handle), expected)
    system.free(handle)


def test_a_delayed_d2h_keeps_its_source_though_freed_and_its_memory_reused(system, cycles_per_ms):
    for _ in range(3):
        source = torch.randn(4096, 4096, device="cuda")
        expected = source.clone()
        with torch.cuda.stream(system.transfer_d2h_stream):
            _sleep_ms(200, cycles_per_ms)  # the copy stream is busy: the D2H copy starts late
        handle = system.offload(source)
        del source  # the caller lets go at once; the allocator may hand its block out again
        reuse = torch.empty(4096, 4096, device="cuda").fill_(7.0)
        assert torch.equal(system.fetch(handle), expected)
        assert bool((reuse == 7.0).all())
        system.free(handle)


def test_a_delayed_h2d_is_done_before_its_extent_is_reused(system, cycles_per_ms):
    for _ in range(3):
        first = torch.randn(4096, 4096, device="cuda")
        handle = system.offload(first)
        system.flush()
        with torch.cuda.stream(system.transfer_h2d_stream):
            _sleep_ms(200, cycles_per_ms)  # the copy back starts late
        back = system.fetch(handle)
        system.free(handle)  # the extent may go to the next offload only once the copy has read it
        system.flush()
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):  # a producer that never waited for the copy back
            second = torch.randn(4096, 4096, device="cuda")
            other = system.offload(second)  # likely into the same extent, at once
        torch.cuda.current_stream().wait_stream(side)
        system.flush()
        assert torch.equal(back, first)
        assert torch.equal(system.fetch(other), second)
        system.free(other)


def test_a_1_gib_offload_overlaps_a_150_ms_kernel(system, cycles_per_ms):
    """Both together take about the longer of the two, not their sum (a generous bound)."""
    x = torch.randn(1 << 28, device="cuda")  # 1 GiB

    def offload_and_wait(kernel: bool) -> None:
        handle = system.offload(x)
        if kernel:
            _sleep_ms(150, cycles_per_ms)  # queued after the offload: the copy need not wait for it
        system.locate(handle)  # returns once the copy is done and the source released
        torch.cuda.synchronize()
        system.free(handle)
        system.flush()

    def timed(work) -> float:  # type: ignore[no-untyped-def]
        samples = []
        for _ in range(3):
            torch.cuda.synchronize()
            started = time.perf_counter()
            work()
            samples.append(time.perf_counter() - started)
        return statistics.median(samples)

    for _ in range(3):  # pins the chunks the extents fall in
        offload_and_wait(kernel=False)

    def kernel_only() -> None:
        _sleep_ms(150, cycles_per_ms)
        torch.cuda.synchronize()

    kernel_s = timed(kernel_only)
    copy_s = timed(lambda: offload_and_wait(kernel=False))
    both_s = timed(lambda: offload_and_wait(kernel=True))
    assert system.stats().kept_tensors == 0
    print(f"kernel {kernel_s * 1e3:.0f} ms, 1 GiB offload {copy_s * 1e3:.0f} ms, both {both_s * 1e3:.0f} ms")
    assert both_s < kernel_s + copy_s - 0.5 * min(kernel_s, copy_s), (kernel_s, copy_s, both_s)
