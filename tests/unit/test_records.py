"""Span geometry, record lookup by storage identity, and verify-mode checksums (no daemon)."""

from __future__ import annotations

import gc
import threading

import pytest
import torch

from client.handle import Handle
from client.integrity import checksum, device_checksum
from client.records import Geometry, RecordTable, SpanRecord


def _record(tensor: torch.Tensor) -> SpanRecord:
    geometry = Geometry.of(tensor)
    handle = Handle(shape=(1,), dtype=torch.uint8, device=tensor.device, size_bytes=1, layer_id=None, seq=0)
    root = tensor._base if tensor._base is not None else tensor
    return SpanRecord(
        handle=handle,
        lo=geometry.span[0],
        geometry=geometry,
        root=root,
        version=tensor._version,
        layer="-",
        checksum=None,
        free=lambda handle: None,
    )


@pytest.mark.parametrize(
    ("make", "span", "dense"),
    [
        (lambda b: b, (0, 4 * 48), True),
        (lambda b: b.t(), (0, 4 * 48), True),
        (lambda b: b[2:4], (4 * 16, 4 * 32), True),
        (lambda b: b[:, 1:3], (4 * 1, 4 * (5 * 8 + 3)), False),
        (lambda b: b.chunk(4, dim=1)[3], (4 * 6, 4 * 48), False),
        (lambda b: b[:, :1].expand(6, 5), (0, 4 * (5 * 8 + 1)), False),
        (lambda b: b.view(-1)[::2], (0, 4 * 47), False),
    ],
)
def test_span_covers_exactly_the_elements(make, span, dense):
    base = torch.arange(48, dtype=torch.float32).view(6, 8)
    geometry = Geometry.of(make(base))
    assert geometry.span == span
    assert geometry.dense is dense


def test_dense_span_shares_inner_views_of_the_same_version_only():
    base = torch.randn(8, 8)
    record = _record(base)
    assert record.covers(Geometry.of(base[2:5]), base, base._version)
    assert record.covers(Geometry.of(base.t()), base, base._version)
    assert not record.covers(Geometry.of(base[2:5]), base, base._version + 1)
    assert not record.covers(Geometry.of(base[2:5]), base.clone(), base._version)


def test_gappy_span_shares_only_the_same_view():
    base = torch.randn(8, 8)
    column = base[:, 0:2]
    record = _record(column)
    assert record.covers(Geometry.of(base[:, 0:2]), base, base._version)
    assert not record.covers(Geometry.of(base[:7, 2:4]), base, base._version)  # inside the span, not the elements


def test_records_are_found_by_storage_identity_not_address():
    table = RecordTable()
    first = torch.randn(32)
    record = _record(first)
    table.add(first.untyped_storage(), record)
    assert table.find(first.untyped_storage(), Geometry.of(first), first, first._version) is record
    address = first.data_ptr()
    del first
    gc.collect()
    assert len(table) == 0, "a dead storage's records must go with it"
    for _ in range(50):
        second = torch.randn(32)
        if second.data_ptr() == address:
            break
    assert table.find(second.untyped_storage(), Geometry.of(second), second, second._version) is None


def test_a_storage_dying_on_another_thread_while_the_table_is_busy():
    table = RecordTable()
    tensors = [torch.randn(16) for _ in range(200)]
    for tensor in tensors:
        table.add(tensor.untyped_storage(), _record(tensor))
    del tensor
    dropper = threading.Thread(target=tensors.clear)
    dropper.start()
    for _ in range(200):
        probe = torch.randn(16)
        table.find(probe.untyped_storage(), Geometry.of(probe), probe, 0)
    dropper.join()
    gc.collect()
    assert len(table) == 0


@pytest.mark.parametrize("hash_fn", [checksum, device_checksum])
@pytest.mark.parametrize("start", [0, 1, 3, 8])
def test_checksums_change_when_any_single_byte_changes(hash_fn, start):
    data = torch.randint(0, 256, (301,), dtype=torch.uint8)[start:]
    reference = hash_fn(data)
    assert hash_fn(data) == reference
    for index in range(data.numel()):
        data[index] ^= 0x80
        assert hash_fn(data) != reference, f"byte {index} flipped unnoticed"
        data[index] ^= 0x80
