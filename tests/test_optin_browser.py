"""Double opt-in in a real headless Chromium: the confirm link of a delivered confirmation mail, the page a
person sees, the button, the consent recorded with time and IP.

Why a real browser (as in ``test_unsubscribe_browser.py``): only a browser proves that the page works under
its own Content-Security-Policy (inline stylesheet by hash, no script), that ``<form method="post">`` posts
back to the token URL, and, for a list with ``redirect``, that the 303 to the sender's site after the POST
is not blocked by ``form-action`` (browsers apply it to redirects after a form submission). The mail comes
from a real ``relayd serve`` through an aiosmtpd sink, so the link is the one a recipient would click.

Needs the Debian package ``chromium`` and the PyPI package ``playwright``, driven against
``/usr/bin/chromium`` (``playwright install`` is never run). When either is missing this test FAILS, it does
not skip.

``RELAYD_SCREENSHOT_DIR=docs`` makes the test write ``confirm-page.png`` and ``confirm-done.png`` there as
well as into its tmp directory.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email import message_from_bytes
from email.policy import compat32
from pathlib import Path

import pytest
from aiohttp import web
from playwright.async_api import BrowserContext, async_playwright, expect

from relayd.store import SqliteStore
from tests.harness import PASSWORD_HASH, Relayd, Sink, submit_each, wait_until

CHROMIUM = Path("/usr/bin/chromium")
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
CONFIRM = re.compile(r"http://127\.0\.0\.1:[0-9]+/c/[a-z2-7]{16}-[0-9]+-[a-z2-7]{16}")


def accounts(welcome_url: str) -> str:
    return f"""
[accounts.acme]
password_hash = "{PASSWORD_HASH}"
domains = ["acme.example.test"]
imprint = "ACME Ltd, 1 Test Street"

[accounts.acme.lists.news]
require_consent = true

[accounts.acme.lists.offers]
require_consent = true
redirect = "{welcome_url}"
"""


def confirmation_mail(list_name: str) -> bytes:
    return (
        "From: ACME <news@acme.example.test>\r\nTo: Jane <jane.doe@example.test>\r\n"
        f"Subject: Please confirm your subscription\r\nX-Relayd-Optin: {list_name}\r\n"
        f"Message-ID: <optin-{list_name}@acme.example.test>\r\nDate: Mon, 23 Nov 2026 12:00:00 +0000\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        "Hello Jane,\r\n\r\nplease confirm that you want our newsletter:\r\n{{confirm_url}}\r\n"
    ).encode()


def _keep(shot: Path) -> None:
    target = os.environ.get("RELAYD_SCREENSHOT_DIR")
    if target:
        shutil.copyfile(shot, Path(target) / shot.name)


@pytest.fixture
async def welcome_site() -> AsyncIterator[str]:
    """The sender's own 'thank you' page on another origin (another port), for the list's ``redirect``."""

    async def no_icon(request: web.Request) -> web.Response:
        return web.Response(status=204)

    async def welcome(request: web.Request) -> web.Response:
        return web.Response(
            text="<!doctype html><title>Welcome</title><h1>Welcome aboard</h1>", content_type="text/html"
        )

    app = web.Application()
    app.router.add_get("/welcome", welcome)
    app.router.add_get("/favicon.ico", no_icon)  # a 404 would show up as a console error
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}/welcome"
    finally:
        await runner.cleanup()


def delivered_link(sink: Sink, list_name: str) -> str:
    """The confirm URL in the text body of the confirmation mail for ``list_name`` the sink received."""
    subject_mails = [m.data for m in sink.messages if f"<optin-{list_name}@".encode() in m.data]
    assert len(subject_mails) == 1
    msg = message_from_bytes(subject_mails[0], policy=compat32)
    assert msg["X-Relayd-Optin"] is None
    body = msg.get_payload(decode=True)
    assert isinstance(body, bytes)
    found = CONFIRM.findall(body.decode())
    assert len(found) == 1, found
    return str(found[0])


async def launch(pw_ctx: object, tmp_path: Path) -> BrowserContext:
    from playwright.async_api import Playwright

    assert isinstance(pw_ctx, Playwright)
    return await pw_ctx.chromium.launch_persistent_context(
        tmp_path / "profile",
        executable_path=CHROMIUM,
        headless=True,
        args=CHROMIUM_FLAGS,
        viewport={"width": 720, "height": 480},
        color_scheme="light",
        java_script_enabled=True,  # the page needs none; on, a stray script would be noticed
    )


async def test_double_opt_in_in_chromium(tmp_path: Path, sink: Sink, welcome_site: str) -> None:
    assert CHROMIUM.exists(), f"{CHROMIUM} missing: apt-get install chromium chromium-driver"
    problems: list[str] = []
    with Relayd(tmp_path, routes={"example.test": sink.port}, accounts=accounts(welcome_site)) as relayd:
        for list_name in ("news", "offers"):
            tx = submit_each(relayd, confirmation_mail(list_name), to=[ADDRESS])
            assert tx.data is not None and tx.data[0] == 250, tx.data
        assert wait_until(lambda: len(sink.messages) == 2)
        news_url, offers_url = delivered_link(sink, "news"), delivered_link(sink, "offers")
        store = SqliteStore(tmp_path / "relayd.db")
        await store.open()
        try:
            async with async_playwright() as pw:
                browser = await launch(pw, tmp_path)
                try:
                    page = browser.pages[0] if browser.pages else await browser.new_page()
                    page.set_default_timeout(15_000)
                    page.on("console", lambda msg: problems.append(f"console {msg.type}: {msg.text}"))
                    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))

                    # the confirm page: a question and one button; opening it records nothing
                    response = await page.goto(news_url)
                    assert response is not None and response.status == 200
                    await expect(page).to_have_title("Confirm subscription")
                    await expect(page.get_by_role("heading", level=1)).to_have_text(
                        "Confirm your subscription"
                    )
                    await expect(page.locator("main p").first).to_have_text(
                        "Send mail from news of acme to j***@example.test?"
                    )
                    button = page.get_by_role("button", name="Confirm subscription")
                    await expect(button).to_have_count(1)
                    await expect(button).to_be_visible()
                    background = await button.evaluate("b => getComputedStyle(b).backgroundColor")
                    assert background == "rgb(29, 78, 216)"  # the stylesheet applied under the CSP
                    assert await store.get_consent("acme", "news", ADDRESS) is None
                    shot = tmp_path / "confirm-page.png"
                    await page.screenshot(path=shot)
                    _keep(shot)

                    clicked = datetime.now(UTC)
                    async with page.expect_navigation() as nav:
                        await button.click()
                    done = await nav.value
                    assert done is not None and done.status == 200
                    assert done.request.method == "POST" and done.url == news_url
                    await expect(page).to_have_title("Subscription confirmed")
                    await expect(page.get_by_role("heading", level=1)).to_have_text(
                        "Your subscription is confirmed"
                    )
                    await expect(page.locator("main p").first).to_have_text(
                        "j***@example.test will get mail from news of acme."
                    )
                    await expect(page.get_by_role("button")).to_have_count(0)
                    shot = tmp_path / "confirm-done.png"
                    await page.screenshot(path=shot)
                    _keep(shot)

                    record = await store.get_consent("acme", "news", ADDRESS)
                    assert record is not None
                    assert record.ip == "127.0.0.1" and record.source == "double-opt-in"
                    assert clicked - timedelta(seconds=1) <= record.confirmed_at <= datetime.now(UTC)
                    assert record.user_agent is not None and "Chrome" in record.user_agent

                    # a list with `redirect`: the button ends on the sender's page on another origin
                    await page.goto(offers_url)
                    assert await store.get_consent("acme", "offers", ADDRESS) is None
                    async with page.expect_navigation(url=welcome_site):
                        await page.get_by_role("button", name="Confirm subscription").click()
                    await expect(page.get_by_role("heading", level=1)).to_have_text("Welcome aboard")
                    offers = await store.get_consent("acme", "offers", ADDRESS)
                    assert offers is not None and offers.ip == "127.0.0.1"
                finally:
                    await browser.close()
        finally:
            await store.close()
    assert problems == []  # no CSP violation, no script error, nothing blocked
