"""POST /tokenize and /detokenize, as `vllm serve` has them: the gateway's own copy of the model's tokenizer
(the one it counts prompts and checks contexts with), so the counts are exactly what a generate uses.

/tokenize: `prompt` (add_special_tokens, default true) or chat `messages` (add_generation_prompt, default
true; add_special_tokens, default false: the template writes them) -> count, max_model_len, tokens, and
with return_token_strs the tokens' strings. /detokenize: `tokens` -> `prompt`.
"""

from __future__ import annotations

from aiohttp import web

from common.errors import Unprocessable
from gateway.api_responses import Tokens
from gateway.api_types import DetokenizeBody, TokenizeBody, parse, parse_json_object
from gateway.context import Gateway


async def tokenize(request: web.Request) -> web.Response:
    gateway = Gateway.of(request)
    body = parse(TokenizeBody, parse_json_object(await request.read()))
    card = await gateway.registry.resolve(body.model)
    encoder = await gateway.registry.encoder(card)
    if body.prompt is not None:
        tokens = await encoder.encode_prompt(body.prompt, add_special_tokens=body.add_special_tokens is not False)
    else:
        tokens = await encoder.encode_messages(
            [m.for_template() for m in body.messages or ()],
            add_generation_prompt=body.add_generation_prompt, add_special_tokens=bool(body.add_special_tokens))
    reply: Tokens = {"count": len(tokens), "max_model_len": card.max_model_len, "tokens": tokens,
                             "token_strs": encoder.token_strs(tokens) if body.return_token_strs else None}
    return web.json_response(reply)


async def detokenize(request: web.Request) -> web.Response:
    gateway = Gateway.of(request)
    body = parse(DetokenizeBody, parse_json_object(await request.read()))
    card = await gateway.registry.resolve(body.model)
    encoder = await gateway.registry.encoder(card)
    tokens = body.tokens
    vocab = encoder.vocab_size
    bad = next((t for t in tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise Unprocessable(f"`tokens` holds {bad}, not a token id of model {card.name!r} (0..{vocab - 1})",
                            param="tokens")
    return web.json_response({"prompt": await encoder.decode(tokens)})

