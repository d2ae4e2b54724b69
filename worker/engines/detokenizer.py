"""Incremental detokenization with stop strings, shared by the step-loop engines."""

from __future__ import annotations

from tokenizers import Tokenizer

# Re-decoding a few tokens before the new ones keeps merges (spaces, multi-byte characters)
# right without decoding the whole output every step.
_CONTEXT_TOKENS = 5


class IncrementalText:
    """Turns generated token ids into text deltas, holding back what may be a stop string."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str], context: list[int] | None = None) -> None:
        """`context`: tokens that precede the output (a continuation's earlier output), decoded
        only to get the first new token's text right (a leading space, a split character)."""
        self._tokenizer = tokenizer
        self._ids: list[int] = list(context or [])[-_CONTEXT_TOKENS:]
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._text = ""  # everything decoded so far
        self._released = 0  # how much of _text has been handed out
        self._stop = [s for s in stop if s]
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Append one token; return text that is safe to release now (maybe empty)."""
        self._ids.append(token_id)
        prefix = self._tokenizer.decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._tokenizer.decode(self._ids[self._prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""  # an incomplete UTF-8 sequence: wait for the next token
        self._text += full[len(prefix) :]
        self._prefix_offset = max(0, len(self._ids) - _CONTEXT_TOKENS)
        self._read_offset = len(self._ids)
        if self._stop:
            search_from = max(0, self._released - self._hold)
            hits = [i for i in (self._text.find(s, search_from) for s in self._stop) if i >= 0]
            if hits:
                self._text = self._text[: min(hits)]
                self.stopped = True
                return self.flush()
            return self._release(len(self._text) - self._hold)
        return self._release(len(self._text))

    def flush(self) -> str:
        """At the end: release whatever was held back."""
        return self._release(len(self._text))

    def _release(self, upto: int) -> str:
        if upto <= self._released:
            return ""
        delta = self._text[self._released : upto]
        self._released = upto
        return delta
