"""The disk layer under the spill tier: spill files (NOTE [O_DIRECT spill files] in files.py)."""

from storm_service.disk.files import SpillFile, SpillFileError, parse_spill_dirs

__all__ = ["SpillFile", "SpillFileError", "parse_spill_dirs"]
