"""One vLLM engine core for several front-end processes (`frontends: N`, see worker/frontends.py).

This is what `vllm serve --api-server-count N` does, with vLLM's own pieces: the worker that loads
the model starts the engine core with N pairs of ZMQ addresses (IPC, on this host), and each
front-end builds an `AsyncLLM` client bound to its pair (`client_index` i of `client_count` N).
The engine core routes each request's output to the client that sent it, so every front-end
does the output processing of its own requests only.

Blocking calls (they wait for the engine core: minutes for a large model): run them in a thread.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from vllm import AsyncEngineArgs
from vllm.usage.usage_lib import UsageContext
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.utils import CoreEngineProcManager, get_engine_zmq_addresses, launch_core_engines
from vllm.v1.executor import Executor

# The settings `vllm serve` uses, so that scheduler defaults (max_num_seqs, batched tokens) match.
USAGE = UsageContext.OPENAI_API_SERVER


@dataclass
class SharedEngineCore:
    """The engine core process this worker started, and where each front-end reaches it."""

    manager: CoreEngineProcManager
    inputs: list[str]
    outputs: list[str]

    def attach_info(self, index: int) -> dict[str, Any]:
        return {"input_address": self.inputs[index], "output_address": self.outputs[index]}

    @property
    def dead_error(self) -> str | None:
        finished = self.manager.finished_procs()
        return f"vLLM engine core exited: {finished}" if finished else None

    def shutdown(self) -> None:
        self.manager.shutdown()


def _for_frontend(args: AsyncEngineArgs, rank: int, count: int) -> AsyncEngineArgs:
    args = copy.copy(args)
    args._api_process_count = count
    args._api_process_rank = rank  # -1: the process that starts the engine core, as in `vllm serve`
    return args


def start_engine_core(args: AsyncEngineArgs, count: int) -> SharedEngineCore:
    """Start the engine core for `count` front-ends and wait until it is up (weights loaded, KV cache
    sized, graphs captured). The front-ends' clients may bind before or after: ZMQ queues the engine's
    first message to each of them."""
    config = _for_frontend(args, -1, count).create_engine_config(usage_context=USAGE)
    addresses = get_engine_zmq_addresses(config, count)
    with launch_core_engines(config, Executor.get_class(config), True, addresses, count) as (manager, _, addresses, _):
        pass  # leaving the block waits for the engine core's handshake
    assert isinstance(manager, CoreEngineProcManager)
    return SharedEngineCore(manager, list(addresses.inputs), list(addresses.outputs))


def attach_client(args: AsyncEngineArgs, index: int, count: int, attach: dict[str, Any],
                  stat_loggers: list[Any]) -> AsyncLLM:
    """Front-end `index`'s `AsyncLLM`, a client of the engine core another process started; returns
    once the engine core has greeted it (its KV capacity is known then)."""
    config = _for_frontend(args, index, count).create_engine_config(usage_context=USAGE)
    return AsyncLLM.from_vllm_config(
        config, usage_context=USAGE, stat_loggers=stat_loggers, disable_log_stats=args.disable_log_stats,
        client_addresses={"input_address": attach["input_address"], "output_address": attach["output_address"]},
        client_count=count, client_index=index,
    )
