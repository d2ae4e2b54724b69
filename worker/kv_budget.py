"""Admission against an engine's real KV capacity: a job runs only if its worst case fits (in the
capacity times the model's `kv_oversubscription`, for engines that preempt)."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

from worker.interactive_board import InteractiveBoard

# Interactive work counts as served this long after its last job ended: requests of a conversation or a
# client come a pause apart, and a batch refilled between them would make the next one wait on long steps.
_INTERACTIVE_LINGER_S = 1.0


class KvBudget:
    """Token budget (prompt + max new tokens per job, rounded up to whole KV blocks, as the
    engine allocates them) and a sequence-slot limit.

    Priority classes (worker/consumer.py): it knows which held jobs are batch jobs, and slots can be
    reserved for interactive jobs taken while batch jobs fill the engine (they are admitted, with
    `reserved`, once the batch jobs preempted for them release their slots; nothing else gets those).
    While interactive work is on the engine (held, or done less than _INTERACTIVE_LINGER_S ago, here or, with
    a `board`, in any front-end process of the engine), batch jobs keep to `batch_share` of the slots
    (`batch_limit`; `batch_room` admits no more, and the worker preempts long running ones beyond it)."""

    def __init__(self, capacity_tokens: int, max_seqs: int, block_size: int = 1, oversubscription: float = 1.0,
                 batch_share: float = 1.0, board: InteractiveBoard | None = None) -> None:
        self.capacity_tokens = capacity_tokens
        self.admit_tokens = int(capacity_tokens * oversubscription)  # the worst cases admitted add up to this
        self.max_seqs = max_seqs
        # Batch jobs held beside interactive work at most (all the slots: no limit).
        self.batch_limit = max_seqs if batch_share >= 1.0 else int(batch_share * max_seqs)
        self.block_size = block_size
        self._held: dict[str, int] = {}
        self._batch: dict[str, None] = {}  # held batch jobs, in the order admitted
        self._reserved = 0
        self._used = 0
        self._changed = asyncio.Event()
        self._interactive_at = float("-inf")  # monotonic: when interactive work was last admitted or released
        self._board = board

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
        else:
            self._interactive_changed()
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
            if request_id in self._batch:
                del self._batch[request_id]
            else:
                self._interactive_changed()
            self._changed.set()

    def _interactive_changed(self) -> None:
        self._interactive_at = time.monotonic()
        if self._board is not None:
            self._board.publish(self._served_at())

    def _served_at(self) -> float:
        """When this process's interactive work counts as served (monotonic; +inf while it holds some)."""
        if len(self._held) > len(self._batch):
            return math.inf
        return self._interactive_at + _INTERACTIVE_LINGER_S

    def interactive_quiet_in(self) -> float:
        """Seconds until interactive work on the engine counts as served (0: it does): none held, none for
        the linger."""
        served_at = self._served_at()
        if self._board is not None:
            served_at = max(served_at, self._board.served_at())
        if served_at == math.inf:
            return _INTERACTIVE_LINGER_S
        return max(0.0, served_at - time.monotonic())

    def batch_room(self) -> int:
        """How many more batch jobs may be admitted: any while no interactive work is here; else only up to
        `batch_limit` (the fewer sequences beside it, the shorter the engine's step, the sooner an interactive
        token comes)."""
        if self.batch_limit >= self.max_seqs or self.interactive_quiet_in() == 0.0:
            return self.max_seqs
        return max(0, self.batch_limit - len(self._batch))
