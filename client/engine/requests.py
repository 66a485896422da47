"""The transfer thread's requests to the daemon: counted calls, posted frees, deferred errors."""

from __future__ import annotations

from typing import Any

from client.engine.failures import Failures
from client.engine.jobs import EngineStats
from client.transport import Channel
from storm_service.errors import StormError
from storm_service.protocol import MAX_BATCH, MAX_SIZE_BYTES, Op

__all__ = ["Requests"]


class Requests:
    """One channel (the transfer thread's), the session token, and what failed after we moved on."""

    def __init__(self, channel: Channel, token: str, timeout_s: float, stats: EngineStats, failures: Failures) -> None:
        self.channel = channel
        self.token = token
        self.timeout_s = timeout_s
        self.stats = stats
        self.failures = failures
        """Errors of posted requests and failed offloads, raised by the next ``offload``."""
        self._reported: dict[str, int] = {}

    def unreported_savings(self) -> dict[str, int]:
        """Bytes the hooks did not copy since the last commit, for the daemon's stats (sent with a commit)."""
        now = {"dedup_saved_bytes": self.stats.dedup_saved_bytes, "span_saved_bytes": self.stats.span_saved_bytes}
        delta = {name: min(value - self._reported.get(name, 0), MAX_SIZE_BYTES) for name, value in now.items()}
        self._reported = now
        return {name: value for name, value in delta.items() if value > 0}

    def call(self, op: Op, **fields: Any) -> dict[str, Any]:
        self.stats.engine_round_trips += 1
        if op is Op.OFFLOAD:
            self.stats.offload_round_trips += 1
        elif op is Op.FETCH:
            self.stats.fetch_round_trips += 1
        return self.channel.call(op, self.token, self.timeout_s, **fields)

    def post(self, op: Op, **fields: Any) -> None:
        """Send without waiting; a failure is reported through ``channel.on_async_error``."""
        self.channel.post(op, self.token, **fields)

    def post_free(self, ids: list[int]) -> None:
        for start in range(0, len(ids), MAX_BATCH):
            try:
                self.channel.post(Op.FREE, self.token, handles=ids[start : start + MAX_BATCH])
            except StormError as e:
                self.failures.add(e)
