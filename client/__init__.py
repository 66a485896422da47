"""STORM's client library: what a training script imports.

``from client import StormSystem, StormModel, offload_saved_tensors, offload_checkpoint``
and the error classes. Submodules load on first use, so ``stormctl`` (which needs only the protocol
client) starts without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from storm_service.errors import (
    BadRequestError,
    ForbiddenError,
    IntegrityError,
    InternalError,
    NotCommittedError,
    PoolFullError,
    ProtocolError,
    QuotaExceededError,
    RemoteError,
    SessionLimitError,
    ShuttingDownError,
    SourceModifiedError,
    StormError,
    StormTimeoutError,
    StormUnavailableError,
    UnknownHandleError,
    UnknownOpError,
    UnknownSessionError,
    UnsupportedVersionError,
    UntrustedDaemonError,
)

if TYPE_CHECKING:
    from client.autograd import StormForwardFunction, fetch_activation_from_cpu, offload_activation_to_cpu
    from client.checkpoint import offload_checkpoint
    from client.defaults import default_system, set_default_system
    from client.handle import Handle
    from client.hooks import OffloadStats, offload_saved_tensors
    from client.modules import StormLayer, StormModel
    from client.segments import PinnedMemoryBuffer
    from client.system import StormSystem
    from client.trainer import StormTrainer

__all__ = [
    "BadRequestError",
    "ForbiddenError",
    "Handle",
    "IntegrityError",
    "InternalError",
    "NotCommittedError",
    "OffloadStats",
    "PinnedMemoryBuffer",
    "PoolFullError",
    "ProtocolError",
    "QuotaExceededError",
    "RemoteError",
    "SessionLimitError",
    "ShuttingDownError",
    "SourceModifiedError",
    "StormError",
    "StormForwardFunction",
    "StormLayer",
    "StormModel",
    "StormSystem",
    "StormTimeoutError",
    "StormTrainer",
    "StormUnavailableError",
    "UnknownHandleError",
    "UnknownOpError",
    "UnknownSessionError",
    "UnsupportedVersionError",
    "UntrustedDaemonError",
    "default_system",
    "fetch_activation_from_cpu",
    "offload_activation_to_cpu",
    "offload_checkpoint",
    "offload_saved_tensors",
    "set_default_system",
]

_LAZY = {
    "StormForwardFunction": "client.autograd",
    "fetch_activation_from_cpu": "client.autograd",
    "offload_activation_to_cpu": "client.autograd",
    "offload_checkpoint": "client.checkpoint",
    "default_system": "client.defaults",
    "set_default_system": "client.defaults",
    "Handle": "client.handle",
    "OffloadStats": "client.hooks",
    "offload_saved_tensors": "client.hooks",
    "StormLayer": "client.modules",
    "StormModel": "client.modules",
    "PinnedMemoryBuffer": "client.segments",
    "StormSystem": "client.system",
    "StormTrainer": "client.trainer",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'client' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
