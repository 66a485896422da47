"""Replies a session's mutating requests got, kept so that a replayed request is answered, not redone.

NOTE [Replay memory]
  A client that gets no reply in time may send the same request (same id) again; the
  daemon answers it with the reply it remembers instead of applying it twice. The
  memory keeps the newest replies, at most REPLAY_REPLIES of them and at most
  REPLAY_BYTES of frames together, except that the newest reply is always kept (one
  reply is at most ``MAX_MESSAGE_BYTES``). A retry comes within a timeout of its
  request, so the newest replies are the ones that matter; the byte bound is what keeps
  a session whose replies are large (an offload of 4096 extents answers with ~200 KB)
  from holding hundreds of MiB of the daemon's memory.
"""

from __future__ import annotations

from collections import OrderedDict

__all__ = ["REPLAY_BYTES", "REPLAY_REPLIES", "ReplayMemory"]

REPLAY_REPLIES = 512
REPLAY_BYTES = 1 << 20


class ReplayMemory:
    """The newest replies of one session by request id, bounded (NOTE [Replay memory])."""

    __slots__ = ("_replies", "bytes")

    def __init__(self) -> None:
        self._replies: OrderedDict[int, bytes] = OrderedDict()
        self.bytes = 0
        """Bytes of the frames kept."""

    def get(self, request_id: int) -> bytes | None:
        return self._replies.get(request_id)

    def remember(self, request_id: int, reply: bytes) -> None:
        replies = self._replies
        old = replies.pop(request_id, None)
        if old is not None:
            self.bytes -= len(old)
        replies[request_id] = reply
        self.bytes += len(reply)
        while len(replies) > REPLAY_REPLIES or (self.bytes > REPLAY_BYTES and len(replies) > 1):
            _, dropped = replies.popitem(last=False)
            self.bytes -= len(dropped)

    def __len__(self) -> int:
        return len(self._replies)
