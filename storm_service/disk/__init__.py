"""The disk layer under the spill tier: spill files (NOTE [O_DIRECT spill files] in
files.py) and their I/O off the daemon's loop (NOTE [Spill I/O pieces] in io.py).
"""

from storm_service.disk.files import SpillFile, SpillFileError, parse_spill_dirs
from storm_service.disk.io import DiskIO

__all__ = ["DiskIO", "SpillFile", "SpillFileError", "parse_spill_dirs"]
