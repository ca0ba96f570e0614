"""The simulated BBB server's webhooks service, as bbb-webhooks 3.x behaves (bbb-api.md §3),
without I/O.

The API, under the server's ``/bigbluebutton/api/hooks/``: GET only; the checksum as
bbb-web's (§1) with call names ``hooks/create``, ``hooks/list``, ``hooks/destroy``, its
algorithm by length; answers written as bbb-webhooks writes them (no whitespace; the
URL and meetingID of ``hooks/list`` in CDATA).

- ``hooks/create``: ``callbackURL`` (required), ``meetingID`` (none: a global hook),
  ``eventID`` (comma list, lower-cased: only those events), ``getRaw``.  "Uniqueness is
  by callbackURL alone": a second create with a URL already registered answers SUCCESS,
  the old hook's id and ``duplicateWarning``, and changes nothing.  Hook ids are UUIDs.
- ``hooks/list``: with ``meetingID``, that meeting's hooks and every global one; without,
  every hook.
- ``hooks/destroy``: ``hookID``; an unknown one is ``destroyMissingHook``.

Events (:mod:`.events`) are queued per hook that wants them (its meeting, its eventID
filter) and posted in order, one at a time per hook, by the trio layer
(:mod:`.webhook_sender`): ``POST callbackURL?checksum=<sha1(callbackURL + body +
secret)>``, form body ``domain=<server>&event=[<json>]&timestamp=<ms>`` encoded as a
browser's ``URLSearchParams``; ``timestamp`` is fixed when the event is queued.  A POST
answered 2xx (or 401, as bbb-webhooks counts it) is done; otherwise it is retried after
each of :data:`RETRY_INTERVALS_MS` in turn, and when they are exhausted the hook is
deleted with its queue.  :meth:`WebhookService.restart` forgets every hook, as a
restarted bbb-webhooks without its redis does.

Limitation: a ``getRaw=true`` hook is accepted and listed as such, but receives mapped
events too (the simulator does not model redis messages).
"""

from __future__ import annotations

import hashlib
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote_plus

import orjson

from proxy.bbb import checksum

from . import events
from .events import Event
from .model import ApiRequest, Attendee, Meeting, Reply
from .recordings import Recording, playback_url

HOOK_CALLS = ("hooks/create", "hooks/list", "hooks/destroy")
# bbb-webhooks' default config (ms): about five minutes of retries, then the hook goes.
RETRY_INTERVALS_MS = (100, 500, 1000, 2000, 4000, 8000, 10000, 30000, 60000, 60000, 60000, 60000)
HTML_TYPE = "text/html; charset=utf-8"
KEPT = 10_000  # events and deliveries kept for inspection

CHECKSUM_ERROR = ("checksumError", "You did not pass the checksum security check.")
MISSING_URL = ("missingParamCallbackURL", "You must specify a callbackURL in the parameters.")
MISSING_HOOK_ID = ("missingParamHookID", "You must specify a hookID in the parameters.")
MISSING_HOOK = ("destroyMissingHook", "The hook informed was not found.")
DUPLICATE = ("duplicateWarning", "There is already a hook for this callback URL.")


@dataclass(frozen=True, slots=True)
class Hook:
    hook_id: str
    callback_url: str
    meeting_id: str | None  # None: every meeting's events (a global hook)
    event_ids: tuple[str, ...] | None  # None: every event
    raw: bool = False

    def wants(self, event: Event) -> bool:
        if self.event_ids is not None and event_id(event).lower() not in self.event_ids:
            return False
        return self.meeting_id is None or self.meeting_id == external_meeting_id(event)


@dataclass(frozen=True, slots=True)
class Delivery:
    """One POST to make: the signed URL and the form body, fixed when queued."""

    hook_id: str
    url: str
    body: str
    event: Event = field(compare=False)


def event_id(event: Event) -> str:
    return str(event["data"]["id"])


def external_meeting_id(event: Event) -> str:
    return str(event["data"]["attributes"]["meeting"]["external-meeting-id"])


def url_search_params(pairs: list[tuple[str, str]]) -> str:
    """``new URLSearchParams(pairs).toString()``: space as ``+``, only ``*-._`` and
    alphanumerics left as they are."""
    return "&".join(f"{_encode(k)}={_encode(v)}" for k, v in pairs)


def _encode(text: str) -> str:
    return quote_plus(text, safe="*").replace("~", "%7E")


def callback_checksum(callback_url: str, body: str, secret: str, algorithm: str = "sha1") -> str:
    return hashlib.new(algorithm, (callback_url + body + secret).encode()).hexdigest()


def signed_callback(callback_url: str, body: str, secret: str, algorithm: str = "sha1") -> str:
    separator = "&" if "?" in callback_url else "?"
    cs = callback_checksum(callback_url, body, secret, algorithm)
    return f"{callback_url}{separator}checksum={cs}"


def _failure(key: str, message: str) -> Reply:
    return Reply.xml(
        f"<response><returncode>FAILED</returncode><messageKey>{key}</messageKey>"
        f"<message>{message}</message></response>"
    )


def _success(*parts: str) -> Reply:
    return Reply.xml(f"<response><returncode>SUCCESS</returncode>{''.join(parts)}</response>")


def _cdata(text: str) -> str:
    return "<![CDATA[" + text.replace("]]>", "]]]]><![CDATA[>") + "]]>"


def _hook_xml(hook: Hook) -> str:
    parts = [
        f"<hookID>{hook.hook_id}</hookID>",
        f"<callbackURL>{_cdata(hook.callback_url)}</callbackURL>",
    ]
    if hook.meeting_id is not None:
        parts.append(f"<meetingID>{_cdata(hook.meeting_id)}</meetingID>")
    if hook.event_ids is not None:
        parts.append(f"<eventID>{','.join(hook.event_ids)}</eventID>")
    parts.append(f"<permanentHook>false</permanentHook><rawData>{str(hook.raw).lower()}</rawData>")
    return "<hook>" + "".join(parts) + "</hook>"


class WebhookService:
    """One server's hooks, each with its queue of deliveries still to make."""

    def __init__(
        self,
        domain: str,
        secret: str,
        clock_ms: Callable[[], int],
        *,
        checksum_algorithm: str = "sha1",
        retry_intervals_ms: tuple[int, ...] = RETRY_INTERVALS_MS,
    ) -> None:
        self.domain = domain
        self.secret = secret
        self.clock_ms = clock_ms
        self.checksum_algorithm = checksum_algorithm  # bbb-webhooks' hookChecksumAlgorithm
        self.retry_intervals_ms = retry_intervals_ms
        self.hooks: dict[str, Hook] = {}
        # The latest events (whether a hook wanted them or not) and deliveries a receiver
        # took, in order: for tests, bounded for benchmarks.
        self.emitted: deque[Event] = deque(maxlen=KEPT)
        self.delivered: deque[Delivery] = deque(maxlen=KEPT)
        self.dropped: list[Hook] = []  # hooks deleted after their retries ran out
        self._queues: dict[str, deque[Delivery]] = {}
        self._busy: set[str] = set()  # hooks whose queue a sender is working through
        self._chat_sequence = 0

    # -- the API -----------------------------------------------------------------------------

    def handle(self, request: ApiRequest) -> Reply:
        """Answer one request to ``/bigbluebutton/api/hooks/...``."""
        if request.method != "GET" or request.call not in HOOK_CALLS:
            return Reply(
                404, f"Cannot {request.method} /bigbluebutton/api/{request.call}", HTML_TYPE
            )
        if not checksum.verify(request.call, request.raw_query, [self.secret]):
            return _failure(*CHECKSUM_ERROR)
        params = {k: v for k, v in reversed(parse_qsl(request.raw_query, keep_blank_values=True))}
        if request.call == "hooks/create":
            return self._create(params)
        if request.call == "hooks/list":
            return self._list(params.get("meetingID") or None)
        return self._destroy(params.get("hookID") or "")

    def _create(self, params: dict[str, str]) -> Reply:
        url = params.get("callbackURL") or ""
        if not url:
            return _failure(*MISSING_URL)
        for hook in self.hooks.values():
            if hook.callback_url == url:
                return _success(f"<hookID>{hook.hook_id}</hookID>", _message(*DUPLICATE))
        filters = params.get("eventID") or None
        hook = Hook(
            hook_id=str(uuid.uuid4()),
            callback_url=url,
            meeting_id=params.get("meetingID") or None,
            event_ids=tuple(filters.lower().split(",")) if filters else None,
            raw=(params.get("getRaw") or "").lower() == "true",
        )
        self.hooks[hook.hook_id] = hook
        raw = str(hook.raw).lower()
        return _success(
            f"<hookID>{hook.hook_id}</hookID><permanentHook>false</permanentHook>"
            f"<rawData>{raw}</rawData>"
        )

    def _list(self, meeting_id: str | None) -> Reply:
        listed = [
            h
            for h in self.hooks.values()
            if meeting_id is None or h.meeting_id in (None, meeting_id)
        ]
        return _success("<hooks>" + "".join(_hook_xml(h) for h in listed) + "</hooks>")

    def _destroy(self, hook_id: str) -> Reply:
        if not hook_id:
            return _failure(*MISSING_HOOK_ID)
        if self.hooks.pop(hook_id, None) is None:
            return _failure(*MISSING_HOOK)
        self._queues.pop(hook_id, None)
        return _success("<removed>true</removed>")

    def restart(self) -> None:
        """Forget every hook and every delivery not yet made (a restarted service)."""
        self.hooks.clear()
        self._queues.clear()

    # -- events --------------------------------------------------------------------------------

    def emit(self, event: Event) -> None:
        """Queue ``event`` for every hook that wants it."""
        self.emitted.append(event)
        body = url_search_params(
            [
                ("domain", self.domain),
                ("event", "[" + orjson.dumps(event).decode() + "]"),
                ("timestamp", str(self.clock_ms())),
            ]
        )
        for hook in self.hooks.values():
            if hook.wants(event):
                url = signed_callback(hook.callback_url, body, self.secret, self.checksum_algorithm)
                queue = self._queues.setdefault(hook.hook_id, deque())
                queue.append(Delivery(hook.hook_id, url, body, event))

    def meeting_created(self, meeting: Meeting) -> None:
        self.emit(events.meeting_created(meeting, self.clock_ms()))

    def meeting_ended(self, meeting: Meeting) -> None:
        self.emit(events.meeting_ended(meeting, self.clock_ms()))

    def user_joined(self, meeting: Meeting, attendee: Attendee, request: ApiRequest) -> None:
        client = {
            "ip-address": request.remote_addr,
            "user-agent": request.user_agent,
            "referer": request.referer,
        }
        self.emit(events.user_joined(meeting, attendee, client, self.clock_ms()))

    def user_left(self, meeting: Meeting, attendee: Attendee) -> None:
        self.emit(events.user_left(meeting, attendee, self.clock_ms()))

    def chat_sent(self, meeting: Meeting, sender: str, text: str) -> None:
        self._chat_sequence += 1
        self.emit(events.chat_sent(meeting, sender, text, self.clock_ms(), self._chat_sequence))

    def recording_archived(self, record_id: str, meeting_id: str) -> None:
        """The steps a recording goes through as its meeting ends."""
        now = self.clock_ms()
        for step in events.ARCHIVE_STEPS:
            for phase in ("started", "ended"):
                self.emit(events.rap_step(step, phase, record_id, meeting_id, now))

    def recording_published(self, recording: Recording) -> None:
        """The steps from processing to a published recording."""
        now, ids = self.clock_ms(), (recording.record_id, recording.meeting_id)
        for step in events.PUBLISH_STEPS:
            self.emit(events.rap_step(step, "started", *ids, now))
            details = self._details(recording) if step == "publish" else None
            self.emit(events.rap_step(step, "ended", *ids, now, details))

    def _details(self, r: Recording) -> dict[str, Any]:
        playback = [
            {"format": kind, "link": playback_url(self.domain, kind, r.record_id)}
            for kind in r.formats
        ]
        return events.recording_details(r.name, r.start_time, r.end_time, r.metadata, playback)

    def recording_state(self, event_name: str, recording: Recording) -> None:
        """``rap-published``, ``rap-unpublished`` or ``rap-deleted``."""
        ids = (recording.record_id, recording.meeting_id)
        self.emit(events.rap_state(event_name, *ids, self.clock_ms()))

    # -- for the sender ------------------------------------------------------------------------

    def take_work(self) -> list[str]:
        """Hooks with deliveries waiting and no sender yet; each is handed out once until
        :meth:`finished`."""
        ready = [h for h, q in self._queues.items() if q and h not in self._busy]
        self._busy.update(ready)
        return ready

    def next_delivery(self, hook_id: str) -> Delivery | None:
        queue = self._queues.get(hook_id)
        return queue[0] if queue else None

    def pending(self, delivery: Delivery) -> bool:
        """Whether ``delivery`` is still to be made (its hook was not destroyed meanwhile)."""
        queue = self._queues.get(delivery.hook_id)
        return queue is not None and bool(queue) and queue[0] is delivery

    def done(self, delivery: Delivery) -> None:
        queue = self._queues.get(delivery.hook_id)
        if queue and queue[0] is delivery:
            queue.popleft()
            self.delivered.append(delivery)

    def drop(self, hook_id: str) -> None:
        """Delete a hook whose retries ran out, with its queue."""
        hook = self.hooks.pop(hook_id, None)
        self._queues.pop(hook_id, None)
        if hook is not None:
            self.dropped.append(hook)

    def finished(self, hook_id: str) -> None:
        self._busy.discard(hook_id)


def _message(key: str, text: str) -> str:
    return f"<messageKey>{key}</messageKey><message>{text}</message>"
