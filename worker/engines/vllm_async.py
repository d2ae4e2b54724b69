"""The vLLM engine: vLLM's v1 `AsyncLLM` on a GPU, through its public API (vLLM 0.26).

vLLM does the continuous batching, paged KV cache and prefix caching. This module maps our
jobs onto it: token-id prompts (the gateway already tokenized them), DELTA outputs (only new
text per step), abort on cancel, and the real KV capacity read once the engine is up, so the
worker's KvBudget admits only what vLLM can hold without preemption. With `frontends: N` the
engine core is shared by N worker processes (worker/engines/vllm_shared.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import tempfile
import uuid
from collections.abc import AsyncIterator
from typing import Any

from vllm import AsyncEngineArgs, RequestOutput, SamplingParams, envs
from vllm.config import KVEventsConfig
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
from vllm.usage.usage_lib import UsageContext
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.metrics.loggers import StatLoggerBase

from common.protocol import FinishReason, ModelCard, TokenLogprob
from common.settings import CONTINUE_STRUCTURED_OPTION, FLEET_OPTIONS, ModelSpec
from worker.engines.base import Engine, EngineOutput, EngineRequest, EngineStats, ProgressCallback
from worker.engines.hf_tokenizer import tokenizer_bundle
from worker.engines.vllm_grammar import ContinuedGrammar, continued_grammar
from worker.engines.vllm_shared import SharedEngineCore, attach_client, start_engine_core
from worker.frontends import FrontendRole

log = logging.getLogger(__name__)

_FINISH_REASONS = {
    "stop": FinishReason.STOP,
    "length": FinishReason.LENGTH,
    "abort": FinishReason.CANCELLED,
    "error": FinishReason.ERROR,
}


def _structured(response_format: dict[str, Any] | None, request: EngineRequest,
                continues_grammar: bool) -> dict[str, Any]:
    """OpenAI's response_format as vLLM's structured outputs (xgrammar, as the CPU engine); for a continuation,
    as the fleet's own logits processor's argument, which first walks the grammar through the earlier output
    (worker/engines/vllm_grammar.py: vLLM's would start a new document at the prompt's end)."""
    if response_format is None:
        return {}
    if request.resumed_tokens:
        if not continues_grammar:
            raise ValueError("this response_format answer was cut off by a worker's death, and this vLLM engine "
                             "cannot continue it (its catalogue entry would need continue_structured_outputs)")
        said = request.prompt_token_ids[len(request.prompt_token_ids) - request.resumed_tokens:]
        return {"extra_args": continued_grammar(response_format, said)}
    if response_format["type"] == "json_object":
        return {"structured_outputs": StructuredOutputsParams(json_object=True)}
    return {"structured_outputs": StructuredOutputsParams(json=response_format["json_schema"].get("schema", {}))}


def _logprobs(steps: Any, token_ids: list[int]) -> list[TokenLogprob]:
    """vLLM's per-token {token id: Logprob} maps (the token first, then the k most likely others) as
    TokenLogprobs, in vLLM's order: ties come out as `vllm serve` lists them."""
    return [[step[token].logprob, [[i, lp.logprob] for i, lp in step.items()]]
            for token, step in zip(token_ids, steps, strict=True)]


class _LatestSchedulerStats(StatLoggerBase):
    """A stat logger that keeps only the scheduler's last report (running, waiting, KV usage)."""

    def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
        self.latest: Any = None

    def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
               engine_idx: int = 0) -> None:
        if scheduler_stats is not None:
            self.latest = scheduler_stats

    def log_engine_initialized(self) -> None:
        pass


class VllmEngine(Engine):
    reports_prefix_events = True

    def __init__(self, spec: ModelSpec, llm: AsyncLLM, hf_tokenizer: Any, stats: _LatestSchedulerStats,
                 core: SharedEngineCore | None = None) -> None:
        config = llm.vllm_config
        self.kv_block_size = config.cache_config.block_size
        self.card = ModelCard(name=spec.name, engine="vllm", max_model_len=config.model_config.max_model_len,
                              prefix_block_size=self.kv_block_size if config.cache_config.enable_prefix_caching else 0)
        self.tokenizer = tokenizer_bundle(hf_tokenizer)
        self.kv_capacity_tokens = int(config.cache_config.num_gpu_blocks or 0) * self.kv_block_size
        self.max_num_seqs = config.scheduler_config.max_num_seqs
        self._llm = llm
        self._core = core  # the engine core this process started for several front-ends, if it did
        self._stats = stats
        self._aborts: set[asyncio.Task[None]] = set()
        self._active: set[str] = set()
        self._continues_grammar = bool(spec.options.get(CONTINUE_STRUCTURED_OPTION))

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        p = request.params
        params = SamplingParams(
            n=1, max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p, stop=p.stop or None,
            seed=p.seed, ignore_eos=p.ignore_eos, min_tokens=p.min_tokens, presence_penalty=p.presence_penalty,
            frequency_penalty=p.frequency_penalty, repetition_penalty=p.repetition_penalty, top_k=p.top_k,
            min_p=p.min_p, stop_token_ids=p.stop_token_ids or None,
            logit_bias={int(token): bias for token, bias in p.logit_bias.items()} or None,
            logprobs=p.logprobs, prompt_logprobs=p.prompt_logprobs,
            **_structured(p.response_format, request, self._continues_grammar),
            output_kind=RequestOutputKind.DELTA,  # only the new text and tokens of each step
        )
        prompt = {"prompt_token_ids": request.prompt_token_ids}
        self._active.add(request.request_id)
        try:
            async for out in self._outputs(prompt, params, request):
                completion = out.outputs[0]
                finish = (_FINISH_REASONS.get(completion.finish_reason or "", FinishReason.ERROR)
                          if out.finished else None)
                # vLLM's stream ends by itself after the finished output. Leaving it earlier would close
                # it half-way, and vLLM answers that with an abort of the request through the engine core.
                token_ids = list(completion.token_ids)
                yield EngineOutput(request.request_id, completion.text, token_ids,
                                   finish_reason=finish,
                                   error="vLLM reported an error" if finish == FinishReason.ERROR else None,
                                   cached_tokens=out.num_cached_tokens,
                                   logprobs=None if p.logprobs is None else _logprobs(
                                       completion.logprobs or [], token_ids),
                                   prompt_logprobs=None if not out.prompt_logprobs else [None, *_logprobs(
                                       out.prompt_logprobs[1:], request.prompt_token_ids[1:])])
        finally:
            self._active.discard(request.request_id)

    async def _outputs(self, prompt: dict[str, Any], params: SamplingParams,
                       request: EngineRequest) -> AsyncIterator[RequestOutput]:
        """vLLM's outputs of the request: its own `generate`, or for a request wanted in pieces
        (`output_every`), the same loop over the request's collector with vLLM's stream interval set on the
        request alone (vLLM has it per server, `--stream-interval`; its output processor keeps it per
        request): the first token at once, then one output per `output_every` tokens, and a finished or
        aborted request's output carries every token not yet handed over."""
        if request.output_every <= 1:
            async for out in self._llm.generate(prompt, params, request.request_id):  # type: ignore[arg-type]
                yield out
            return
        collector = await self._llm.add_request(request.request_id, prompt, params)  # type: ignore[arg-type]
        state = self._llm.output_processor.request_states.get(collector.request_id)
        # Set before the request's first output is processed (this task has not yielded since the add: no
        # engine step can have come back); after it, vLLM would hand over the first token twice.
        if state is not None and state.detokenizer is not None and state.detokenizer.num_output_tokens() == 0:
            state.stream_interval = request.output_every
        try:
            finished = False
            while not finished:
                out = collector.get_nowait() or await collector.get()
                finished = out.finished
                yield out
        except (asyncio.CancelledError, GeneratorExit):  # as vLLM's generate: a request left is aborted
            await self._llm.abort(collector.request_id, internal=True)
            raise

    def abort(self, request_id: str) -> None:
        # vLLM's abort is a coroutine; the request's stream then ends with finish_reason "abort".
        task = asyncio.get_running_loop().create_task(self._llm.abort(request_id))
        self._aborts.add(task)
        task.add_done_callback(self._aborts.discard)

    def stats(self) -> EngineStats:
        latest = self._stats.latest
        if latest is None or not self._active:
            # vLLM reports stats only while it steps, so its last report is stale once idle.
            return EngineStats(running=0, waiting=0, kv_usage=0.0)
        return EngineStats(running=latest.num_running_reqs, waiting=latest.num_waiting_reqs,
                           kv_usage=float(latest.kv_cache_usage))

    def attach_info(self, index: int) -> dict[str, Any]:
        if self._core is None:
            raise ValueError(f"model {self.card.name!r}: this engine core was not started for several front-ends")
        return self._core.attach_info(index)

    @property
    def dead_error(self) -> str | None:
        if self._llm.errored:
            return f"vLLM engine died: {self._llm.dead_error}"
        return self._core.dead_error if self._core is not None else None

    async def close(self) -> None:
        await asyncio.to_thread(self._llm.shutdown)
        if self._core is not None:  # after the other front-ends stopped (the loader waits for them)
            await asyncio.to_thread(self._core.shutdown)


def engine_args(spec: ModelSpec) -> AsyncEngineArgs:
    """The catalogue entry as vLLM engine arguments: `source` is the model directory, every
    option an `AsyncEngineArgs` field (dtype, max_model_len, gpu_memory_utilization, load_format, ...)."""
    known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    unknown = sorted(set(spec.options) - known - FLEET_OPTIONS)
    if unknown:
        raise ValueError(f"model {spec.name!r}: not vLLM engine arguments: {', '.join(unknown)}")
    if not spec.source:
        raise ValueError(f"model {spec.name!r}: `source` (the model directory) is required for vllm")
    options = {k: v for k, v in spec.options.items() if k not in FLEET_OPTIONS}
    if spec.options.get(CONTINUE_STRUCTURED_OPTION):  # the fleet's processor, beside any the catalogue names
        options["logits_processors"] = [*(options.get("logits_processors") or ()), ContinuedGrammar]
    return AsyncEngineArgs(model=spec.source, served_model_name=spec.name, disable_log_stats=True, **options)


async def load_vllm_engine(spec: ModelSpec, progress: ProgressCallback, role: FrontendRole) -> VllmEngine:
    """Build the engine off the event loop: vLLM starts its engine-core process and waits for
    weights, profiling, torch.compile and CUDA graphs there (minutes), while the worker heartbeats.
    Front-end 0 of several starts the shared engine core; the others attach to it."""
    from transformers import AutoTokenizer

    args = engine_args(spec)
    events_endpoint = None
    if role.index == 0 and args.enable_prefix_caching is not False and args.kv_events_config is None:
        # This process starts the engine core: it publishes its prefix cache's changes here (IPC, this host).
        events_endpoint = f"ipc://{tempfile.gettempdir()}/llm-fleet-kv-events-{uuid.uuid4().hex}"
        args.kv_events_config = KVEventsConfig(enable_kv_cache_events=True, publisher="zmq",
                                               endpoint=events_endpoint)
    holder: list[_LatestSchedulerStats] = []

    def stats_logger(vllm_config: Any, engine_index: int) -> _LatestSchedulerStats:
        holder.append(_LatestSchedulerStats(vllm_config, engine_index))
        return holder[-1]

    progress(0.05)
    hf_tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, args.tokenizer or spec.source)
    progress(0.1)
    core: SharedEngineCore | None = None
    if role.count == 1:
        # OPENAI_API_SERVER: the same scheduler defaults (max_num_seqs, batched tokens) as `vllm serve`.
        llm = await asyncio.to_thread(
            AsyncLLM.from_engine_args, args, usage_context=UsageContext.OPENAI_API_SERVER, stat_loggers=[stats_logger]
        )
    else:
        if role.index == 0:
            core = await asyncio.to_thread(start_engine_core, args, role.count)
        attach = core.attach_info(0) if core is not None else role.attach
        try:
            llm = await asyncio.to_thread(attach_client, args, role.index, role.count, attach, [stats_logger])
        except BaseException:
            if core is not None:
                await asyncio.to_thread(core.shutdown)
            raise
    progress(0.95)
    # Without its cache, every `vllm.envs.X` read parses os.environ again, and vLLM's output path reads
    # some per request per token (py-spy: 10% of a front-end at c=1000). vLLM's engine core turns the
    # cache on once it is up; its front end never does, so do it here: settings are fixed by now.
    envs.enable_envs_cache()
    try:
        # A first round trip on this event loop: starts vLLM's output tasks here and proves the
        # engine core answers before the worker reads a single job.
        tasks = await llm.get_supported_tasks()
        if "generate" not in tasks:
            raise ValueError(f"model {spec.name!r} cannot generate text (vLLM supports: {', '.join(tasks)})")
    except BaseException:
        await asyncio.to_thread(llm.shutdown)
        if core is not None:
            await asyncio.to_thread(core.shutdown)
        raise
    engine = VllmEngine(spec, llm, hf_tokenizer, holder[0], core)
    engine.prefix_events_endpoint = events_endpoint
    log.info("vLLM engine %s up: %d KV blocks x %d tokens, max_num_seqs %d (front-end %d of %d)", spec.name,
             engine.kv_capacity_tokens // engine.kv_block_size, engine.kv_block_size, engine.max_num_seqs,
             role.index, role.count)
    return engine
