"""The unsubscribe page in a real headless Chromium: the page a person sees, the button, the done page.

Why a real browser: the aiohttp tests prove the HTTP contract, but only a browser proves that the page works
under its own Content-Security-Policy (the inline stylesheet's hash is accepted, no script is needed), that
``<form method="post">`` with no action posts back to the token URL, and that the button is reachable by its
accessible name. The screenshots in ``docs/`` come from this test.

Needs the Debian packages ``chromium`` (and ``chromium-driver`` for Selenium users) and the PyPI package
``playwright``, driven against ``/usr/bin/chromium`` (``playwright install`` is never run). When either is
missing this test FAILS, it does not skip: CI installs them.

``RELAYD_SCREENSHOT_DIR=docs`` makes the test write ``unsubscribe-page.png`` and ``unsubscribe-done.png``
there as well as into its tmp directory.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from playwright.async_api import async_playwright, expect

from relayd.edge.web import create_app, start_web
from relayd.policy.render import unsubscribe_url
from relayd.queue.store import QueueStore
from relayd.store import Reason, Scope, SqliteStore
from tests.test_web import SECRET, make_config, send

CHROMIUM = Path("/usr/bin/chromium")
# Playwright adds --headless and --user-data-dir (a fresh tmp profile) itself.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ADDRESS = "jane.doe@example.test"


@pytest.fixture
async def stores(tmp_path: Path) -> AsyncIterator[tuple[SqliteStore, QueueStore]]:
    store = SqliteStore(tmp_path / "relayd.db")
    queue = QueueStore(tmp_path / "queue" / "queue.db")
    await store.open()
    await queue.open()
    try:
        yield store, queue
    finally:
        await queue.close()
        await store.close()


def _keep(shot: Path) -> None:
    target = os.environ.get("RELAYD_SCREENSHOT_DIR")
    if target:
        shutil.copyfile(shot, Path(target) / shot.name)


async def test_unsubscribe_in_chromium(tmp_path: Path, stores: tuple[SqliteStore, QueueStore]) -> None:
    assert CHROMIUM.exists(), f"{CHROMIUM} missing: apt-get install chromium chromium-driver"
    store, queue = stores
    qid = await send(store, queue, "acme", "news", ADDRESS)
    runner = await start_web(create_app(make_config(), store, SECRET, queue), "127.0.0.1", 0)
    host, port = runner.addresses[0][:2]
    url = unsubscribe_url(f"http://{host}:{port}", SECRET, qid, 0, ADDRESS)
    problems: list[str] = []
    try:
        async with async_playwright() as pw:
            browser = await pw.chromium.launch_persistent_context(
                tmp_path / "profile",
                executable_path=CHROMIUM,
                headless=True,
                args=CHROMIUM_FLAGS,
                viewport={"width": 720, "height": 480},
                color_scheme="light",
                java_script_enabled=True,  # the page needs none; on, a stray script would be noticed
            )
            try:
                page = browser.pages[0] if browser.pages else await browser.new_page()
                page.set_default_timeout(15_000)
                page.on("console", lambda msg: problems.append(f"console {msg.type}: {msg.text}"))
                page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))

                response = await page.goto(url)
                assert response is not None and response.status == 200
                await expect(page).to_have_title("Unsubscribe")
                await expect(page.get_by_role("heading", level=1)).to_have_text("Unsubscribe")
                await expect(page.locator("main p").first).to_have_text(
                    "Unsubscribe j***@example.test from news of acme?"
                )
                button = page.get_by_role("button", name="Unsubscribe")
                await expect(button).to_have_count(1)
                await expect(button).to_be_visible()
                # the stylesheet applied under the CSP (a hash mismatch would leave a grey default button)
                background = await button.evaluate("b => getComputedStyle(b).backgroundColor")
                assert background == "rgb(29, 78, 216)"
                assert await store.list_entries(include_expired=True) == []  # the GET changed nothing
                shot = tmp_path / "unsubscribe-page.png"
                await page.screenshot(path=shot)
                _keep(shot)

                async with page.expect_navigation() as nav:
                    await button.click()
                done = await nav.value
                assert done is not None and done.status == 200
                assert done.request.method == "POST" and done.url == url  # posted back, no redirect
                await expect(page).to_have_title("Unsubscribed")
                await expect(page.get_by_role("heading", level=1)).to_have_text("You are unsubscribed")
                await expect(page.locator("main p").first).to_have_text(
                    "j***@example.test will get no more mail from news of acme."
                )
                await expect(page.get_by_role("button")).to_have_count(0)
                shot = tmp_path / "unsubscribe-done.png"
                await page.screenshot(path=shot)
                _keep(shot)
            finally:
                await browser.close()
    finally:
        await runner.cleanup()

    [entry] = await store.list_entries(include_expired=True)
    assert (entry.address, entry.scope, entry.account, entry.list) == (ADDRESS, Scope.LIST, "acme", "news")
    assert (entry.reason, entry.source) == (Reason.UNSUBSCRIBE, "web")
    assert entry.created_at <= datetime.now(UTC)
    row = await queue.show(qid)
    assert row is not None and [r.state for r in row.recipients] == ["dropped"]
    assert problems == []  # no CSP violation, no script error, nothing blocked
