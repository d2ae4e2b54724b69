"""Priority classes: batch work runs in what interactive work leaves, yields its slots, and has its own cap."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from common import keys
from tests.conftest import TEST_MODEL, Fleet, StartFleet
from tests.test_faults import echo, wait_until, worker_of
from tests.test_frontends import start_group

LONG = "".join(chr(ord("a") + i % 26) for i in range(100))  # the test engine echoes it, a byte per step


async def test_batch_jobs_yield_their_slots_to_an_interactive_request_and_still_complete_whole(
    start_fleet: StartFleet, redis
) -> None:
    # Four slots, 20 ms a step: a batch job takes 2 s, an interactive one 0.1 s. Batch jobs may keep every
    # slot interactive work leaves (share 1): only the full engine makes one yield.
    fleet = await start_fleet(workers=0)
    worker = await fleet.start_worker({"batch_share_with_interactive": 1.0}, max_num_seqs=4, step_delay_ms=20)
    await fleet.wait_ready()
    batch = [await fleet.submit(prompt=LONG, max_tokens=100, priority="batch") for _ in range(6)]
    budget = worker.budgets[TEST_MODEL]

    async def four_batch_jobs_running() -> bool:
        return len(budget.batch_jobs) == 4

    await wait_until(four_batch_jobs_running)

    interactive = await fleet.submit(prompt="quick", max_tokens=5)
    done = await fleet.wait_done(interactive, timeout_s=10)
    assert done["status"] == "completed" and done["text"] == "quick"
    # It did not wait for a batch job to end: none has, yet (each needs 2 s of steps).
    states = [(await fleet.get(f"/v1/requests/{request_id}"))[1]["status"] for request_id in batch]
    assert "completed" not in states, states
    assert _counter(worker, "llm_fleet_jobs_preempted_total") == 1  # one slot for one request, no more

    # The preempted job was parked in the worker and continued once batch room came back, ahead of the batch's
    # later lines (not handed back to the stream's end): every text whole, no gap, no repeat.
    for request_id in batch:
        result = await fleet.wait_done(request_id, timeout_s=30)
        assert result["status"] == "completed" and result["text"] == LONG
    assert _counter(worker, "llm_fleet_jobs_handed_back_total") == 0
    assert await redis.xlen(keys.batch_stream(TEST_MODEL)) == 0


async def test_interactive_jobs_are_taken_before_batch_jobs_queued_earlier(start_fleet: StartFleet) -> None:
    fleet = await start_fleet(workers=0)
    await fleet.start_worker(max_num_seqs=1, step_delay_ms=5)  # registers the model
    await fleet.wait_ready()
    await fleet.stop_workers()
    batch = [await fleet.submit(prompt=f"batch {i}", max_tokens=8, priority="batch") for i in range(3)]
    interactive = [await fleet.submit(prompt=f"chat {i}", max_tokens=8) for i in range(3)]

    await fleet.start_worker(max_num_seqs=1, step_delay_ms=5)
    started = {}
    for request_id in batch + interactive:
        result = await fleet.wait_done(request_id)
        assert result["status"] == "completed"
        started[request_id] = result["timings"]["created_at"] + result["timings"]["queue_s"]
    assert max(started[i] for i in interactive) < min(started[b] for b in batch)


async def test_each_class_has_its_own_cap_so_a_batch_backlog_never_refuses_interactive_work(
    start_fleet: StartFleet,
) -> None:
    fleet = await start_fleet(workers=0, max_outstanding=2, max_outstanding_batch=3)
    await fleet.start_worker()
    await fleet.wait_ready()
    await fleet.stop_workers()

    async def post(priority: object) -> int:
        return (await fleet.post("/v1/generate", {"model": TEST_MODEL, "prompt": "x", "max_tokens": 2,
                                                  "priority": priority}))[0]

    assert [await post("batch") for _ in range(4)] == [202, 202, 202, 429]
    assert [await post("interactive") for _ in range(3)] == [202, 202, 429]
    # vLLM's integer priority: above 0 is batch (whose cap is reached), 0 interactive (whose cap is too).
    assert await post(5) == 429 and await post(0) == 429
    status, reply, _ = await fleet.post("/v1/completions", {"model": TEST_MODEL, "prompt": "x", "priority": "urgent"})
    assert status == 422 and reply["error"]["param"] == "priority"
    _, view = await fleet.get("/v1/fleet")
    assert view["queues"][TEST_MODEL]["batch_outstanding"] == 3
    assert view["queues"][TEST_MODEL]["outstanding"] == 5  # both classes


def _counter(worker, name: str) -> float:
    return worker.metrics.registry.get_sample_value(name, {"model": TEST_MODEL}) or 0.0


async def test_while_interactive_work_runs_batch_jobs_are_kept_to_their_share_then_fill_again(
    start_fleet: StartFleet,
) -> None:
    """`batch_share_with_interactive`: with interactive work on the engine no batch job is admitted above
    the share (the running ones finish, none is preempted for it); once it is served and the linger has
    passed, batch jobs fill every slot again."""
    fleet = await start_fleet(workers=0)
    worker = await fleet.start_worker({"batch_share_with_interactive": 0.25}, max_num_seqs=8, step_delay_ms=5)
    await fleet.wait_ready()
    budget = worker.budgets[TEST_MODEL]
    short = [await fleet.submit(prompt="s" * 20, max_tokens=20, priority="batch") for _ in range(4)]
    chat = await fleet.submit(prompt="c" * 100, max_tokens=100)  # 0.5 s of steps, in a free slot
    batch = [await fleet.submit(prompt=LONG * 2, max_tokens=200, priority="batch") for _ in range(16)]

    async def chat_running() -> bool:
        return (await fleet.get(f"/v1/requests/{chat}"))[1]["status"] == "running"

    await wait_until(chat_running)
    # Four slots are free, yet the long batch jobs get at most 2 of the 8 while the chat runs, and the short
    # ones (0.1 s) end meanwhile.
    held_during_chat = []
    while (await fleet.get(f"/v1/requests/{chat}"))[1]["status"] == "running":
        held_during_chat.append(len(budget.batch_jobs))
        await asyncio.sleep(0.02)
    for request_id in short:
        assert (await fleet.wait_done(request_id))["status"] == "completed"
    assert max(held_during_chat) <= 4 and held_during_chat[-1] <= 2, held_during_chat
    assert _counter(worker, "llm_fleet_jobs_preempted_total") == 0  # it found free slots: nothing preempted

    async def batch_fills_every_slot() -> bool:
        return len(budget.batch_jobs) == 8

    await wait_until(batch_fills_every_slot)  # the chat is served: after the linger (1 s) batch takes all
    for request_id in batch:
        assert (await fleet.wait_done(request_id, timeout_s=60))["text"] == (LONG * 2)[:200]


async def test_batch_jobs_taken_in_one_read_are_preempted_as_soon_as_they_run(start_fleet: StartFleet) -> None:
    """The batch jobs a worker takes in one read are all admitted before any runs, and only running jobs
    can be preempted: their start must wake the preempting loop, or an interactive request waits for a
    batch job to end (2 s here) instead of taking a slot at once."""
    fleet = await start_fleet(workers=0)
    await fleet.start_worker(max_num_seqs=4, step_delay_ms=20)  # registers the model
    await fleet.wait_ready()
    await fleet.stop_workers()
    batch = [await fleet.submit(prompt=LONG, max_tokens=100, priority="batch") for _ in range(4)]
    await fleet.start_worker(max_num_seqs=4, step_delay_ms=20)  # takes all four in its first read

    async def four_batch_jobs_running() -> bool:
        running = [(await fleet.get(f"/v1/requests/{r}"))[1]["status"] for r in batch]
        return running.count("running") == 4

    await wait_until(four_batch_jobs_running)
    interactive = await fleet.submit(prompt="quick", max_tokens=5)
    assert (await fleet.wait_done(interactive, timeout_s=10))["text"] == "quick"
    states = [(await fleet.get(f"/v1/requests/{request_id}"))[1]["status"] for request_id in batch]
    assert "completed" not in states, states
    for request_id in batch:
        assert (await fleet.wait_done(request_id, timeout_s=30))["text"] == LONG


async def test_interactive_work_on_one_frontend_keeps_batch_jobs_off_every_frontend_of_its_engine(
    start_fleet: StartFleet, tmp_path: Path
) -> None:
    """The front-end processes of an engine share its step time, so interactive work on any of them holds back
    the batch jobs of all (worker/interactive_board.py): with the default share (0) no front-end starts one
    while a chat runs on another, and once it is served they run."""
    fleet = await start_fleet(workers=0)
    await start_group(fleet, tmp_path, frontends=2)  # 15 slots each, 5 ms steps
    chat = await fleet.submit(prompt="c" * 400, max_tokens=400)  # 2 s of steps on one of the two

    async def chat_running() -> bool:
        return (await fleet.get(f"/v1/requests/{chat}"))[1]["status"] == "running"

    await wait_until(chat_running)
    batch = [await fleet.submit(prompt=f"batch {i}", max_tokens=20, priority="batch") for i in range(6)]
    seen = set()
    while (await fleet.get(f"/v1/requests/{chat}"))[1]["status"] == "running":
        seen.update([(await fleet.get(f"/v1/requests/{r}"))[1]["status"] for r in batch])
        await asyncio.sleep(0.05)
    assert seen == {"queued"}, seen  # the front-end without the chat had 15 free slots, and took none
    for i, request_id in enumerate(batch):
        assert (await fleet.wait_done(request_id, timeout_s=30))["text"] == echo(f"batch {i}", 20)


async def test_long_batch_jobs_make_way_when_interactive_work_comes_and_finish_whole_later(
    start_fleet: StartFleet,
) -> None:
    """With free slots too: once interactive work is on the engine, running batch jobs beyond the share (0)
    with many tokens to go are handed back (a batch of long answers would make every interactive step long
    for as long as they run), one near its end finishes, and all continue later from their output."""
    fleet = await start_fleet(workers=0)
    worker = await fleet.start_worker(max_num_seqs=8, step_delay_ms=5)
    await fleet.wait_ready()
    long = [await fleet.submit(prompt=LONG * 3, max_tokens=300, priority="batch") for _ in range(3)]  # 1.5 s each
    short = await fleet.submit(prompt="s" * 30, max_tokens=30, priority="batch")

    async def all_running() -> bool:
        return [(await fleet.get(f"/v1/requests/{r}"))[1]["status"] for r in [*long, short]] == ["running"] * 4

    await wait_until(all_running)
    chat = await fleet.submit(prompt="quick", max_tokens=5)
    assert (await fleet.wait_done(chat, timeout_s=10))["text"] == "quick"
    assert _counter(worker, "llm_fleet_jobs_preempted_total") == 3  # the long ones; four slots were free
    assert (await fleet.wait_done(short, timeout_s=10))["text"] == "s" * 30
    for request_id in long:
        assert (await fleet.wait_done(request_id, timeout_s=30))["text"] == LONG * 3


async def test_batch_jobs_parked_for_interactive_work_are_continued_elsewhere_when_their_worker_dies(
    start_fleet: StartFleet, redis
) -> None:
    """A parked batch job is still held by its worker (its entry not acked, its output so far stored): when
    that worker is SIGKILLed another reclaims it like any job of a dead worker and continues it whole."""
    fleet = await start_fleet(workers=0)
    doomed = fleet.spawn_worker("doomed", step_delay_ms=20, max_num_seqs=8)
    await fleet.wait_ready()
    batch = [await fleet.submit(prompt=LONG * 3, max_tokens=300, priority="batch") for _ in range(3)]  # 6 s each

    async def texts() -> list[int]:
        return [len((await fleet.get(f"/v1/requests/{r}"))[1]["text"]) for r in batch]

    async def batch_output_stored() -> bool:
        return min(await texts()) > 0  # written every 500 ms

    await wait_until(batch_output_stored)
    chat = await fleet.submit(prompt="c" * 200, max_tokens=200)  # 4 s of steps: the batch stays parked
    await wait_until(lambda: _status_is(fleet, chat, "running"))
    await asyncio.sleep(0.3)
    parked = await texts()
    await asyncio.sleep(0.6)
    assert await texts() == parked and all(0 < n < 300 for n in parked)  # stored mid-way, not moving
    assert {await worker_of(redis, r) for r in batch} == {"doomed"}

    fleet.spawn_worker("survivor", step_delay_ms=5, max_num_seqs=8)
    doomed.send_signal(signal.SIGKILL)
    assert (await fleet.wait_done(chat, timeout_s=30))["text"] == "c" * 200
    for request_id in batch:
        assert (await fleet.wait_done(request_id, timeout_s=30))["text"] == LONG * 3
    assert {await worker_of(redis, r) for r in batch} == {"survivor"}


async def _status_is(fleet: Fleet, request_id: str, status: str) -> bool:
    return (await fleet.get(f"/v1/requests/{request_id}"))[1]["status"] == status
