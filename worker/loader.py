"""The async model loader: builds engines in the background, so the worker heartbeats
`loading` (with progress) and keeps answering while weights load."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from common.protocol import ModelState, WorkerModelStatus
from common.settings import ModelSpec
from worker.engines.base import Engine

log = logging.getLogger(__name__)


async def build_engine(spec: ModelSpec, cache_dir: str, status: WorkerModelStatus) -> Engine:
    def progress(fraction: float) -> None:
        status.progress = round(fraction, 3)

    if spec.engine == "test":
        from worker.engines.test_echo import load_test_engine

        return await load_test_engine(spec, progress)
    if spec.engine == "cpu":
        from worker.engines.cpu import load_cpu_engine

        return await load_cpu_engine(spec, cache_dir, progress)
    if spec.engine == "vllm":
        from worker.engines.vllm_async import load_vllm_engine

        return await load_vllm_engine(spec, progress)
    raise ValueError(f"model {spec.name!r}: unknown engine {spec.engine!r}")


class ModelLoader:
    """Loads and unloads models; `status[name]` is what the heartbeat reports for each."""

    def __init__(self, cache_dir: str, on_loaded: Callable[[Engine], Awaitable[None]]) -> None:
        self.cache_dir = cache_dir
        self._on_loaded = on_loaded  # runs before the model reports ready (registers it for gateways)
        self.status: dict[str, WorkerModelStatus] = {}
        self.engines: dict[str, Engine] = {}
        self._ready: dict[str, asyncio.Future[Engine]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, spec: ModelSpec) -> None:
        status = self.status[spec.name] = WorkerModelStatus(state=ModelState.LOADING)
        future: asyncio.Future[Engine] = asyncio.get_running_loop().create_future()
        self._ready[spec.name] = future

        async def load() -> None:
            try:
                engine = await build_engine(spec, self.cache_dir, status)
                await self._on_loaded(engine)
            except Exception as exc:
                log.exception("loading model %s failed", spec.name)
                status.state, status.error = ModelState.FAILED, str(exc)
                future.set_exception(exc)
                return
            self.engines[spec.name] = engine
            status.state, status.progress = ModelState.READY, 1.0
            status.kv_capacity_tokens, status.max_num_seqs = engine.kv_capacity_tokens, engine.max_num_seqs
            future.set_result(engine)

        task = asyncio.create_task(load(), name=f"load:{spec.name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def ready(self, name: str) -> Engine:
        return await asyncio.shield(self._ready[name])

    async def unload(self, name: str) -> None:
        """Forget the model and free its engine (a load still running is waited for first: an engine
        being built in a thread cannot be interrupted)."""
        future = self._ready.pop(name, None)
        if future is not None and not future.done():
            with contextlib.suppress(Exception):
                await future
        self.status.pop(name, None)
        engine = self.engines.pop(name, None)
        if engine is not None:
            await engine.close()

    async def close(self) -> None:
        for name in list(self._ready):
            await self.unload(name)
