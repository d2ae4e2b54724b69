"""OpenAI's response_format as an xgrammar grammar, the library vLLM's structured outputs use, compiled as
vLLM's backend compiles it (json_object: any JSON object; json_schema: the schema, xgrammar's defaults), for
both engines: the CPU engine masks every step with it (`GrammarConstraint`), and a vLLM continuation goes
through the fleet's logits processor with it (worker/engines/vllm_grammar.py).

A continuation (the job's earlier output is now the tail of its prompt) first walks the matcher through
that output, so the JSON it finishes is the one the client has been reading, and stays valid.
"""

from __future__ import annotations

import json
from typing import Any

import torch


class GrammarConstraint:
    """One sequence's grammar: masks what it may not say next; accepts what it said."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        import xgrammar

        self._xgr = xgrammar
        self._matcher = matcher
        self._bitmask = xgrammar.allocate_token_bitmask(1, vocab_size)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """The row's logits (a float copy) with every token the grammar rules out at -inf."""
        logits = logits.float().clone()[None]
        self._matcher.fill_next_token_bitmask(self._bitmask)
        self._xgr.apply_token_bitmask_inplace(logits, self._bitmask)
        return logits[0]

    def accept(self, token: int) -> None:
        self._matcher.accept_token(token)


class Grammars:
    """Compiles response formats for one model's tokenizer (compiled grammars are cached by xgrammar)."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int) -> None:
        self._hf_tokenizer = hf_tokenizer
        self._vocab_size = vocab_size
        self._compiler: Any = None

    @staticmethod
    def available() -> bool:
        try:
            import xgrammar  # noqa: F401
        except ImportError:
            return False
        return True

    def matcher(self, response_format: dict[str, Any], already_said: list[int]) -> Any:
        """An xgrammar matcher of the format, walked through what the sequence already said."""
        import xgrammar

        if self._compiler is None:
            info = xgrammar.TokenizerInfo.from_huggingface(self._hf_tokenizer, vocab_size=self._vocab_size)
            self._compiler = xgrammar.GrammarCompiler(info)
        schema = ({"type": "object"} if response_format["type"] == "json_object"
                  else response_format["json_schema"].get("schema", {}))
        matcher = xgrammar.GrammarMatcher(self._compiler.compile_json_schema(json.dumps(schema)))
        for token in already_said:
            if not matcher.accept_token(token):
                raise ValueError("the output so far does not fit the response format")
        return matcher

    def constraint(self, response_format: dict[str, Any], already_said: list[int]) -> GrammarConstraint:
        return GrammarConstraint(self.matcher(response_format, already_said), self._vocab_size)
