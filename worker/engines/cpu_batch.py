"""Continuous batching for a Hugging Face causal LM on the CPU: a step loop over a dynamic batch.

Sequences join and leave between steps. All rows share one KV cache of length T; a row whose
history is shorter is left-padded and masked out, and carries its own position ids, so each
row computes exactly what it would compute alone. A new request is prefilled on its own and
its cache spliced into the batch; finished rows are cut out and common padding trimmed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel

from common.protocol import SamplingParams, TokenLogprob
from worker.engines.grammar import GrammarConstraint
from worker.engines.sequence import Sequence

Sampled = tuple[int, TokenLogprob | None]  # a token and, when its request asked, its logprob


@dataclass
class _Row:
    seq: Sequence
    generator: torch.Generator | None  # set when the request has a seed
    constraint: GrammarConstraint | None = None  # set when the request has a response_format


class BatchedDecoder:
    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.rows: list[_Row] = []
        self._kv: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer, [B, heads, T, dim]
        self._mask = torch.zeros(0, 0, dtype=torch.long)  # [B, T]: 1 where a real token is cached
        self._positions = torch.zeros(0, dtype=torch.long)  # [B]: position of the next token
        self._next_tokens = torch.zeros(0, dtype=torch.long)  # [B]: token to feed at the next step

    def __len__(self) -> int:
        return len(self.rows)

    @torch.inference_mode()
    def prefill(self, seq: Sequence, constraint: GrammarConstraint | None = None
                ) -> tuple[Sampled, list[TokenLogprob | None] | None]:
        """Run the prompt alone, splice its cache into the batch; returns the first token, and the prompt's
        logprobs when the request asked. `constraint` keeps the sequence's tokens inside its grammar."""
        prompt = torch.tensor([seq.request.prompt_token_ids], dtype=torch.long)
        length = prompt.shape[1]
        cache = DynamicCache()
        out = self.model(
            input_ids=prompt, position_ids=torch.arange(length)[None], past_key_values=cache, use_cache=True
        )
        row = _Row(seq, _generator(seq.request.params.seed), constraint)
        last = out.logits[:, -1, :]
        token = int(self._sample(last, [row])[0])
        self._splice(row, [(layer.keys, layer.values) for layer in cache.layers], length, token)
        params = seq.request.params
        prompt_logprobs = None
        if params.prompt_logprobs is not None:
            prompt_logprobs = [None, *_logprobs(out.logits[0, :-1], prompt[0, 1:], params.prompt_logprobs)]
        chosen = None if params.logprobs is None else _logprobs(last, torch.tensor([token]), params.logprobs)[0]
        return (token, chosen), prompt_logprobs

    @torch.inference_mode()
    def step(self) -> list[Sampled]:
        """One decoding step for every row; returns each row's new token (and logprob), in row order."""
        batch = len(self.rows)
        mask = torch.cat([self._mask, torch.ones(batch, 1, dtype=torch.long)], dim=1)
        cache = DynamicCache(ddp_cache_data=self._kv)
        out = self.model(
            input_ids=self._next_tokens[:, None],
            attention_mask=mask,
            position_ids=self._positions[:, None],
            past_key_values=cache,
            use_cache=True,
        )
        self._kv = [(layer.keys, layer.values) for layer in cache.layers]
        self._mask = mask
        self._positions = self._positions + 1
        logits = out.logits[:, -1, :]
        tokens = self._sample(logits, self.rows)
        self._next_tokens = tokens
        sampled: list[Sampled] = [(token, None) for token in tokens.tolist()]
        for i, row in enumerate(self.rows):
            if (k := row.seq.request.params.logprobs) is not None:
                sampled[i] = (sampled[i][0], _logprobs(logits[i:i + 1], tokens[i:i + 1], k)[0])
        return sampled

    def remove(self, request_ids: set[str]) -> None:
        """Cut finished or aborted rows out of the batch and drop padding no row needs."""
        keep = [i for i, row in enumerate(self.rows) if row.seq.request_id not in request_ids]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self._kv, self._mask = [], torch.zeros(0, 0, dtype=torch.long)
            self._positions = self._next_tokens = torch.zeros(0, dtype=torch.long)
            return
        index = torch.tensor(keep)
        mask = self._mask.index_select(0, index)
        # Columns that are padding in every remaining row hold nothing anyone attends to.
        start = int((mask.cumsum(dim=1) == 0).sum(dim=1).min())
        self._mask = mask[:, start:]
        self._kv = [(k.index_select(0, index)[:, :, start:], v.index_select(0, index)[:, :, start:])
                    for k, v in self._kv]
        self._positions = self._positions.index_select(0, index)
        self._next_tokens = self._next_tokens.index_select(0, index)

    def _splice(self, row: _Row, kv: list[tuple[torch.Tensor, torch.Tensor]], length: int, token: int) -> None:
        self.rows.append(row)
        new_mask = torch.ones(1, length, dtype=torch.long)
        if not self._kv:
            self._kv, self._mask = kv, new_mask
        else:
            width = max(self._mask.shape[1], length)
            self._kv = [
                (torch.cat([_left_pad(k, width), _left_pad(nk, width)]),
                 torch.cat([_left_pad(v, width), _left_pad(nv, width)]))
                for (k, v), (nk, nv) in zip(self._kv, kv, strict=True)
            ]
            self._mask = torch.cat([_left_pad_mask(self._mask, width), _left_pad_mask(new_mask, width)])
        self._positions = torch.cat([self._positions, torch.tensor([length])])
        self._next_tokens = torch.cat([self._next_tokens, torch.tensor([token])])

    @staticmethod
    def _sample(logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        tokens = logits.argmax(dim=-1)
        for i, row in enumerate(rows):
            params = row.seq.request.params
            shaped = _penalized(logits[i], row.seq)
            if row.constraint is not None:
                shaped = row.constraint.mask(logits[i] if shaped is None else shaped)
            if params.temperature <= 1e-5:  # greedy
                if shaped is not None:
                    tokens[i] = shaped.argmax()
            else:
                tokens[i] = _sampled(logits[i] if shaped is None else shaped, params, row.generator)
            if row.constraint is not None:
                row.constraint.accept(int(tokens[i]))
        return tokens


def _sampled(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """One token drawn from the row's (shaped) logits: temperature, then top_k, min_p and top_p."""
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if 0 < params.top_k < probs.shape[0]:
        probs = probs.masked_fill(probs < probs.topk(params.top_k).values[-1], 0.0)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    if params.top_p < 1.0:
        probs = probs / probs.sum()
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(0) - sorted_probs > params.top_p
        probs = probs.scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1, generator=generator)[0]


def _penalized(logits: torch.Tensor, seq: Sequence) -> torch.Tensor | None:
    """The row's logits with the request's logit_bias and vLLM's penalties applied (None: none asked):
    repetition_penalty over every token of the prompt and the output (a positive logit divided by it, a
    negative one multiplied), presence and frequency penalties over the output (a continuation's output
    includes what it emitted before)."""
    params, request = seq.request.params, seq.request
    if (params.repetition_penalty == 1.0 and not params.presence_penalty and not params.frequency_penalty
            and not params.logit_bias):
        return None
    logits = logits.float().clone()
    for token, bias in params.logit_bias.items():
        logits[int(token)] += bias
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted({*request.prompt_token_ids, *seq.generated}), dtype=torch.long)
        values = logits[seen]
        logits[seen] = torch.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
    output = [*request.prompt_token_ids[len(request.prompt_token_ids) - request.resumed_tokens:], *seq.generated]
    if output and (params.presence_penalty or params.frequency_penalty):
        ids, counts = torch.tensor(output, dtype=torch.long).unique(return_counts=True)
        logits[ids] -= params.frequency_penalty * counts + params.presence_penalty
    return logits


def _logprobs(logits: torch.Tensor, chosen: torch.Tensor, k: int) -> list[TokenLogprob]:
    """Per row of raw logits (vLLM's default, "raw_logprobs": the model's distribution before penalties,
    temperature and top-k/p): the chosen token's logprob, and as vLLM lists them the token itself and the k
    most likely others."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    own = logprobs.gather(1, chosen[:, None])[:, 0].tolist()
    top = logprobs.topk(min(k, logprobs.shape[1]), dim=-1)
    return [[lp, [[token, lp], *([i, v] for i, v in zip(ids, values, strict=True) if i != token)]]
            for token, lp, ids, values in zip(chosen.tolist(), own, top.indices.tolist(), top.values.tolist(),
                                               strict=True)]


def _generator(seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - t.shape[2]
    if missing == 0:
        return t
    return torch.cat([t.new_zeros(t.shape[0], t.shape[1], missing, t.shape[3]), t], dim=2)


def _left_pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - mask.shape[1]
    return mask if missing == 0 else torch.cat([mask.new_zeros(mask.shape[0], missing), mask], dim=1)
