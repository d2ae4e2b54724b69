"""Prompt -> token ids in the gateway, with the tokenizer a worker published.

Tokenizing here (as vLLM's own front end does) gives exact context-length errors before
anything is queued, and an exact KV token budget in every job.

Never on the event loop: a 1,000-token prompt takes about a millisecond, and a burst of a few
hundred (clients that all come back at once) would stall every stream this gateway relays for the
better part of a second. `_BatchEncoder` hands prompts to a thread in batches instead: every prompt
that arrives while one batch is being encoded goes into the next, one thread hop per batch, and the
Rust tokenizer encodes a batch on several cores without the GIL (as vLLM's AsyncMicrobatchTokenizer).
"""

from __future__ import annotations

import asyncio
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from common.errors import Unprocessable
from common.protocol import TokenizerBundle

# Chat messages (all their contents together) longer than this are rendered off the event loop too.
_INLINE_RENDER_CHARS = 16_384


def _raise(message: str) -> None:
    raise Unprocessable(f"chat template: {message}", param="messages")


class _BatchEncoder:
    """Encodes texts in a worker thread, batching those that arrive while a batch is in flight."""

    def __init__(self, tokenizer: Tokenizer, *, add_special_tokens: bool) -> None:
        self._tokenizer = tokenizer
        self._add_special_tokens = add_special_tokens
        self._pending: list[tuple[str, asyncio.Future[list[int]]]] = []
        self._drainer: asyncio.Task[None] | None = None

    async def encode(self, text: str) -> list[int]:
        future: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        self._pending.append((text, future))
        if self._drainer is None:
            self._drainer = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    encodings = await asyncio.to_thread(self._tokenizer.encode_batch, [text for text, _ in batch],
                                                        add_special_tokens=self._add_special_tokens)
                except Exception as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), encoding in zip(batch, encodings, strict=True):
                    if not future.done():  # its request may have been cancelled meanwhile
                        future.set_result(encoding.ids)
        finally:
            self._drainer = None
            for _, future in self._pending:  # cancelled itself (the gateway stops): nobody waits forever
                future.cancel()
            self._pending = []


class PromptEncoder:
    def __init__(self, bundle: TokenizerBundle) -> None:
        self._tokenizer = tokenizer = Tokenizer.from_str(bundle.tokenizer_json)
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        self._prompts = _BatchEncoder(tokenizer, add_special_tokens=True)
        # A rendered chat template already holds its special tokens.
        self._rendered = _BatchEncoder(tokenizer, add_special_tokens=False)
        self._bos, self._eos = bundle.bos_token, bundle.eos_token
        self._texts: dict[int, str] = {}
        self._template = None
        if bundle.chat_template:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise
            self._template = env.from_string(bundle.chat_template)

    async def encode_prompt(self, prompt: str, *, add_special_tokens: bool = True) -> list[int]:
        return await (self._prompts if add_special_tokens else self._rendered).encode(prompt)

    async def encode_messages(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                              add_special_tokens: bool = False, tools: list[dict[str, Any]] | None = None) -> list[int]:
        size = sum(len(str(m.get("content", ""))) for m in messages)
        if size > _INLINE_RENDER_CHARS:
            text = await asyncio.to_thread(self.render, messages, add_generation_prompt=add_generation_prompt,
                                           tools=tools)
        else:
            text = self.render(messages, add_generation_prompt=add_generation_prompt, tools=tools)
        return await (self._prompts if add_special_tokens else self._rendered).encode(text)

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
               tools: list[dict[str, Any]] | None = None) -> str:
        """The chat as the model's template writes it (Python code: it holds the GIL wherever it runs); the
        tools for templates that describe them (Hugging Face's `tools` variable)."""
        if self._template is None:
            raise Unprocessable("this model has no chat template: send `prompt`", param="messages")
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self._bos or "", eos_token=self._eos or "", tools=tools)
        except TemplateError as exc:
            raise Unprocessable(f"chat template failed: {exc}", param="messages") from exc

    def token_text(self, token_id: int) -> str:
        """One token's text, as logprobs name it (cached: a logprobs response names each token many times)."""
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self._tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    def token_strs(self, token_ids: list[int]) -> list[str | None]:
        return [self._tokenizer.id_to_token(token_id) for token_id in token_ids]

    async def decode(self, token_ids: list[int]) -> str:
        return await asyncio.to_thread(self._tokenizer.decode, token_ids, skip_special_tokens=False)
