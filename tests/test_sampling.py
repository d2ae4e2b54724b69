"""The CPU engine's logit shaping, as vLLM does it: logit_bias, repetition, presence and frequency penalties
(greedy too), then top_k and min_p before sampling. Run on hand-made logits, so each rule is seen alone;
the real model is checked end to end in tests/test_cpu_model.py. And stop_token_ids, through the fleet."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from common.protocol import SamplingParams
from tests.conftest import StartFleet
from worker.engines.base import EngineRequest
from worker.engines.cpu_batch import BatchedDecoder, _generator, _Row
from worker.engines.echo import byte_tokenizer
from worker.engines.sequence import Sequence

VOCAB = 8


def _row(prompt: list[int], generated: list[int] = (), resumed: int = 0, seed: int | None = None,
         **params: object) -> _Row:
    request = EngineRequest("r", prompt, SamplingParams(max_tokens=16, **params), resumed_tokens=resumed)
    seq = Sequence(request, byte_tokenizer(), frozenset())
    seq.generated = list(generated)
    return _Row(seq, _generator(seed))


def _logits(**values: float) -> torch.Tensor:
    logits = torch.full((1, VOCAB), -5.0)
    for token, value in values.items():
        logits[0, int(token[1:])] = value
    return logits


def _greedy(row: _Row, logits: torch.Tensor) -> int:
    return int(BatchedDecoder._sample(logits, [row])[0])


def test_repetition_penalty_divides_the_logits_of_tokens_already_seen() -> None:
    logits = _logits(t3=2.0, t4=1.9)
    assert _greedy(_row([3, 5], temperature=0.0), logits) == 3
    assert _greedy(_row([3, 5], temperature=0.0, repetition_penalty=1.5), logits) == 4  # 2.0 / 1.5 < 1.9
    assert _greedy(_row([1], generated=[3], temperature=0.0, repetition_penalty=1.5), logits) == 4  # output too
    negative = _logits(t3=-1.0, t4=-1.2)  # a negative logit is multiplied: pushed further down
    assert _greedy(_row([3], temperature=0.0, repetition_penalty=1.5), negative) == 4


def test_presence_and_frequency_penalties_count_the_output_only() -> None:
    logits = _logits(t3=2.0, t4=1.5)
    assert _greedy(_row([3, 3, 3], temperature=0.0, presence_penalty=1.0), logits) == 3, "the prompt is not output"
    assert _greedy(_row([1], generated=[3], temperature=0.0, presence_penalty=1.0), logits) == 4
    assert _greedy(_row([1], generated=[3], temperature=0.0, frequency_penalty=0.4), logits) == 3  # 1.6 > 1.5
    assert _greedy(_row([1], generated=[3, 3], temperature=0.0, frequency_penalty=0.4), logits) == 4  # 1.2
    # A continuation's earlier output is the end of its prompt (resumed_tokens): it counts as output.
    assert _greedy(_row([1, 3], resumed=1, temperature=0.0, presence_penalty=1.0), logits) == 4


@pytest.mark.parametrize("seed", range(5))
def test_top_k_and_min_p_keep_only_the_likeliest_tokens(seed: int) -> None:
    logits = torch.log(torch.tensor([[0.05, 0.3, 0.05, 0.25, 0.05, 0.2, 0.05, 0.05]]))
    assert _greedy(_row([1], seed=seed, temperature=1.0, top_k=1), logits) == 1
    assert _greedy(_row([1], seed=seed, temperature=1.0, min_p=0.9), logits) == 1  # 0.25 < 0.9 x 0.3
    kept = {_greedy(_row([1], seed=seed * 100 + i, temperature=1.0, top_k=3), logits) for i in range(40)}
    assert kept <= {1, 3, 5} and len(kept) > 1


def test_logit_bias_is_added_to_the_logits() -> None:
    logits = _logits(t3=2.0, t4=1.9)
    assert _greedy(_row([1], temperature=0.0, logit_bias={"4": 0.5}), logits) == 4
    assert _greedy(_row([1], temperature=0.0, logit_bias={"3": -100.0}), logits) == 4


async def test_stop_token_ids_end_the_output_after_min_tokens(start_fleet: StartFleet) -> None:
    fleet = await start_fleet()
    [d] = (await fleet.post("/tokenize", {"prompt": "d"}))[1]["tokens"]
    done = await fleet.wait_done(await fleet.submit(prompt="abcdefgh", max_tokens=8, stop_token_ids=[d]))
    assert (done["text"], done["finish_reason"]) == ("abc", "stop")
    done = await fleet.wait_done(await fleet.submit(prompt="abcdabcd", max_tokens=8, stop_token_ids=[d],
                                                    min_tokens=5, ignore_eos=True))
    assert (done["text"], done["finish_reason"]) == ("abcdabc", "stop"), "held back until min_tokens; ignore_eos no"


def test_every_sampling_field_is_checked_and_reaches_the_job() -> None:
    """One list of sampling fields (SamplingParams): a request's typed body sets each of them, no more, no
    fewer, and its defaults are SamplingParams' defaults."""
    from gateway.api_types import CompletionBody

    sampling = CompletionBody.model_validate({"prompt": "x"}).request().sampling
    assert set(sampling) == {f.name for f in dataclasses.fields(SamplingParams)} - {"max_tokens"}
    assert SamplingParams(max_tokens=1, **sampling) == SamplingParams(max_tokens=1)
