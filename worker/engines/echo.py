"""The deterministic test engine: echoes the prompt back, one byte-token per decoding step.

For tests and gateway benchmarks only. It behaves like a batched engine with a fixed time per
step (`step_delay_ms`, whatever the batch size, on a clock of its own), honours max_tokens and
stop strings, and has a real (byte-level) tokenizer so the gateway's token counting is exercised
for real.
A continuation (a reclaimed job) echoes on from where the earlier output stopped, so its
whole text is exactly what an uninterrupted run gives: tests check "no gap, no duplicate".

Several front-ends (`frontends: N`, worker/frontends.py) each run their own copy: the test engine
stands in for a shared engine, so that the fleet side of front-ends is tested without a GPU.

A simulated prefix cache (common/prefix_blocks.py): the blocks of the prompts it has seen, the least
recently used evicted past its `kv_cache_tokens`; each request reports the prompt tokens found there
(`cached_tokens`). Prefill costs engine time, as on a GPU: the step that takes in new requests lasts
`prefill_ms_per_token` longer for each prompt token the cache did not have, for every request in the
batch (`prefix_block_size`, 16, and `prefill_ms_per_token`, 0, in the catalogue's options). Decoding can
cost per sequence too, as a batched step grows with its batch: `decode_ms_per_seq` (0) more per running
sequence (bench/batch_priority.py: an interactive request beside a batch of long answers).

Fault injection, for the failure tests only: `die_on_prompt` (a string) makes the worker
process exit at once, as if killed, when it decodes a prompt that contains it; `unstorable_on_prompt`
makes the engine emit text that cannot be encoded (a lone surrogate, as a broken detokenizer might)
for a prompt that contains it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from common.prefix_blocks import PrefixCache
from common.protocol import FinishReason, ModelCard, TokenizerBundle, TokenLogprob
from common.settings import ModelSpec
from worker.engines.base import EngineOutput, EngineRequest, ProgressCallback
from worker.engines.queued import QueuedEngine
from worker.engines.sequence import Sequence

_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def byte_tokenizer() -> Tokenizer:
    """Every byte is one token (ids 0..255): token counts equal UTF-8 byte counts."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


class EchoEngine(QueuedEngine):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        options = spec.options
        block_size = int(options.get("prefix_block_size", 16))
        self.card = ModelCard(name=spec.name, engine="test", max_model_len=int(options["max_model_len"]),
                              prefix_block_size=block_size, unsupported=["response_format"])  # it only echoes
        self.kv_capacity_tokens = int(options["kv_cache_tokens"])
        self.max_num_seqs = int(options["max_num_seqs"])
        self._step_s = float(options.get("step_delay_ms", 2)) / 1000
        self._tokenizer = byte_tokenizer()
        self.tokenizer = TokenizerBundle(
            tokenizer_json=self._tokenizer.to_str(), chat_template=_CHAT_TEMPLATE, bos_token=None, eos_token=None
        )
        self._prefix_cache = PrefixCache(block_size, self.kv_capacity_tokens // block_size)
        self._prefill_s_per_token = float(options.get("prefill_ms_per_token", 0)) / 1000
        self._decode_s_per_seq = float(options.get("decode_ms_per_seq", 0)) / 1000
        self._to_prefill: dict[str, int] = {}  # request id -> uncached prompt tokens, until its first step
        self._cached: dict[str, int] = {}  # request id -> cached prompt tokens, until its first output says so
        self._die_on = str(options.get("die_on_prompt", ""))
        self._unstorable_on = str(options.get("unstorable_on_prompt", ""))
        self._unstorable: set[str] = set()
        self._running: dict[str, Sequence] = {}
        self._echo: dict[str, tuple[list[int], int]] = {}  # request id -> (original prompt, tokens already out)
        self._wakeup = asyncio.Event()
        self._loop_task = asyncio.create_task(self._step_loop(), name=f"engine:{spec.name}")

    def _submit(self, request: EngineRequest) -> None:
        prompt = request.prompt_token_ids[: len(request.prompt_token_ids) - request.resumed_tokens]
        if self._die_on and self._die_on in self._tokenizer.decode(prompt):
            os._exit(137)
        if self._unstorable_on and self._unstorable_on in self._tokenizer.decode(prompt):
            self._unstorable.add(request.request_id)
        self._echo[request.request_id] = (prompt, request.resumed_tokens)
        cached = self._prefix_cache.lookup_and_store(request.prompt_token_ids)
        self._cached[request.request_id] = cached
        self._to_prefill[request.request_id] = len(request.prompt_token_ids) - cached
        self._running[request.request_id] = Sequence(request, self._tokenizer, frozenset())
        self._wakeup.set()

    def _abort(self, request_id: str) -> None:
        if self._running.pop(request_id, None) is not None:
            self._deliver([EngineOutput(request_id, "", finish_reason=FinishReason.CANCELLED)])

    def _forget(self, request_id: str) -> None:
        self._running.pop(request_id, None)
        self._echo.pop(request_id, None)
        self._unstorable.discard(request_id)
        self._to_prefill.pop(request_id, None)
        self._cached.pop(request_id, None)

    async def _step_loop(self) -> None:
        # Steps on a fixed clock, as a GPU does whatever the host is busy with: the time this process
        # spends around a step (the worker's own work) does not stretch the step, unless it takes longer
        # than a whole step (then the clock starts again from now, no burst of late steps).
        loop = asyncio.get_running_loop()
        deadline = loop.time()
        while True:
            if not self._running:
                self._wakeup.clear()
                await self._wakeup.wait()
                deadline = loop.time()
            prefill_s = sum(self._to_prefill.values()) * self._prefill_s_per_token
            self._to_prefill.clear()  # prefilled in this step; requests arriving during it wait for the next
            decode_s = len(self._running) * self._decode_s_per_seq
            deadline = max(deadline + self._step_s + prefill_s + decode_s, loop.time())
            await asyncio.sleep(deadline - loop.time())
            outputs = []
            for seq in list(self._running.values()):
                if seq.request_id in self._to_prefill:
                    continue  # arrived during this step
                prompt, already_out = self._echo[seq.request_id]
                params = seq.request.params
                token = prompt[(already_out + len(seq.generated)) % len(prompt)]
                output = seq.append(token, None if params.logprobs is None else _certain(token, params.logprobs))
                if len(seq.generated) == 1 and params.prompt_logprobs is not None:  # the request's first output
                    output.prompt_logprobs = [None, *(_certain(t, params.prompt_logprobs)
                                                      for t in seq.request.prompt_token_ids[1:])]
                output.cached_tokens = self._cached.pop(seq.request_id, None)
                if output.finish_reason is not None:
                    del self._running[seq.request_id]
                if seq.request_id in self._unstorable:
                    output.text = "\ud800"
                outputs.append(output)
            self._deliver(outputs)

    def attach_info(self, index: int) -> dict[str, Any]:
        return {}  # each front-end builds its own copy

    async def close(self) -> None:
        self._loop_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._loop_task


def _certain(token: int, k: int) -> TokenLogprob:
    """The echo "model" is sure of every token it echoes: logprob 0, the most likely; its k - 1 next
    alternatives get vLLM's stand-in for -inf in JSON."""
    return [0.0, [[token, 0.0], *([(token + i) % 256, -9999.0] for i in range(1, k))]]


async def load_echo_engine(spec: ModelSpec, progress: ProgressCallback) -> EchoEngine:
    delay_s = float(spec.options.get("load_delay_s", 0))
    steps = 10
    for i in range(steps):  # an optional fake load time, to exercise the `loading` state
        await asyncio.sleep(delay_s / steps)
        progress((i + 1) / steps)
    return EchoEngine(spec)
