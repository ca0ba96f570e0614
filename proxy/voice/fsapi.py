"""``POST /fsapi``: the dial-in router FreeSWITCH's ``mod_xml_curl`` asks for dialplans.

Off (404, as for any unknown path) until ``[fsapi] password`` is set.  FreeSWITCH
authenticates with HTTP basic auth (its binding's ``gateway-credentials``); only the
password is checked, in constant time, and a wrong one is answered 401.  The decision
and the XML are :mod:`proxy.voice.dialplan`'s; this module reads the form and looks a
PIN up in the ledger: the voice bridge of a confirmed reservation, bridged to the
``sip_host`` of its backend (``[fsapi.sip_hosts]``, else the host of the backend's URL).

Error handling: nothing FreeSWITCH (or anyone else) sends can fail the route: an
unreadable form is an empty one (answered "not found"), and an unexpected error is
logged and answered "not found" too, so FreeSWITCH falls back to its own dialplan.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
from urllib.parse import parse_qsl, urlsplit

from quart import Response, request
from quart_trio import QuartTrio

from proxy.gateway import Gateway
from proxy.voice import dialplan

log = logging.getLogger(__name__)
PATH = "/fsapi"
MAX_FIELDS = 5000  # FreeSWITCH posts every channel variable: hundreds, not thousands
XML = "text/xml; charset=utf-8"


def install(app: QuartTrio, gw: Gateway) -> None:
    """Register ``POST /fsapi`` on ``app``."""

    @app.route(PATH, methods=["POST"])
    async def fsapi() -> Response:
        return await _answer(gw)


async def _answer(gw: Gateway) -> Response:
    settings = gw.config.fsapi
    if not settings.password:
        return Response("not found\n", 404, content_type="text/plain")
    if not password_matches(settings.password, request.headers.get("Authorization")):
        return Response(
            "unauthorised\n",
            401,
            {"WWW-Authenticate": 'Basic realm="fsapi"'},
            content_type="text/plain",
        )
    body = await request.get_data(cache=False, as_text=False, parse_form_data=False)
    try:
        document = dialplan.answer(
            read_form(body), settings, lambda pin: target(gw, pin), gw.config.voice.length
        )
    except Exception:  # never FreeSWITCH's problem: it falls back to its own dialplan
        log.exception("dial-in lookup failed")
        document = dialplan.not_found()
    return Response(document, 200, content_type=XML)


def password_matches(password: str, header: str | None) -> bool:
    """Whether ``header`` is ``Basic base64(user:password)``; the user is not checked."""
    scheme, _, encoded = (header or "").partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return False
    _user, colon, given = decoded.partition(b":")
    return bool(colon) and hmac.compare_digest(given, password.encode("utf-8"))


def read_form(body: bytes) -> dict[str, str]:
    """The form's first value of each field; an unreadable form is an empty one."""
    try:
        pairs = parse_qsl(
            body.decode("utf-8", "replace"), keep_blank_values=True, max_num_fields=MAX_FIELDS
        )
    except ValueError:  # too many fields
        return {}
    return dict(reversed(pairs))


def target(gw: Gateway, pin: str) -> dialplan.Target | None:
    """Where the running meeting with voice bridge ``pin`` takes phone calls."""
    reservation = gw.ledger.state.by_voice_bridge(pin)
    if reservation is None:
        return None
    host = sip_host(gw, reservation.backend_id)
    return None if host is None else dialplan.Target(pin, host)


def sip_host(gw: Gateway, backend_id: str) -> str | None:
    """The backend's FreeSWITCH: ``[fsapi.sip_hosts]``, else its API URL's host."""
    configured = gw.config.fsapi.sip_hosts.get(backend_id)
    if configured:
        return configured
    backend = gw.backend(backend_id)
    if backend is None:
        return None
    host = urlsplit(backend.url).hostname
    if not host:
        return None
    return f"[{host}]" if ":" in host else host
