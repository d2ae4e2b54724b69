"""The rule for every long-lived task of a gateway or a worker: it never ends silently.

A task (publisher, relay reader, heartbeat, cancel listener, control plane, a model's reader, ...)
handles what it expects (Redis unavailable: retry with backoff) itself. Anything else that escapes
it is logged with its traceback, counted (`on_crash`, a /metrics counter) and the task is started
again after a backoff. A task that keeps crashing (`give_up_after` crashes in a row, none of its runs
lasting `stable_s`) has failed: `failed` names it, so the process reports unready and a worker exits
for its supervisor (Kubernetes, `llm-fleet up`) to restart it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

_FIRST_BACKOFF_S = 0.1
_MAX_BACKOFF_S = 5.0


class Supervisor:
    def __init__(self, *, on_crash: Callable[[str], None] = lambda name: None,
                 on_failed: Callable[[str], None] = lambda name: None,
                 give_up_after: int = 8, stable_s: float = 30.0) -> None:
        self._on_crash = on_crash
        self._on_failed = on_failed
        self._give_up_after = give_up_after
        self._stable_s = stable_s
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.failed: dict[str, str] = {}  # task name -> its last error, once given up on

    def start(self, name: str, run: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
        """Run `run()` under supervision until it returns or `stop` cancels it."""
        task = self._tasks[name] = asyncio.create_task(self._supervise(name, run), name=name)
        return task

    async def _supervise(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        crashes = 0
        backoff = _FIRST_BACKOFF_S
        while True:
            started = time.monotonic()
            try:
                await run()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if time.monotonic() - started >= self._stable_s:
                    crashes, backoff = 0, _FIRST_BACKOFF_S  # it had recovered: a new incident
                crashes += 1
                self._on_crash(name)
                if crashes >= self._give_up_after:
                    log.error("task %s failed %d times in a row; giving up on it", name, crashes, exc_info=exc)
                    self.failed[name] = f"{type(exc).__name__}: {exc}"
                    self._on_failed(name)
                    return
                log.error("task %s crashed (%d in a row); restarting in %.1fs", name, crashes, backoff, exc_info=exc)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF_S)

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Cancel every task and wait (bounded: redis-py 5 can lose a cancellation in a reconnect)."""
        tasks = [t for t in self._tasks.values() if not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)
        for task in tasks:
            if task.done():
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    task.result()
        self._tasks.clear()
