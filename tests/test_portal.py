"""The customer portal ``/portal/`` over real sockets: invitations, logins, throttling, CSRF,
tenant isolation on every page and form, and each change seen in what the BBB API does."""

from __future__ import annotations

import logging
import re
import time
from typing import Any

import httpx
import orjson
import pytest
import trio
from lxml import etree

from proxy.bbb.checksum import signed_query
from proxy.errors import StorageUnavailable
from proxy.portal import sessions
from proxy.portal.service import PortalService, open_portal
from tests.harness import Stack, StackFactory, text
from tests.test_admin_cli import TOKEN, Cli

AUTH = {"Authorization": f"Bearer {TOKEN}"}
PASSWORD = "correct horse battery"
PAGES = ("api", "defaults", "usage")


class Browser:
    """One person's cookie jar on the portal (no redirects followed)."""

    def __init__(self, stack: Stack, lang: str = "en") -> None:
        self.stack = stack
        self.http = httpx.AsyncClient(
            base_url=stack.url, timeout=10, headers={"Accept-Language": lang}
        )
        self.csrf = ""

    async def get(self, path: str, expect: int = 200) -> str:
        response = await self.http.get(path)
        assert response.status_code == expect, (path, response.status_code, response.text)
        self._remember(response.text)
        return response.text

    async def post(
        self, path: str, data: dict[str, str], *, csrf: bool = True, expect: int = 303
    ) -> httpx.Response:
        form = {"csrf": self.csrf, **data} if csrf else data
        response = await self.http.post(path, data=form)
        assert response.status_code == expect, (path, response.status_code, response.text)
        self._remember(response.text)
        return response

    def _remember(self, html: str) -> None:
        found = re.search(r'name="csrf" value="([^"]+)"', html)
        if found:
            self.csrf = found.group(1)

    async def accept(self, link: str, password: str = PASSWORD) -> None:
        path = link.removeprefix(self.stack.url)
        await self.get(path)
        response = await self.post(path, {"password": password, "repeated": password})
        assert response.headers["location"] == "/portal/login?done=password_set"

    async def login(self, email: str, password: str = PASSWORD, expect: int = 303) -> str:
        await self.get("/portal/login")
        response = await self.post(
            "/portal/login", {"email": email, "password": password}, expect=expect
        )
        return str(response.headers.get("location", response.text))

    async def aclose(self) -> None:
        await self.http.aclose()


async def portal_stack(make_stack: StackFactory, **portal: Any) -> Stack:
    return await make_stack(proxy={"admin_token": TOKEN}, portal=portal)


async def invite(stack: Stack, customer: str, email: str, expect: int = 201) -> Any:
    response = await stack.http.post(
        f"{stack.url}/admin/v1/customers/{customer}/admins", headers=AUTH, json={"email": email}
    )
    assert response.status_code == expect, response.text
    return response.json()


async def admin_of(stack: Stack, customer: str, email: str) -> Browser:
    browser = Browser(stack)
    await browser.accept((await invite(stack, customer, email))["invitation_url"])
    assert await browser.login(email) == f"/portal/customers/{customer}/api"
    await browser.get(f"/portal/customers/{customer}/api")  # its pages' CSRF token
    return browser


def gateway_log(caplog: pytest.LogCaptureFixture) -> str:
    """What the gateway logged (not the test's own HTTP client)."""
    return "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("proxy"))


def portal(stack: Stack) -> PortalService:
    assert stack.gateway.portal is not None
    return stack.gateway.portal


async def bbb(stack: Stack, call: str, params: list[tuple[str, str]], secret: str) -> str:
    query = signed_query(call, params, secret)
    response = await stack.http.get(f"{stack.api()}/{call}?{query}")
    root = etree.fromstring(response.content)
    key = root.findtext("messageKey") or ""
    return text(root, "returncode") + ("/" + key if text(root, "returncode") != "SUCCESS" else "")


# -- invitations and logins --------------------------------------------------------------------


async def test_an_invitation_sets_a_password_once_and_opens_the_pages(
    make_stack: StackFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    stack = await portal_stack(make_stack)
    answer = await invite(stack, "acme", " Admin@Acme.Example ")
    link = answer["invitation_url"]
    assert answer["email"] == "admin@acme.example" and answer["customer"] == "acme"
    assert link.startswith(f"{stack.url}/portal/invitation?token=")
    assert answer["expires_at"] == pytest.approx(time.time() + 7 * 86400, abs=60)
    token = link.rsplit("=", 1)[1]
    browser = Browser(stack)
    page = await browser.get(link.removeprefix(stack.url))
    assert "admin@acme.example" in page and "acme" in page
    path = link.removeprefix(stack.url)
    for password, repeated, field in [("short", "short", "password"), (PASSWORD, "x", "repeated")]:
        page = (
            await browser.post(path, {"password": password, "repeated": repeated}, expect=400)
        ).text
        marked = re.search(rf'id="{field}"[^>]*aria-invalid="true"', page)
        assert marked, field
    await browser.accept(link)
    again = Browser(stack)
    await again.get("/portal/login")
    await again.get(path, expect=404)  # used up
    await again.post(path, {"password": PASSWORD, "repeated": PASSWORD}, expect=404)
    assert await browser.login("admin@acme.example", "wrong password", expect=401)
    assert await browser.login("ADMIN@acme.example") == "/portal/customers/acme/api"
    cookie = next(c for c in browser.http.cookies.jar if c.name == "bbb_portal_session")
    assert cookie.path == "/portal" and not cookie.secure
    assert cookie.has_nonstandard_attr("HttpOnly")
    page = await browser.get("/portal/customers/acme/api")
    assert "acme-secret" in page and f"{stack.url}/acme/bigbluebutton/api" in page
    logged = gateway_log(caplog)
    assert "admin@acme.example set a password" in logged
    for secret in (PASSWORD, token, "acme-secret"):
        assert secret not in logged
    listed = await stack.http.get(f"{stack.url}/admin/v1/customers/acme/admins", headers=AUTH)
    assert listed.json() == {
        "customer": "acme", "admins": [{"email": "admin@acme.example"}], "invitations": []
    }  # fmt: skip
    log_file = (stack.config.proxy.state_dir / "portal.log").read_bytes()
    assert PASSWORD.encode() not in log_file and token.encode() not in log_file
    await browser.aclose()
    await again.aclose()


async def test_invitation_input_errors_and_expiry(make_stack: StackFactory) -> None:
    stack = await portal_stack(make_stack, invitation_lifetime=60)
    bad = [({}, "email"), ({"email": "not-an-address"}, "email"), ({"email": 7}, "email"),
           ({"mail": "a@b.cd"}, "mail")]  # fmt: skip
    for body, field in bad:
        response = await stack.http.post(
            f"{stack.url}/admin/v1/customers/acme/admins", headers=AUTH, json=body
        )
        assert (response.status_code, response.json()["field"]) == (400, field), body
    response = await stack.http.post(
        f"{stack.url}/admin/v1/customers/nobody/admins", headers=AUTH, json={"email": "a@b.cd"}
    )
    assert response.status_code == 404
    response = await stack.http.post(
        f"{stack.url}/admin/v1/customers/acme/admins", json={"email": "a@b.cd"}
    )
    assert response.status_code == 404  # no token
    link = (await invite(stack, "acme", "late@acme.example"))["invitation_url"]
    service = portal(stack)
    service.clock = lambda: time.time() + 61
    browser = Browser(stack)
    await browser.get(link.removeprefix(stack.url), expect=404)
    service.clock = time.time
    await browser.accept(link)  # within its minute
    await invite(stack, "globex", "late@acme.example", expect=409)  # one customer per address
    await browser.aclose()


async def test_logins_are_throttled_per_account_and_per_address(make_stack: StackFactory) -> None:
    stack = await portal_stack(make_stack, max_login_failures=3, login_lockout=600)
    first = await admin_of(stack, "acme", "one@acme.example")
    other = await admin_of(stack, "globex", "two@globex.example")
    for _ in range(3):
        await first.login("one@acme.example", "wrong password", expect=401)
    page = await first.login("one@acme.example", expect=429)  # the right one, too late
    assert "Too many failed logins" in page
    # The address is locked as well: another account from it waits too.
    await other.login("two@globex.example", expect=429)
    service = portal(stack)
    service.by_address.succeeded("127.0.0.1")  # as if from another address
    await other.login("two@globex.example")
    await first.login("one@acme.example", expect=429)  # the account is still locked
    service.clock = lambda: time.time() + 601
    assert await first.login("one@acme.example") == "/portal/customers/acme/api"
    await first.aclose()
    await other.aclose()


# -- CSRF, sessions, logout --------------------------------------------------------------------


async def test_a_form_without_its_csrf_token_is_refused(make_stack: StackFactory) -> None:
    stack = await portal_stack(make_stack)
    browser = await admin_of(stack, "acme", "admin@acme.example")
    other = await admin_of(stack, "globex", "admin@globex.example")
    await browser.get("/portal/customers/acme/api")
    forms = [
        ("api", {"action": "disable"}),
        ("api", {"action": "rotate"}),
        ("defaults", {"default_max_participants": "3", "default_duration": "15"}),
    ]
    for page, data in forms:
        path = f"/portal/customers/acme/{page}"
        await browser.post(path, data, csrf=False, expect=403)
        await browser.post(path, {**data, "csrf": "forged"}, csrf=False, expect=403)
        await browser.post(path, {**data, "csrf": other.csrf}, csrf=False, expect=403)
    acme = stack.gateway.customer("acme")
    assert acme is not None and acme.enabled and acme.secrets == ("acme-secret",)
    assert acme.default_max_participants == 10
    await browser.post("/portal/logout", {}, csrf=False, expect=403)
    await browser.get("/portal/customers/acme/api")  # a logout without the token: still in
    anonymous = Browser(stack)
    await anonymous.get("/portal/login")
    await anonymous.post(
        "/portal/login", {"email": "admin@acme.example", "password": PASSWORD}, csrf=False,
        expect=403,
    )  # fmt: skip
    await browser.aclose()
    await other.aclose()
    await anonymous.aclose()


async def test_logout_closes_the_pages_even_for_a_copied_cookie(make_stack: StackFactory) -> None:
    stack = await portal_stack(make_stack)
    browser = await admin_of(stack, "acme", "admin@acme.example")
    copied = browser.http.cookies.get("bbb_portal_session")
    assert copied
    await browser.get("/portal/customers/acme/usage")
    response = await browser.post("/portal/logout", {})
    assert response.headers["location"] == "/portal/login?done=logged_out"
    for page in PAGES:
        response = await browser.http.get(f"/portal/customers/acme/{page}")
        assert (response.status_code, response.headers["location"]) == (303, "/portal/login")
    thief = httpx.AsyncClient(base_url=stack.url, cookies={"bbb_portal_session": copied})
    response = await thief.get("/portal/customers/acme/api")
    assert response.status_code == 303 and "acme-secret" not in response.text
    # A session ends by itself after session_lifetime, and a tampered cookie is nobody's.
    again = await admin_of(stack, "acme", "admin@acme.example")  # re-invited: new password
    sealed = again.http.cookies.get("bbb_portal_session")
    assert sealed
    tampered = sealed[:-2] + ("AA" if not sealed.endswith("AA") else "BB")
    thief.cookies.set("bbb_portal_session", tampered)
    assert (await thief.get("/portal/customers/acme/api")).status_code == 303
    service = portal(stack)
    service.clock = lambda: time.time() + service.settings.session_lifetime + 1
    assert (await again.http.get("/portal/customers/acme/api")).status_code == 303
    await browser.aclose()
    await again.aclose()
    await thief.aclose()


async def test_the_admins_and_closed_sessions_survive_a_restart(make_stack: StackFactory) -> None:
    stack = await portal_stack(make_stack)
    browser = await admin_of(stack, "acme", "admin@acme.example")
    copied = browser.http.cookies.get("bbb_portal_session")
    await browser.post("/portal/logout", {})
    pending = await invite(stack, "globex", "later@globex.example")
    replayed = open_portal(stack.config)  # what a restart reads from state_dir
    state = portal(stack).state
    assert replayed.state.admins == state.admins and set(replayed.state.admins) == {
        "admin@acme.example"
    }
    assert replayed.state.invitations == state.invitations
    assert replayed.state.closed == state.closed and len(state.closed) == 1
    assert replayed.key == portal(stack).key  # sessions stay signed with the same key
    session = sessions.opened(replayed.key, copied, time.time())
    assert session is not None and replayed.current(session) is None  # still logged out
    token = pending["invitation_url"].rsplit("=", 1)[1]
    assert replayed.state.invitation(token, time.time()) is not None
    await replayed.log.compact(list(replayed.state.records()))
    again = open_portal(stack.config)
    assert again.state.admins == state.admins and again.state.closed == state.closed
    await browser.aclose()


# -- tenant isolation --------------------------------------------------------------------------


async def test_an_administrator_sees_and_changes_only_its_own_customer(
    make_stack: StackFactory,
) -> None:
    stack = await portal_stack(make_stack)
    globex = await admin_of(stack, "globex", "admin@globex.example")
    acme_admin = await admin_of(stack, "acme", "admin@acme.example")
    own = await globex.get("/portal/customers/globex/api")
    assert "globex-new" in own and "acme-secret" not in own
    before = stack.gateway.customer("acme")
    tampered = ["acme", "ACME", "acme/", "off", "nobody", "globex/../acme", "%61cme"]
    for customer in tampered:
        for page in (*PAGES, "credentials", "secrets"):
            path = f"/portal/customers/{customer}/{page}"
            response = await globex.http.get(path)
            assert response.status_code == 404, path
            assert "acme-secret" not in response.text and "globex-new" not in response.text
            for data in (
                {"action": "disable"},
                {"action": "rotate"},
                {"default_max_participants": "1", "default_duration": "1"},
            ):
                response = await globex.http.post(path, data={"csrf": globex.csrf, **data})
                assert response.status_code == 404, path
    # A form of its own page with the other customer's id in it changes only its own.
    await globex.post(
        "/portal/customers/globex/defaults",
        {"default_max_participants": "7", "default_duration": "45", "customer": "acme"},
    )
    assert stack.gateway.customer("acme") == before
    changed = stack.gateway.customer("globex")
    assert changed is not None and changed.default_max_participants == 7
    for path in ("/portal/customers/globex", "/portal/acme/api", "/portal/customers/", "/portal/x"):
        assert (await globex.http.get(path)).status_code == 404, path
    # The other customer removed: its administrator's pages close.
    pending = await invite(stack, "globex", "next@globex.example")
    await stack.http.delete(f"{stack.url}/admin/v1/customers/globex", headers=AUTH)
    assert (await globex.http.get("/portal/customers/globex/api")).status_code in (303, 404)
    state = portal(stack).state
    assert not state.admins_of("globex")  # removed with it, invitations withdrawn
    assert state.invitation(pending["invitation_url"].rsplit("=", 1)[1], time.time()) is None
    assert [a.email for a in state.admins_of("acme")] == ["admin@acme.example"]
    await globex.aclose()
    await acme_admin.aclose()


# -- each change changes what the BBB API does -------------------------------------------------


async def test_the_api_switch_rotation_and_defaults_change_the_bbb_api(
    make_stack: StackFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    stack = await portal_stack(make_stack)
    browser = await admin_of(stack, "acme", "admin@acme.example")
    assert await bbb(stack, "getMeetings", [], "acme-secret") == "SUCCESS"
    await browser.post("/portal/customers/acme/api", {"action": "disable"})
    page = await browser.get("/portal/customers/acme/api")
    assert "acme-secret" not in page and "apiNotEnabled" in page
    assert await bbb(stack, "getMeetings", [], "acme-secret") == "FAILED/apiNotEnabled"
    assert (
        await bbb(stack, "create", [("meetingID", "m"), ("name", "M")], "acme-secret")
        == "FAILED/apiNotEnabled"
    )
    await browser.post("/portal/customers/acme/api", {"action": "rotate"}, expect=409)
    await browser.post("/portal/customers/acme/api", {"action": "enable"})
    assert await bbb(stack, "getMeetings", [], "acme-secret") == "SUCCESS"
    await browser.post("/portal/customers/acme/api", {"action": "rotate"})
    page = await browser.get("/portal/customers/acme/api?done=rotated")
    shown = re.findall(r'class="secret" readonly value="([^"]+)"', page)
    assert len(shown) == 2 and shown[1] == "acme-secret"
    assert "Valid until: no end" in page and "Valid until: 20" in page
    for secret in shown:
        assert await bbb(stack, "getMeetings", [], secret) == "SUCCESS"
    # Defaults: a create without maxParticipants/duration reserves the new values.
    await browser.post(
        "/portal/customers/acme/defaults",
        {"default_max_participants": "4", "default_duration": "25"},
    )
    assert (
        await bbb(stack, "create", [("meetingID", "room"), ("name", "Room")], shown[0]) == "SUCCESS"
    )
    reservation = stack.gateway.ledger.get(("acme", "room"))
    assert reservation is not None and (reservation.connections, reservation.duration) == (4, 25)
    usage = await browser.get("/portal/customers/acme/usage")
    assert "room" in usage and "Reserved until" in usage and "4 connections" in usage
    assert "20 connections" in usage  # the subscription
    ledger = stack.gateway.ledger
    ledger.clock = lambda: time.time() + 26 * 60  # past its 25 minutes
    usage = await browser.get("/portal/customers/acme/usage")
    assert "overtime" in usage and "Reserved until" not in usage
    ledger.clock = time.time
    changes = [r.getMessage() for r in caplog.records if r.name == "proxy.portal.web"]
    assert any("disabled by admin@acme.example" in m for m in changes)
    assert any("secret rotated by admin@acme.example" in m for m in changes)
    assert any("defaults" in m and "admin@acme.example" in m for m in changes)
    for secret in shown:
        assert secret not in gateway_log(caplog)
    await browser.aclose()


async def test_bad_defaults_are_shown_beside_their_field(make_stack: StackFactory) -> None:
    stack = await portal_stack(make_stack)
    browser = await admin_of(stack, "acme", "admin@acme.example")
    cases = [
        ({"default_max_participants": "abc", "default_duration": "30"}, "whole number"),
        ({"default_max_participants": "0", "default_duration": "30"}, "whole number"),
        ({"default_max_participants": "21", "default_duration": "30"}, "more than your"),
        ({"default_max_participants": "2.5", "default_duration": "30"}, "whole number"),
        ({"default_max_participants": "5", "default_duration": "-3"}, "whole number"),
        ({"default_max_participants": "5", "default_duration": "99999"}, "at most"),
        ({"default_max_participants": "5"}, "whole number"),
    ]
    for data, message in cases:
        page = (await browser.post("/portal/customers/acme/defaults", data, expect=400)).text
        assert message in page, data
        assert 'aria-invalid="true"' in page
    acme = stack.gateway.customer("acme")
    assert acme is not None and (acme.default_max_participants, acme.default_duration) == (10, 60)
    await browser.post(
        "/portal/customers/acme/defaults",
        {"default_max_participants": "20", "default_duration": "90"},
    )
    acme = stack.gateway.customer("acme")
    assert acme is not None and (acme.default_max_participants, acme.default_duration) == (20, 90)
    await browser.aclose()


async def test_pages_in_german_and_the_switch(make_stack: StackFactory) -> None:
    stack = await portal_stack(make_stack)
    browser = Browser(stack, lang="de-DE,de;q=0.9,en;q=0.5")
    assert "Anmelden" in await browser.get("/portal/login")
    response = await browser.http.get("/portal/login?lang=en")
    assert response.status_code == 303
    assert "Log in" in await browser.get("/portal/login")
    await browser.aclose()


async def test_the_portal_can_be_turned_off(make_stack: StackFactory) -> None:
    stack = await portal_stack(make_stack, enabled=False)
    assert stack.gateway.portal is None
    assert (await stack.http.get(f"{stack.url}/portal/login")).status_code == 404
    await invite(stack, "acme", "a@acme.example", expect=404)


async def test_the_cli_invites_an_administrator(
    make_stack: StackFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    stack = await portal_stack(make_stack)
    cli = Cli(stack, capsys)
    printed = await cli("customers", "invite", "acme", "cli@acme.example")
    link = printed.strip().splitlines()[-1]
    assert link.startswith(f"{stack.url}/portal/invitation?token=") and "usable once" in printed
    listed = await cli("customers", "admins", "acme")
    assert "cli@acme.example" in listed and "invited until" in listed
    browser = Browser(stack)
    await browser.accept(link)
    assert "active" in await cli("customers", "admins", "acme")
    assert "administers another customer" in await cli(
        "customers", "invite", "globex", "cli@acme.example", expect=1
    )
    assert await browser.login("cli@acme.example") == "/portal/customers/acme/api"
    await browser.get("/portal/customers/acme/api")
    assert "no administrator" in await cli(
        "customers", "remove-admin", "globex", "cli@acme.example", expect=1
    )
    removed = await cli("customers", "remove-admin", "acme", "CLI@acme.example")
    assert "cli@acme.example of acme removed" in removed
    response = await browser.http.get("/portal/customers/acme/api")
    assert response.status_code == 303  # its session ended with it
    await browser.login("cli@acme.example", expect=401)
    answer = orjson.loads(await cli("customers", "invite", "acme", "b@acme.example", "--json"))
    assert answer["invitation_url"].startswith(stack.url)
    await browser.aclose()
    await trio.lowlevel.checkpoint()


async def test_cookies_are_secure_behind_https(make_stack: StackFactory) -> None:
    stack = await make_stack(proxy={"admin_token": TOKEN, "public_url": "https://bbb.example"})
    link = (await invite(stack, "acme", "admin@acme.example"))["invitation_url"]
    assert link.startswith("https://bbb.example/portal/invitation?token=")
    # httpx, like a browser, sends no Secure cookie over http: the test sends them itself.
    local = link.replace("https://bbb.example", stack.url)
    response = await stack.http.get(local)
    pre = response.cookies["bbb_portal_form"]
    assert "Secure" in response.headers["set-cookie"]
    csrf = re.search(r'name="csrf" value="([^"]+)"', response.text)
    assert csrf is not None
    response = await stack.http.post(
        local,
        data={"csrf": csrf.group(1), "password": PASSWORD, "repeated": PASSWORD},
        headers={"Cookie": f"bbb_portal_form={pre}"},
    )
    assert response.status_code == 303
    response = await stack.http.post(
        f"{stack.url}/portal/login",
        data={"csrf": csrf.group(1), "email": "admin@acme.example", "password": PASSWORD},
        headers={"Cookie": f"bbb_portal_form={pre}"},
    )
    assert response.status_code == 303
    cookie = response.headers["set-cookie"]
    assert cookie.startswith("bbb_portal_session=")
    for attribute in ("Secure", "HttpOnly", "SameSite=Lax", "Path=/portal", "Max-Age=28800"):
        assert attribute in cookie, attribute


class BrokenLog:
    """A store that cannot write."""

    failed = True

    def append(self, record: Any) -> None:
        raise AssertionError("nothing is appended to a failed log")

    async def flush(self) -> None:
        raise StorageUnavailable()

    async def compact(self, records: Any) -> None:
        raise StorageUnavailable()


async def test_a_portal_store_that_cannot_write_changes_nothing(make_stack: StackFactory) -> None:
    stack = await portal_stack(make_stack)
    link = (await invite(stack, "acme", "admin@acme.example"))["invitation_url"]
    portal(stack).log = BrokenLog()
    response = await stack.http.post(
        f"{stack.url}/admin/v1/customers/acme/admins", headers=AUTH, json={"email": "b@a.example"}
    )
    assert response.status_code == 503
    browser = Browser(stack)
    path = link.removeprefix(stack.url)
    await browser.get(path)
    page = await browser.post(path, {"password": PASSWORD, "repeated": PASSWORD}, expect=503)
    assert "could not be saved" in page.text
    assert not portal(stack).state.admins
    assert portal(stack).state.invitation(link.rsplit("=", 1)[1], time.time()) is not None
    await browser.aclose()
