"""Structured output on the CPU engine: OpenAI's response_format as an xgrammar grammar (the library vLLM
uses for the same on the GPU), one matcher per sequence, applied to its logits as a token mask each step.

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

    def constraint(self, response_format: dict[str, Any], already_said: list[int]) -> GrammarConstraint:
        import xgrammar

        if self._compiler is None:
            info = xgrammar.TokenizerInfo.from_huggingface(self._hf_tokenizer, vocab_size=self._vocab_size)
            self._compiler = xgrammar.GrammarCompiler(info)
        if response_format["type"] == "json_object":
            compiled = self._compiler.compile_builtin_json_grammar()
        else:
            spec = response_format["json_schema"]
            compiled = self._compiler.compile_json_schema(json.dumps(spec.get("schema", {})),
                                                          strict_mode=bool(spec.get("strict", True)))
        matcher = xgrammar.GrammarMatcher(compiled)
        for token in already_said:
            if not matcher.accept_token(token):
                raise ValueError("the output so far does not fit the response format")
        return GrammarConstraint(matcher, self._vocab_size)
