"""Pinning in chunks (NOTE [Pinning in chunks]) with fake CUDA calls: no device, no memory."""

from __future__ import annotations

import pytest

from storm_service.shm import PIN_CHUNK_BYTES, PinError, pin, unpin

BASE = 0x7F00_0000_0000


def test_pin_registers_chunks_that_cover_the_range_once() -> None:
    size_bytes = 2 * PIN_CHUNK_BYTES + 4096
    calls: list[tuple[int, int]] = []
    pin(BASE, size_bytes, lambda address, length: calls.append((address, length)) or 0)
    assert calls == [
        (BASE, PIN_CHUNK_BYTES),
        (BASE + PIN_CHUNK_BYTES, PIN_CHUNK_BYTES),
        (BASE + 2 * PIN_CHUNK_BYTES, 4096),
    ]


def test_unpin_unregisters_at_the_offsets_pin_registered() -> None:
    size_bytes = 2 * PIN_CHUNK_BYTES + 4096
    registered: list[int] = []
    unregistered: list[int] = []
    pin(BASE, size_bytes, lambda address, length: registered.append(address) or 0)
    unpin(BASE, size_bytes, lambda address: unregistered.append(address) or 0)
    assert unregistered == registered


def test_failed_pin_names_the_chunk_offset_and_the_error() -> None:
    def register(address: int, length: int) -> int:
        return 2 if address == BASE + PIN_CHUNK_BYTES else 0  # 2: cudaErrorMemoryAllocation

    with pytest.raises(
        PinError, match=rf"pin segment s: .* {PIN_CHUNK_BYTES} bytes at offset {PIN_CHUNK_BYTES} .*error 2"
    ):
        pin(BASE, 3 * PIN_CHUNK_BYTES, register, what="segment s")


def test_failed_unpin_tries_every_chunk_then_names_the_failed_offsets() -> None:
    tried: list[int] = []

    def unregister(address: int) -> int:
        tried.append(address)
        return 712 if address == BASE else 0  # 712: cudaErrorHostMemoryNotRegistered

    with pytest.raises(PinError, match=r"unpin mapping: .*offset 0: CUDA error 712"):
        unpin(BASE, 2 * PIN_CHUNK_BYTES, unregister)
    assert tried == [BASE, BASE + PIN_CHUNK_BYTES]
