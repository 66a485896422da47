"""The transfer engine, in parts (each small enough to read in one sitting).

``transfer``   the training threads' API, and the thread's lifetime (NOTE [Transfer engine])
``loop``       the thread: queue, batching, ordering, flush
``fetches``    the thread's fetches: confirmed by the daemon, copied back, asked again
``placement``  reservations and the pressure policy (keep / wait / error)
``prefetch``   pass counting and the bytes in flight
``copies``     a CPU copier and a CUDA copier behind one interface (the seam for other tiers)
``state``      per-handle state, one table under one lock (NOTE [Handle states])
``requests``   the transfer thread's counted calls and posted frees
``jobs``       what is queued, and the engine's counters
"""

from client.engine.jobs import EngineStats
from client.engine.transfer import TransferEngine

__all__ = ["EngineStats", "TransferEngine"]
