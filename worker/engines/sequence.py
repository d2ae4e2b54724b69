"""One request's decoding state inside a step-loop engine: tokens, text, when it ends."""

from __future__ import annotations

from tokenizers import Tokenizer

from common.protocol import FinishReason, TokenLogprob
from worker.engines.base import EngineOutput, EngineRequest
from worker.engines.detokenizer import IncrementalText


class Sequence:
    def __init__(self, request: EngineRequest, tokenizer: Tokenizer, eos_token_ids: frozenset[int]) -> None:
        self.request = request
        self.request_id = request.request_id
        self.generated: list[int] = []
        self._eos = eos_token_ids
        resumed = request.prompt_token_ids[len(request.prompt_token_ids) - request.resumed_tokens:]
        self._text = IncrementalText(tokenizer, request.params.stop, context=resumed)
        self.finished = False

    def append(self, token_id: int, logprob: TokenLogprob | None = None) -> EngineOutput:
        """Take one sampled token (and its logprob, when the request asked); the output says what to stream
        and whether it is over."""
        params = self.request.params
        stops = (token_id in self._eos and not params.ignore_eos) or token_id in params.stop_token_ids
        if stops and len(self.generated) >= params.min_tokens:
            return self._finish(FinishReason.STOP, [])
        self.generated.append(token_id)
        delta = self._text.add(token_id)
        logprobs = None if logprob is None else [logprob]
        if self._text.stopped:
            return self._finish(FinishReason.STOP, [token_id], delta, logprobs)
        if len(self.generated) >= params.max_tokens:
            return self._finish(FinishReason.LENGTH, [token_id], delta + self._text.flush(), logprobs)
        return EngineOutput(self.request_id, delta, [token_id], logprobs=logprobs)

    def _finish(self, reason: str, token_ids: list[int], delta: str = "",
                logprobs: list[TokenLogprob] | None = None) -> EngineOutput:
        self.finished = True
        if reason == FinishReason.STOP and not self._text.stopped:
            delta += self._text.flush()
        return EngineOutput(self.request_id, delta, token_ids, finish_reason=reason, logprobs=logprobs)
