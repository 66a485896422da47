"""Each session's steps as the daemon sees them: when will the activations it holds be asked for?

NOTE [Time to next use]
  A training step offloads activations through forward (commits) and fetches them back
  through backward, newest first. The daemon sees only that, so a session's step has two
  phases: forward begins with the first commit after a fetch (or the first commit ever),
  backward with the first fetch after a commit. The profile keeps the last whole step's
  forward and backward lengths, ``F`` and ``B``. An activation committed a fraction
  ``x = (c - f0) / F`` into the forward that began at ``f0`` is wanted when backward has
  walked back to it, about ``(1 - x) * B`` after backward begins:

      in forward:   f0 + F + (1 - x) * B
      in backward:  b0 + (1 - x) * B

  Until a step has been seen whole, ``F`` is the forward so far and ``B`` is ``2 * F``
  (backward's usual cost). A forward that runs past its learned length stretches ``F``
  to what it has run, so a session that stops stepping while it holds activations (a
  paused job, one that keeps a graph for later) moves further out with every second
  and is spilled before any session still stepping. The estimate only orders victims
  between sessions; within one, the oldest activation always goes first.
"""

from __future__ import annotations

__all__ = ["StepProfile"]


class StepProfile:
    """Phase and step lengths of one session, from the times of its commits and fetches."""

    def __init__(self, now: float) -> None:
        self.forward_started = now
        self.backward_started: float | None = None
        self.forward_s: float | None = None
        """The last whole forward's length (None until one was seen)."""
        self.backward_s: float | None = None

    def committed(self, now: float) -> None:
        """A commit: a fetch before it means backward ended and a new forward begins now."""
        if self.backward_started is not None:
            self.backward_s = max(now - self.backward_started, 0.0)
            self.backward_started = None
            self.forward_started = now

    def fetched(self, now: float) -> None:
        """A fetch: the first since a commit ends forward."""
        if self.backward_started is None:
            self.forward_s = max(now - self.forward_started, 0.0)
            self.backward_started = now

    def time_to_use(self, committed_at: float, now: float) -> float:
        """Seconds until an activation committed at ``committed_at`` is likely fetched (may be negative)."""
        forward = self.forward_s or 0.0
        if self.backward_started is None:
            forward = max(forward, now - self.forward_started)
        forward = max(forward, 1e-6)
        backward = self.backward_s if self.backward_s is not None else 2 * forward
        remaining = 1.0 - min(max((committed_at - self.forward_started) / forward, 0.0), 1.0)
        if self.backward_started is None:
            return self.forward_started + forward + remaining * backward - now
        return self.backward_started + remaining * backward - now
