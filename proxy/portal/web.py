"""The portal's pages under ``/portal/``: routes only, each a few lines.

Every customer page is ``/portal/customers/<customer>/<page>``: it needs a session of an
administrator of exactly that customer; any other customer id (URL tampering, a deleted
customer) answers the same 404 page as a page that does not exist.  Every POST checks
the session first, then the form's CSRF token, then the form.  Each change goes through
the admin API's own handler (:func:`proxy.admin.handle`), so it is applied at once,
made durable in the runtime log and counted exactly as an operator's change; a log line
names the customer, what changed and the administrator, never a value or a secret.

Error handling: nothing a browser sends raises out of a route; a change that cannot be
made durable shows the page again with a message (HTTP 503).
"""

from __future__ import annotations

import logging
import secrets as tokens
import time
from typing import Any
from urllib.parse import quote

import orjson
from quart import Blueprint, Response, render_template, request
from quart_trio import QuartTrio

from proxy import admin, admin_views, request_log
from proxy.errors import StorageUnavailable
from proxy.gateway import Gateway
from proxy.portal import forms, sessions, texts
from proxy.portal.service import PortalService, Refusal, check_email, open_portal

log = logging.getLogger(__name__)

SESSION_COOKIE = "bbb_portal_session"
PRE_COOKIE = "bbb_portal_form"  # binds the CSRF token of the login and invitation forms
LANG_COOKIE = "bbb_portal_lang"
PAGES = ("api", "defaults", "usage")
DONE = ("changed", "rotated", "password_set", "logged_out")  # messages after a redirect
HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'self'; form-action 'self'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # an invitation's token is in its URL
}


def install(app: QuartTrio, gw: Gateway) -> None:
    """Open the portal's state and register its routes (``[portal] enabled``).  Blocking:
    at start-up.  Error handling: ``StateError`` for a portal log that cannot be read."""
    if not gw.config.portal.enabled:
        return
    portal = open_portal(gw.config)
    gw.portal = portal
    gw.stores["portal"] = portal.log
    portal.start(gw)
    app.register_blueprint(_blueprint(gw, portal))


def _blueprint(gw: Gateway, portal: PortalService) -> Blueprint:
    bp = Blueprint(
        "portal",
        __name__,
        url_prefix="/portal",
        template_folder="templates",
        static_folder="static",
    )
    pages = _Pages(gw, portal)
    bp.add_url_rule("/", "home", pages.home, methods=["GET"])
    bp.add_url_rule("/login", "login", pages.login, methods=["GET", "POST"])
    bp.add_url_rule("/logout", "logout", pages.logout, methods=["POST"])
    # The token is in the query: request logs never show a query string (proxy.request_log).
    bp.add_url_rule("/invitation", "invitation", pages.invitation, methods=["GET", "POST"])
    bp.add_url_rule("/customers/<customer>/<page>", "page", pages.page, methods=["GET", "POST"])
    bp.add_url_rule("/<path:rest>", "unknown", pages.unknown, methods=["GET", "POST"])
    return bp


class _Pages:
    def __init__(self, gw: Gateway, portal: PortalService) -> None:
        self.gw, self.portal = gw, portal
        self.secure = gw.config.proxy.public_url.startswith("https://")

    # -- pages without a session -----------------------------------------------------------

    async def home(self) -> Response:
        session = self._session()
        if session is None:
            return _see("/portal/login")
        return _see(f"/portal/customers/{quote(session.customer)}/api")

    async def login(self) -> Response:
        if request.method == "GET":
            if (switched := self._switched()) is not None:
                return switched
            return await self._anonymous("login.html", email="")
        form = await request.form
        email = form.get("email", "").strip().lower()[:254]
        if not self._csrf_ok(None, form):
            return await self._anonymous("login.html", 403, email=email, error="csrf")
        try:
            session = await self.portal.login(email, form.get("password", ""), _client())
        except Refusal as refused:
            status = 429 if refused.key == "throttled" else 401
            return await self._anonymous("login.html", status, email=email, error=refused.key)
        response = _see(f"/portal/customers/{quote(session.customer)}/api")
        self._set_cookie(response, SESSION_COOKIE, sessions.sealed(self.portal.key, session),
                         max_age=int(self.portal.settings.session_lifetime))  # fmt: skip
        return response

    async def logout(self) -> Response:
        session = self._session()
        form = await request.form
        if session is not None and not self._csrf_ok(session, form):
            return await self._render("missing.html", 403, session=session, error="csrf")
        if session is not None:
            try:
                await self.portal.logout(session)
            except StorageUnavailable:
                log.warning("portal: a logout could not be made durable; the cookie is cleared")
        response = _see("/portal/login?done=logged_out")
        response.delete_cookie(SESSION_COOKIE, path="/portal", secure=self.secure, httponly=True)
        return response

    async def invitation(self) -> Response:
        token = request.args.get("token", "")[:200]
        found = self.portal.state.invitation(token, self.portal.clock())
        if request.method == "GET":
            if (switched := self._switched()) is not None:
                return switched
            return await self._anonymous("invitation.html", 200 if found else 404, found=found,
                                         error=None if found else "invitation")  # fmt: skip
        form = await request.form
        if not self._csrf_ok(None, form):
            return await self._anonymous("invitation.html", 403, found=found, error="csrf")
        try:
            await self.portal.accept(token, form.get("password", ""), form.get("repeated", ""))
        except Refusal as refused:
            status = 404 if refused.key == "invitation" else 400
            return await self._anonymous("invitation.html", status, found=found,
                                         error=refused.key, field=refused.field)  # fmt: skip
        except StorageUnavailable:
            return await self._anonymous("invitation.html", 503, found=found, error="storage")
        return _see("/portal/login?done=password_set")

    async def unknown(self, rest: str) -> Response:
        return await self._render("missing.html", 404)

    # -- a customer's pages ----------------------------------------------------------------

    async def page(self, customer: str, page: str) -> Response:
        session = self._session()
        if session is None:
            return _see("/portal/login")
        if session.customer != customer or page not in PAGES or self.gw.customer(customer) is None:
            return await self._render("missing.html", 404, session=session)
        if request.method == "GET":
            if (switched := self._switched()) is not None:
                return switched
            return await self._show(session, page)
        form = await request.form
        if not self._csrf_ok(session, form):
            log.warning("portal: form of %s without a valid CSRF token (%s)", customer, page)
            return await self._show(session, page, status=403, error="csrf")
        try:
            if page == "api":
                return await self._post_api(session, form.get("action", ""))
            if page == "defaults":
                return await self._post_defaults(session, form)
        except StorageUnavailable:
            return await self._show(session, page, status=503, error="storage")
        return await self._render("missing.html", 404, session=session)

    async def _post_api(self, session: sessions.Session, action: str) -> Response:
        cid = session.customer
        if action in ("enable", "disable"):
            await self._admin("PATCH", (cid,), {"enabled": action == "enable"})
            log.info("portal: customer %s: Integration API %sd by %s", cid, action, session.email)
            return _see(f"/portal/customers/{quote(cid)}/api?done=changed")
        if action == "rotate":
            customer = self.gw.customer(cid)
            if customer is None or not customer.enabled:  # no secret while the API is off
                return await self._show(session, "api", status=409)
            await self._admin("POST", (cid, "secrets"), {})
            log.info("portal: customer %s: secret rotated by %s", cid, session.email)
            return _see(f"/portal/customers/{quote(cid)}/api?done=rotated")
        return await self._show(session, "api", status=400)

    async def _post_defaults(self, session: sessions.Session, form: Any) -> Response:
        cid = session.customer
        customer = self.gw.customer(cid)
        assert customer is not None  # checked by page(), no await since
        checked = forms.defaults(form, customer.max_connections)
        if checked.errors:
            return await self._show(session, "defaults", status=400, errors=checked.errors,
                                    given=dict(form))  # fmt: skip
        await self._admin("PATCH", (cid,), checked.values)
        log.info("portal: customer %s: defaults (%s) changed by %s",
                 cid, ", ".join(sorted(checked.values)), session.email)  # fmt: skip
        return _see(f"/portal/customers/{quote(cid)}/defaults?done=changed")

    async def _admin(self, method: str, parts: tuple[str, ...], body: object) -> Any:
        call = admin.Call(method, ("customers", *parts), {}, orjson.dumps(body))
        status, document = await admin.handle(self.gw, call)
        if status == 503:
            raise StorageUnavailable()
        if status >= 300:
            log.warning("portal: change refused by the admin API (%s)", status)
            raise StorageUnavailable()  # shown as "could not be saved"; nothing changed
        return document

    async def _show(
        self, session: sessions.Session, page: str, *, status: int = 200, **extra: Any
    ) -> Response:
        cid = session.customer
        customer = self.gw.customer(cid)
        assert customer is not None
        context: dict[str, Any] = {"customer": customer, "page": page, "session": session}
        if page == "api" and customer.enabled:
            context["credentials"] = admin_views.credentials(self.gw, cid)
        if page == "usage":
            context["usage"] = admin_views.timeline(self.gw, cid)
        return await self._render(f"{page}.html", status, **context, **extra)

    # -- sessions, tokens, language ------------------------------------------------------

    def _session(self) -> sessions.Session | None:
        sealed = request.cookies.get(SESSION_COOKIE)
        return self.portal.current(sessions.opened(self.portal.key, sealed, self.portal.clock()))

    def _csrf_ok(self, session: sessions.Session | None, form: Any) -> bool:
        binding = session.sid if session is not None else request.cookies.get(PRE_COOKIE)
        return sessions.csrf_ok(self.portal.key, binding, form.get("csrf"))

    def _switched(self) -> Response | None:
        lang = request.args.get("lang")
        if lang not in texts.LANGUAGES:
            return None
        response = _see(request.path)
        self._set_cookie(response, LANG_COOKIE, str(lang), max_age=365 * 86400)
        return response

    async def _anonymous(self, template: str, status: int = 200, **context: Any) -> Response:
        """A page whose form is posted without a session (login, invitation)."""
        return await self._render(template, status, anonymous=True, **context)

    async def _render(
        self, template: str, status: int = 200, *, anonymous: bool = False, **context: Any
    ) -> Response:
        session = None if anonymous else context.pop("session", None) or self._session()
        pre = request.cookies.get(PRE_COOKIE)
        fresh = pre is None or len(pre) != 32
        if session is None and fresh:
            pre = tokens.token_hex(16)
        binding = session.sid if session is not None else pre
        lang = texts.language(
            request.cookies.get(LANG_COOKIE), request.headers.get("Accept-Language")
        )
        done = request.args.get("done")
        html = await render_template(
            template,
            t=texts.TEXTS[lang],
            lang=lang,
            other=[code for code in texts.LANGUAGES if code != lang],
            csrf=sessions.csrf_token(self.portal.key, binding or ""),
            session=session,
            done=done if done in DONE else None,
            when=_when,
            now=time.time(),
            **{"error": None, "errors": {}, "given": {}, "field": None, **context},
        )
        response = Response(html, status, content_type="text/html; charset=utf-8")
        response.headers.update(HEADERS)
        if session is None and fresh and pre is not None:
            self._set_cookie(response, PRE_COOKIE, pre, max_age=86400)
        return response

    def _set_cookie(self, response: Response, name: str, value: str, *, max_age: int) -> None:
        response.set_cookie(name, value, max_age=max_age, path="/portal", secure=self.secure,
                            httponly=True, samesite="Lax")  # fmt: skip


def _see(location: str) -> Response:
    response = Response("", 303, {"Location": location})
    response.headers.update(HEADERS)
    return response


def _client() -> str:
    entry = request_log.current()
    return entry.client if entry is not None else (request.remote_addr or "")


def _when(epoch: float | None) -> str:
    if epoch is None:
        return ""
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(epoch))


__all__ = ["check_email", "install"]
