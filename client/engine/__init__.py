"""The transfer engine, in parts (each small enough to read in one sitting).

``loop``       the thread: queue, batching, ordering, flush; the training threads' API
``placement``  reservations and the pressure policy (keep / wait / error)
``prefetch``   pass counting and the bytes in flight
``copies``     a CPU copier and a CUDA copier behind one interface (the seam for other tiers)
``state``      per-handle state, one table under one lock (NOTE [Handle states])
``requests``   the transfer thread's counted calls and posted frees
``jobs``       what is queued, and the engine's counters
"""

from client.engine.jobs import EngineStats
from client.engine.loop import TransferEngine

__all__ = ["EngineStats", "TransferEngine"]
