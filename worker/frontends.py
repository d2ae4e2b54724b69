"""Several front-end processes for one engine (a model's `frontends: N`).

At high concurrency the process that turns engine output into published chunks is the limit, not
the GPU: vLLM's output processing (detokenizing, one Python object per request per step) and ours
run in one process, at one core. With `frontends: N` the worker that loads the model starts N-1
more worker processes, its front-ends, each attached to the same engine (for vLLM: one engine core
shared by N `AsyncLLM` clients, as `vllm serve --api-server-count N` does). Each front-end is a
full consumer of the model's stream with its own heartbeat and 1/N of the engine's KV capacity
and sequences; the fleet's reclaim covers a front-end that dies like any worker.

The loading worker owns its front-ends: they stop with the model (drained and handed back like
the worker's own jobs), a front-end that dies makes the worker stop so that its supervisor
restarts the whole group, and a front-end dies with the worker (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from common.embedded_redis import free_port
from common.settings import ModelSpec, WorkerSettings

log = logging.getLogger(__name__)

FRONTEND_ENV = "LLM_FLEET_FRONTEND"
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class FrontendRole:
    """Which front-end of a model's engine this process is: index 0 is the worker that loaded the
    model (it hosts the engine), 1..count-1 are the processes it started."""

    index: int = 0
    count: int = 1
    attach: dict[str, Any] = dataclasses.field(default_factory=dict)  # engine-specific: how to reach the engine
    board: str = ""  # the engine's interactive board (worker/interactive_board.py), made by front-end 0


@dataclass(frozen=True)
class FrontendProcess:
    """What a started front-end reads from its environment."""

    parent_id: str
    parent_pid: int
    role: FrontendRole
    spec: ModelSpec
    settings: WorkerSettings

    def to_env(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_env(cls) -> FrontendProcess | None:
        raw = os.environ.get(FRONTEND_ENV)
        if not raw:
            return None
        data = json.loads(raw)
        return cls(parent_id=data["parent_id"], parent_pid=data["parent_pid"], role=FrontendRole(**data["role"]),
                   spec=ModelSpec(**data["spec"]), settings=WorkerSettings(**data["settings"]))

    def die_with_parent(self) -> None:
        """SIGTERM this process when the worker that started it dies (then it drains like any worker)."""
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != self.parent_pid:  # it died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)


def frontend_id(parent_id: str, index: int) -> str:
    return f"{parent_id}-fe{index}"


class FrontendGroup:
    """The front-end processes 1..N-1 of one model, started by the worker that loaded it."""

    def __init__(self, model: str, procs: list[subprocess.Popen[bytes]], metrics_ports: list[int | None]) -> None:
        self.model = model
        self._procs = procs
        self._metrics_ports = metrics_ports
        self._stopping = False

    @classmethod
    def start(cls, settings: WorkerSettings, spec: ModelSpec, attach: list[dict[str, Any]],
              board: str) -> FrontendGroup:
        """Start one front-end per `attach` entry (front-ends 1..len(attach)); `board`: the engine's
        interactive board."""
        procs = []
        count = len(attach) + 1
        # Where the worker serves /metrics, each front-end serves its own on a localhost port, for the
        # worker to fold into its own (worker/frontend_metrics.py).
        ports = [free_port() if settings.http_port is not None else None for _ in attach]
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        for index, (where, port) in enumerate(zip(attach, ports, strict=True), start=1):
            child_settings = dataclasses.replace(
                settings, worker_id=frontend_id(settings.worker_id, index), models=[spec.name], catalogue=None,
                http_host="127.0.0.1", http_port=port)
            env = dict(os.environ)
            env[FRONTEND_ENV] = FrontendProcess(
                parent_id=settings.worker_id, parent_pid=os.getpid(), role=FrontendRole(index, count, where, board),
                spec=spec, settings=child_settings).to_env()
            procs.append(subprocess.Popen([sys.executable, "-m", "common.cli", "worker", "--log-level", level],
                                          env=env))
        log.info("model %s: started %d more front-end process(es): %s", spec.name, len(procs),
                 ", ".join(str(p.pid) for p in procs))
        return cls(spec.name, procs, ports)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    @property
    def metrics_urls(self) -> list[tuple[str, str]]:
        """(front-end index, its /metrics URL) for each front-end that serves one."""
        return [(str(index), f"http://127.0.0.1:{port}/metrics")
                for index, port in enumerate(self._metrics_ports, start=1) if port is not None]

    @property
    def dead_error(self) -> str | None:
        """Set once a front-end exited while the model was not stopping (a crash, a kill)."""
        if self._stopping:
            return None
        for index, proc in enumerate(self._procs, start=1):
            code = proc.poll()
            if code is not None:
                return f"front-end {index} of model {self.model!r} (pid {proc.pid}) exited with code {code}"
        return None

    def begin_stop(self) -> None:
        """SIGTERM every front-end: each stops reading and drains its jobs, as the worker does."""
        self._stopping = True
        for proc in self._procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    def wait(self, timeout_s: float) -> None:
        """Blocking (call it in a thread): wait for the front-ends to exit; kill those that do not."""
        self.begin_stop()
        deadline = time.monotonic() + timeout_s
        for proc in self._procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("front-end pid %d did not stop within %.0fs; killing it", proc.pid, timeout_s)
                proc.kill()
                proc.wait()
