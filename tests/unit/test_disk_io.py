"""The disk layer under the spill tier: spill files (NOTE [O_DIRECT spill files] in
storm_service/disk/files.py), on a real disk filesystem and on tmpfs.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import stat
import tempfile
from collections.abc import Iterator

import pytest

from storm_service.disk import SpillFile, SpillFileError, parse_spill_dirs
from storm_service.disk import direct as direct_module
from storm_service.disk.direct import probe_alignment, statx_dio_alignment

MiB = 1 << 20


@pytest.fixture
def disk_dir(cache: pytest.Cache) -> Iterator[str]:
    """A private directory on the repository's filesystem (a disk, unlike /tmp on some hosts);
    the test must leave it empty (a spill file has no name)."""
    path = tempfile.mkdtemp(prefix="spill-", dir=cache.mkdir("disk-io"))
    yield path
    assert os.listdir(path) == []
    os.rmdir(path)


@pytest.fixture
def shm_dir() -> Iterator[str]:
    """A private directory on tmpfs, left empty by the test."""
    path = tempfile.mkdtemp(prefix="disk-io-test-", dir="/dev/shm")
    yield path
    assert os.listdir(path) == []
    os.rmdir(path)


def test_a_spill_file_on_a_disk_filesystem_is_direct_anonymous_and_reserved(disk_dir) -> None:
    spill = SpillFile.open(disk_dir, 4 * MiB + 100)
    try:
        assert spill.direct and spill.anonymous
        assert (spill.mem_alignment, spill.alignment) == statx_dio_alignment(spill.fd)
        assert spill.size_bytes == 4 * MiB  # rounded down to the alignment
        info = os.fstat(spill.fd)
        assert info.st_nlink == 0 and info.st_blocks * 512 >= spill.size_bytes
        assert fcntl.fcntl(spill.fd, fcntl.F_GETFL) & os.O_DIRECT
        assert os.readlink(f"/proc/self/fd/{spill.fd}").endswith("(deleted)")
        assert os.listdir(disk_dir) == []
    finally:
        spill.close()
    assert spill.fd == -1


def test_tmpfs_falls_back_to_buffered_io_with_one_warning(shm_dir, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="stormd.disk"):
        spill = SpillFile.open(shm_dir, MiB)
    spill.close()
    assert not spill.direct and (spill.alignment, spill.mem_alignment) == (512, 1)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and shm_dir in warnings[0] and "tmpfs" in warnings[0]


def test_a_size_above_the_free_space_is_refused_naming_both(disk_dir) -> None:
    space = os.statvfs(disk_dir)
    free_bytes = space.f_bavail * space.f_frsize
    asked = free_bytes + space.f_blocks * space.f_frsize
    with pytest.raises(
        SpillFileError, match=rf"{re.escape(disk_dir)}: {asked} bytes asked .*, \d+ free .*; lower --spill-size"
    ):
        SpillFile.open(disk_dir, asked)


def test_a_size_below_one_block_is_refused(disk_dir) -> None:
    with pytest.raises(SpillFileError, match="less than one block"):
        SpillFile.open(disk_dir, 100)


def test_unsafe_or_missing_directories_are_refused(disk_dir) -> None:
    target = os.path.join(disk_dir, "real")
    os.mkdir(target, 0o700)
    link, regular = os.path.join(disk_dir, "link"), os.path.join(disk_dir, "file")
    os.symlink(target, link)
    open(regular, "wb").close()
    try:
        for path, problem in [
            (os.path.join(disk_dir, "missing"), "does not exist"),
            (link, "is a symbolic link or not a directory"),
            (regular, "is a symbolic link or not a directory"),
        ]:
            with pytest.raises(SpillFileError, match=f"spill dir {re.escape(path)} {problem}"):
                SpillFile.open(path, MiB)
        os.chmod(target, 0o777)
        with pytest.raises(SpillFileError, match="others can write to it and it is not sticky"):
            SpillFile.open(target, MiB)
        os.chmod(target, 0o777 | stat.S_ISVTX)
        SpillFile.open(target, MiB).close()
    finally:
        os.unlink(link)
        os.unlink(regular)
        os.rmdir(target)


def test_without_o_tmpfile_the_file_is_unlinked_at_once(disk_dir, monkeypatch, caplog) -> None:
    real_open = os.open

    def open_without_tmpfile(path, flags, *args, **kwargs):  # as on a filesystem without O_TMPFILE
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_without_tmpfile)
    with caplog.at_level(logging.INFO, logger="stormd.disk"):
        spill = SpillFile.open(disk_dir, MiB)
    monkeypatch.undo()
    try:
        assert not spill.anonymous and spill.direct
        assert os.fstat(spill.fd).st_nlink == 0 and os.listdir(disk_dir) == []
        assert any("has no O_TMPFILE" in r.getMessage() for r in caplog.records)
    finally:
        spill.close()


def test_where_statx_says_nothing_the_probe_finds_the_same_alignment(disk_dir, monkeypatch) -> None:
    monkeypatch.setattr(direct_module, "statx_dio_alignment", lambda fd: None)  # as before Linux 6.1
    spill = SpillFile.open(disk_dir, MiB)
    try:
        statx_alignment = statx_dio_alignment(spill.fd)
        assert spill.direct and statx_alignment is not None
        assert spill.alignment == statx_alignment[1] == probe_alignment(spill.fd)[1]
    finally:
        spill.close()


def test_parse_spill_dirs_splits_paths_and_refuses_empty_or_repeated_ones() -> None:
    assert parse_spill_dirs("/mnt/a") == ["/mnt/a"]
    assert parse_spill_dirs(" /mnt/a , /mnt/b ") == ["/mnt/a", "/mnt/b"]
    for value, problem in [("", "empty"), ("/mnt/a,,/mnt/b", "empty"), ("/mnt/a,/mnt/a", "more than once")]:
        with pytest.raises(ValueError, match=f"--spill-dir .*{problem}"):
            parse_spill_dirs(value)
