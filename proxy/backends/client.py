"""Talking to one BBB server: signed calls, per-phase timeouts, one error boundary.

Each backend gets its own small pool of keep-alive connections
(:mod:`proxy.backends.http`).  Every transport and lxml exception is
translated here, and only here, into :class:`proxy.errors.BackendError`:

- nothing was sent (connect refused or timed out, pool exhausted)
  -> ``BackendUnavailable``: safe to try another backend;
- no answer in time after sending -> ``BackendTimeout``;
- anything that is not BBB's ``<response>`` XML with HTTP 200, or a
  connection broken mid-answer, or an answer above ``max_answer_bytes``
  -> ``BackendBadResponse``.

Two bounds keep one peer from starving the rest:

- *fairness*: a call made for a customer (``customer=``) waits at most the
  pool timeout for one of that customer's ``calls_per_customer`` slots on this
  backend, else ``BackendUnavailable`` (``serverUnavailable``) for that
  customer alone; the other customers keep the rest of the pool;
- *parsing off the event loop*: an answer above :data:`PARSE_IN_THREAD_BYTES`
  is parsed in a worker thread, so a big getMeetings never stalls every other
  request for the time lxml takes (tens of milliseconds per MiB).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

import trio
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


PARSE_IN_THREAD_BYTES = 256 * 1024  # about 2 ms of lxml: below it a thread costs more


def _safe_parser() -> etree.XMLParser:
    return etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)


_PARSER = _safe_parser()  # the event loop's; worker threads make their own


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


def parse_reply(backend_id: str, content: bytes, parser: etree.XMLParser | None = None) -> Reply:
    """Parse a BBB answer; anything else is ``BackendBadResponse``.

    Entities are not resolved, nothing is fetched, and lxml's limits (depth,
    text size) stay on: a billion-laughs, deeply nested or external-entity
    answer is ``BackendBadResponse``.
    """
    try:
        root = etree.fromstring(content, parser if parser is not None else _PARSER)
    except etree.XMLSyntaxError:
        raise BackendBadResponse(backend_id, "answer is not XML") from None
    if root.tag != "response" or root.find("returncode") is None:
        raise BackendBadResponse(backend_id, f"unexpected XML root <{root.tag}>")
    return Reply(root)


def _parse_in_thread(backend_id: str, content: bytes) -> Reply:
    # lxml parsers must not be shared between threads: one per parse (cheap next to it).
    return parse_reply(backend_id, content, _safe_parser())


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
            backend.url,
            settings.timeouts,
            settings.backend_connections,
            max_answer_bytes=settings.max_answer_bytes,
        )
        self._share = settings.calls_per_customer
        self._share_wait = settings.timeouts.pool
        self._per_customer: dict[str, trio.CapacityLimiter] = {}

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
        customer: str | None = None,
    ) -> Reply:
        """Send ``call`` and parse BBB's answer.

        ``customer``: the customer the call is made for (its fair share applies);
        None for the gateway's own calls (polls, ending preempted meetings).

        Error handling: raises ``BackendUnavailable``, ``BackendTimeout`` or
        ``BackendBadResponse`` as described in the module docstring; a BBB
        ``FAILED`` answer is a normal :class:`Reply` with ``ok == False``.
        """
        content = await self.fetch(call, params, body, content_type, customer=customer)
        if len(content) <= PARSE_IN_THREAD_BYTES:
            return parse_reply(self.id, content)
        return await trio.to_thread.run_sync(_parse_in_thread, self.id, content)

    async def fetch(
        self,
        call: str,
        params: Sequence[tuple[str, str]],
        body: http.Body | None = None,
        content_type: str | None = None,
        *,
        customer: str | None = None,
        sink: Callable[[bytes], None] | None = None,
    ) -> bytes:
        """The raw body of a 200 answer to ``call`` (used where BBB answers JSON); with
        ``sink``, the body goes there as it arrives and b"" is returned.  ``body`` may be
        an async iterable, streamed (:mod:`proxy.backends.http`).

        Error handling: as :meth:`call`.
        """
        target = f"{self._path}/{call}?{self._query(call, params)}"
        slots = None if customer is None else await self._customer_slot(call, customer)
        started = time.perf_counter()
        outcome = "ok"
        try:
            return await self._fetch(target, body, content_type, sink)
        except BackendError as exc:
            outcome = type(exc).__name__.removeprefix("Backend").lower()
            raise
        finally:
            self.observer(self.id, call, outcome, time.perf_counter() - started)
            if slots is not None:
                slots.release()

    async def _customer_slot(self, call: str, customer: str) -> trio.CapacityLimiter:
        """One of ``customer``'s slots on this backend, held for the call (the caller
        releases it); none is taken for the gateway's own calls."""
        slots = self._per_customer.get(customer)
        if slots is None:
            slots = self._per_customer[customer] = trio.CapacityLimiter(self._share)
        try:
            slots.acquire_nowait()  # the usual case: no wait, no extra task switch
            return slots
        except trio.WouldBlock:
            pass
        with trio.move_on_after(self._share_wait) as waiting:
            await slots.acquire()
        if waiting.cancelled_caught:
            self.observer(self.id, call, "customer_limit", 0.0)
            raise BackendUnavailable(self.id, f"{customer} has {self._share} calls in flight")
        return slots

    async def _fetch(
        self,
        target: str,
        body: http.Body | None,
        content_type: str | None,
        sink: Callable[[bytes], None] | None = None,
    ) -> bytes:
        method = "GET" if body is None else "POST"
        try:
            if sink is not None and isinstance(self._transport, http.Pool):
                answer = await self._transport.stream(method, target, sink)
            elif isinstance(self._transport, http.Pool):
                answer = await self._transport.request(method, target, body, content_type)
            else:
                whole = body if body is None or isinstance(body, bytes) else await _joined(body)
                answer = await self._transport.request(method, target, whole, content_type)
                if sink is not None and answer.status == 200:
                    sink(answer.body)  # a transport that cannot stream: handed over whole
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


async def _joined(body: AsyncIterable[bytes]) -> bytes:
    """A streamed body read whole, for a transport that cannot stream (tests' fakes)."""
    return b"".join([chunk async for chunk in body])
