"""Prompt -> token ids in the gateway, with the tokenizer a worker published.

Tokenizing here (as vLLM's own front end does) gives exact context-length errors before
anything is queued, and an exact KV token budget in every job.
"""

from __future__ import annotations

from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from common.errors import Unprocessable
from common.protocol import TokenizerBundle


def _raise(message: str) -> None:
    raise Unprocessable(f"chat template: {message}", param="messages")


class PromptEncoder:
    def __init__(self, bundle: TokenizerBundle) -> None:
        self._tokenizer = Tokenizer.from_str(bundle.tokenizer_json)
        self._bos, self._eos = bundle.bos_token, bundle.eos_token
        self._template = None
        if bundle.chat_template:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise
            self._template = env.from_string(bundle.chat_template)

    def encode_prompt(self, prompt: str) -> list[int]:
        return self._tokenizer.encode(prompt, add_special_tokens=True).ids

    def encode_messages(self, messages: list[dict[str, Any]]) -> list[int]:
        if self._template is None:
            raise Unprocessable("this model has no chat template: send `prompt`", param="messages")
        try:
            text = self._template.render(
                messages=messages, add_generation_prompt=True, bos_token=self._bos or "", eos_token=self._eos or ""
            )
        except TemplateError as exc:
            raise Unprocessable(f"chat template failed: {exc}", param="messages") from exc
        # The template already wrote the special tokens.
        return self._tokenizer.encode(text, add_special_tokens=False).ids
