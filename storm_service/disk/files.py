"""Spill files: one anonymous, preallocated file per ``--spill-dir`` path, read and written
with O_DIRECT where the filesystem allows it.

NOTE [O_DIRECT spill files]
  A spill file is made with ``O_TMPFILE`` in its directory: an inode with no name, so
  nobody can open it by path, and the kernel frees its space when the last fd closes,
  however the daemon ends (SIGKILL included). Where the filesystem has no ``O_TMPFILE``
  (EOPNOTSUPP, EISDIR or EINVAL), the file is created under a random name with
  ``O_EXCL | O_NOFOLLOW`` and unlinked at once, which has the same effect except for the
  instant between the two (``anonymous`` is then False, and the fallback is logged).
  The directory must exist and be ours or root's, not a symbolic link, and writable by
  nobody else unless sticky: in a directory others can write to, they could rename our
  named file away before the unlink and keep its space (NOTE [Files we trust] in
  storm_service/lockfile.py). It is opened once, ``O_DIRECTORY | O_NOFOLLOW``, and the
  file is made relative to that fd, never by path.

  O_DIRECT moves bytes between the slab mapping and the device without the page cache
  (no second copy of spilled bytes in memory, no writeback storms), but every transfer
  must be aligned: its file offset and length to ``alignment``, its buffer address to
  ``mem_alignment``. The kernel says what these are through ``statx(STATX_DIOALIGN)``
  (Linux 6.1+; ``stx_dio_offset_align``, ``stx_dio_mem_align``); both 0 there means the
  file has no direct I/O (ext4 with data=journal, an encrypted file, ...), although the
  flag is accepted and silently buffered. Where statx does not say, a probe finds the
  smallest block (512, then 4096) an O_DIRECT write and read accept from a page-aligned
  buffer, and requires it of both. A slab mapping is page-aligned and the tier keeps
  its extents aligned, so transfers go straight from the mapping (DiskIO in io.py).

  Where O_DIRECT cannot be used (the filesystem refuses the flag, statx says none, the
  probe fails, or tmpfs, which accepts the flag since Linux 6.6 but keeps its files in
  memory), the file falls back to buffered I/O with one warning naming the path and the
  reason: ``direct`` is False, ``alignment`` 512 (the tier's rules stay the same on
  every filesystem) and ``mem_alignment`` 1.

  The size is rounded down to ``alignment`` and reserved with ``posix_fallocate`` at
  once, so that the tier never meets ENOSPC on a write into its own range (except on
  copy-on-write filesystems). A size above the space free to unprivileged users
  (``f_bavail``: root's reserve stays untouched) is refused before anything is
  allocated, naming both numbers.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import stat
from dataclasses import dataclass

from storm_service.disk.direct import DirectIOUnavailable, enable_direct_io
from storm_service.units import format_bytes

__all__ = ["BUFFERED_ALIGNMENT", "SpillFile", "SpillFileError", "parse_spill_dirs"]

log = logging.getLogger("stormd.disk")

BUFFERED_ALIGNMENT = 512
"""The alignment buffered spill files keep, so that the tier's rules do not change with the filesystem."""

_NO_TMPFILE = (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL)


class SpillFileError(RuntimeError):
    """A spill file cannot be opened or reserved; the message names the path and what to do."""


@dataclass
class SpillFile:
    """One reserved spill file in a ``--spill-dir`` directory (NOTE [O_DIRECT spill files])."""

    dir: str
    fd: int
    size_bytes: int
    """Reserved with posix_fallocate; a multiple of ``alignment``."""
    alignment: int
    """What the offset and the length of every transfer must be a multiple of."""
    mem_alignment: int
    """What the buffer address of every transfer must be a multiple of (1 when buffered)."""
    direct: bool
    """O_DIRECT is on."""
    anonymous: bool
    """Made with O_TMPFILE; False: created under a name and unlinked at once."""

    @classmethod
    def open(cls, directory: str, size_bytes: int, *, direct: bool = True) -> SpillFile:
        """Make and reserve a spill file of ``size_bytes`` (rounded down to its alignment) in ``directory``.

        ``direct=False`` asks for buffered I/O (no warning then). Raises SpillFileError
        when the directory is missing or unsafe, the size is too small or more than is
        free, or the reservation fails.
        """
        dir_fd = _open_directory(directory)
        try:
            fd, anonymous = _create(dir_fd, directory)
        finally:
            os.close(dir_fd)
        try:
            mem_alignment, alignment = 1, BUFFERED_ALIGNMENT
            if direct:
                try:
                    mem_alignment, alignment = enable_direct_io(fd)
                except DirectIOUnavailable as e:
                    direct = False
                    log.warning("spill dir %s: buffered I/O, not O_DIRECT: %s", directory, e)
            reserved = size_bytes // alignment * alignment
            _reserve(fd, directory, size_bytes, reserved)
        except BaseException:
            os.close(fd)
            raise
        return cls(directory, fd, reserved, alignment, mem_alignment, direct, anonymous)

    def close(self) -> None:
        """Close the file; its space returns to the filesystem (it has no name)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def parse_spill_dirs(value: str) -> list[str]:
    """Split ``--spill-dir PATH[,PATH...]`` into paths; ValueError for an empty or repeated one."""
    paths = [part.strip() for part in value.split(",")]
    if not value.strip() or "" in paths:
        raise ValueError(f"--spill-dir {value!r}: an empty path (give PATH[,PATH...])")
    repeated = sorted({path for path in paths if paths.count(path) > 1})
    if repeated:
        raise ValueError(f"--spill-dir {value!r}: {', '.join(repeated)} given more than once (one file per path)")
    return paths


def _open_directory(directory: str) -> int:
    """Open ``directory`` without following links and check it is one we may use (NOTE [O_DIRECT spill files])."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SpillFileError(f"spill dir {directory} does not exist; create it or fix --spill-dir") from None
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise SpillFileError(
                f"spill dir {directory} is a symbolic link or not a directory; give the real directory"
            ) from None
        raise SpillFileError(f"spill dir {directory} cannot be opened: {e.strerror}") from e
    info = os.fstat(fd)
    problem = None
    if info.st_uid not in (os.getuid(), 0):
        problem = f"belongs to uid {info.st_uid}, neither to uid {os.getuid()} nor to root"
    elif stat.S_IMODE(info.st_mode) & 0o022 and not info.st_mode & stat.S_ISVTX:
        problem = f"has mode {stat.S_IMODE(info.st_mode):o}: others can write to it and it is not sticky"
    if problem is not None:
        os.close(fd)
        raise SpillFileError(f"spill dir {directory} {problem}; use a directory of your own")
    return fd


def _create(dir_fd: int, directory: str) -> tuple[int, bool]:
    """A new file with no name in the directory: ``(fd, anonymous)`` (NOTE [O_DIRECT spill files])."""
    flags = os.O_RDWR | os.O_CLOEXEC
    try:
        return os.open(".", flags | os.O_TMPFILE, 0o600, dir_fd=dir_fd), True
    except OSError as e:
        if e.errno not in _NO_TMPFILE:
            raise SpillFileError(f"spill dir {directory}: cannot make a file there: {e.strerror}") from e
        reason = errno.errorcode.get(e.errno or 0, str(e))
    name = f".storm-spill-{os.getpid()}-{secrets.token_hex(8)}"
    try:
        fd = os.open(name, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dir_fd)
    except OSError as e:
        raise SpillFileError(f"spill dir {directory}: cannot make a file there: {e.strerror}") from e
    os.unlink(name, dir_fd=dir_fd)
    log.info("spill dir %s has no O_TMPFILE (%s): its file was created and unlinked at once", directory, reason)
    return fd, False


def _reserve(fd: int, directory: str, asked_bytes: int, size_bytes: int) -> None:
    """Allocate ``size_bytes`` of ``fd``, refusing more than is free (NOTE [O_DIRECT spill files])."""
    if size_bytes <= 0:
        raise SpillFileError(f"--spill-size {asked_bytes} bytes is less than one block of {directory}")
    space = os.fstatvfs(fd)
    free_bytes = space.f_bavail * space.f_frsize
    if size_bytes > free_bytes:
        raise SpillFileError(_no_space(directory, size_bytes, free_bytes))
    try:
        os.posix_fallocate(fd, 0, size_bytes)
    except OSError as e:
        if e.errno == errno.ENOSPC:  # another writer took the space since statvfs
            raise SpillFileError(_no_space(directory, size_bytes, free_bytes)) from e
        raise SpillFileError(f"spill dir {directory}: cannot reserve {size_bytes} bytes: {e.strerror}") from e


def _no_space(directory: str, size_bytes: int, free_bytes: int) -> str:
    return (
        f"spill dir {directory}: {size_bytes} bytes asked ({format_bytes(size_bytes)}), "
        f"{free_bytes} free ({format_bytes(free_bytes)}); lower --spill-size or free space there"
    )
