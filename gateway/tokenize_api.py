"""POST /tokenize and /detokenize, as `vllm serve` has them: the gateway's own copy of the model's tokenizer
(the one it counts prompts and checks contexts with), so the counts are exactly what a generate uses.

/tokenize: `prompt` (add_special_tokens, default true) or chat `messages` (add_generation_prompt, default
true; add_special_tokens, default false: the template writes them) -> count, max_model_len, tokens, and
with return_token_strs the tokens' strings. /detokenize: `tokens` -> `prompt`.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from common.errors import Unprocessable
from gateway.context import Gateway
from gateway.validation import model_field, parse_json_object, prompt_or_messages, reject_unknown, strict_bool

_TOKENIZE_FIELDS = frozenset({"model", "prompt", "messages", "add_special_tokens", "add_generation_prompt",
                              "return_token_strs"})
MAX_DETOKENIZE_TOKENS = 1 << 20


async def tokenize(request: web.Request) -> web.Response:
    gateway = Gateway.of(request)
    body = parse_json_object(await request.read())
    reject_unknown(body, _TOKENIZE_FIELDS)
    card = await gateway.registry.resolve(model_field(body))
    encoder = await gateway.registry.encoder(card)
    prompt, messages = prompt_or_messages(body)
    if prompt is not None:
        tokens = await encoder.encode_prompt(prompt, add_special_tokens=strict_bool(body, "add_special_tokens", True))
    else:
        tokens = await encoder.encode_messages(
            messages, add_generation_prompt=strict_bool(body, "add_generation_prompt", True),
            add_special_tokens=strict_bool(body, "add_special_tokens", False))
    reply: dict[str, Any] = {"count": len(tokens), "max_model_len": card.max_model_len, "tokens": tokens,
                             "token_strs": encoder.token_strs(tokens) if strict_bool(body, "return_token_strs",
                                                                                     False) else None}
    return web.json_response(reply)


async def detokenize(request: web.Request) -> web.Response:
    gateway = Gateway.of(request)
    body = parse_json_object(await request.read())
    reject_unknown(body, frozenset({"model", "tokens"}))
    card = await gateway.registry.resolve(model_field(body))
    encoder = await gateway.registry.encoder(card)
    tokens = body.get("tokens")
    if (not isinstance(tokens, list) or len(tokens) > MAX_DETOKENIZE_TOKENS
            or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens)):
        raise Unprocessable(f"`tokens` must be a list of at most {MAX_DETOKENIZE_TOKENS} token ids", param="tokens")
    vocab = encoder.vocab_size
    bad = next((t for t in tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise Unprocessable(f"`tokens` holds {bad}, not a token id of model {card.name!r} (0..{vocab - 1})",
                            param="tokens")
    return web.json_response({"prompt": await encoder.decode(tokens)})

