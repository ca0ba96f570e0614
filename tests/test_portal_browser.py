"""The customer portal in a real headless Chromium (Debian's ``chromium``, driven by Playwright).

One administrator's way through every page, each step checked against what the BBB API
and the admin API do next; axe-core (npm, pinned in ``tests/clients/axe``) and a
keyboard walk check every page's accessibility; the screenshots in ``docs/screenshots``
(shown in the README) are written here when ``BBB_PROXY_SCREENSHOTS=1`` (``./run
screenshots``), else into a temporary folder, so a test run leaves the tree as it was.
``./run test`` installs Chromium when missing (``BBB_PROXY_NEED_CHROMIUM=1``: then a
missing browser fails this test instead of skipping).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from lxml import etree

from proxy.bbb.checksum import signed_query
from tests import npm
from tests.harness import StackFactory

CHROMIUM = "/usr/bin/chromium"
AXE = Path(__file__).resolve().parent / "clients" / "axe"
DOCS_SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
SCREENSHOTS = (
    DOCS_SCREENSHOTS
    if os.environ.get("BBB_PROXY_SCREENSHOTS") == "1"
    else Path(tempfile.gettempdir()) / f"bbb-proxy-screenshots-{os.getpid()}"
)
TOKEN = "browser-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PASSWORD = "a long portal password"
EMAIL = "it@acme.example"


def _chromium() -> str:
    found = shutil.which("chromium") or (CHROMIUM if Path(CHROMIUM).exists() else None)
    if found is None:
        message = "Debian's chromium is not installed (./run test installs it)"
        if os.environ.get("BBB_PROXY_NEED_CHROMIUM"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def bbb(api_url: str, call: str, params: list[tuple[str, str]], secret: str) -> tuple[str, str]:
    """A BBB call signed with ``secret``: (returncode, messageKey)."""
    response = httpx.get(f"{api_url}/{call}?{signed_query(call, params, secret)}", timeout=10)
    root = etree.fromstring(response.content)
    return root.findtext("returncode") or "", root.findtext("messageKey") or ""


class Walk:
    """The browser's side of the test, run in a worker thread (Playwright's sync API)."""

    def __init__(self, base: str, chromium: str, axe: Path) -> None:
        self.base, self.chromium, self.axe = base, chromium, axe
        self.admin = httpx.Client(base_url=f"{base}/admin/v1", headers=AUTH, timeout=10)
        self.checked: list[str] = []

    def run(self) -> None:
        from playwright.sync_api import sync_playwright

        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=self.chromium, args=["--no-sandbox"])
            try:
                self.administrator(browser)
                self.other_customer(browser)
            finally:
                browser.close()

    def context(self, browser: Any, **options: Any) -> Any:
        # bypass_csp: only so the test can inject axe-core; the pages' own CSP stays on.
        options.setdefault("viewport", {"width": 1000, "height": 900})
        return browser.new_context(bypass_csp=True, locale="en-GB", **options)

    def administrator(self, browser: Any) -> None:
        link = self.admin.post("customers/acme/admins", json={"email": EMAIL}).json()
        page = self.context(browser).new_page()
        # Accept the invitation and set a password.
        page.goto(link["invitation_url"])
        assert EMAIL in page.inner_text("main")
        self.check(page, "invitation")
        page.fill("#password", PASSWORD)
        page.fill("#repeated", PASSWORD)
        page.click("main button[type=submit]")
        assert page.url.endswith("/portal/login?done=password_set")
        assert "password is set" in page.inner_text("main")
        # Log in.
        self.check(page, "login")
        self.login(page, PASSWORD)
        assert page.url.endswith("/portal/customers/acme/api")
        api_url = page.input_value("#api-url")
        secret = page.input_value("#secret-1")
        assert api_url == f"{self.base}/acme/bigbluebutton/api"
        assert bbb(api_url, "getMeetings", [], secret)[0] == "SUCCESS"
        self.keyboard(page)
        assert page.inner_text("button.copy >> nth=1") == "Copy"
        page.click("button.copy >> nth=1")
        page.wait_for_function(
            "document.querySelectorAll('button.copy')[1].textContent == 'Copied'"
        )
        self.check(page, "api")
        # Off: the shown secret answers apiNotEnabled; no secret on the page.
        page.click("button[value=disable]")
        assert "disabled" in page.inner_text("#state")
        assert secret not in page.content()
        assert bbb(api_url, "getMeetings", [], secret) == ("FAILED", "apiNotEnabled")
        self.check(page, "api-off")
        page.click("button[value=enable]")
        assert bbb(api_url, "getMeetings", [], page.input_value("#secret-1"))[0] == "SUCCESS"
        # Defaults: errors beside the field; then a create without them reserves the new ones.
        page.click("nav.pages >> text=Defaults")
        page.fill("#default_max_participants", "500")
        page.fill("#default_duration", "soon")
        page.click("main button[type=submit]")
        assert "more than your subscription" in page.inner_text("#default_max_participants-error")
        assert "whole number" in page.inner_text("#default_duration-error")
        self.check(page, "defaults-errors")
        page.fill("#default_max_participants", "4")
        page.fill("#default_duration", "25")
        page.click("main button[type=submit]")
        assert "Saved." in page.inner_text("main")
        self.check(page, "defaults")
        params = [("meetingID", "weekly"), ("name", "Weekly")]
        assert bbb(api_url, "create", params, secret)[0] == "SUCCESS"
        (meeting,) = self.admin.get("meetings", params={"customer": "acme"}).json()
        assert (meeting["connections"], meeting["duration_minutes"]) == (4, 25)
        # Rotate: the new one and the old one are both accepted, both shown with an expiry.
        page.click("nav.pages >> text=Integration API")
        page.click("button[value=rotate]")
        new, old = page.input_value("#secret-1"), page.input_value("#secret-2")
        assert old == secret and new != secret
        assert "Valid until: 20" in page.inner_text(".secrets")
        for valid in (new, old):
            assert bbb(api_url, "getMeetings", [], valid)[0] == "SUCCESS"
        self.check(page, "api-rotated")
        # Usage, in English and in German.
        page.click("nav.pages >> text=Usage")
        assert "weekly" in page.inner_text("table") and "Reserved until" in page.inner_text("table")
        assert "4 connections" in page.inner_text("#reserved")
        self.check(page, "usage")
        page.click("text=Deutsch")
        assert page.inner_text("h1") == "Nutzung"
        self.check(page, "usage-de")
        page.click("text=English")
        # On a phone.
        page.set_viewport_size({"width": 390, "height": 844})
        page.click("nav.pages >> text=Integration API")
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, f"the page is {width}px wide on a 390px phone"
        page.screenshot(path=str(SCREENSHOTS / "portal-phone.png"), full_page=True)
        page.set_viewport_size({"width": 1000, "height": 900})
        # Log out: the pages are closed.
        page.click("button:has-text('Log out')")
        assert page.url.endswith("/portal/login?done=logged_out")
        for name in ("api", "defaults", "usage"):
            page.goto(f"{self.base}/portal/customers/acme/{name}")
            assert page.url.endswith("/portal/login"), name
        # A wrong password several times: throttled, even for the right one afterwards.
        for _ in range(3):
            self.login(page, "not the password")
            assert "wrong" in page.inner_text("[role=alert]")
        self.login(page, "not the password")
        assert "Too many failed logins" in page.inner_text("[role=alert]")
        self.check(page, "login-throttled")
        self.login(page, PASSWORD)
        assert "Too many failed logins" in page.inner_text("[role=alert]")
        assert page.url.endswith("/portal/login")
        page.context.close()

    def other_customer(self, browser: Any) -> None:
        """globex's administrator is refused every page and form of acme."""
        link = self.admin.post("customers/globex/admins", json={"email": "it@globex.example"})
        page = self.context(browser).new_page()
        page.goto(link.json()["invitation_url"])
        page.fill("#password", PASSWORD)
        page.fill("#repeated", PASSWORD)
        page.click("main button[type=submit]")
        self.unthrottled()
        page.fill("#email", "it@globex.example")
        page.fill("#password", PASSWORD)
        page.click("main button[type=submit]")
        assert page.url.endswith("/portal/customers/globex/api")
        csrf = page.input_value("input[name=csrf] >> nth=0")
        for name in ("api", "defaults", "usage"):
            response = page.goto(f"{self.base}/portal/customers/acme/{name}")
            assert response is not None and response.status == 404, name
            assert "acme-secret" not in page.content()
            posted = page.request.post(
                f"{self.base}/portal/customers/acme/{name}",
                form={"csrf": csrf, "action": "disable", "default_max_participants": "1",
                      "default_duration": "1"},
            )  # fmt: skip
            assert posted.status == 404, name
        customer = self.admin.get("customers/acme").json()
        assert customer["enabled"] and customer["default_max_participants"] == 4
        page.context.close()

    def unthrottled(self) -> None:
        """The address's failed logins forgotten, as if the next login came from another
        address (the gateway runs in this process, in the test's trio loop)."""
        trio.from_thread.run_sync(self.forget_address)

    forget_address: Any = None

    def login(self, page: Any, password: str) -> None:
        page.goto(f"{self.base}/portal/login")
        page.fill("#email", EMAIL)
        page.fill("#password", password)
        page.click("main button[type=submit]")

    def check(self, page: Any, name: str) -> None:
        """axe-core on the page (no serious or critical violation), and its screenshot."""
        page.add_script_tag(path=str(self.axe / "node_modules" / "axe-core" / "axe.min.js"))
        result = page.evaluate("async () => await axe.run(document, {resultTypes: ['violations']})")
        serious = [
            f"{v['id']} ({v['impact']}): {[n['target'] for n in v['nodes']]}"
            for v in result["violations"]
            if v["impact"] in ("serious", "critical")
        ]
        assert not serious, f"{name}: {serious}"
        page.screenshot(path=str(SCREENSHOTS / f"portal-{name}.png"), full_page=True)
        self.checked.append(name)

    def keyboard(self, page: Any) -> None:
        """Tab reaches every control in order, each with a visible focus outline."""
        controls = page.evaluate(
            "document.querySelectorAll('a[href], button, input:not([type=hidden])').length"
        )
        seen = []
        for _ in range(controls):
            page.keyboard.press("Tab")
            focused = page.evaluate(
                """() => { const e = document.activeElement;
                   const s = getComputedStyle(e);
                   return [e.tagName, e.id || e.textContent.trim().slice(0, 30),
                           s.outlineStyle, s.outlineWidth]; }"""
            )
            assert focused[2] != "none" and focused[3] != "0px", f"no focus outline: {focused}"
            seen.append(focused[1])
        assert "api-url" in seen and "secret-1" in seen, seen


@pytest.mark.slow
async def test_the_portal_in_a_real_browser(make_stack: StackFactory) -> None:
    chromium = _chromium()
    axe = await trio.to_thread.run_sync(npm.installed, AXE)
    stack = await make_stack(
        proxy={"admin_token": TOKEN}, portal={"max_login_failures": 3, "login_lockout": 600}
    )
    walk = Walk(stack.url, chromium, axe)
    portal = stack.gateway.portal
    assert portal is not None
    walk.forget_address = lambda: portal.by_address.succeeded("127.0.0.1")
    await trio.to_thread.run_sync(walk.run)
    walk.admin.close()
    assert walk.checked == [
        "invitation", "login", "api", "api-off", "defaults-errors", "defaults", "api-rotated",
        "usage", "usage-de", "login-throttled",
    ]  # fmt: skip
    for name in walk.checked:
        assert (SCREENSHOTS / f"portal-{name}.png").stat().st_size > 1000
