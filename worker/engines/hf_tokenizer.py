"""A Hugging Face tokenizer as the TokenizerBundle the gateway tokenizes with."""

from __future__ import annotations

from typing import Any

from common.protocol import TokenizerBundle


def tokenizer_bundle(hf_tokenizer: Any) -> TokenizerBundle:
    """The fast tokenizer's JSON, chat template and special tokens (a transformers tokenizer)."""
    return TokenizerBundle(
        tokenizer_json=hf_tokenizer.backend_tokenizer.to_str(),
        chat_template=hf_tokenizer.chat_template,
        bos_token=hf_tokenizer.bos_token,
        eos_token=hf_tokenizer.eos_token,
    )
