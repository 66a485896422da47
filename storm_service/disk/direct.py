"""Whether a spill file can use O_DIRECT, and the alignments it then needs (NOTE [O_DIRECT
spill files] in files.py): the kernel's own answer through ``statx``, or a probe.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import platform

__all__ = ["DirectIOUnavailable", "enable_direct_io", "probe_alignment", "statx_dio_alignment"]

STATX_DIOALIGN = 0x2000  # Linux 6.1
AT_EMPTY_PATH = 0x1000
TMPFS_MAGIC = 0x01021994
PROBE_SIZES = (512, 4096)
_STATX_BYTES = 256  # sizeof(struct statx), spare fields included
_STATX_DIO_MEM_ALIGN = 152  # offsets of the u32 fields in struct statx
_STATX_DIO_OFFSET_ALIGN = 156
_STATFS_BYTES = 256  # more than sizeof(struct statfs); f_type is its first field, a long
_SYS_STATX = {"x86_64": 332, "aarch64": 291}

_libc = ctypes.CDLL(None, use_errno=True)


class DirectIOUnavailable(Exception):
    """The file cannot use O_DIRECT; the argument says why. O_DIRECT is left off."""


def enable_direct_io(fd: int) -> tuple[int, int]:
    """Turn O_DIRECT on for ``fd``; return ``(mem_alignment, offset_alignment)`` in bytes.

    Raises DirectIOUnavailable with O_DIRECT off when the filesystem keeps its files in
    memory (tmpfs accepts O_DIRECT since Linux 6.6, and goes through the page cache all
    the same), refuses the flag, reports through statx that it has no direct I/O for the
    file, or fails the probe.
    """
    if _filesystem_magic(fd) == TMPFS_MAGIC:
        raise DirectIOUnavailable("tmpfs keeps the file in memory: O_DIRECT there is the page cache")
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)
    except OSError as e:
        raise DirectIOUnavailable(f"the filesystem refuses O_DIRECT ({errno.errorcode.get(e.errno or 0, e)})") from e
    try:
        alignment = statx_dio_alignment(fd)
        if alignment is None:
            alignment = probe_alignment(fd)
    except DirectIOUnavailable:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)
        raise
    return alignment


def statx_dio_alignment(fd: int) -> tuple[int, int] | None:
    """``(stx_dio_mem_align, stx_dio_offset_align)`` of ``fd``; None where the kernel or the
    filesystem does not say (no ``statx``, or STATX_DIOALIGN missing from the reply mask).

    Raises DirectIOUnavailable when the kernel says the file has no direct I/O (both 0).
    """
    buf = ctypes.create_string_buffer(_STATX_BYTES)
    if _statx(fd, buf) != 0:
        return None
    raw = buf.raw
    if not int.from_bytes(raw[0:4], "little") & STATX_DIOALIGN:
        return None
    mem = int.from_bytes(raw[_STATX_DIO_MEM_ALIGN : _STATX_DIO_MEM_ALIGN + 4], "little")
    offset = int.from_bytes(raw[_STATX_DIO_OFFSET_ALIGN : _STATX_DIO_OFFSET_ALIGN + 4], "little")
    if mem == 0 or offset == 0:
        raise DirectIOUnavailable("statx reports no direct I/O for this file")
    return mem, offset


def probe_alignment(fd: int) -> tuple[int, int]:
    """Find the smallest of PROBE_SIZES that an O_DIRECT write and read of one block at
    offset 0 accept, from a page-aligned buffer; it serves as both alignments.

    ``fd`` must have O_DIRECT on. Raises DirectIOUnavailable when none is accepted.
    """
    failures = []
    with mmap.mmap(-1, max(PROBE_SIZES)) as buffer:
        view = memoryview(buffer)
        try:
            for size in PROBE_SIZES:
                try:
                    written = os.pwritev(fd, [view[:size]], 0)
                    read = os.preadv(fd, [view[:size]], 0)
                except OSError as e:
                    failures.append(f"{size}: {errno.errorcode.get(e.errno or 0, e)}")
                    continue
                if written == read == size:
                    return size, size
                failures.append(f"{size}: short transfer")
        finally:
            view.release()
    raise DirectIOUnavailable(f"no O_DIRECT block size works ({', '.join(failures)})")


def _statx(fd: int, buf: ctypes.Array[ctypes.c_char]) -> int:
    """``statx(fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, buf)`` through glibc (2.28+) or the raw
    system call; -1 where neither exists or the kernel refuses."""
    function = getattr(_libc, "statx", None)
    if function is not None:
        return int(function(fd, b"", AT_EMPTY_PATH, STATX_DIOALIGN, buf))
    number = _SYS_STATX.get(platform.machine())
    if number is None:
        return -1
    args = (ctypes.c_long(fd), ctypes.c_char_p(b""), ctypes.c_long(AT_EMPTY_PATH), ctypes.c_long(STATX_DIOALIGN))
    return int(_libc.syscall(ctypes.c_long(number), *args, buf))


def _filesystem_magic(fd: int) -> int | None:
    """``f_type`` of the filesystem that holds ``fd`` (``fstatfs``), None if it fails."""
    buf = ctypes.create_string_buffer(_STATFS_BYTES)
    if _libc.fstatfs(fd, buf) != 0:
        return None
    return ctypes.c_long.from_buffer(buf).value
