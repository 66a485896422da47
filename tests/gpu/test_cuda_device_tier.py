"""The device tier on real GPUs: stormd lends GPU memory through CUDA IPC handles. Skipped without CUDA.

NOTE [CUDA backend] in storm_service/device/cuda.py (the daemon's side) and NOTE
[Importing device slabs] in client/engine/ipc.py (the client's). Long sleep kernels hold
a stream busy so that a copy, or the kernel it must wait for, runs late: the ordering of
NOTE [Device hygiene] must still give back bit-identical bytes.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from client import StormSystem
from client.engine.ipc import DeviceSegment
from client.engine.placement import gpu_uuid as _uuid
from client.handle import Handle
from helpers import DaemonProcess, StartDaemon, wait_for
from storm_service.errors import ActivationLostError, StormUnavailableError

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: the device tier lends GPU memory"),
]

DEVICE_POOL = "256MiB"


def _lending(daemon_factory: StartDaemon, index: int) -> DaemonProcess:
    """A daemon whose device tier is ``DEVICE_POOL`` of CUDA device ``index``."""
    return daemon_factory(pool_size="256MiB", extra_args=["--device-pool", f"cuda:{_uuid(index)}={DEVICE_POOL}"])


def _slab_of(system: StormSystem, handle: Handle) -> object:
    """The slab the handle's extent is in, once its offload is done."""
    where = system.locate(handle)
    assert where is not None, f"{handle!r} holds no extent"
    return system.segments[where[1]]


def _sleep_ms(ms: float, cycles_per_ms: float) -> None:
    torch.cuda._sleep(int(ms * cycles_per_ms))


@pytest.fixture
def system(daemon_factory):
    with StormSystem(_lending(daemon_factory, 0).endpoint) as system:
        yield system


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
def test_a_cuda_tensor_round_trips_bit_exact_through_a_device_slab(system, cycles_per_ms, dtype):
    source = (torch.randn(1024, 257, device="cuda") * 100).to(dtype)
    produced = torch.empty_like(source)
    torch.cuda.synchronize()
    _sleep_ms(100, cycles_per_ms)  # the producer's stream is busy...
    produced.copy_(source)  # ...and writes the tensor only after the sleep
    handle = system.offload(produced)  # offloaded at once, long before that write
    assert isinstance(_slab_of(system, handle), DeviceSegment), "the offload went to the host pool"
    with torch.cuda.stream(system.transfer_h2d_stream):
        _sleep_ms(100, cycles_per_ms)  # the copy back starts late
    back = system.fetch(handle)
    assert back.device == source.device and back.dtype == dtype
    assert torch.equal(back, source)
    system.free(handle)
    assert system.stats().used_bytes == 0


def test_activations_moved_off_a_full_device_to_the_host_come_back_bit_exact(daemon_factory):
    """The daemon's own copy (``cudaMemcpy`` into its host mapping) runs only when the device fills."""
    daemon = _lending(daemon_factory, 0)
    sources = [torch.randn(4 << 20, device="cuda") for _ in range(15)]  # 15 x 16 MiB into a 256 MiB device
    with StormSystem(daemon.endpoint) as system:
        handles = [system.offload(source) for source in sources]
        system.flush()
        stats = wait_for(lambda: (s := daemon.stats())["device_evictions"] > 0 and s, what="a move to the host")
        assert stats["device_evict_errors"] == 0
        for handle, source in zip(reversed(handles), reversed(sources), strict=True):
            assert torch.equal(system.fetch(handle), source)
            system.free(handle)


def test_a_delayed_copy_into_a_device_slab_keeps_its_source_though_freed_and_reused(system, cycles_per_ms):
    for _ in range(3):
        source = torch.randn(2048, 2048, device="cuda")  # 16 MiB
        expected = source.clone()
        with torch.cuda.stream(system.transfer_d2h_stream):
            _sleep_ms(200, cycles_per_ms)  # the copy into the slab starts late
        handle = system.offload(source)
        del source  # the caller lets go at once; the allocator may hand its block out again
        reuse = torch.empty(2048, 2048, device="cuda").fill_(7.0)
        assert isinstance(_slab_of(system, handle), DeviceSegment)
        assert torch.equal(system.fetch(handle), expected)
        assert bool((reuse == 7.0).all())
        system.free(handle)


def test_a_device_slab_is_opened_once_and_later_offloads_pay_no_open(system):
    x = torch.randn(1 << 20, device="cuda")  # 4 MiB
    torch.cuda.synchronize()
    started = time.perf_counter()
    first = system.offload(x)
    slab = _slab_of(system, first)  # returns once the copy is done
    first_s = time.perf_counter() - started
    assert isinstance(slab, DeviceSegment) and slab.importer == torch.cuda.current_device()
    later = []
    for _ in range(20):
        started = time.perf_counter()
        handle = system.offload(x)
        _slab_of(system, handle)
        later.append(time.perf_counter() - started)
        system.free(handle)
    opened = [segment for segment in system.segments if isinstance(segment, DeviceSegment)]
    print(
        f"first offload into the device tier {first_s * 1e3:.2f} ms (opening the slab {slab.open_s * 1e3:.2f} ms); "
        f"later ones {statistics.median(later) * 1e3:.2f} ms (median of {len(later)})"
    )
    assert opened == [slab]  # one open per slab per process
    assert slab.open_s < first_s and statistics.median(later) < first_s
    assert torch.equal(system.fetch(first), x)


def test_a_daemon_killed_during_a_copy_fails_every_fetch_with_a_typed_error(daemon_factory, cycles_per_ms):
    daemon = _lending(daemon_factory, 0)
    system = StormSystem(daemon.endpoint)
    try:
        kept = system.offload(torch.randn(1024, 1024, device="cuda"))
        assert isinstance(_slab_of(system, kept), DeviceSegment)
        sources = [torch.randn(1024, 1024, device="cuda") for _ in range(4)]  # 4 MiB each
        with torch.cuda.stream(system.transfer_d2h_stream):
            _sleep_ms(1500, cycles_per_ms)  # the copies into the slab wait behind this
        handles = [system.offload(source) for source in sources]
        wait_for(
            lambda: daemon.stats()["device_reserved_bytes"] >= 4 << 20,
            timeout_s=1.0,
            what="the extents to be placed while their copies wait",
        )
        daemon.kill()
        for handle in [kept, *handles]:
            with pytest.raises((StormUnavailableError, ActivationLostError)):
                system.fetch(handle)  # never bytes nobody can vouch for
        torch.cuda.synchronize()  # copies into the dead daemon's memory left this process's CUDA working
        assert torch.equal(sources[0] + sources[0], sources[0] * 2)
    finally:
        system.close()


def _run(script: str, *args: str) -> dict:
    """Run ``script`` in a fresh interpreter; it prints one JSON line last."""
    result = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=150, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_the_link_between_two_gpus_is_measured_reported_and_used(daemon_factory, context_probe):
    client, pool = _uuid(0), _uuid(1)
    daemon = _lending(daemon_factory, 1)
    (device,) = daemon.stats()["devices"]
    assert device["name"].lower() == pool.lower() and device["backend"] == "cuda"
    link = {name.lower(): link for name, link in device["links"].items()}[client.lower()]
    print(f"cuda:0 -> cuda:1: {link['peer_gbps']} GB/s device to device, {link['host_gbps']} GB/s to the host")
    assert link["measured"] and link["peer_gbps"] > 0 and link["host_gbps"] > 0, link
    assert client.lower() in daemon.log().lower()  # the figures are in the daemon's log
    if not link["enabled"]:
        pytest.skip("peer copies are slower than the host path here: the tier keeps cuda:0's activations off it")
    script = context_probe + textwrap.dedent(
        """
        import json, sys
        import torch
        from client import StormSystem
        from client.engine.ipc import DeviceSegment

        storm = sys.argv[2] == "storm"
        x = torch.randn(4096, 1024, device="cuda:0")
        report = {}
        if storm:
            with StormSystem(sys.argv[1]) as system:
                handle = system.offload(x)
                slab = system.segments[system.locate(handle)[1]]
                report = {
                    "device_slab": isinstance(slab, DeviceSegment),
                    "slab_device": slab.device,
                    "importer": getattr(slab, "importer", None),
                    "equal": torch.equal(system.fetch(handle), x),
                }
        torch.cuda.synchronize(0)
        print(json.dumps({**report, "context_1": primary_context_active(1)}))
        """
    )
    plain = _run(script, daemon.endpoint, "plain")
    storm = _run(script, daemon.endpoint, "storm")
    assert storm["device_slab"] and storm["slab_device"].lower() == pool.lower() and storm["importer"] == 0
    assert storm["equal"]
    assert storm["context_1"] == plain["context_1"]  # mapped into cuda:0's context: none made on the pool GPU
