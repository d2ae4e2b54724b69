"""A structured-output job continued on vLLM (its first worker died mid-answer): the JSON it finishes must be
the one the client has half of.

vLLM 0.26's structured outputs start their grammar where the prompt ends, and a continuation's prompt ends
with the earlier output: the grammar would ask for a second document. So a continuation does not use them;
it carries its response_format and the output so far in `extra_args` instead, and this logits processor
(registered on the engines whose catalogue entry asks for it, idle for every other request) walks an xgrammar matcher,
the library vLLM's own backend uses, through that output first, then masks each step's logits as vLLM
would. The grammar is the CPU engine's (worker/engines/grammar.py).

Opt-in per catalogue entry (`options.continue_structured_outputs: true`): a custom logits processor makes
vLLM keep every request's output token ids for it, and one c=1000 run with it registered measured 9% less
throughput (bench/RESULTS.md). Without it, a structured job whose worker died mid-answer fails with a
clear error instead of finishing as an invalid document.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor, RequestLogitsProcessor

from worker.engines.grammar import Grammars

log = logging.getLogger(__name__)

EXTRA_ARG = "llm_fleet_continued_grammar"  # {"response_format": ..., "said": [token ids]}


def continued_grammar(response_format: dict[str, Any], said: list[int]) -> dict[str, Any]:
    """The `extra_args` of a continuation that must keep its response format."""
    return {EXTRA_ARG: {"response_format": response_format, "said": said}}


class ContinuedGrammar(AdapterLogitsProcessor):
    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        super().__init__(vllm_config, device, is_pin_memory)
        model_config = vllm_config.model_config
        self._tokenizer_path = model_config.tokenizer
        self._vocab_size = model_config.get_vocab_size()
        self._grammars: Grammars | None = None  # built at the first continuation that needs it

    def is_argmax_invariant(self) -> bool:
        return False

    def new_req_logits_processor(self, params: SamplingParams) -> RequestLogitsProcessor | None:
        spec = (params.extra_args or {}).get(EXTRA_ARG)
        if spec is None:
            return None
        import xgrammar

        # This runs inside vLLM's engine core: an exception would take the engine down with every request.
        try:
            matcher = self._grammars_of_model().matcher(spec["response_format"], spec["said"])
        except Exception:
            log.exception("a continued response_format cannot be followed; the rest of this output is free")
            return None
        bitmask = xgrammar.allocate_token_bitmask(1, self._vocab_size)
        accepted = 0

        def mask(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
            nonlocal accepted
            try:
                for token in output_ids[accepted:]:  # what was sampled since the last step
                    matcher.accept_token(token)
                accepted = len(output_ids)
                if matcher.is_terminated():  # the document ended (vLLM may still ask for a last step)
                    return logits
                matcher.fill_next_token_bitmask(bitmask)
                xgrammar.apply_token_bitmask_inplace(logits.unsqueeze(0),
                                                     bitmask.to(logits.device, non_blocking=True))
            except Exception:  # never into the engine core
                log.exception("continued response_format: masking failed; this step is free")
            return logits  # masked in place

        return mask

    def _grammars_of_model(self) -> Grammars:
        if self._grammars is None:
            from transformers import AutoTokenizer

            self._grammars = Grammars(AutoTokenizer.from_pretrained(self._tokenizer_path), self._vocab_size)
        return self._grammars
