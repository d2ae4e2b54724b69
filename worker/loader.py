"""The async model loader: builds engines in the background, so the worker heartbeats
`loading` (with progress) and keeps answering while weights load. A model with `frontends: N`
gets its N-1 front-end processes started here once its engine is up (worker/frontends.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from common.protocol import ModelState, WorkerModelStatus
from common.settings import TOOL_CALL_PARSER_OPTION, ModelSpec, WorkerSettings
from worker.engines.base import Engine
from worker.frontends import FrontendGroup, FrontendRole
from worker.interactive_board import InteractiveBoard, board_path

log = logging.getLogger(__name__)

# A front-end's stop takes its drain plus handing back and closing; past this margin it is killed.
_FRONTEND_STOP_MARGIN_S = 30.0

# Engines one engine instance of which several front-end processes can share. The test engine
# stands in for it in tests: each of its front-ends runs its own copy.
SHAREABLE_ENGINES = frozenset({"vllm", "test"})


def frontend_share(engine: Engine, spec: ModelSpec) -> tuple[int, int]:
    """The KV tokens and sequences each of the model's front-ends admits: 1/N of the engine, so that
    together they never overfill it."""
    return engine.kv_capacity_tokens // spec.frontends, max(1, engine.max_num_seqs // spec.frontends)


async def build_engine(spec: ModelSpec, cache_dir: str, status: WorkerModelStatus, role: FrontendRole) -> Engine:
    engine = await _engine_of(spec, cache_dir, status, role)
    engine.card.tool_call_parser = str(spec.options.get(TOOL_CALL_PARSER_OPTION, ""))
    return engine


async def _engine_of(spec: ModelSpec, cache_dir: str, status: WorkerModelStatus, role: FrontendRole) -> Engine:
    def progress(fraction: float) -> None:
        status.progress = round(fraction, 3)

    if spec.frontends > 1 and spec.engine not in SHAREABLE_ENGINES:
        raise ValueError(f"model {spec.name!r}: the {spec.engine} engine cannot be shared by several front-ends "
                         f"(frontends: {spec.frontends}); only {', '.join(sorted(SHAREABLE_ENGINES))} can")
    if spec.engine == "test":
        from worker.engines.echo import load_echo_engine

        return await load_echo_engine(spec, progress)
    if spec.engine == "cpu":
        from worker.engines.cpu import load_cpu_engine

        return await load_cpu_engine(spec, cache_dir, progress)
    if spec.engine == "vllm":
        from worker.engines.vllm_async import load_vllm_engine

        return await load_vllm_engine(spec, progress, role)
    raise ValueError(f"model {spec.name!r}: unknown engine {spec.engine!r}")


class ModelLoader:
    """Loads and unloads models; `status[name]` is what the heartbeat reports for each."""

    def __init__(self, settings: WorkerSettings, on_loaded: Callable[[Engine], Awaitable[None]],
                 role: FrontendRole | None = None) -> None:
        self.settings = settings
        self._on_loaded = on_loaded  # runs before the model reports ready (registers it for gateways)
        self._role = role  # set in a front-end process: it attaches to its worker's engine
        self.status: dict[str, WorkerModelStatus] = {}
        self.engines: dict[str, Engine] = {}
        self.frontends: dict[str, FrontendGroup] = {}
        self.boards: dict[str, InteractiveBoard] = {}  # models with several front-ends: their interactive board
        self._ready: dict[str, asyncio.Future[Engine]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, spec: ModelSpec) -> None:
        status = self.status[spec.name] = WorkerModelStatus(state=ModelState.LOADING)
        future: asyncio.Future[Engine] = asyncio.get_running_loop().create_future()
        self._ready[spec.name] = future

        async def load() -> None:
            try:
                role = self._role or FrontendRole(index=0, count=spec.frontends)
                engine = await build_engine(spec, self.settings.cache_dir, status, role)
                if self._role is None and spec.frontends > 1:
                    try:
                        # Cleared before any front-end starts: none of them has interactive work yet.
                        board = self.boards[spec.name] = InteractiveBoard.create(
                            board_path(os.getpid(), spec.name), spec.frontends)
                        self.frontends[spec.name] = FrontendGroup.start(
                            self.settings, spec, [engine.attach_info(i) for i in range(1, spec.frontends)],
                            str(board.path))
                    except BaseException:
                        await engine.close()
                        raise
                elif role.board:
                    self.boards[spec.name] = InteractiveBoard(Path(role.board), role.count, role.index)
                await self._on_loaded(engine)
            except Exception as exc:
                log.exception("loading model %s failed", spec.name)
                status.state, status.error = ModelState.FAILED, str(exc)
                future.set_exception(exc)
                return
            self.engines[spec.name] = engine
            status.state, status.progress = ModelState.READY, 1.0
            status.kv_capacity_tokens, status.max_num_seqs = frontend_share(engine, spec)
            future.set_result(engine)

        task = asyncio.create_task(load(), name=f"load:{spec.name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def ready(self, name: str) -> Engine:
        return await asyncio.shield(self._ready[name])

    def dead_error(self, name: str) -> str | None:
        """Why the model can serve nothing more here: its engine or one of its front-ends died."""
        engine, group = self.engines.get(name), self.frontends.get(name)
        return (engine.dead_error if engine is not None else None) or (group.dead_error if group else None)

    def begin_unload(self, name: str) -> None:
        """The model stops serving: its front-end processes start their drain now, with this worker's."""
        group = self.frontends.get(name)
        if group is not None:
            group.begin_stop()

    async def unload(self, name: str) -> None:
        """Forget the model and free its engine (a load still running is waited for first: an engine
        being built in a thread cannot be interrupted)."""
        future = self._ready.pop(name, None)
        if future is not None and not future.done():
            with contextlib.suppress(Exception):
                await future
        self.status.pop(name, None)
        group = self.frontends.pop(name, None)
        if group is not None:  # they drain like a worker, then the engine they share can go
            await asyncio.to_thread(group.wait, self.settings.drain_timeout_s + _FRONTEND_STOP_MARGIN_S)
        board = self.boards.pop(name, None)
        if board is not None and self._role is None:
            board.remove()
        engine = self.engines.pop(name, None)
        if engine is not None:
            await engine.close()

    async def close(self) -> None:
        for name in list(self._ready):
            await self.unload(name)
