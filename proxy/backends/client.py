"""Talking to one BBB server: signed calls, per-phase timeouts, one error boundary.

Each backend gets its own small ``httpx.AsyncClient`` (one large shared pool
degrades badly past ~30 connections).  Every httpx and lxml exception is
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

import httpx
from lxml import etree

from proxy.bbb.checksum import signed_query
from proxy.config import Backend, ProxySettings
from proxy.errors import BackendBadResponse, BackendError, BackendTimeout, BackendUnavailable

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


class BackendClient:
    """Signed calls to one BBB server."""

    def __init__(
        self,
        backend: Backend,
        settings: ProxySettings,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.backend = backend
        self.observer: Observer = _unobserved
        t = settings.timeouts
        n = settings.backend_connections
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(connect=t.connect, read=t.read, write=t.write, pool=t.pool),
            limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
            follow_redirects=False,
            transport=transport,
        )

    @property
    def id(self) -> str:
        return self.backend.id

    def url(self, call: str, params: Sequence[tuple[str, str]]) -> str:
        """The signed URL of ``call`` on this backend."""
        query = signed_query(call, params, self.backend.secret, self.backend.checksum_algorithm)
        return f"{self.backend.url}/{call}?{query}"

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
        try:
            return await self._fetch(self.url(call, params), body, content_type)
        except BackendError as exc:
            outcome = type(exc).__name__.removeprefix("Backend").lower()
            raise
        finally:
            self.observer(self.id, call, outcome, time.perf_counter() - started)

    async def _fetch(self, url: str, body: bytes | None, content_type: str | None) -> bytes:
        headers = {"Content-Type": content_type} if content_type else None
        try:
            if body is None:
                response = await self._http.get(url)
            else:
                response = await self._http.post(url, content=body, headers=headers)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise BackendUnavailable(self.id, type(exc).__name__) from None
        except httpx.TimeoutException as exc:
            raise BackendTimeout(self.id, type(exc).__name__) from None
        except httpx.HTTPError as exc:
            raise BackendBadResponse(self.id, type(exc).__name__) from None
        if response.status_code != 200:
            raise BackendBadResponse(self.id, f"HTTP {response.status_code}")
        return response.content

    async def aclose(self) -> None:
        await self._http.aclose()
