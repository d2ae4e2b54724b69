"""Engine-core step probe for `bench/vllm_vs_fleet.py --engine-probe` (a benchmark tool, never in the
product). Put this directory first on PYTHONPATH and set LLM_FLEET_ENGINE_PROBE to a folder: every
vLLM engine-core process then writes `engine-<pid>.json` there once a second, with cumulative
counters of what its busy loop did:

- batches: how many the scheduler made, how many were decode-only (one token per request), and
  their tokens, requests and new requests;
- cycle_s: wall time from one batch's scheduling to the next, split by decode-only and mixed batches
  (what a step costs, all included: GPU, scheduling, output processing, waiting on the GIL);
- input_s / requests: time the busy loop spent taking client requests (adds, aborts, utility calls),
  and how many of each kind.

The same on `vllm serve` and on the fleet, so their engine cores can be compared step for step.
"""

from __future__ import annotations

import importlib.abc
import json
import os
import sys
import threading
import time
from collections import Counter
from typing import Any

_TARGET = "vllm.v1.engine.core"
_OUT = os.environ.get("LLM_FLEET_ENGINE_PROBE")


class _Counters:
    def __init__(self) -> None:
        self.values: Counter[str] = Counter()
        self.last_schedule: float | None = None
        self.last_kind: str | None = None
        self.writer: threading.Thread | None = None

    def scheduled(self, output: Any) -> None:
        now = time.perf_counter()
        if self.last_schedule is not None and self.last_kind is not None:
            self.values[f"cycle_s_{self.last_kind}"] += now - self.last_schedule
        tokens = output.num_scheduled_tokens
        if not tokens:
            self.last_schedule, self.last_kind = None, None
            return
        kind = "decode" if max(tokens.values()) == 1 else "mixed"
        self.values[f"batches_{kind}"] += 1
        self.values[f"tokens_{kind}"] += output.total_num_scheduled_tokens
        self.values[f"requests_{kind}"] += len(tokens)
        self.values["new_requests"] += len(output.scheduled_new_reqs)
        self.last_schedule, self.last_kind = now, kind

    def write_every_second(self) -> None:
        path = os.path.join(_OUT or ".", f"engine-{os.getpid()}.json")
        while True:
            time.sleep(1.0)
            with open(path + ".tmp", "w") as out:
                json.dump({"at": time.time(), **self.values}, out)
            os.replace(path + ".tmp", path)


_COUNTERS = _Counters()


def _install(core: Any) -> None:
    engine_core = core.EngineCoreProc  # the busy loop of the engine-core process
    process_step = engine_core._process_engine_step
    process_inputs = engine_core._process_input_queue
    handle = engine_core._handle_client_request

    def probed_step(self: Any) -> bool:
        if _COUNTERS.writer is None:  # the first step runs in the engine-core process (after any fork)
            _COUNTERS.writer = threading.Thread(target=_COUNTERS.write_every_second, daemon=True)
            _COUNTERS.writer.start()
            schedule = self.scheduler.schedule

            def probed_schedule(*args: Any, **kwargs: Any) -> Any:
                output = schedule(*args, **kwargs)
                _COUNTERS.scheduled(output)
                return output

            self.scheduler.schedule = probed_schedule
        return process_step(self)

    def probed_inputs(self: Any) -> None:
        started = time.perf_counter()
        try:
            process_inputs(self)
        finally:
            _COUNTERS.values["input_s"] += time.perf_counter() - started

    def probed_handle(self: Any, request_type: Any, request: Any) -> None:
        kind = getattr(request_type, "name", str(request_type))
        _COUNTERS.values[f"requests_{kind}"] += 1
        if kind == "ABORT":
            _COUNTERS.values["aborted_ids"] += len(request)
        elif kind == "UTILITY":
            _COUNTERS.values[f"utility_{request[2]}"] += 1
        handle(self, request_type, request)

    engine_core._process_engine_step = probed_step
    engine_core._process_input_queue = probed_inputs
    engine_core._handle_client_request = probed_handle


class _AfterImport(importlib.abc.MetaPathFinder):
    """Patches vLLM's engine core right after it is imported (and only if it ever is)."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != _TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                exec_module = spec.loader.exec_module

                def exec_and_install(module: Any, exec_module: Any = exec_module) -> None:
                    exec_module(module)
                    _install(module)

                spec.loader.exec_module = exec_and_install  # type: ignore[method-assign]
                return spec
        return None


def _run_shadowed_sitecustomize() -> None:
    """This file hides any other sitecustomize (the system's may set paths up): run that one too."""
    here = os.path.dirname(os.path.abspath(__file__))
    for entry in sys.path:
        candidate = os.path.join(entry or ".", "sitecustomize.py")
        if os.path.abspath(entry or ".") != here and os.path.isfile(candidate):
            with open(candidate) as source:
                exec(compile(source.read(), candidate, "exec"), {"__name__": "sitecustomize", "__file__": candidate})
            return


if _OUT:
    sys.meta_path.insert(0, _AfterImport())
_run_shadowed_sitecustomize()
