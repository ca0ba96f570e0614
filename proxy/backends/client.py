"""Talking to one BBB server: signed calls, per-phase timeouts, one error boundary.

Each backend gets its own small pool of keep-alive connections
(:mod:`proxy.backends.http`).  Every transport and lxml exception is
translated here, and only here, into :class:`proxy.errors.BackendError`:

- nothing was sent (connect refused or timed out, pool exhausted)
  -> ``BackendUnavailable``: safe to try another backend;
- no answer in time after sending -> ``BackendTimeout``;
- anything that is not BBB's ``<response>`` XML with HTTP 200, or a
  connection broken mid-answer -> ``BackendBadResponse``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

from lxml import etree

from proxy.backends import http
from proxy.bbb.checksum import signed_query
from proxy.config import Backend, ProxySettings
from proxy.errors import (
    BackendBadResponse,
    BackendError,
    BackendRedirect,
    BackendTimeout,
    BackendUnavailable,
)

type Observer = Callable[[str, str, str, float], None]  # backend, call, outcome, seconds


def _unobserved(backend: str, call: str, outcome: str, seconds: float) -> None:
    pass


_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)


@dataclass(frozen=True, slots=True)
class Reply:
    """A BBB XML answer, parsed."""

    root: etree._Element

    @property
    def ok(self) -> bool:
        return self.text("returncode") == "SUCCESS"

    @property
    def message_key(self) -> str:
        return self.text("messageKey")

    @property
    def message(self) -> str:
        return self.text("message")

    def text(self, tag: str) -> str:
        return (self.root.findtext(tag) or "").strip()


def parse_reply(backend_id: str, content: bytes) -> Reply:
    """Parse a BBB answer; anything else is ``BackendBadResponse``."""
    try:
        root = etree.fromstring(content, _PARSER)
    except etree.XMLSyntaxError:
        raise BackendBadResponse(backend_id, "answer is not XML") from None
    if root.tag != "response" or root.find("returncode") is None:
        raise BackendBadResponse(backend_id, f"unexpected XML root <{root.tag}>")
    return Reply(root)


class Transport(Protocol):
    """How a client reaches its server; :class:`proxy.backends.http.Pool` in production."""

    async def request(
        self, method: str, target: str, body: bytes | None = None, content_type: str | None = None
    ) -> http.Answer: ...

    async def aclose(self) -> None: ...


class BackendClient:
    """Signed calls to one BBB server."""

    def __init__(
        self, backend: Backend, settings: ProxySettings, transport: Transport | None = None
    ) -> None:
        self.backend = backend
        self.observer: Observer = _unobserved
        self._path = urlsplit(backend.url).path
        self._transport: Transport = transport or http.Pool(
            backend.url, settings.timeouts, settings.backend_connections
        )

    @property
    def id(self) -> str:
        return self.backend.id

    def url(self, call: str, params: Sequence[tuple[str, str]]) -> str:
        """The signed URL of ``call`` on this backend."""
        return f"{self.backend.url}/{call}?{self._query(call, params)}"

    def _query(self, call: str, params: Sequence[tuple[str, str]]) -> str:
        return signed_query(call, params, self.backend.secret, self.backend.checksum_algorithm)

    async def call(
        self,
        call: str,
        params: Sequence[tuple[str, str]],
        *,
        body: bytes | None = None,
        content_type: str | None = None,
    ) -> Reply:
        """Send ``call`` and parse BBB's answer.

        Error handling: raises ``BackendUnavailable``, ``BackendTimeout`` or
        ``BackendBadResponse`` as described in the module docstring; a BBB
        ``FAILED`` answer is a normal :class:`Reply` with ``ok == False``.
        """
        return parse_reply(self.id, await self.fetch(call, params, body, content_type))

    async def fetch(
        self,
        call: str,
        params: Sequence[tuple[str, str]],
        body: bytes | None = None,
        content_type: str | None = None,
    ) -> bytes:
        """The raw body of a 200 answer to ``call`` (used where BBB answers JSON)."""
        started = time.perf_counter()
        outcome = "ok"
        target = f"{self._path}/{call}?{self._query(call, params)}"
        try:
            return await self._fetch(target, body, content_type)
        except BackendError as exc:
            outcome = type(exc).__name__.removeprefix("Backend").lower()
            raise
        finally:
            self.observer(self.id, call, outcome, time.perf_counter() - started)

    async def _fetch(self, target: str, body: bytes | None, content_type: str | None) -> bytes:
        method = "GET" if body is None else "POST"
        try:
            answer = await self._transport.request(method, target, body, content_type)
        except http.ConnectFailed as exc:
            raise BackendUnavailable(self.id, str(exc)) from None
        except http.Timeout as exc:
            raise BackendTimeout(self.id, str(exc)) from None
        except http.ProtocolFailed as exc:
            raise BackendBadResponse(self.id, str(exc)) from None
        if answer.status == 302 and answer.location:
            raise BackendRedirect(self.id, answer.location)  # how BBB answers a failed join
        if answer.status != 200:
            raise BackendBadResponse(self.id, f"HTTP {answer.status}")
        return answer.body

    async def aclose(self) -> None:
        await self._transport.aclose()
