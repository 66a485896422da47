"""Offload the saved tensors of any module through ``saved_tensors_hooks``.

Contract (as for ``torch.autograd.graph.save_on_cpu``): ``unpack(pack(t))`` equals
``t`` in value, size, stride, dtype and device.

NOTE [Storage records]
  Autograd often saves several tensors that share one storage (a tensor and its
  reshaped view, or the same tensor saved by two ops). STORM offloads *storages*, not
  tensors: the first pack of a storage offloads its bytes once, and later packs of a
  tensor that aliases it share that record; unpack rebuilds each tensor with its own
  offset, size and stride on one restored storage, so aliasing survives the round trip.
  A storage is recognised by its data pointer *while a tensor seen with it is alive*
  (weak references), so a freed and reused address is never mistaken for the old one.
  The restored storage is kept while some packed tensor of the record has not been
  unpacked yet (so views unpacked later in backward share one copy back), and the
  extent is freed when the last packed tensor is released by autograd: after its
  node's backward, or when a graph is dropped without backward. ``retain_graph``
  unpacks more than once; that works because nothing is freed on unpack.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from client.defaults import default_system
from client.handle import Handle
from client.system import StormSystem

__all__ = ["OffloadStats", "active_offloader", "offload_saved_tensors"]

DEFAULT_MIN_BYTES = 64 << 10


@dataclass
class OffloadStats:
    """What one ``offload_saved_tensors`` context moved, per layer where known."""

    packed_tensors: int = 0
    offloaded_storages: int = 0
    offloaded_bytes: int = 0
    shared_packs: int = 0
    """Packs that reused an already offloaded storage (views, tensors saved twice)."""
    skipped_tensors: int = 0
    """Parameters and tensors under ``min_bytes``, left where they were."""
    layer_bytes: dict[str, int] = field(default_factory=dict)


class _Record:
    """One offloaded storage and the packed tensors that share it."""

    def __init__(self, system: StormSystem, handle: Handle, seen: list[weakref.ref[torch.Tensor]]) -> None:
        self.system = system
        self.handle = handle
        self.seen = seen
        self.lock = threading.Lock()
        self.packed = 0
        self.not_unpacked = 0
        self.restored: torch.Tensor | None = None

    def still_alive(self) -> bool:
        return any(ref() is not None for ref in self.seen)

    def storage(self) -> torch.UntypedStorage:
        with self.lock:
            restored = self.restored
            if restored is None:
                restored = self.system.fetch(self.handle, alias=True)  # (nbytes,) uint8
                if self.not_unpacked > 1:
                    self.restored = restored
            self.not_unpacked = max(self.not_unpacked - 1, 0)
            if self.not_unpacked == 0:
                self.restored = None
            return restored.untyped_storage()

    def release(self) -> None:
        with self.lock:
            self.packed -= 1
            if self.packed > 0:
                return
            self.restored = None
        self.system.free(self.handle)


class _Packed:
    """What autograd keeps in place of a saved tensor; frees its share on release."""

    __slots__ = ("dtype", "record", "size", "storage_offset", "stride", "unpacked")

    def __init__(self, record: _Record, tensor: torch.Tensor) -> None:
        self.record = record
        self.dtype = tensor.dtype
        self.size = tensor.size()
        self.stride = tensor.stride()
        self.storage_offset = tensor.storage_offset()
        self.unpacked = False
        with record.lock:
            record.packed += 1
            record.not_unpacked += 1

    def unpack(self) -> torch.Tensor:
        if self.unpacked:  # retain_graph: a second unpack of the same saved tensor
            with self.record.lock:
                self.record.not_unpacked += 1
        self.unpacked = True
        storage = self.record.storage()
        out = torch.empty(0, dtype=self.dtype, device=self.record.handle.device)
        return out.set_(storage, self.storage_offset, self.size, self.stride)

    def __del__(self) -> None:
        self.record.release()


class _SavedTensorOffloader:
    def __init__(self, system: StormSystem, min_bytes: int, stats: OffloadStats) -> None:
        self.system = system
        self.min_bytes = min_bytes
        self.stats = stats
        self.layer_id: int | None = None
        self.layer_name: str | None = None
        self._records: dict[tuple[str, int], _Record] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor | _Packed:
        if (
            type(tensor) is not torch.Tensor  # parameters and tensor subclasses stay put
            or isinstance(tensor._base, nn.Parameter)  # so do views of parameters (linear saves weight.t())
            or tensor.layout is not torch.strided
            or tensor.numel() * tensor.element_size() < self.min_bytes
        ):
            self.stats.skipped_tensors += 1
            return tensor
        self.stats.packed_tensors += 1
        key = (str(tensor.device), tensor.untyped_storage().data_ptr())
        record = self._records.get(key)
        if record is not None and record.still_alive() and not record.handle.freed:
            record.seen.append(weakref.ref(tensor))
            self.stats.shared_packs += 1
            return _Packed(record, tensor)
        storage = tensor.untyped_storage()
        whole = torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(storage)  # (nbytes,)
        handle = self.system.offload(whole, layer_id=self.layer_id)
        seen = [weakref.ref(tensor)]
        if tensor._base is not None:
            seen.append(weakref.ref(tensor._base))
        record = _Record(self.system, handle, seen)
        self._records = {k: r for k, r in self._records.items() if r.still_alive()}
        self._records[key] = record
        self.stats.offloaded_storages += 1
        self.stats.offloaded_bytes += storage.nbytes()
        name = self.layer_name or (str(self.layer_id) if self.layer_id is not None else "-")
        self.stats.layer_bytes[name] = self.stats.layer_bytes.get(name, 0) + storage.nbytes()
        return _Packed(record, tensor)

    @staticmethod
    def unpack(packed: torch.Tensor | _Packed) -> torch.Tensor:
        return packed.unpack() if isinstance(packed, _Packed) else packed


@contextmanager
def offload_saved_tensors(
    system: StormSystem | None = None,
    min_bytes: int = DEFAULT_MIN_BYTES,
    module: nn.Module | None = None,
) -> Iterator[OffloadStats]:
    """Offload what autograd saves for backward, inside the ``with`` block, to the pool.

    Parameters, tensor subclasses and tensors under ``min_bytes`` are left alone. With
    ``module``, each of its direct children is a layer: the daemon's per-layer stats
    and ``OffloadStats.layer_bytes`` are keyed by the child's name. Yields the stats.

    ::

        with offload_saved_tensors(system, module=model) as moved:
            loss = loss_fn(model(x), y)
        loss.backward()
    """
    stats = OffloadStats()
    offloader = _SavedTensorOffloader(system or default_system(), min_bytes, stats)
    handles = []
    if module is not None:
        for index, (name, child) in enumerate(module.named_children()):
            handles.append(child.register_forward_pre_hook(_enter_layer(offloader, index, name)))
    stack = _stack()
    stack.append(offloader)
    try:
        with torch.autograd.graph.saved_tensors_hooks(offloader.pack, offloader.unpack):
            yield stats
    finally:
        stack.pop()
        for hook in handles:
            hook.remove()


@contextmanager
def active_offloader(system: StormSystem, layer_id: int | None) -> Iterator[None]:
    """Offload every saved tensor in the block (no size floor), tagged with ``layer_id``.

    Inside an ``offload_saved_tensors`` block for the same system, its offloader is
    reused, so a tensor that both contexts see is offloaded once (NOTE [Storage records]).
    """
    stack = _stack()
    outer = stack[-1] if stack and stack[-1].system is system else None
    if outer is None:
        offloader = _SavedTensorOffloader(system, 0, OffloadStats())
        offloader.layer_id = layer_id
        with torch.autograd.graph.saved_tensors_hooks(offloader.pack, offloader.unpack):
            yield
        return
    saved = outer.layer_id, outer.layer_name
    outer.layer_id, outer.layer_name = layer_id, None
    try:
        yield
    finally:
        outer.layer_id, outer.layer_name = saved


_local = threading.local()


def _stack() -> list[_SavedTensorOffloader]:
    stack: list[_SavedTensorOffloader] | None = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


def _enter_layer(offloader: _SavedTensorOffloader, index: int, name: str) -> Callable[[nn.Module, object], None]:
    def hook(module: nn.Module, args: object) -> None:
        offloader.layer_id, offloader.layer_name = index, name

    return hook
