"""The CPU engine: a real small model (SmolLM2-135M-Instruct) through transformers.

The decoding loop runs in its own thread (torch releases the GIL), so the worker's event loop
keeps heartbeating and publishing; it hands each step's outputs back in one call.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
from collections import deque
from pathlib import Path
from typing import Any

from common.protocol import FinishReason, ModelCard
from common.settings import ModelSpec
from worker.engines.base import EngineOutput, EngineRequest, ProgressCallback
from worker.engines.cpu_batch import BatchedDecoder
from worker.engines.gguf_cache import cached_model_dir, packaged_file
from worker.engines.grammar import GrammarConstraint, Grammars
from worker.engines.hf_tokenizer import tokenizer_bundle
from worker.engines.queued import QueuedEngine
from worker.engines.sequence import Sequence

log = logging.getLogger(__name__)

# New sequences prefilled per step: bounds how long running sequences wait for a step.
_PREFILLS_PER_STEP = 4


class CpuEngine(QueuedEngine):
    def __init__(self, spec: ModelSpec, model: Any, hf_tokenizer: Any) -> None:
        super().__init__()
        options = spec.options
        max_len = min(int(options.get("max_model_len", 2048)), int(model.config.max_position_embeddings))
        self.card = ModelCard(name=spec.name, engine="cpu", max_model_len=max_len)
        self.max_num_seqs = int(options.get("max_num_seqs", 16))
        self.kv_capacity_tokens = int(options.get("kv_cache_tokens", self.max_num_seqs * max_len))
        self.tokenizer = tokenizer_bundle(hf_tokenizer)
        self._tokenizer = hf_tokenizer.backend_tokenizer
        self._eos = frozenset(_eos_ids(model, hf_tokenizer))
        self._grammars = Grammars(hf_tokenizer, int(model.config.vocab_size)) if Grammars.available() else None
        if self._grammars is None:
            self.card.unsupported = ["response_format"]
        self._decoder = BatchedDecoder(model)
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._loop = asyncio.get_running_loop()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"cpu-engine:{spec.name}", daemon=True)
        self._thread.start()

    def _submit(self, request: EngineRequest) -> None:
        self._inbox.put(("add", request))

    def _abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def _forget(self, request_id: str) -> None:
        self._inbox.put(("forget", request_id))

    async def close(self) -> None:
        self._stopping.set()
        self._inbox.put(("stop", None))
        await asyncio.to_thread(self._thread.join, 10)

    # -- the engine thread --------------------------------------------------------------
    def _run(self) -> None:
        waiting: deque[Sequence] = deque()
        while not self._stopping.is_set():
            try:
                outputs = self._take_inbox(waiting)
                outputs += self._step(waiting)
            except Exception as exc:  # a bug or OOM in the model: fail what runs, keep serving
                log.exception("cpu engine step failed")
                waiting.clear()
                self._decoder.remove({row.seq.request_id for row in self._decoder.rows})
                self._loop.call_soon_threadsafe(self._fail_all, f"engine error: {exc}")
                continue
            if outputs:
                self._loop.call_soon_threadsafe(self._deliver, outputs)

    def _take_inbox(self, waiting: deque[Sequence]) -> list[EngineOutput]:
        outputs: list[EngineOutput] = []
        idle = not waiting and not self._decoder.rows
        while True:
            try:
                op, arg = self._inbox.get(timeout=0.5) if idle else self._inbox.get_nowait()
            except queue.Empty:
                return outputs
            idle = False
            if op == "add":
                waiting.append(Sequence(arg, self._tokenizer, self._eos))
            elif op in ("abort", "forget"):
                known = any(s.request_id == arg for s in waiting) or any(
                    r.seq.request_id == arg for r in self._decoder.rows
                )
                for s in [s for s in waiting if s.request_id == arg]:
                    waiting.remove(s)
                self._decoder.remove({arg})
                if op == "abort" and known:
                    outputs.append(EngineOutput(arg, "", finish_reason=FinishReason.CANCELLED))

    def _step(self, waiting: deque[Sequence]) -> list[EngineOutput]:
        outputs: list[EngineOutput] = []
        finished: set[str] = set()
        for _ in range(_PREFILLS_PER_STEP):
            if not waiting or len(self._decoder) >= self.max_num_seqs:
                break
            seq = waiting.popleft()
            try:
                constraint = self._constraint(seq.request)
            except Exception as exc:  # this request's grammar alone: the others go on
                outputs.append(EngineOutput(seq.request_id, "", finish_reason=FinishReason.ERROR,
                                            error=f"response_format: {exc}"))
                continue
            (token, logprob), prompt_logprobs = self._decoder.prefill(seq, constraint)
            output = seq.append(token, logprob)
            output.prompt_logprobs = prompt_logprobs
            outputs.append(output)
            if seq.finished:
                finished.add(seq.request_id)
        self._decoder.remove(finished)
        if self._decoder.rows:
            rows = list(self._decoder.rows)
            for row, (token, logprob) in zip(rows, self._decoder.step(), strict=True):
                output = row.seq.append(token, logprob)
                outputs.append(output)
                if row.seq.finished:
                    finished.add(row.seq.request_id)
            self._decoder.remove(finished)
        return outputs

    def _constraint(self, request: EngineRequest) -> GrammarConstraint | None:
        response_format = request.params.response_format
        if response_format is None or self._grammars is None:
            return None
        said = request.prompt_token_ids[len(request.prompt_token_ids) - request.resumed_tokens:]
        return self._grammars.constraint(response_format, said)


def _eos_ids(model: Any, hf_tokenizer: Any) -> set[int]:
    ids = {hf_tokenizer.eos_token_id} if hf_tokenizer.eos_token_id is not None else set()
    configured = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    return ids


def _load(model_dir: Path, threads: int) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


async def load_cpu_engine(spec: ModelSpec, cache_dir: str, progress: ProgressCallback) -> CpuEngine:
    """Find (or convert once) the model files, load them off the event loop, start the engine."""
    progress(0.05)
    if spec.source.endswith(".gguf"):
        model_dir = await asyncio.to_thread(cached_model_dir, packaged_file(spec.source), Path(cache_dir))
    else:
        model_dir = Path(spec.source)
    progress(0.6)
    threads = int(spec.options.get("threads") or os.cpu_count() or 1)
    model, hf_tokenizer = await asyncio.to_thread(_load, model_dir, threads)
    progress(1.0)
    return CpuEngine(spec, model, hf_tokenizer)
