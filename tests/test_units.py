"""Small parts on their own: incremental text with stop strings, the KV budget, settings."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from redis.exceptions import DataError

from common.protocol import Chunk, Job
from common.settings import GatewaySettings, ModelSpec
from worker.engines.detokenizer import IncrementalText
from worker.engines.echo import byte_tokenizer
from worker.interactive_board import InteractiveBoard
from worker.kv_budget import KvBudget


def _feed(text: str, stop: list[str]) -> tuple[str, bool]:
    tokenizer = byte_tokenizer()
    out = IncrementalText(tokenizer, stop)
    released = ""
    for token in tokenizer.encode(text).ids:
        released += out.add(token)
        if out.stopped:
            return released, True
    return released + out.flush(), False


def test_incremental_text_reassembles_multibyte_characters() -> None:
    assert _feed("héllo wörld ✓ 日本", []) == ("héllo wörld ✓ 日本", False)


def test_stop_string_cuts_the_text_before_it() -> None:
    assert _feed("one two three", ["two"]) == ("one ", True)
    assert _feed("one two three", ["x", "thr"]) == ("one two ", True)
    assert _feed("one two three", ["four"]) == ("one two three", False)


def test_text_that_may_begin_a_stop_string_is_held_back() -> None:
    tokenizer = byte_tokenizer()
    out = IncrementalText(tokenizer, ["STOP"])
    released = "".join(out.add(t) for t in tokenizer.encode("abcST").ids)
    assert released == "ab"  # "cST" could still become "STOP"... only 3 chars are held
    assert out.flush() == "cST"


async def test_kv_budget_admits_by_tokens_and_slots_and_frees_on_release() -> None:
    budget = KvBudget(capacity_tokens=100, max_seqs=2)
    assert budget.try_admit("a", 60)
    assert not budget.try_admit("b", 50)  # tokens
    assert budget.try_admit("c", 40)
    assert not budget.try_admit("d", 0)  # slots
    waiter = asyncio.create_task(budget.admit("b", 50))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    budget.release("a")
    await asyncio.wait_for(waiter, 1)
    assert budget.used_tokens == 90 and budget.free_seqs == 0


def test_kv_oversubscription_admits_worst_cases_beyond_capacity_but_never_a_job_larger_than_the_engine() -> None:
    budget = KvBudget(capacity_tokens=100, max_seqs=8, oversubscription=1.5)
    assert budget.try_admit("a", 80) and budget.try_admit("b", 70)  # 150 of 100 tokens' worst cases
    assert not budget.try_admit("c", 1)
    assert budget.never_fits(101) and not budget.never_fits(100)
    with pytest.raises(ValueError, match="kv_oversubscription"):
        ModelSpec(name="m", engine="vllm", kv_oversubscription=0.5)


def test_interactive_work_on_one_frontend_closes_the_batch_room_of_another(tmp_path: Path) -> None:
    """Two front-ends' budgets over one board (as two processes map it): an interactive job held by one
    leaves the other no batch room (share 0) until it ends and the linger passes; a new board starts clear."""
    path = tmp_path / "board"
    first = KvBudget(1000, 4, batch_share=0.0, board=InteractiveBoard.create(path, 2))
    second = KvBudget(1000, 4, batch_share=0.0, board=InteractiveBoard(path, 2, 1))
    assert second.batch_room() == 4
    first.try_admit("chat", 10)
    assert second.batch_room() == 0 and second.interactive_quiet_in() == 1.0  # held: the whole linger, at least
    first.release("chat")
    assert second.batch_room() == 0 and 0.9 < second.interactive_quiet_in() <= 1.0  # served, lingering
    assert KvBudget(1000, 4, batch_share=0.5, board=InteractiveBoard(path, 2, 1)).batch_room() == 2  # a share
    first.try_admit("chat 2", 10)
    assert KvBudget(1000, 4, batch_share=0.0, board=InteractiveBoard.create(path, 2)).batch_room() == 4  # a restart


@pytest.mark.parametrize("command", [
    ("EVALSHA", "0123abcd", 2, "req:1", "req:1:chunks", "w-1", b"\x81\xa3seq\x01", 7, 1796005228.7729154, 0.1, -3),
    ("SCRIPT LOAD", "return redis.call('GET', KEYS[1])"),
    (b"CLIENT SETNAME", "né ☃"),
    ("XADD", "jobs:m", "*", "job", b"\x00" * 70_000),  # a large value, packed in one piece
])
def test_commands_packed_by_hiredis_are_what_redis_py_would_send(command: tuple[Any, ...]) -> None:
    from redis.asyncio.connection import Connection

    from common.redis_conn import connection_pool

    ours = connection_pool("redis://127.0.0.1:6379/0", timeout_s=1.0).make_connection()
    assert type(ours) is not Connection
    assert b"".join(ours.pack_command(*command)) == b"".join(Connection().pack_command(*command))
    with pytest.raises(DataError):  # what redis-py refuses, refused alike
        ours.pack_command("SET", "k", True)


def test_wire_messages_round_trip() -> None:
    job = Job("r1", "m", [1, 2, 3], {"max_tokens": 5, "temperature": 0.0, "top_p": 1.0, "stop": [], "seed": 1}, 1.0)
    assert Job.unpack(job.pack()) == job
    assert job.token_budget == 8
    chunk = Chunk(seq=3, text="hé", token_ids=[9], finish_reason="stop", prompt_tokens=3, completion_tokens=2)
    assert Chunk.unpack(chunk.pack()) == chunk


def test_settings_come_from_the_environment_and_flags_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_FLEET_MAX_OUTSTANDING", "7")
    monkeypatch.setenv("LLM_FLEET_PORT", "9001")
    settings = GatewaySettings.from_env(port=9002)
    assert settings.max_outstanding == 7 and settings.port == 9002


@pytest.mark.parametrize(
    ("ignore_eos", "min_tokens", "expected"),
    [(False, 0, ([1], "stop")), (True, 0, ([1, 5, 2, 5], "length")), (False, 3, ([1, 5, 2], "stop"))],
)
def test_eos_ends_a_sequence_unless_ignore_eos_or_min_tokens(ignore_eos, min_tokens, expected) -> None:
    from common.protocol import SamplingParams
    from worker.engines.base import EngineRequest
    from worker.engines.sequence import Sequence

    params = SamplingParams(max_tokens=4, ignore_eos=ignore_eos, min_tokens=min_tokens)
    seq = Sequence(EngineRequest("r", [9], params), byte_tokenizer(), frozenset({5}))
    for token in [1, 5, 2, 5, 7]:
        output = seq.append(token)
        if seq.finished:
            break
    assert (seq.generated, output.finish_reason) == expected


def test_a_continuation_runs_prompt_plus_emitted_tokens_for_the_tokens_still_owed() -> None:
    from worker.continuation import resume

    decode = byte_tokenizer().decode
    job = Job(request_id="r", model="m", prompt_token_ids=[1, 2, 3], enqueued_at=0.0,
              sampling={"max_tokens": 10, "min_tokens": 4, "temperature": 0.0})
    assert resume(job, [], decode).request.prompt_token_ids == [1, 2, 3]
    ab, c = byte_tokenizer().encode("ab").ids, byte_tokenizer().encode("c").ids
    plan = resume(job, [Chunk(seq=1, text="ab", token_ids=ab), Chunk(seq=2, text="c", token_ids=c)], decode)
    assert plan.request.prompt_token_ids == [1, 2, 3, *ab, *c] and plan.request.resumed_tokens == 3
    assert (plan.request.params.max_tokens, plan.request.params.min_tokens) == (7, 1)
    assert (plan.tokens_done, plan.unsent_text) == (3, "")
    all_out = byte_tokenizer().encode("x" * 10).ids
    assert resume(job, [Chunk(seq=1, text="x" * 10, token_ids=all_out)], decode).request is None


def test_a_continuation_sends_held_back_text_and_regenerates_a_half_character() -> None:
    from worker.continuation import resume

    tokenizer = byte_tokenizer()
    job = Job(request_id="r", model="m", prompt_token_ids=[1], enqueued_at=0.0, sampling={"max_tokens": 20})
    ids = tokenizer.encode("ab日本").ids  # 日 and 本 are 3 byte-tokens each
    # The dead worker emitted the tokens of "ab日" and one byte of "本", but released only "a"
    # (say "b日" was held back as a possible stop string): the client is owed "b日", and the
    # half character's byte is generated again.
    plan = resume(job, [Chunk(seq=1, text="a", token_ids=ids[:6])], tokenizer.decode)
    assert plan.unsent_text == "b日" and plan.tokens_done == 5
    assert plan.request.prompt_token_ids == [1, *ids[:5]] and plan.request.params.max_tokens == 15


def test_incremental_text_decodes_new_tokens_in_the_context_of_earlier_output() -> None:
    tokenizer = byte_tokenizer()
    ids = tokenizer.encode("ab日本").ids
    resumed = IncrementalText(tokenizer, [], context=ids[:5])
    assert "".join(resumed.add(t) for t in ids[5:]) + resumed.flush() == "本"


def test_the_api_reference_in_docs_is_the_one_the_gateway_describes() -> None:
    from gateway import api_reference, openapi

    written = (Path(__file__).parent.parent / "docs" / "api.md").read_text()
    assert written == api_reference.render(openapi.SPEC), "docs/api.md is out of date: run `make api-docs`"
