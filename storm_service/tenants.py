"""Who is asking, and what each tenant may hold: peer credentials, tenants, and the caps on both.

NOTE [Peer credentials]
  For an ``ipc://`` connection libzmq reads the peer's ``SO_PEERCRED`` when it accepts
  the connection and exposes it on every message as the ``Peer-Address`` property,
  ``"<host>:<uid>:<gid>:<pid>"``. The kernel fills it in, so a client cannot forge it,
  and reading it costs no system call. The daemon takes a caller's uid from there
  (never from the message) and the uid is its **tenant**: sessions, quotas and stats
  are grouped by it. Over ``tcp://`` (allowed only with CURVE) there is no uid; the
  tenant is then the client's CURVE public key, which the ZAP handler reports as the
  ``User-Id`` property. The ``pid`` a register carries stays the client's own word:
  the client may live in another pid namespace, where the kernel's pid would differ.
  Operators are the daemon's own uid and root: only they may shut it down, and only
  they see every session in ``stats`` (NOTE [Stats between tenants] in ops.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

import zmq

from storm_service.errors import QuotaExceededError, SessionLimitError

__all__ = ["Limits", "Peer", "PropertySource", "TenantUsage"]


class PropertySource(Protocol):
    """What :meth:`Peer.of_message` reads: a received ``zmq.Frame`` (``get`` a message property)."""

    def get(self, option: str) -> object: ...


@dataclass(frozen=True)
class Peer:
    """The sender of one message, as the transport attests it (NOTE [Peer credentials])."""

    uid: int | None
    """The peer process's uid (ipc://); None where the transport gives none (tcp://)."""
    pid: int | None = None
    """The peer's pid as the daemon's pid namespace sees it (ipc://)."""
    key: str | None = None
    """The peer's CURVE public key, Z85 (tcp://)."""

    @classmethod
    def this_process(cls) -> Peer:
        """The daemon itself: what an in-process caller of ``Server.dispatch`` is."""
        return cls(uid=os.getuid(), pid=os.getpid())

    @classmethod
    def of_message(cls, message: PropertySource, ipc: bool) -> Peer:
        if ipc:
            try:
                _host, uid, _gid, pid = str(message.get("Peer-Address")).rsplit(":", 3)
                return cls(uid=int(uid), pid=int(pid))
            except (ValueError, zmq.ZMQError):  # no credentials: nobody in particular
                return cls(uid=None)
        try:
            key = str(message.get("User-Id"))
        except zmq.ZMQError:  # no ZAP handler ran: no identity
            return cls(uid=None)
        return cls(uid=None, key=key or None)

    @property
    def tenant(self) -> str:
        """The tenant this peer belongs to: ``uid <n>``, ``key <z85>``, or ``unknown``."""
        if self.uid is not None:
            return f"uid {self.uid}"
        return f"key {self.key}" if self.key else "unknown"

    @property
    def is_operator(self) -> bool:
        """The daemon's own uid or root."""
        return self.uid is not None and self.uid in (0, os.getuid())


@dataclass(frozen=True)
class Limits:
    """Caps on what sessions and tenants may hold (``--max-sessions`` and the rest; 0: no cap)."""

    max_sessions: int = 0
    max_tenant_sessions: int = 0
    max_extents: int = 0
    """Extents one session may hold at once."""
    tenant_quota: int = 0
    """Bytes all the sessions of one tenant may hold together."""

    def admit(self, open_sessions: int, tenant: TenantUsage) -> None:
        """Refuse a register (SessionLimitError) that would open one session too many."""
        if self.max_sessions and open_sessions >= self.max_sessions:
            raise SessionLimitError(
                f"register: {open_sessions} sessions are open, at most {self.max_sessions} (--max-sessions)"
            )
        if self.max_tenant_sessions and tenant.sessions >= self.max_tenant_sessions:
            raise SessionLimitError(
                f"register: {tenant.name} has {tenant.sessions} sessions open, "
                f"at most {self.max_tenant_sessions} (--max-tenant-sessions)"
            )

    def check_offload(self, extents_held: int, extents_asked: int, need_bytes: int, tenant: TenantUsage) -> None:
        """Refuse an offload (QuotaExceededError) past the session's cap on extents or the tenant quota."""
        if self.max_extents and extents_held + extents_asked > self.max_extents:
            raise QuotaExceededError(
                f"offload: {extents_asked} extents requested, the session holds {extents_held} "
                f"of at most {self.max_extents} (--max-extents)"
            )
        if self.tenant_quota and tenant.held_bytes + need_bytes > self.tenant_quota:
            raise QuotaExceededError(
                f"offload: {need_bytes} bytes requested, {max(self.tenant_quota - tenant.held_bytes, 0)} left of "
                f"{tenant.name}'s {self.tenant_quota}-byte tenant quota (--tenant-quota)"
            )


@dataclass
class TenantUsage:
    """What one tenant holds now: its open sessions and their bytes in the pool."""

    name: str
    operator: bool = False
    """The daemon's own uid or root (NOTE [Peer credentials])."""
    sessions: int = 0
    held_bytes: int = 0
    """Bytes its extents hold, committed or not, including those of closed sessions not yet reclaimed."""
