"""Posting a simulated server's webhook deliveries: the trio half of :mod:`.webhooks`.

One sender per hook with deliveries waiting (:meth:`WebhookService.take_work`) works
through that hook's queue in order: each POST is tried at once, then again after each of
the service's retry intervals; a POST answered 2xx or 401 is done (bbb-webhooks counts
401 as delivered).  When the intervals are exhausted the hook is deleted
(:meth:`WebhookService.drop`).  Every POST is bounded by :data:`REQUEST_TIMEOUT`;
redirects are followed (up to 10), as bbb-webhooks' HTTP client does.

Error handling: a POST that fails in any way (refused, reset, timeout, HTTP error) is a
failed attempt; nothing here raises for what a receiver does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import trio

from .webhooks import WebhookService

SECONDS = 1.0
REQUEST_TIMEOUT = 5 * SECONDS
MAX_REDIRECTS = 10
FORM = {"Content-Type": "application/x-www-form-urlencoded"}

type Post = Callable[[str, str], Awaitable[int | None]]  # (signed URL, body) -> status or None


class Poster:
    """POSTs over one keep-alive HTTP client, opened on first use."""

    def __init__(self) -> None:
        self._client: httpx.AsyncClient | None = None

    async def __call__(self, url: str, body: str) -> int | None:
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=REQUEST_TIMEOUT, follow_redirects=True, max_redirects=MAX_REDIRECTS
            )
        request = self._client.build_request("POST", url, content=body.encode(), headers=FORM)
        request.stream = _Body(body.encode())
        try:
            response = await self._client.send(request)
            await response.aclose()
        except (httpx.HTTPError, OSError):
            return None
        return response.status_code

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def close_when_cancelled(self) -> None:
        """Wait; close the client when cancelled (a server cancelled from outside never
        runs its shutdown hooks)."""
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await self.aclose()


class _Body(httpx.AsyncByteStream):
    """A request body that is a plain async iterator, not an async generator: httpx's own
    (``ByteStream``) is left unfinished when the receiver goes away mid-request, and trio
    then reports the generator as garbage collected unclosed."""

    def __init__(self, data: bytes) -> None:
        self._data: bytes | None = data

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        if self._data is None:
            raise StopAsyncIteration
        data, self._data = self._data, None
        return data


def delivered(status: int | None) -> bool:
    return status is not None and (200 <= status < 300 or status == 401)


async def deliver_hook(service: WebhookService, hook_id: str, post: Post) -> None:
    """Make ``hook_id``'s deliveries in order until its queue is empty or it is dropped."""
    try:
        while (delivery := service.next_delivery(hook_id)) is not None:
            for wait_ms in (0, *service.retry_intervals_ms):
                await trio.sleep(wait_ms / 1000)
                if not service.pending(delivery):
                    break  # destroyed, or forgotten by a restart, meanwhile
                if await _attempt(post, delivery.url, delivery.body):
                    service.done(delivery)
                    break
            else:
                service.drop(hook_id)
    finally:
        service.finished(hook_id)


async def _attempt(post: Post, url: str, body: str) -> bool:
    with trio.move_on_after(REQUEST_TIMEOUT):
        return delivered(await post(url, body))
    return False
