"""STORM's exception tree, shared by the daemon and the client library.

::

    StormError                      anything STORM raises
    ├── StormUnavailableError       the daemon cannot be reached (or died)
    │   └── UntrustedDaemonError    its socket directory, peer uid or a lent fd fails the client's checks
    ├── StormTimeoutError           a request got no reply within its timeout
    ├── ProtocolError               a malformed message (either direction)
    ├── IntegrityError              verify mode: fetched bytes differ from the bytes offloaded
    ├── SourceModifiedError         a source changed in place before its copy was done
    └── RemoteError                 the daemon answered with an error code
        ├── BadRequestError         BAD_REQUEST: a field is missing, mistyped or out of range
        ├── UnknownOpError          UNKNOWN_OP: the op is not one the daemon knows
        ├── UnsupportedVersionError UNSUPPORTED_VERSION: protocol versions differ
        ├── UnknownSessionError     UNKNOWN_SESSION: the token names no live session
        ├── UnknownHandleError      UNKNOWN_HANDLE: the handle names no extent
        ├── ForbiddenError          FORBIDDEN: another session's handle, or an operator's op (shutdown)
        ├── NotCommittedError       NOT_COMMITTED: the extent's bytes were never committed
        ├── PoolFullError           POOL_FULL: the pool has no extent large enough
        ├── QuotaExceededError      QUOTA_EXCEEDED: a session's or tenant's quota of bytes or extents would be exceeded
        ├── SessionLimitError       SESSION_LIMIT: no more sessions for the daemon or the caller's tenant
        ├── ShuttingDownError       SHUTTING_DOWN: the daemon is stopping
        └── InternalError           INTERNAL: a bug in the daemon (logged there)

This module imports nothing from the rest of the daemon and nothing from torch, so
that the client library can import it.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "ActivationLostError",
    "BadRequestError",
    "ErrorCode",
    "ForbiddenError",
    "IntegrityError",
    "InternalError",
    "NotCommittedError",
    "PoolFullError",
    "ProtocolError",
    "QuotaExceededError",
    "RemoteError",
    "SessionLimitError",
    "ShuttingDownError",
    "SourceModifiedError",
    "StormError",
    "StormTimeoutError",
    "StormUnavailableError",
    "UnknownHandleError",
    "UnknownOpError",
    "UnknownSessionError",
    "UnsupportedVersionError",
    "UntrustedDaemonError",
    "error_for_code",
]


class ErrorCode(StrEnum):
    """Stable error codes carried in error replies."""

    BAD_REQUEST = "BAD_REQUEST"
    UNKNOWN_OP = "UNKNOWN_OP"
    UNSUPPORTED_VERSION = "UNSUPPORTED_VERSION"
    UNKNOWN_SESSION = "UNKNOWN_SESSION"
    UNKNOWN_HANDLE = "UNKNOWN_HANDLE"
    FORBIDDEN = "FORBIDDEN"
    NOT_COMMITTED = "NOT_COMMITTED"
    POOL_FULL = "POOL_FULL"
    QUOTA_EXCEEDED = "QUOTA_EXCEEDED"
    SESSION_LIMIT = "SESSION_LIMIT"
    SHUTTING_DOWN = "SHUTTING_DOWN"
    ACTIVATION_LOST = "ACTIVATION_LOST"
    INTERNAL = "INTERNAL"


class StormError(Exception):
    """Base class of every error STORM raises."""


class StormUnavailableError(StormError):
    """The daemon cannot be reached, refused the connection, or died."""


class UntrustedDaemonError(StormUnavailableError):
    """What answers at the endpoint is not a daemon this client trusts (NOTE [Verifying the daemon] in fdpass.py)."""


class StormTimeoutError(StormError):
    """A request got no reply within its timeout while the daemon seemed alive."""


class ProtocolError(StormError):
    """A message did not follow the protocol (bad encoding, missing fields)."""


class IntegrityError(StormError):
    """Verify mode found a fetched activation whose checksum differs from the one taken when it was saved."""


class SourceModifiedError(StormError):
    """A tensor was changed in place (its version moved) before its copy into the pool was done."""


class RemoteError(StormError):
    """The daemon answered a request with an error code."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.value}: {self.message}"


class BadRequestError(RemoteError):
    """A field is missing, has the wrong type, or is out of range."""

    code = ErrorCode.BAD_REQUEST


class UnknownOpError(RemoteError):
    """The daemon does not know the requested op."""

    code = ErrorCode.UNKNOWN_OP


class UnsupportedVersionError(RemoteError):
    """Client and daemon speak different protocol versions."""

    code = ErrorCode.UNSUPPORTED_VERSION


class UnknownSessionError(RemoteError):
    """The token names no live session (never registered, expired, or unregistered)."""

    code = ErrorCode.UNKNOWN_SESSION


class UnknownHandleError(RemoteError):
    """The handle names no extent held by the daemon."""

    code = ErrorCode.UNKNOWN_HANDLE


class ForbiddenError(RemoteError):
    """The handle belongs to another session, or the op is for the daemon's operators (its uid, root)."""

    code = ErrorCode.FORBIDDEN


class NotCommittedError(RemoteError):
    """The extent exists but its bytes were never committed, so it cannot be read."""

    code = ErrorCode.NOT_COMMITTED


class PoolFullError(RemoteError):
    """The pool has no free extent large enough for the request."""

    code = ErrorCode.POOL_FULL


class QuotaExceededError(RemoteError):
    """The request would take the session past its quota, its cap on extents, or its tenant past the tenant quota."""

    code = ErrorCode.QUOTA_EXCEEDED


class SessionLimitError(RemoteError):
    """register: the daemon, or the caller's tenant (uid), has as many sessions open as it may."""

    code = ErrorCode.SESSION_LIMIT


class ActivationLostError(RemoteError):
    """The daemon cannot give these bytes back (reading them from the disk tier failed); the session goes on."""

    code = ErrorCode.ACTIVATION_LOST


class ShuttingDownError(RemoteError):
    """The daemon is stopping and accepts no more work."""

    code = ErrorCode.SHUTTING_DOWN


class InternalError(RemoteError):
    """The daemon hit a bug while serving the request."""

    code = ErrorCode.INTERNAL


_BY_CODE: dict[str, type[RemoteError]] = {
    cls.code.value: cls
    for cls in (
        BadRequestError,
        UnknownOpError,
        UnsupportedVersionError,
        UnknownSessionError,
        UnknownHandleError,
        ForbiddenError,
        NotCommittedError,
        PoolFullError,
        QuotaExceededError,
        SessionLimitError,
        ActivationLostError,
        ShuttingDownError,
        InternalError,
    )
}


def error_for_code(code: str, message: str) -> RemoteError:
    """Build the exception that matches an error reply's code (INTERNAL for unknown codes)."""
    cls = _BY_CODE.get(code)
    if cls is None:
        return InternalError(f"unknown error code {code!r}: {message}")
    return cls(message)
