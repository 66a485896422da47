"""The disk layer under the spill tier: spill files (NOTE [O_DIRECT spill files] in
files.py), their I/O off the daemon's loop (NOTE [Spill I/O pieces] in io.py), and the
raw throughput of a spill directory to measure the tier against (raw.py).
"""

from storm_service.disk.files import SpillFile, SpillFileError, parse_spill_dirs
from storm_service.disk.io import DiskIO
from storm_service.disk.raw import RawThroughput, raw_throughput

__all__ = ["DiskIO", "RawThroughput", "SpillFile", "SpillFileError", "parse_spill_dirs", "raw_throughput"]
