"""Span records: which bytes of a storage a saved tensor needs, and when two packs may share them.

NOTE [Storage records]
  Autograd saves tensors, but a tensor is a window (offset, sizes, strides) on a
  storage that other tensors share. STORM copies the *span* of bytes a saved tensor's
  own elements cover, not its whole storage:

  * A pack gets the bytes its view held when it was packed (the contract of
    ``torch.autograd.graph.save_on_cpu``). Copying the whole storage later, on the
    transfer thread, broke that: kernels may write one region of a storage between
    the packs of views of other regions (the CPU GRU cell saves chunk views of one
    gate buffer and fills the other chunks in place, through writes that do not bump
    the version counter), so a storage copy shared by several packs held whichever
    bytes the transfer thread happened to read. A span copy also moves fewer bytes for
    chunks, narrow views and small slices of large tensors.
  * A later pack shares an earlier record only where every byte it reads is an
    element of the earlier pack's tensor, so nothing can have written those bytes in
    between without also changing a tensor that was saved: the later span lies inside
    an earlier span that has no gaps (contiguous, transposed or permuted), or both
    packs are the same view. Both must be views of one base (so they share one
    version counter) at the same version. A tensor saved three times, or ``x`` and
    ``x.t()``, is still copied once.
  * A record is found by the identity of its storage (a weak reference to the storage
    object, which PyTorch keeps as long as the storage lives), never by data pointer:
    a freed storage whose address is reused, or two storages over one buffer, never
    match an old record.
  * The copy starts up to ``ALIGN_BYTES - 1`` bytes before the span, so that the
    restored tensor's address is congruent to the original's modulo ``ALIGN_BYTES``:
    some CPU kernels pick their code path (and so their rounding) from alignment.
  * Tracked in-place changes of a source before its copy completed make its fetch
    fail (NOTE [Modified sources] in client/engine/jobs.py) instead of returning bytes
    nobody can vouch for.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch

from client.handle import Handle

__all__ = ["ALIGN_BYTES", "Geometry", "RecordTable", "SpanRecord", "byte_range", "offloadable"]

ALIGN_BYTES = 64
"""Restored tensors keep their address modulo this (the CPU allocator's alignment)."""

_SCAN_RECORDS = 16
"""Records of one storage checked for sharing: the newest ones (missing a share costs bytes, never correctness)."""


def offloadable(tensor: torch.Tensor) -> bool:
    """Whether a saved tensor is a plain strided CPU/CUDA tensor with bytes to move.

    Parameters, views of parameters, tensor subclasses, nested, sparse and quantized
    tensors, and empty ones, stay where they are.
    """
    return (
        type(tensor) is torch.Tensor
        and not isinstance(tensor._base, torch.nn.Parameter)  # linear saves weight.t()
        and tensor.layout is torch.strided
        and not tensor.is_nested
        and not tensor.is_quantized
        and tensor.device.type in ("cpu", "cuda")
        and tensor.numel() > 0
    )


def byte_range(storage: torch.UntypedStorage, device: torch.device, lo: int, hi: int) -> torch.Tensor:
    """The storage's bytes ``[lo, hi)`` as a ``(hi - lo,)`` uint8 tensor (no copy)."""
    return torch.empty(0, dtype=torch.uint8, device=device).set_(storage, lo, (hi - lo,), (1,))


@dataclass(frozen=True)
class Geometry:
    """Where a tensor's elements lie in its storage: dtype, element offset, sizes, strides."""

    dtype: torch.dtype
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    @classmethod
    def of(cls, tensor: torch.Tensor) -> Geometry:
        return cls(tensor.dtype, int(tensor.storage_offset()), tuple(tensor.size()), tuple(tensor.stride()))

    @property
    def span(self) -> tuple[int, int]:
        """The bytes ``[lo, hi)`` of the storage that hold the elements (numel > 0)."""
        itemsize = self.dtype.itemsize
        last = self.offset + sum((size - 1) * stride for size, stride in zip(self.size, self.stride, strict=True))
        return self.offset * itemsize, (last + 1) * itemsize

    @property
    def dense(self) -> bool:
        """Whether every byte of the span is an element: no gaps, no overlaps."""
        expected = 1
        for stride, size in sorted((st, sz) for sz, st in zip(self.size, self.stride, strict=True) if sz != 1):
            if stride != expected:
                return False
            expected *= size
        return True

    def shifted(self, byte_lo: int) -> Geometry | None:
        """This geometry on a copy whose byte 0 is the storage's ``byte_lo`` (None if misaligned)."""
        shift, rest = divmod(byte_lo, self.dtype.itemsize)
        return None if rest else Geometry(self.dtype, self.offset - shift, self.size, self.stride)

    def on_bytes(self, restored: torch.Tensor) -> torch.Tensor:
        """This geometry over a restored ``(n,) uint8`` copy, wherever in its storage that copy starts."""
        shifted = self.shifted(-int(restored.storage_offset()))
        assert shifted is not None  # copies start on element boundaries (SpanRecord.lo)
        return shifted.on(restored.untyped_storage(), restored.device)

    def on(self, storage: torch.UntypedStorage, device: torch.device) -> torch.Tensor:
        """A tensor with this geometry over ``storage`` (no conjugate or negative bit)."""
        out = torch.empty(0, dtype=self.dtype, device=device)
        return out.set_(storage, self.offset, self.size, self.stride)


class SpanRecord:
    """One copied byte span of a storage, and the packed tensors that read it.

    ``lo`` is the storage byte where the copy starts; ``span`` the bytes the first
    tensor's elements cover. The extent is freed when the last pack is released.
    """

    def __init__(
        self,
        *,
        handle: Handle,
        lo: int,
        geometry: Geometry,
        root: torch.Tensor,
        version: int,
        layer: str,
        checksum: int | None,
        free: Callable[[Handle], None],
    ) -> None:
        self.handle = handle
        self.lo = lo
        self.geometry = geometry
        self.span = geometry.span
        self.dense = geometry.dense
        self.root = weakref.ref(root)
        self.version = version
        self.layer = layer
        self.checksum = checksum
        self._free = free
        self.lock = threading.Lock()
        self.packed = 0
        self.not_unpacked = 0
        self.restored: torch.Tensor | None = None
        self.freed = False

    def covers(self, geometry: Geometry, root: torch.Tensor, version: int) -> bool:
        """Whether a pack of ``geometry`` may read this record's copy (NOTE [Storage records])."""
        if self.freed or self.root() is not root or self.version != version:
            return False
        if geometry == self.geometry:
            return True
        lo, hi = geometry.span
        return self.dense and self.span[0] <= lo and hi <= self.span[1]

    def acquire(self) -> None:
        with self.lock:
            self.packed += 1
            self.not_unpacked += 1

    def restore(self, fetch: Callable[[Handle], torch.Tensor], again: bool) -> torch.Tensor:
        """The restored bytes as a ``(n,) uint8`` tensor; views unpacked in one pass share one fetch.

        Under the ``keep`` policy that is the original span itself, a view into the source's storage.
        """
        with self.lock:
            if again:  # retain_graph: a second unpack of the same saved tensor
                self.not_unpacked += 1
            restored = self.restored
            if restored is None:
                restored = fetch(self.handle)  # (nbytes,) uint8
                if self.not_unpacked > 1:
                    self.restored = restored
            self.not_unpacked = max(self.not_unpacked - 1, 0)
            if self.not_unpacked == 0:
                self.restored = None
            return restored

    def release(self) -> None:
        with self.lock:
            self.packed -= 1
            if self.packed > 0:
                return
            self.restored = None
            self.freed = True
        self._free(self.handle)


class RecordTable:
    """Records by storage identity; an entry goes when its storage does."""

    def __init__(self) -> None:
        self._records: dict[int, tuple[weakref.ref[torch.UntypedStorage], list[SpanRecord]]] = {}
        self._lock = threading.RLock()  # a storage may die (and its callback run) while it is held

    def find(
        self, storage: torch.UntypedStorage, geometry: Geometry, root: torch.Tensor, version: int
    ) -> SpanRecord | None:
        with self._lock:
            entry = self._records.get(id(storage))
            if entry is None or entry[0]() is not storage:
                return None
            live = [record for record in entry[1] if not record.freed]
            entry[1][:] = live
            for record in reversed(live[-_SCAN_RECORDS:]):
                if record.covers(geometry, root, version):
                    return record
        return None

    def add(self, storage: torch.UntypedStorage, record: SpanRecord) -> None:
        key = id(storage)
        with self._lock:
            entry = self._records.get(key)
            if entry is None or entry[0]() is not storage:
                entry = (weakref.ref(storage, self._forget(key)), [])
                self._records[key] = entry
            entry[1].append(record)

    def __len__(self) -> int:
        return len(self._records)

    def _forget(self, key: int) -> Callable[[weakref.ref[torch.UntypedStorage]], None]:
        def forget(ref: weakref.ref[torch.UntypedStorage]) -> None:
            with self._lock:
                entry = self._records.get(key)
                if entry is not None and entry[0] is ref:
                    del self._records[key]

        return forget
