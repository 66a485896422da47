"""Offload the saved tensors of any module through ``saved_tensors_hooks``.

Contract (as for ``torch.autograd.graph.save_on_cpu``): ``unpack(pack(t))`` equals
``t`` in value, size, stride, dtype, device and conjugate/negative bits, with the bytes
``t`` held when it was packed. What is copied, and when two packs share a copy, is
NOTE [Storage records] in ``client/records.py``. The extent of a record is freed when
the last packed tensor that reads it is released by autograd: after its node's
backward, or when a graph is dropped without backward. ``retain_graph`` unpacks more
than once; that works because nothing is freed on unpack.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from client.checkpoint import checkpointed
from client.defaults import default_system
from client.integrity import checksum
from client.records import ALIGN_BYTES, Geometry, RecordTable, SpanRecord, byte_range, offloadable
from client.selection import BudgetChooser, LayerProfile, profile_for
from client.settings import SELECTIONS
from client.system import StormSystem
from storm_service.errors import IntegrityError, SourceModifiedError

__all__ = ["OffloadStats", "active_offloader", "offload_saved_tensors"]

DEFAULT_MIN_BYTES = 64 << 10


@dataclass
class OffloadStats:
    """What one ``offload_saved_tensors`` context moved, per layer where known."""

    packed_tensors: int = 0
    offloaded_storages: int = 0
    """Copies made (one per record: a byte span of one storage)."""
    offloaded_bytes: int = 0
    shared_packs: int = 0
    """Packs that read an earlier pack's copy (a tensor saved twice, ``x`` and ``x.t()``)."""
    dedup_saved_bytes: int = 0
    """Bytes those shared packs did not copy again."""
    span_saved_bytes: int = 0
    """Bytes of the packed tensors' storages outside the spans copied (chunks, slices)."""
    skipped_tensors: int = 0
    """Parameters, tensors under ``min_bytes`` and tensors that are not plain strided ones, left where they were."""
    layer_bytes: dict[str, int] = field(default_factory=dict)
    """Bytes offloaded, per layer: what the selection chose."""
    left_bytes: dict[str, int] = field(default_factory=dict)
    """Bytes the selection left on the device, per layer (``budget``, ``keep_last_layers``)."""


class _Packed:
    """What autograd keeps in place of a saved tensor; frees its share on release."""

    __slots__ = ("conj", "geometry", "neg", "record", "unpacked")

    def __init__(self, record: SpanRecord, geometry: Geometry, tensor: torch.Tensor) -> None:
        self.geometry = geometry
        self.conj = tensor.is_conj()
        self.neg = tensor.is_neg()
        self.unpacked = False
        record.acquire()
        self.record = record  # last: __del__ releases only a pack that was counted

    def unpack(self, system: StormSystem) -> torch.Tensor:
        record = self.record
        root = record.root()
        if root is not None and root._version != record.version:  # NOTE [Modified sources]
            raise SourceModifiedError(
                f"unpack: a tensor saved for backward in layer {record.layer} ({record.geometry.dtype} "
                f"{tuple(record.geometry.size)}) was changed in place since it was saved "
                f"(version {record.version} then, {root._version} now)"
            )
        restored = record.restore(lambda handle: system.fetch(handle, alias=True), again=self.unpacked)
        self.unpacked = True
        if record.checksum is not None:
            _verify(record, restored, system)
        out = self.geometry.on_bytes(restored)
        if self.neg:
            out = torch._neg_view(out)
        return out.conj() if self.conj else out

    def __del__(self) -> None:
        record = getattr(self, "record", None)
        if record is not None:
            record.release()


def _verify(record: SpanRecord, restored: torch.Tensor, system: StormSystem) -> None:
    """The restored elements hash as they did at pack time (NOTE [Verify mode] in docs/design.md)."""
    geometry = record.geometry.shifted(record.lo - int(restored.storage_offset()))
    assert geometry is not None  # a record's own geometry starts inside its copy, aligned
    found = checksum(_element_bytes(geometry, restored.untyped_storage(), restored.device, record.dense))
    if found != record.checksum:
        where = system.locate(record.handle)
        raise IntegrityError(
            f"verify: layer {record.layer}, {geometry.dtype} {tuple(geometry.size)} in "
            f"handle {where[0] if where else '-'} {record.handle!r}: "
            f"checksum {found:#018x} on fetch, {record.checksum:#018x} when packed"
        )


def _element_bytes(
    geometry: Geometry, storage: torch.UntypedStorage, device: torch.device, dense: bool
) -> torch.Tensor:
    """The bytes of the elements only, as a contiguous (n,) uint8 tensor (gaps left out)."""
    if dense:
        lo, hi = geometry.span
        return byte_range(storage, device, lo, hi)
    return geometry.on(storage, device).contiguous().view(-1).view(torch.uint8)


class _SavedTensorOffloader:
    def __init__(
        self,
        system: StormSystem,
        min_bytes: int,
        stats: OffloadStats,
        budget: BudgetChooser | None = None,
        keep_from: int | None = None,
    ) -> None:
        self.system = system
        self.min_bytes = min_bytes
        self.stats = stats
        self.layer_id: int | None = None
        self.layer_name: str | None = None
        self._budget = budget
        self._keep_from = keep_from
        """Layers with this index or later stay on the device (``keep_last_layers``)."""
        self._records = RecordTable()

    @property
    def layer(self) -> str:
        return self.layer_name or (str(self.layer_id) if self.layer_id is not None else "-")

    def _selected(self, tensor: torch.Tensor, nbytes: int) -> bool:
        """Whether the selection policy lets this copy go (client/selection.py)."""
        kept = self._keep_from is not None and self.layer_id is not None and self.layer_id >= self._keep_from
        if kept or (self._budget is not None and not self._budget.allows(self.layer, nbytes, tensor.device)):
            self.stats.left_bytes[self.layer] = self.stats.left_bytes.get(self.layer, 0) + nbytes
            return False
        return True

    def pack(self, tensor: torch.Tensor) -> torch.Tensor | _Packed:
        if not offloadable(tensor) or tensor.numel() * tensor.element_size() < self.min_bytes:
            self.stats.skipped_tensors += 1
            return tensor
        self.stats.packed_tensors += 1
        storage = tensor.untyped_storage()
        geometry = Geometry.of(tensor)
        root = tensor._base if tensor._base is not None else tensor
        version = tensor._version
        record = self._records.find(storage, geometry, root, version)
        if record is not None:
            shared = geometry.shifted(record.lo)
            if shared is not None:
                lo, hi = geometry.span
                self.stats.shared_packs += 1
                self.stats.dedup_saved_bytes += hi - lo
                self.system.note_saved_bytes(dedup=hi - lo)
                return _Packed(record, shared, tensor)
        span_lo, span_hi = geometry.span
        if not self._selected(tensor, span_hi - span_lo):
            return tensor
        record = self._offload(tensor, storage, geometry, root, version)
        shifted = geometry.shifted(record.lo)
        assert shifted is not None  # the copy starts on an element boundary of its first tensor
        return _Packed(record, shifted, tensor)

    def _offload(
        self, tensor: torch.Tensor, storage: torch.UntypedStorage, geometry: Geometry, root: torch.Tensor, version: int
    ) -> SpanRecord:
        """Copy the span ``tensor``'s elements cover, starting where alignment is kept."""
        span_lo, span_hi = geometry.span
        pad = min((storage.data_ptr() + span_lo) % ALIGN_BYTES, span_lo)
        pad -= pad % tensor.element_size()
        lo = span_lo - pad
        span = byte_range(storage, tensor.device, lo, span_hi)
        digest = (
            checksum(_element_bytes(geometry, storage, tensor.device, geometry.dense)) if self.system.verify else None
        )
        name = self.layer
        handle = self.system.offload(span, layer_id=self.layer_id, guard=tensor)
        record = SpanRecord(
            handle=handle,
            lo=lo,
            geometry=geometry,
            root=root,
            version=version,
            layer=name,
            checksum=digest,
            free=self.system.free,
        )
        self._records.add(storage, record)
        self.stats.offloaded_storages += 1
        self.stats.offloaded_bytes += span_hi - lo
        self.stats.span_saved_bytes += storage.nbytes() - (span_hi - lo)
        self.stats.layer_bytes[name] = self.stats.layer_bytes.get(name, 0) + span_hi - lo
        self.system.note_saved_bytes(span=storage.nbytes() - (span_hi - lo))
        return record

    def unpack(self, packed: torch.Tensor | _Packed) -> torch.Tensor:
        return packed.unpack(self.system) if isinstance(packed, _Packed) else packed


@contextmanager
def offload_saved_tensors(
    system: StormSystem | None = None,
    min_bytes: int = DEFAULT_MIN_BYTES,
    module: nn.Module | None = None,
    select: str | None = None,
) -> Iterator[OffloadStats]:
    """Offload what autograd saves for backward, inside the ``with`` block, to the pool.

    Parameters, tensor subclasses and tensors under ``min_bytes`` are left alone. With
    ``module``, each of its direct children is a layer: the daemon's per-layer stats
    and ``OffloadStats.layer_bytes`` are keyed by the child's name. Yields the stats.

    ``select`` (default: the system's ``select`` setting) says what leaves the device:
    ``all``; ``budget``, what the link can carry behind each layer's compute (NOTE
    [Offload budget] in client/selection.py); ``checkpoint``, which needs ``module``:
    each child is checkpointed and only its input is offloaded (NOTE [Offloaded
    checkpoint] in client/checkpoint.py). The last ``keep_last_layers`` children are
    left alone.

    ::

        with offload_saved_tensors(system, module=model) as moved:
            loss = loss_fn(model(x), y)
        loss.backward()
    """
    system = system or default_system()
    select = select or system.settings.select
    if select not in SELECTIONS:
        raise ValueError(f"offload_saved_tensors: select must be one of {SELECTIONS}, got {select!r}")
    if select != "all" and module is None:
        raise ValueError(
            f"offload_saved_tensors: select={select!r} works per layer and needs module= (its children "
            "are the layers); client.offload_checkpoint(function, *args) checkpoints one call"
        )
    stats = OffloadStats()
    children = list(module.named_children()) if module is not None else []
    keep_from = len(children) - system.settings.keep_last_layers if module is not None else None
    profile = profile_for(module) if module is not None and select == "budget" else None
    budget = BudgetChooser(system, profile) if profile is not None else None
    offloader = _SavedTensorOffloader(system, min_bytes, stats, budget, keep_from)
    undo: list[Callable[[], None]] = []
    for index, (name, child) in enumerate(children):
        undo.append(child.register_forward_pre_hook(_enter_layer(offloader, index, name, profile)).remove)
        if select == "checkpoint" and keep_from is not None and index < keep_from:
            undo.append(_checkpoint_child(child, offloader, index, name))
    stack = _stack()
    stack.append(offloader)
    try:
        if select == "checkpoint":  # saved tensors outside the checkpointed children stay
            yield stats
        else:
            with torch.autograd.graph.saved_tensors_hooks(offloader.pack, offloader.unpack):
                yield stats
        if stats.offloaded_bytes:
            system.prefetch_latest()  # backward starts with the latest
    finally:
        stack.pop()
        for step in reversed(undo):
            step()
        if profile is not None:
            profile.end(system.transfer_stats().window_wait_s)


def _checkpoint_child(child: nn.Module, offloader: _SavedTensorOffloader, index: int, name: str) -> Callable[[], None]:
    """Run ``child`` through ``offload_checkpoint`` until the returned function undoes it."""
    own = child.__dict__.get("forward")
    original = child.forward
    stats = offloader.stats

    def forward(*args: object, **kwargs: object) -> object:
        out, sizes = checkpointed(original, args, kwargs, offloader.system, index, offloader.min_bytes)
        stats.offloaded_storages += len(sizes)
        stats.offloaded_bytes += sum(sizes)
        stats.layer_bytes[name] = stats.layer_bytes.get(name, 0) + sum(sizes)
        return out

    child.forward = forward

    def undo() -> None:
        if own is None:
            del child.forward
        else:
            child.forward = own

    return undo


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


def _enter_layer(
    offloader: _SavedTensorOffloader, index: int, name: str, profile: LayerProfile | None
) -> Callable[[nn.Module, tuple[object, ...]], None]:
    def hook(module: nn.Module, args: tuple[object, ...]) -> None:
        offloader.layer_id, offloader.layer_name = index, name
        if profile is not None:
            device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
            profile.enter(name, device, offloader.system.transfer_stats().window_wait_s)

    return hook
