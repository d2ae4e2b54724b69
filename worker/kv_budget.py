"""Admission against an engine's real KV capacity: a job runs only if its worst case fits (in the
capacity times the model's `kv_oversubscription`, for engines that preempt)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class KvBudget:
    """Token budget (prompt + max new tokens per job, rounded up to whole KV blocks, as the
    engine allocates them) and a sequence-slot limit.

    Priority classes (worker/consumer.py): it knows which held jobs are batch jobs, and slots can be
    reserved for interactive jobs taken while batch jobs fill the engine (they are admitted, with
    `reserved`, once the batch jobs preempted for them release their slots; nothing else gets those)."""

    def __init__(self, capacity_tokens: int, max_seqs: int, block_size: int = 1, oversubscription: float = 1.0) -> None:
        self.capacity_tokens = capacity_tokens
        self.admit_tokens = int(capacity_tokens * oversubscription)  # the worst cases admitted add up to this
        self.max_seqs = max_seqs
        self.block_size = block_size
        self._held: dict[str, int] = {}
        self._batch: dict[str, None] = {}  # held batch jobs, in the order admitted
        self._reserved = 0
        self._used = 0
        self._changed = asyncio.Event()

    @property
    def used_tokens(self) -> int:
        return self._used

    @property
    def held_seqs(self) -> int:
        return len(self._held)

    @property
    def free_seqs(self) -> int:
        return self.max_seqs - len(self._held) - self._reserved

    @property
    def batch_jobs(self) -> list[str]:
        """Held batch jobs, the most recently admitted first (the least work lost if preempted)."""
        return list(reversed(self._batch))

    def _blocks(self, tokens: int) -> int:
        return -(-tokens // self.block_size) * self.block_size

    def fits(self, tokens: int, *, reserved: bool = False) -> bool:
        others_reserved = self._reserved - 1 if reserved else self._reserved
        return (len(self._held) + others_reserved < self.max_seqs
                and self._used + self._blocks(tokens) <= self.admit_tokens)

    def try_admit(self, request_id: str, tokens: int, *, batch: bool = False, reserved: bool = False) -> bool:
        """Hold the job's tokens if it fits; `reserved`: it takes one of the reserved slots."""
        if not self.fits(tokens, reserved=reserved):
            return False
        self._held[request_id] = self._blocks(tokens)
        self._used += self._held[request_id]
        if batch:
            self._batch[request_id] = None
        if reserved:
            self._reserved -= 1
        self._changed.set()
        return True

    async def admit(self, request_id: str, tokens: int, *, batch: bool = False, reserved: bool = False) -> None:
        """Wait until the job fits, then hold its tokens. A job larger than the whole capacity
        never fits: callers reject those first (see `never_fits`)."""
        while not self.try_admit(request_id, tokens, batch=batch, reserved=reserved):
            self._changed.clear()
            await self._changed.wait()

    def reserve(self, count: int) -> None:
        """Keep `count` slots, as they free, for jobs admitted with `reserved`."""
        self._reserved += count
        self._changed.set()

    def unreserve(self) -> None:
        """A reserved slot whose job will not be admitted after all (refused, or never started)."""
        self._reserved -= 1
        self._changed.set()

    def wake(self) -> None:
        """Have every `wait_until` check its condition again (it changed without an admission or release)."""
        self._changed.set()

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        """Wait until `condition` holds; it is checked again whenever a job is admitted or released."""
        while not condition():
            self._changed.clear()
            await self._changed.wait()

    def never_fits(self, tokens: int) -> bool:
        """Larger than the whole engine: no oversubscription makes it runnable."""
        return self._blocks(tokens) > self.capacity_tokens

    def release(self, request_id: str) -> None:
        held = self._held.pop(request_id, None)
        if held is not None:
            self._used -= held
            self._batch.pop(request_id, None)
            self._changed.set()
