"""The playground (/) and the console (/console), driven in a real headless Chromium through Playwright.

`make test` installs Debian's chromium; where no browser can be installed these tests are skipped,
saying so. Each test takes a screenshot; with LLM_FLEET_SCREENSHOTS=docs (`make screenshots`) the
pages' pictures in docs/ are replaced by them.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Locator, Page, async_playwright, expect

from common import api_keys
from common.api_keys import ApiKey
from tests.conftest import TEST_MODEL, Fleet, StartFleet
from tests.test_control_plane import OTHER, catalogue
from tests.test_cpu_model import smollm2_worker_process

DOCS = Path(__file__).parent.parent / "docs"
# Chromium as root in a container: no sandbox; no connections of its own (this network is closed).
_CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


def _chromium() -> str | None:
    candidates = [os.environ.get("LLM_FLEET_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"]
    return next((found for c in candidates if c and (found := shutil.which(c))), None)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    executable = _chromium()
    if executable is None:
        pytest.skip("no Chromium on this machine (`make test` installs Debian's chromium where apt-get can)")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=executable, args=_CHROMIUM_ARGS)
        yield browser
        await browser.close()


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    context = await browser.new_context(viewport={"width": 1280, "height": 760})
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    yield page
    await context.close()
    # A script error or something the CSP blocked shows here. The browser also logs each 4xx answer,
    # which the tests provoke and check on the page.
    assert [e for e in errors if not e.startswith("Failed to load resource")] == [], errors


async def screenshot(page: Page, name: str, tmp_path: Path) -> None:
    path = tmp_path / name
    await page.screenshot(path=path)
    assert path.stat().st_size > 10_000, "a rendered page, not a blank one"
    if os.environ.get("LLM_FLEET_SCREENSHOTS") == "docs":
        shutil.copy(path, DOCS / name)


def conversation(page: Page, index: int = 0) -> Locator:
    return page.locator(".conversation").nth(index)


async def send(chat: Locator, text: str, **params: Any) -> None:
    for field, value in params.items():
        await chat.locator(f"input[name={field}]").fill(str(value))
    await chat.locator("textarea.input").fill(text)
    await chat.locator("button.send").click()


async def request_id_of(chat: Locator) -> str:
    stat = chat.locator("[data-stat=request-id]")
    await expect(stat).to_have_text(re.compile(r"^[0-9a-f]{32}$"))
    return await stat.inner_text()


async def answer(chat: Locator) -> str:
    """The last assistant message's text, as the page shows it."""
    return await chat.locator(".message.assistant .text").last.text_content() or ""


async def test_a_prompt_streams_in_and_the_text_equals_the_poll_result(start_fleet: StartFleet, page: Page,
                                                                       tmp_path: Path) -> None:
    fleet = await start_fleet(engine={"step_delay_ms": 15})
    await page.goto(fleet.base_url + "/")
    chat = conversation(page)
    await expect(chat.locator("select.model")).to_have_value(TEST_MODEL)
    await expect(page.locator("#connection")).to_have_text("connected")
    await send(chat, "Tell me about fleets of workers", max_tokens=60, temperature=0)
    request_id = await request_id_of(chat)
    await expect(chat.locator(".text.streaming")).not_to_have_text("")  # text arrives before the end ...
    assert await chat.locator("[data-stat=finish-reason]").count() == 0  # ... while still streaming
    await expect(chat.locator("[data-stat=finish-reason]")).to_have_text("length", timeout=15_000)

    polled = await fleet.wait_done(request_id)
    assert await answer(chat) == polled["text"] and polled["usage"]["completion_tokens"] == 60
    await expect(chat.locator("[data-stat=tokens]")).to_have_text("60")
    await expect(chat.locator("[data-stat=ttft]")).to_have_text(re.compile(r"^\d+ ms$"))
    await expect(chat.locator("[data-stat=tokens-per-s]")).to_have_text(re.compile(r"^\d+\.\d$"))


async def test_the_sampling_fields_reach_the_request(start_fleet: StartFleet, page: Page) -> None:
    fleet = await start_fleet()
    await page.goto(fleet.base_url + "/")
    chat = conversation(page)
    await chat.locator("select.mode").select_option("prompt")
    await expect(page.locator("#connection")).to_have_text("connected")
    await send(chat, "one two three four", max_tokens=50, stop="three")
    await expect(chat.locator("[data-stat=finish-reason]")).to_have_text("stop")
    polled = await fleet.wait_done(await request_id_of(chat))
    assert polled["text"] == await answer(chat) and "three" not in polled["text"]


@pytest.mark.model
async def test_the_real_model_chats_and_completes_in_the_playground(start_fleet: StartFleet, page: Page,
                                                                    tmp_path: Path) -> None:
    """SmolLM2 on the CPU: a two-turn chat (the second turn carries the first) beside a raw prompt."""
    fleet = await start_fleet(workers=0)
    worker = smollm2_worker_process(fleet.redis_url)
    try:
        await fleet.wait_ready(timeout_s=120)
        await page.goto(fleet.base_url + "/")
        await expect(page.locator("#connection")).to_have_text("connected")
        await page.locator("#new-conversation").click()
        chat, completion = conversation(page, 0), conversation(page, 1)
        await completion.locator("select.mode").select_option("prompt")
        await send(completion, "The three primary colors are", max_tokens=40, temperature=0)
        prompt_tokens = []
        for question in ("What is the capital of France?", "And of Italy?"):
            await send(chat, question, max_tokens=48, temperature=0)
            request_id = await request_id_of(chat)
            await expect(chat.locator("[data-stat=finish-reason]")).to_have_text(re.compile("stop|length"),
                                                                                 timeout=60_000)
            polled = await fleet.wait_done(request_id, timeout_s=60)
            assert await answer(chat) == polled["text"] and polled["text"].strip()
            prompt_tokens.append(polled["usage"]["prompt_tokens"])
        assert prompt_tokens[1] > prompt_tokens[0] + 10, "the second turn sent the whole conversation"
        assert await chat.locator(".message").count() == 4
        await expect(completion.locator("[data-stat=finish-reason]")).to_have_text(re.compile("stop|length"),
                                                                                   timeout=60_000)
        polled = await fleet.wait_done(await request_id_of(completion))
        assert await answer(completion) == polled["text"]
        await screenshot(page, "playground.png", tmp_path)
    finally:
        worker.kill()
        worker.wait()


async def test_stop_cancels_the_request(start_fleet: StartFleet, page: Page) -> None:
    fleet = await start_fleet(engine={"step_delay_ms": 40})
    await page.goto(fleet.base_url + "/")
    chat = conversation(page)
    await expect(page.locator("#connection")).to_have_text("connected")
    await send(chat, "a long answer please", max_tokens=2000)
    request_id = await request_id_of(chat)
    await expect(chat.locator(".text.streaming")).not_to_have_text("")
    await chat.locator("button.stop").click()
    await expect(chat.locator("[data-stat=finish-reason]")).to_have_text("cancelled")
    polled = await fleet.wait_done(request_id)
    assert polled["status"] == "cancelled" and polled["usage"]["completion_tokens"] < 2000
    assert await answer(chat) == polled["text"]


async def test_a_reload_mid_stream_reattaches_every_conversation_with_no_gap(start_fleet: StartFleet,
                                                                             page: Page) -> None:
    """Two conversations stream at once; the page reloads in the middle; both finish with exactly the
    fleet's text: nothing missing where the page was away, nothing twice."""
    fleet = await start_fleet(engine={"step_delay_ms": 20})
    await page.goto(fleet.base_url + "/")
    await expect(page.locator("#connection")).to_have_text("connected")
    await page.locator("#new-conversation").click()
    first, second = conversation(page, 0), conversation(page, 1)
    await send(first, "first conversation, a long one", max_tokens=150)
    await send(second, "second conversation, also long", max_tokens=120)
    ids = [await request_id_of(first), await request_id_of(second)]
    await expect(first.locator(".text.streaming")).not_to_have_text("")
    await expect(second.locator(".text.streaming")).not_to_have_text("")

    await page.reload()
    first, second = conversation(page, 0), conversation(page, 1)
    for chat in (first, second):
        await expect(chat.locator("[data-stat=finish-reason]")).to_have_text("length", timeout=20_000)
    for chat, request_id in zip((first, second), ids, strict=True):
        polled = await fleet.wait_done(request_id)
        assert await request_id_of(chat) == request_id
        assert await answer(chat) == polled["text"], "no gap, no duplicate across the reload"


async def test_a_gateway_restart_mid_stream_is_a_pause_on_the_page(start_fleet: StartFleet, page: Page) -> None:
    """The gateway closes the socket with 1001 (a deploy); the page reconnects and re-attaches by itself."""
    fleet = await start_fleet(engine={"step_delay_ms": 20})
    await page.goto(fleet.base_url + "/")
    await expect(page.locator("#connection")).to_have_text("connected")
    chat = conversation(page)
    await send(chat, "through a deploy", max_tokens=150)
    request_id = await request_id_of(chat)
    await expect(chat.locator(".text.streaming")).not_to_have_text("")
    await fleet.restart_gateway()
    await expect(chat.locator("[data-stat=finish-reason]")).to_have_text("length", timeout=20_000)
    assert await answer(chat) == (await fleet.wait_done(request_id))["text"]


async def test_bad_input_shows_the_error_the_api_returned(start_fleet: StartFleet, page: Page) -> None:
    fleet = await start_fleet()
    await page.goto(fleet.base_url + "/")
    chat = conversation(page)
    await expect(page.locator("#connection")).to_have_text("connected")
    await send(chat, "hello", max_tokens=0)
    await expect(chat.locator(".error")).to_have_text("422: `max_tokens`: Input should be greater than or equal to 1")
    assert await chat.locator(".message").count() == 0, "a refused turn is not kept in the conversation"
    await expect(chat.locator("button.send")).to_be_enabled()


async def test_with_api_keys_the_page_asks_for_one_and_streams_with_it(start_fleet: StartFleet, redis,
                                                                       page: Page) -> None:
    fleet = await start_fleet(auth=True)
    key = await api_keys.create(redis, ApiKey(name="browser"))
    await page.goto(fleet.base_url + "/")
    await expect(page.locator("#banner")).to_have_text("This fleet uses API keys: enter yours above.")
    await page.locator("#api-key").fill(key)
    await page.locator("#api-key").dispatch_event("change")
    await expect(page.locator("#connection")).to_have_text("connected")  # the key went as a subprotocol
    chat = conversation(page)
    await expect(chat.locator("select.model")).to_have_value(TEST_MODEL)
    await send(chat, "keyed", max_tokens=5)
    await expect(chat.locator("[data-stat=finish-reason]")).to_have_text("length")
    fleet.headers = {"Authorization": f"Bearer {key}"}
    assert await answer(chat) == (await fleet.wait_done(await request_id_of(chat)))["text"]


async def admin_console(start_fleet: StartFleet, redis, tmp_path: Path) -> tuple[Fleet, str]:
    fleet = await start_fleet(workers=0, auth=True)
    admin = await api_keys.create(redis, ApiKey(name="ops", admin=True))
    fleet.headers = {"Authorization": f"Bearer {admin}"}
    path = catalogue(tmp_path, load_delay_s=3.0)
    for _ in range(2):
        await fleet.start_worker(settings={"catalogue": path, "heartbeat_interval_s": 0.2})
    await fleet.wait_ready()
    return fleet, admin


async def test_the_console_lists_workers_and_shows_a_model_load_in_progress(start_fleet: StartFleet, redis,
                                                                            page: Page, tmp_path: Path) -> None:
    fleet, admin = await admin_console(start_fleet, redis, tmp_path)
    await page.goto(fleet.base_url + "/console")
    await expect(page.locator("#banner")).to_have_text("This fleet uses API keys: enter yours above.")
    await page.locator("#api-key").fill(admin)
    await page.locator("#api-key").dispatch_event("change")
    await expect(page.locator("[data-card=workers]")).to_have_text("2")
    for worker in fleet.workers:
        row = page.locator(f"tr[data-worker='{worker.settings.worker_id}'][data-model='{TEST_MODEL}']")
        await expect(row.locator(".model-state")).to_have_text("ready")
    await expect(page.locator(f"tr[data-queue='{TEST_MODEL}']")).to_be_visible()

    target = fleet.workers[1].settings.worker_id
    row = page.locator(f"tr[data-worker='{target}']").first
    await row.locator("select.load-model").select_option(OTHER)
    await row.locator("button.load").click()
    await expect(page.locator("#action-log")).to_contain_text(f"load {OTHER} on {target}: sent")
    loading = page.locator(f"tr[data-worker='{target}'][data-model='{OTHER}'] .model-state")
    await expect(loading).to_contain_text("loading", timeout=5_000)  # progress, while it loads
    await screenshot(page, "console.png", tmp_path)
    await expect(loading).to_have_text("ready", timeout=10_000)
    assert await page.locator(f"tr[data-worker='{fleet.workers[0].settings.worker_id}'][data-model='{OTHER}']"
                              ).count() == 0, "loaded on the chosen worker only"


async def test_a_console_refresh_never_swallows_a_click(start_fleet: StartFleet, redis, page: Page,
                                                        tmp_path: Path) -> None:
    """The tables are rebuilt every 2 s: a button held down across a refresh still gets its click."""
    fleet, admin = await admin_console(start_fleet, redis, tmp_path)
    await page.goto(fleet.base_url + "/console")
    await page.locator("#api-key").fill(admin)
    await page.locator("#api-key").dispatch_event("change")
    target = fleet.workers[0].settings.worker_id
    button = page.locator(f"tr[data-worker='{target}'] button.load").first
    box = await button.bounding_box()
    assert box is not None
    await page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    await page.mouse.down()
    await page.wait_for_timeout(2_500)  # a refresh comes while the button is pressed
    await page.mouse.up()
    await expect(page.locator("#action-log")).to_contain_text(f"load {OTHER} on {target}: sent")


async def test_the_console_shows_the_error_the_api_returned(start_fleet: StartFleet, redis, page: Page,
                                                            tmp_path: Path) -> None:
    """A key that is not an admin key may look, and is told why it may not load."""
    fleet, _ = await admin_console(start_fleet, redis, tmp_path)
    reader = await api_keys.create(redis, ApiKey(name="reader"))
    await page.goto(fleet.base_url + "/console")
    await page.locator("#api-key").fill(reader)
    await page.locator("#api-key").dispatch_event("change")
    row = page.locator(f"tr[data-worker='{fleet.workers[0].settings.worker_id}']").first
    await row.locator("button.load").click()
    await expect(page.locator("#action-log")).to_have_text(
        f"load {OTHER} on {fleet.workers[0].settings.worker_id} refused: 403: API key 'reader' is not an admin key")
