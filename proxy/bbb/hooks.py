"""The hooks API (hooks/create, hooks/list, hooks/destroy) as bbb-webhooks speaks it, no I/O.

bbb-webhooks 3.x (``src/out/webhooks/api/``) reads its parameters from the
signed query (checksum as any BBB call, call names ``hooks/create`` etc.) and
answers XML in BBB's envelope; hooks/list wraps the callback URL and the
meetingID in ``<![CDATA[...]]>``, the one place BBB's XML uses CDATA.  What
this gateway does differently, and why (docs/decisions.md, "Webhooks: the
hooks API"):

- **One meeting per hook.**  ``meetingID`` is required: a hook for every
  meeting of a platform shared by many customers is not offered, so a create
  without it is ``missingParamMeetingID``.
- **No raw events.**  ``getRaw=true`` is refused (``createHookError``): raw
  redis messages carry auth tokens and cannot be filtered of personal data.
- **Duplicates per customer and meeting.**  bbb-webhooks keeps one hook per
  callback URL on the whole server and answers a second create of that URL
  ``SUCCESS`` + ``duplicateWarning`` with the old hook's id.  Here the same
  holds within one customer's meeting; another meeting (or customer) with
  the same URL gets a hook of its own.
- ``eventID`` is a comma list, lower-cased (as bbb-webhooks stores it), each id
  checked (:data:`EVENT_ID`); empty items are ignored, and a list with none
  left means every event.

Error handling: every refusal is a :class:`~proxy.errors.ValidationError`
carrying bbb-webhooks' ``messageKey`` (or BBB's, for the meetingID).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from proxy.bbb import envelope
from proxy.bbb.customer_urls import problem
from proxy.errors import ValidationError

type Params = Sequence[tuple[str, str]]

EVENT_ID = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")  # user-joined, rap-publish-ended, ...
MAX_EVENT_IDS = 64  # bbb-webhooks maps about 50 event types
CREATE_FAILED = "createHookError"
_NOT_XML = envelope.NOT_XML


@dataclass(frozen=True, slots=True)
class CreateParams:
    """A hooks/create's parameters, checked (meetingID apart: BBB's own rules check it)."""

    callback_url: str
    event_ids: frozenset[str] | None  # None: every event


class ListedHook(Protocol):
    """What hooks/list shows of a hook (:class:`proxy.webhooks.registry.Hook` is one)."""

    @property
    def id(self) -> str: ...
    @property
    def callback_url(self) -> str: ...
    @property
    def meeting_id(self) -> str: ...
    @property
    def event_ids(self) -> frozenset[str] | None: ...


def first(params: Params, name: str) -> str | None:
    return next((v for k, v in params if k == name), None)


def callback_url(params: Params) -> str:
    """The callbackURL, required, and one the gateway may call (its host checked later)."""
    url = first(params, "callbackURL")
    if url is None or not url.strip():
        raise ValidationError(
            "You must specify a callbackURL in the parameters.",
            message_key="missingParamCallbackURL",
        )
    reason = problem(url)
    if reason is not None:
        raise unreachable(reason)
    return url


def unreachable(reason: str) -> ValidationError:
    return ValidationError(
        f"The callbackURL cannot be used: {reason}. It must be an http(s) URL whose host "
        "is a public address",
        message_key=CREATE_FAILED,
    )


def missing_meeting_id() -> ValidationError:
    return ValidationError(
        "You must provide a meeting ID: this gateway registers hooks for one meeting "
        "each; hooks for all meetings are not offered",
        message_key="missingParamMeetingID",
    )


def checked_meeting_id(meeting_id: str) -> str:
    """A meetingID that can be written back in hooks/list's XML (no character XML 1.0 forbids)."""
    if _NOT_XML.search(meeting_id):
        raise ValidationError("Meeting ID cannot contain control characters")
    return meeting_id


def create_params(params: Params) -> CreateParams:
    """callbackURL, getRaw and eventID of a hooks/create, in bbb-webhooks' order of checks."""
    url = callback_url(params)
    refuse_raw(params)
    return CreateParams(url, event_ids(params))


def refuse_raw(params: Params) -> None:
    """``getRaw`` may be absent, empty or ``false``; ``true`` is refused, anything else invalid."""
    value = (first(params, "getRaw") or "").strip().lower()
    if value == "true":
        raise ValidationError(
            "Raw events (getRaw=true) are not offered: they cannot be filtered of personal "
            "data. Register the hook without getRaw to get the mapped events",
            message_key=CREATE_FAILED,
        )
    if value not in ("", "false"):
        raise ValidationError("Parameter getRaw must be true or false")


def event_ids(params: Params) -> frozenset[str] | None:
    """The eventID filter: comma list, lower-cased; None when no id is given."""
    value = first(params, "eventID")
    ids = [i.strip().lower() for i in (value or "").split(",")]
    ids = [i for i in ids if i]
    if len(ids) > MAX_EVENT_IDS:
        raise ValidationError(f"Parameter eventID may list at most {MAX_EVENT_IDS} events")
    bad = next((i for i in ids if not EVENT_ID.fullmatch(i)), None)
    if bad is not None:
        raise ValidationError(
            "Parameter eventID must be a comma list of event ids such as user-joined"
        )
    return frozenset(ids) if ids else None


def hook_id(params: Params) -> str:
    value = first(params, "hookID")
    if value is None or not value.strip():
        raise ValidationError(
            "You must specify a hookID in the parameters.", message_key="missingParamHookID"
        )
    return value.strip()


def missing_hook() -> ValidationError:
    """A hook that is not there, or not the customer's: the same answer either way."""
    return ValidationError("The hook informed was not found.", message_key="destroyMissingHook")


# -- answers -----------------------------------------------------------------------------------


def created(hook_id: str) -> str:
    return envelope.success([("hookID", hook_id), ("permanentHook", False), ("rawData", False)])


def duplicated(hook_id: str) -> str:
    return envelope.success(
        [
            ("hookID", hook_id),
            ("messageKey", "duplicateWarning"),
            ("message", "There is already a hook for this callback URL."),
        ]
    )


def destroyed() -> str:
    return envelope.success([("removed", True)])


def listed(hooks: Iterable[ListedHook]) -> str:
    """hooks/list's answer, element by element as bbb-webhooks writes it."""
    body = "".join(_hook(h) for h in hooks)
    return f"<response><returncode>SUCCESS</returncode><hooks>{body}</hooks></response>"


def _hook(hook: ListedHook) -> str:
    events = "" if hook.event_ids is None else envelope.element("eventID", _joined(hook))
    return (
        f"<hook>{envelope.element('hookID', hook.id)}"
        f"<callbackURL>{cdata(hook.callback_url)}</callbackURL>"
        f"<meetingID>{cdata(hook.meeting_id)}</meetingID>{events}"
        f"{envelope.element('permanentHook', False)}{envelope.element('rawData', False)}</hook>"
    )


def _joined(hook: ListedHook) -> str:
    return ",".join(sorted(hook.event_ids or ()))


def cdata(text: str) -> str:
    """``text`` in CDATA; a ``]]>`` inside is split across two sections, so it stays text."""
    return "<![CDATA[" + text.replace("]]>", "]]]]><![CDATA[>") + "]]>"
