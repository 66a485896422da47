"""Activation checkpointing whose inputs wait in the pool: ``offload_checkpoint``.

NOTE [Offloaded checkpoint]
  ``torch.utils.checkpoint`` keeps a layer's inputs on the device and recomputes the
  rest in backward. ``offload_checkpoint`` runs the same non-reentrant checkpoint, but
  the function reads its tensor arguments through a cell: in forward, the caller's
  tensors; once forward returns, each is offloaded (one extent, one copy and one event
  per tensor, usually one per layer) and the cell lets go of it; when backward
  recomputes the layer, the cell fetches them back. The graph itself holds no input:
  checkpoint's hooks hold placeholders for every saved tensor, so the device keeps
  nothing of the layer between its forward and its backward. Fetched inputs get the
  ``requires_grad`` of the originals, so the recomputation saves the same tensors as
  forward did. Random state: checkpoint stashes it for the devices of its arguments,
  so an empty tensor on each device the inputs were on is passed as one. The extents
  are freed when the graph lets go of the recomputation (after backward, or with the
  graph); ``retain_graph`` fetches again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from client.defaults import default_system
from client.records import offloadable

if TYPE_CHECKING:
    from client.handle import Handle
    from client.system import StormSystem

__all__ = ["checkpointed", "offload_checkpoint"]


def offload_checkpoint(
    function: Callable[..., Any],
    *args: Any,
    system: StormSystem | None = None,
    layer_id: int | None = None,
    min_bytes: int = 0,
    preserve_rng_state: bool = True,
    use_reentrant: bool | None = None,
    **kwargs: Any,
) -> Any:
    """``torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, **kwargs)``,
    with the tensor arguments (of ``min_bytes`` or more) kept in the pool until backward.

    ``system`` defaults to the process's default system; ``layer_id`` tags the extents
    in the daemon's per-layer stats. Keyword arguments go to ``function`` and stay where
    they are (masks and position tables are shared between layers). NOTE [Offloaded
    checkpoint].
    """
    if use_reentrant:
        raise ValueError("offload_checkpoint is the non-reentrant checkpoint: use_reentrant=True is not supported")
    out, _ = checkpointed(function, args, kwargs, system or default_system(), layer_id, min_bytes, preserve_rng_state)
    return out


def checkpointed(
    function: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    system: StormSystem,
    layer_id: int | None,
    min_bytes: int,
    preserve_rng_state: bool = True,
) -> tuple[Any, list[int]]:
    """``offload_checkpoint``'s work; also returns the sizes of the tensors offloaded
    (none where no graph is recorded)."""
    if not torch.is_grad_enabled():
        return function(*args, **kwargs), []
    cell = _Inputs(args)
    anchors = [torch.empty(0, device=device) for device in _devices(args)]
    out = checkpoint(
        lambda *_: function(*cell.values(), **kwargs),
        *anchors,
        use_reentrant=False,
        preserve_rng_state=preserve_rng_state,
    )
    cell.offload(system, layer_id, min_bytes)
    return out, [handle.size_bytes for _, handle, _ in cell.held]


class _Inputs:
    """The function's arguments: the caller's in forward, the pool's when recomputed."""

    def __init__(self, args: tuple[Any, ...]) -> None:
        self._args: list[Any] = list(args)
        self.held: list[tuple[int, Handle, bool]] = []
        """``(position, handle, requires_grad)`` of each offloaded argument."""
        self._system: StormSystem | None = None

    def offload(self, system: StormSystem, layer_id: int | None, min_bytes: int) -> None:
        self._system = system
        for position, arg in enumerate(self._args):
            if not isinstance(arg, torch.Tensor) or isinstance(arg, nn.Parameter) or not offloadable(arg):
                continue
            if arg.numel() * arg.element_size() < max(min_bytes, 1):
                continue
            handle = system.offload(arg.detach(), layer_id=layer_id, guard=arg)
            self.held.append((position, handle, arg.requires_grad))
            self._args[position] = None

    def values(self) -> list[Any]:
        args = list(self._args)
        for position, handle, requires_grad in self.held:
            assert self._system is not None
            args[position] = self._system.fetch(handle).requires_grad_(requires_grad)
        return args

    def __del__(self) -> None:
        for _, handle, _ in getattr(self, "held", ()):
            assert self._system is not None
            self._system.free(handle)


def _devices(args: tuple[Any, ...]) -> list[torch.device]:
    """The non-CPU devices of the tensor arguments, in order of first appearance."""
    devices: list[torch.device] = []
    for arg in args:
        if isinstance(arg, torch.Tensor) and arg.device.type != "cpu" and arg.device not in devices:
            devices.append(arg.device)
    return devices
