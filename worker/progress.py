"""Progress output: one redrawn line on a terminal, plain log lines anywhere else."""

from __future__ import annotations

from typing import TextIO

from storm_service.units import format_bytes

__all__ = ["Progress"]

BAR_WIDTH = 24


class Progress:
    def __init__(self, total_steps: int, stream: TextIO) -> None:
        self.total = total_steps
        self.stream = stream
        self.tty = stream.isatty()
        self.every = 1 if self.tty else max(1, total_steps // 10)
        self._pool: int | None = None

    def due(self, step: int) -> bool:
        """Whether ``step`` gets a line (callers fetch pool stats only then)."""
        return step % self.every == 0 or step == self.total

    def update(self, step: int, loss: float, steps_per_s: float, pool_bytes: int | None) -> None:
        if pool_bytes is not None:
            self._pool = pool_bytes
        if not self.due(step):
            return
        pool = f" pool {format_bytes(self._pool)}" if self._pool is not None else ""
        if self.tty:
            filled = BAR_WIDTH * step // self.total
            bar = "#" * filled + "-" * (BAR_WIDTH - filled)
            line = f"\r[{bar}] {step}/{self.total} loss {loss:.4f} {steps_per_s:.1f} steps/s{pool}"
            self.stream.write(line)
        else:
            self.stream.write(f"step {step}/{self.total} loss {loss:.6f} {steps_per_s:.2f} steps/s{pool}\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
