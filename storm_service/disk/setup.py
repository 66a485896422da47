"""Opening the disk tier at start: its spill files, and the alignment they ask of the host pool."""

from __future__ import annotations

import logging

from storm_service.disk.files import SpillFile
from storm_service.units import format_bytes

__all__ = ["open_spill_files", "pool_alignment"]

log = logging.getLogger("stormd.disk")


def open_spill_files(directories: tuple[str, ...], size_bytes: int) -> list[SpillFile]:
    """One reserved spill file per directory; SpillFileError (the others closed) if one cannot be made."""
    files: list[SpillFile] = []
    try:
        for directory in directories:
            spill = SpillFile.open(directory, size_bytes)
            files.append(spill)
            log.info(
                "spill file of %s in %s (%s, %s, %d-byte alignment)",
                format_bytes(spill.size_bytes),
                directory,
                "O_DIRECT" if spill.direct else "buffered",
                "anonymous" if spill.anonymous else "unlinked",
                spill.alignment,
            )
    except BaseException:
        for spill in files:
            spill.close()
        raise
    return files


def pool_alignment(files: list[SpillFile], least: int) -> int:
    """The pool's extent alignment: ``least``, or more where a spill file's direct I/O needs more.

    Extents go to disk whole, from and to their place in a slab, so every extent's offset
    and length must suit each file's offset alignment and its buffer alignment.
    """
    return max([least] + [max(f.alignment, f.mem_alignment) for f in files])
