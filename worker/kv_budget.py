"""Admission against an engine's real KV capacity: a job runs only if its worst case fits."""

from __future__ import annotations

import asyncio


class KvBudget:
    """Token budget (prompt + max new tokens per job) and a sequence-slot limit."""

    def __init__(self, capacity_tokens: int, max_seqs: int) -> None:
        self.capacity_tokens = capacity_tokens
        self.max_seqs = max_seqs
        self._held: dict[str, int] = {}
        self._changed = asyncio.Event()

    @property
    def used_tokens(self) -> int:
        return sum(self._held.values())

    @property
    def free_seqs(self) -> int:
        return self.max_seqs - len(self._held)

    def fits(self, tokens: int) -> bool:
        return len(self._held) < self.max_seqs and self.used_tokens + tokens <= self.capacity_tokens

    def try_admit(self, request_id: str, tokens: int) -> bool:
        if not self.fits(tokens):
            return False
        self._held[request_id] = tokens
        return True

    async def admit(self, request_id: str, tokens: int) -> None:
        """Wait until the job fits, then hold its tokens. A job larger than the whole capacity
        never fits: callers reject those first (the gateway's context check guarantees it)."""
        while not self.try_admit(request_id, tokens):
            self._changed.clear()
            await self._changed.wait()

    async def wait_for_slot(self) -> None:
        while self.free_seqs <= 0:
            self._changed.clear()
            await self._changed.wait()

    def release(self, request_id: str) -> None:
        if self._held.pop(request_id, None) is not None:
            self._changed.set()
