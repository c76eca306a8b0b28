"""The dashboard in a real headless Chromium (Debian's, driven by Playwright): it loads with an admin
key, shows a session the test started, and releasing it from the page removes the node."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support import ManagerProcess, wait_until
from toolserver.client import ToolServerClient

CHROMIUM = shutil.which("chromium")
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium not installed; run scripts/ensure-chromium.sh"
)


def test_the_dashboard_shows_a_session_and_releases_it(
    manager_factory: Callable[..., ManagerProcess], tmp_path: Path
) -> None:
    from playwright.sync_api import expect, sync_playwright

    manager = manager_factory(auth="api_keys")
    admin, alice = manager.create_key("ops", "admin"), manager.create_key("alice", "user")
    with ToolServerClient(manager.url, api_key=alice) as client:
        session = client.get_cookie(labels={"suite": "dashboard"})
        for _ in range(5):
            session.execute_tool("calculator", {"expression": "1+1"})
    [record] = manager.nodes()
    short = record["short_id"]

    with sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=ARGS
        )
        try:
            page = browser.pages[0] if browser.pages else browser.new_page()
            page.set_default_timeout(20_000)
            page.goto(f"{manager.url}/dashboard")
            expect(page.locator("#login")).to_be_visible()  # no key yet: the page asks for one
            page.fill("#key", admin)
            page.click("#login-form button")
            row = page.locator(f'tr[data-short-id="{short}"]')
            expect(row).to_be_visible()
            expect(row).to_contain_text("alice")
            expect(row).to_contain_text("suite=dashboard")
            expect(page.locator("#latency")).to_contain_text("cold")
            expect(page.locator("#proxied-total")).to_have_text("5")
            expect(page.locator("#pool-target")).to_have_text("0")
            assert page.evaluate("sessionStorage.getItem('toolserver.adminKey')") == admin
            assert admin not in page.url

            # a key passed once in the fragment is kept and taken out of the address bar
            fresh = browser.new_page()
            fresh.goto(f"{manager.url}/dashboard#key={admin}")
            expect(fresh.locator(f'tr[data-short-id="{short}"]')).to_be_visible()
            assert fresh.url.endswith("/dashboard")
            fresh.close()

            page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
            page.on("dialog", lambda dialog: dialog.accept())
            row.locator('button[data-action="release"]').click()
            expect(row).to_have_count(0)
        finally:
            browser.close()
    assert manager.node(session.node_id) is None
    wait_until(lambda: manager.node_processes() == [], timeout=10, what="the node gone")
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000
    assert admin not in manager.log()
