"""The disk layer under the spill tier: spill files (NOTE [O_DIRECT spill files] in
storm_service/disk/files.py) and their I/O off the loop (NOTE [Spill I/O pieces] in
storm_service/disk/io.py), on a real disk filesystem and on tmpfs.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import random
import re
import select
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from storm_service.disk import DiskIO, SpillFile, SpillFileError, parse_spill_dirs, raw_throughput
from storm_service.disk import direct as direct_module
from storm_service.disk.direct import probe_alignment, statx_dio_alignment
from storm_service.disk.io import transfer

KiB = 1 << 10
MiB = 1 << 20
PIECE_BYTES = 64 * KiB  # small pieces: every op of a few hundred KiB is cut in several


@pytest.fixture
def disk_dir() -> Iterator[str]:
    """A private directory on the repository's filesystem (a disk, unlike /tmp on some hosts), under
    the ignored .pytest_cache; the test must leave it empty (a spill file has no name)."""
    base = Path(__file__).resolve().parents[2] / ".pytest_cache" / "disk-io"
    base.mkdir(parents=True, exist_ok=True)
    path = tempfile.mkdtemp(prefix="spill-", dir=base)
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


@pytest.fixture(params=["disk", "tmpfs"])
def any_dir(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue("disk_dir" if request.param == "disk" else "shm_dir"))


def _random_mapping(size_bytes: int, seed: int) -> mmap.mmap:
    mapping = mmap.mmap(-1, size_bytes)  # page-aligned, like a slab mapping
    mapping.write(random.Random(seed).randbytes(size_bytes))
    return mapping


def _finish(io: DiskIO, count: int, timeout_s: float = 20.0) -> dict[object, OSError | None]:
    """Poll the wakeup fd, as the loop does, until ``count`` operations completed."""
    poller = select.poll()
    poller.register(io.wakeup_fd, select.POLLIN)
    deadline = time.monotonic() + timeout_s
    done: dict[object, OSError | None] = {}
    while len(done) < count:
        left_s = deadline - time.monotonic()
        assert left_s > 0, f"{len(done)} of {count} operations completed in {timeout_s} s"
        poller.poll(left_s * 1000)
        done.update(io.completed())
    return done


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


def test_round_trips_of_random_sizes_and_offsets_are_bit_exact(any_dir) -> None:
    rng = random.Random(14)
    spill = SpillFile.open(any_dir, 32 * MiB)
    io = DiskIO([spill], piece_bytes=PIECE_BYTES, depth=4)
    source, dest = _random_mapping(8 * MiB, seed=1), mmap.mmap(-1, 8 * MiB)
    try:
        blocks = spill.alignment
        ranges = []  # (file offset, mapping offset, length), disjoint in the file and in the mapping
        file_at = map_at = 0
        while True:
            length = rng.randint(1, 12 * PIECE_BYTES // blocks) * blocks
            file_at += rng.randint(0, 64) * blocks
            if file_at + length > spill.size_bytes or map_at + length > len(source):
                break
            ranges.append((file_at, map_at, length))
            file_at, map_at = file_at + length, map_at + length
        for n, (offset, at, length) in enumerate(ranges):
            io.write(0, offset, memoryview(source)[at : at + length], ("write", n))
        assert set(_finish(io, len(ranges)).values()) == {None}
        for n, (offset, at, length) in enumerate(ranges):
            io.read(0, offset, memoryview(dest)[at : at + length], ("read", n))
        assert set(_finish(io, len(ranges)).values()) == {None}
        assert io.pending() == 0
        for offset, at, length in ranges:
            assert dest[at : at + length] == source[at : at + length], f"{length} bytes at file offset {offset}"
    finally:
        io.close()
        spill.close()
    source.close()  # no view of it is left behind (NOTE [Spill I/O pieces])
    dest.close()


def test_many_concurrent_ops_across_two_files_all_complete_bit_exact(disk_dir, shm_dir) -> None:
    files = [SpillFile.open(disk_dir, 16 * MiB), SpillFile.open(shm_dir, 16 * MiB)]
    io = DiskIO(files, piece_bytes=PIECE_BYTES, depth=3)
    extent_bytes, count = 4 * PIECE_BYTES, 48
    source, dest = _random_mapping(count * extent_bytes, seed=2), mmap.mmap(-1, count * extent_bytes)
    try:
        for n in range(count):
            at = n * extent_bytes
            io.write(n % 2, (n // 2) * extent_bytes, memoryview(source)[at : at + extent_bytes], n)
        assert io.pending() > 0
        assert _finish(io, count) == dict.fromkeys(range(count))
        for n in range(count):
            at = n * extent_bytes
            io.read(n % 2, (n // 2) * extent_bytes, memoryview(dest)[at : at + extent_bytes], n)
        assert _finish(io, count) == dict.fromkeys(range(count))
        assert dest[:] == source[:]
    finally:
        io.close()
        for spill in files:
            spill.close()
    source.close()
    dest.close()


@pytest.mark.parametrize("kind", ["write", "read"])
@pytest.mark.parametrize("code", [errno.EIO, errno.ENOSPC])
def test_an_injected_error_fails_exactly_the_op_of_its_piece(disk_dir, kind, code) -> None:
    spill = SpillFile.open(disk_dir, 8 * MiB)
    io = DiskIO([spill], piece_bytes=PIECE_BYTES, depth=4)
    extent_bytes, count, failing = 4 * PIECE_BYTES, 8, 5
    source, dest = _random_mapping(count * extent_bytes, seed=3), mmap.mmap(-1, count * extent_bytes)
    bad_offset = failing * extent_bytes + 2 * PIECE_BYTES  # the third piece of one op

    def inject(op: str, file: int, offset: int, length: int) -> None:
        if (op, file, offset) == (kind, 0, bad_offset):
            raise OSError(code, os.strerror(code))

    io.inject = inject
    try:
        for n in range(count):
            io.write(0, n * extent_bytes, memoryview(source)[n * extent_bytes : (n + 1) * extent_bytes], n)
        writes = _finish(io, count)
        for n in range(count):
            io.read(0, n * extent_bytes, memoryview(dest)[n * extent_bytes : (n + 1) * extent_bytes], n)
        reads = _finish(io, count)
        failed = writes if kind == "write" else reads
        assert [n for n, error in failed.items() if error is not None] == [failing]
        assert failed[failing] is not None and failed[failing].errno == code
        assert all(error is None for error in (reads if kind == "write" else writes).values())
        for n in set(range(count)) - {failing}:
            at = n * extent_bytes
            assert dest[at : at + extent_bytes] == source[at : at + extent_bytes]
    finally:
        io.close()
        spill.close()
    source.close()
    dest.close()


def test_a_piece_that_raises_a_bug_still_completes_its_op_with_eio(disk_dir, caplog) -> None:
    spill = SpillFile.open(disk_dir, MiB)
    io = DiskIO([spill], piece_bytes=PIECE_BYTES)
    source = _random_mapping(MiB, seed=5)

    def inject(op: str, file: int, offset: int, length: int) -> None:
        raise RuntimeError("a bug")

    io.inject = inject
    try:
        with caplog.at_level(logging.ERROR, logger="stormd.disk"):
            io.write(0, 0, memoryview(source), "bug")
            error = _finish(io, 1)["bug"]
        assert error is not None and error.errno == errno.EIO and "a bug" in str(error)
        assert any("write piece at 0" in r.getMessage() for r in caplog.records)
    finally:
        io.close()
        spill.close()
    source.close()


def test_misaligned_or_outside_ranges_raise_before_any_io(disk_dir) -> None:
    spill = SpillFile.open(disk_dir, MiB)
    io = DiskIO([spill], piece_bytes=PIECE_BYTES)
    calls: list[tuple[str, int, int, int]] = []
    io.inject = lambda *call: calls.append(call)
    mapping = mmap.mmap(-1, 2 * MiB)
    view = memoryview(mapping)
    try:
        block = spill.alignment
        for write in [
            lambda: io.write(0, block + 1, view[:block], "offset"),
            lambda: io.write(0, 0, view[: block + 1], "length"),
            lambda: io.write(0, 0, view[:0], "empty"),
            lambda: io.write(0, spill.size_bytes - block, view[: 2 * block], "past the end"),
            lambda: io.write(0, -block, view[:block], "negative"),
            lambda: io.write(0, 0, view[1 : block + 1], "buffer address"),
            lambda: io.write(1, 0, view[:block], "no such file"),
            lambda: io.read(0, 0, memoryview(bytes(block)), "read-only destination"),
        ]:
            with pytest.raises(ValueError, match="DiskIO"):
                write()
        assert calls == [] and io.pending() == 0 and io.completed() == []
    finally:
        view.release()
        io.close()
        spill.close()
    mapping.close()


def test_close_finishes_queued_ops_and_refuses_new_ones(disk_dir) -> None:
    spill = SpillFile.open(disk_dir, 8 * MiB)
    io = DiskIO([spill], piece_bytes=PIECE_BYTES, depth=2)
    source = _random_mapping(8 * MiB, seed=4)
    try:
        for n in range(8):
            io.write(0, n * MiB, memoryview(source)[n * MiB : (n + 1) * MiB], n)
        io.close()
        assert io.pending() == 0 and dict(io.completed()) == dict.fromkeys(range(8))
        with pytest.raises(ValueError, match="closed"):
            io.write(0, 0, memoryview(source)[:MiB], "late")
    finally:
        io.close()
        spill.close()
    source.close()


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


def test_a_read_past_the_end_of_a_file_is_an_error(disk_dir) -> None:
    spill = SpillFile.open(disk_dir, MiB, direct=False)
    buffer = bytearray(512)
    try:
        with pytest.raises(OSError, match="moved nothing") as raised:
            transfer(spill.fd, "read", memoryview(buffer), spill.size_bytes)
        assert raised.value.errno == errno.EIO
    finally:
        spill.close()


KILLED_WRITER = textwrap.dedent(
    """
    import mmap, select, sys
    from storm_service.disk import DiskIO, SpillFile
    spill = SpillFile.open(sys.argv[1], 64 << 20)
    io = DiskIO([spill])
    source = mmap.mmap(-1, 8 << 20)
    n = 0
    while True:
        io.write(0, (n % 8) * (8 << 20), memoryview(source), n)
        n += 1
        if n == 4:
            print(spill.fd, flush=True)
        while io.pending() > 2:
            select.select([io.wakeup_fd], [], [], 1.0)
            io.completed()
    """
)


def test_a_process_killed_mid_write_leaves_no_spill_file(disk_dir) -> None:
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, disk_dir], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        ready = select.select([proc.stdout], [], [], 30.0)[0]
        assert ready, "the writer never started writing"
        fd = int(proc.stdout.readline())
        held = os.readlink(f"/proc/{proc.pid}/fd/{fd}")
        assert held.startswith(disk_dir) and held.endswith("(deleted)")
        assert os.listdir(disk_dir) == []
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30.0)
    assert proc.returncode == -signal.SIGKILL
    assert os.listdir(disk_dir) == []


def test_parse_spill_dirs_splits_paths_and_refuses_empty_or_repeated_ones() -> None:
    assert parse_spill_dirs("/mnt/a") == ["/mnt/a"]
    assert parse_spill_dirs(" /mnt/a , /mnt/b ") == ["/mnt/a", "/mnt/b"]
    for value, problem in [("", "empty"), ("/mnt/a,,/mnt/b", "empty"), ("/mnt/a,/mnt/a", "more than once")]:
        with pytest.raises(ValueError, match=f"--spill-dir .*{problem}"):
            parse_spill_dirs(value)


def test_raw_throughput_measures_both_ways_and_leaves_nothing(disk_dir) -> None:
    result = raw_throughput(disk_dir, 8 * MiB + 100, piece_bytes=MiB, depth=2)
    assert result.direct and result.size_bytes == 8 * MiB
    assert result.write_gb_s > 0 and result.read_gb_s > 0
