"""Lazy pinning in chunks (NOTE [Lazy pinning]) with fake CUDA calls: no device, no memory."""

from __future__ import annotations

import threading
import time

import pytest

from storm_service.shm import MAX_PIN_CHUNK_BYTES, PIN_CHUNK_BYTES, ChunkPins, PinError

BASE = 0x7F00_0000_0000
CHUNK = PIN_CHUNK_BYTES


class FakeCuda:
    """cudaHostRegister / cudaHostUnregister that record their calls; ``fail`` maps an offset to an error."""

    def __init__(self, fail: dict[int, int] | None = None, fail_unregister: dict[int, int] | None = None) -> None:
        self.registered: list[tuple[int, int]] = []
        self.unregistered: list[int] = []
        self.fail = fail or {}
        self.fail_unregister = fail_unregister or {}

    def register(self, address: int, length: int) -> int:
        err = self.fail.get(address - BASE, 0)
        if err == 0:
            self.registered.append((address - BASE, length))
        return err

    def unregister(self, address: int) -> int:
        self.unregistered.append(address - BASE)
        return self.fail_unregister.get(address - BASE, 0)


def _pins(size_bytes: int, cuda: FakeCuda, **kwargs) -> ChunkPins:  # type: ignore[no-untyped-def]
    return ChunkPins(BASE, size_bytes, cuda.register, cuda.unregister, what="segment s", **kwargs)


def test_chunks_are_whole_huge_pages_and_at_most_one_gib() -> None:
    assert 0 < PIN_CHUNK_BYTES <= MAX_PIN_CHUNK_BYTES == 1 << 30
    assert PIN_CHUNK_BYTES % (2 << 20) == 0
    for bad in (0, 4095, (1 << 30) + 4096, 3 << 30):
        with pytest.raises(ValueError, match="multiple of 4096 bytes up to 1 GiB"):
            _pins(1 << 40, FakeCuda(), chunk_bytes=bad)


def test_chunk_math_covers_each_extent_with_the_chunks_it_touches() -> None:
    pins = _pins(2 * CHUNK + 4096, FakeCuda())
    assert list(pins.chunks(0, CHUNK)) == [0]
    assert list(pins.chunks(CHUNK - 512, 1024)) == [0, 1]
    assert list(pins.chunks(CHUNK, 1)) == [1]
    assert list(pins.chunks(0, 2 * CHUNK + 4096)) == [0, 1, 2]
    assert list(pins.chunks(4096, 0)) == []
    assert pins.chunk(2) == (2 * CHUNK, 4096)  # the last chunk ends with the segment
    with pytest.raises(ValueError, match="outside segment s"):
        pins.chunks(2 * CHUNK, 8192)


def test_pieces_cut_an_extent_at_chunk_boundaries() -> None:
    pins = _pins(3 * CHUNK, FakeCuda())
    assert pins.pieces(512, 1024) == [(0, 1024)]
    assert pins.pieces(CHUNK - 512, CHUNK + 1024) == [(0, 512), (512, CHUNK), (CHUNK + 512, 512)]
    pieces = pins.pieces(CHUNK - 4096, 3 * 4096)
    assert sum(length for _, length in pieces) == 3 * 4096
    assert [start for start, _ in pieces] == [0, 4096]


def test_only_the_chunks_an_extent_touches_are_registered() -> None:
    cuda = FakeCuda()
    pins = _pins(8 * CHUNK, cuda)
    pins.ensure(3 * CHUNK + 100, 1000)
    assert cuda.registered == [(3 * CHUNK, CHUNK)]
    pins.ensure(5 * CHUNK - 512, 1024)
    assert cuda.registered == [(3 * CHUNK, CHUNK), (4 * CHUNK, CHUNK), (5 * CHUNK, CHUNK)]
    assert pins.registered == [3, 4, 5]
    assert pins.pinned_bytes == 3 * CHUNK


def test_ensure_is_idempotent() -> None:
    cuda = FakeCuda()
    pins = _pins(4 * CHUNK, cuda)
    for _ in range(3):
        pins.ensure(CHUNK, 4096)
        pins.ensure(CHUNK + 8192, 4096)
    assert cuda.registered == [(CHUNK, CHUNK)]


def test_concurrent_ensures_register_a_chunk_once() -> None:
    cuda = FakeCuda()
    slow_register = cuda.register

    def register(address: int, length: int) -> int:
        time.sleep(0.01)  # a registration takes a while: the second thread arrives meanwhile
        return slow_register(address, length)

    pins = ChunkPins(BASE, 2 * CHUNK, register, cuda.unregister)
    threads = [threading.Thread(target=pins.ensure, args=(4096 * i, 4096)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert cuda.registered == [(0, CHUNK)]


def test_release_unregisters_exactly_the_registered_chunks_once() -> None:
    cuda = FakeCuda()
    pins = _pins(6 * CHUNK, cuda)
    pins.ensure(CHUNK, 10)
    pins.ensure(4 * CHUNK, CHUNK + 10)
    pins.release()
    assert cuda.unregistered == [CHUNK, 4 * CHUNK, 5 * CHUNK]
    assert pins.registered == []
    pins.release()
    assert cuda.unregistered == [CHUNK, 4 * CHUNK, 5 * CHUNK]


def test_a_failed_register_names_the_chunk_and_the_error_and_keeps_the_chunks_before_it() -> None:
    cuda = FakeCuda(fail={CHUNK: 2})  # 2: cudaErrorMemoryAllocation
    pins = _pins(4 * CHUNK, cuda)
    with pytest.raises(PinError, match=rf"pin segment s: .* {CHUNK} bytes at offset {CHUNK} .*error 2"):
        pins.ensure(CHUNK - 512, 1024)
    assert pins.registered == [0]
    pins.release()
    assert cuda.unregistered == [0]  # never the chunk that failed


def test_a_failed_unregister_tries_every_chunk_then_names_the_failed_offsets() -> None:
    cuda = FakeCuda(fail_unregister={0: 712})  # 712: cudaErrorHostMemoryNotRegistered
    pins = _pins(2 * CHUNK, cuda)
    pins.ensure(0, 2 * CHUNK)
    with pytest.raises(PinError, match=r"unpin segment s: .*offset 0: CUDA error 712"):
        pins.release()
    assert cuda.unregistered == [0, CHUNK]
