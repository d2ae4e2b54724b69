"""Admission against an engine's real KV capacity: a job runs only if its worst case fits (in the
capacity times the model's `kv_oversubscription`, for engines that preempt)."""

from __future__ import annotations

import asyncio


class KvBudget:
    """Token budget (prompt + max new tokens per job, rounded up to whole KV blocks, as the
    engine allocates them) and a sequence-slot limit."""

    def __init__(self, capacity_tokens: int, max_seqs: int, block_size: int = 1, oversubscription: float = 1.0) -> None:
        self.capacity_tokens = capacity_tokens
        self.admit_tokens = int(capacity_tokens * oversubscription)  # the worst cases admitted add up to this
        self.max_seqs = max_seqs
        self.block_size = block_size
        self._held: dict[str, int] = {}
        self._used = 0
        self._changed = asyncio.Event()

    @property
    def used_tokens(self) -> int:
        return self._used

    @property
    def free_seqs(self) -> int:
        return self.max_seqs - len(self._held)

    def _blocks(self, tokens: int) -> int:
        return -(-tokens // self.block_size) * self.block_size

    def fits(self, tokens: int) -> bool:
        return len(self._held) < self.max_seqs and self._used + self._blocks(tokens) <= self.admit_tokens

    def try_admit(self, request_id: str, tokens: int) -> bool:
        if not self.fits(tokens):
            return False
        self._held[request_id] = self._blocks(tokens)
        self._used += self._held[request_id]
        return True

    async def admit(self, request_id: str, tokens: int) -> None:
        """Wait until the job fits, then hold its tokens. A job larger than the whole capacity
        never fits: callers reject those first (see `never_fits`)."""
        while not self.try_admit(request_id, tokens):
            self._changed.clear()
            await self._changed.wait()

    def never_fits(self, tokens: int) -> bool:
        """Larger than the whole engine: no oversubscription makes it runnable."""
        return self._blocks(tokens) > self.capacity_tokens

    async def wait_for_slot(self) -> None:
        while self.free_seqs <= 0:
            self._changed.clear()
            await self._changed.wait()

    def release(self, request_id: str) -> None:
        held = self._held.pop(request_id, None)
        if held is not None:
            self._used -= held
            self._changed.set()
