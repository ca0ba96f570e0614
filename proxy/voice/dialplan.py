"""The dial-in router's decision and its XML, for FreeSWITCH's ``mod_xml_curl``; no I/O.

FreeSWITCH, bound to the gateway for the ``dialplan`` section, POSTs one form per
lookup (docs/decisions.md, "Dial-in router"): ``section``, the channel's caller
profile (``Caller-Destination-Number``, ``Caller-Caller-ID-Number``,
``Caller-Privacy-Hide-Number``, ``Hunt-Context``, ...) and its variables as
``variable_<name>``.  The answer is a ``freeswitch/xml`` document with one
extension in the asked context:

- **prompt**: the destination is not a PIN (the platform's own number): answer, ask for
  the PIN (``play_and_get_digits``) and ``transfer`` the digits back into the dialplan,
  which asks the gateway again with the PIN as the destination;
- **bridge**: the destination is the voice bridge of a running meeting, or of its
  breakout room (the room's bridge is the meeting's plus one digit, as BBB numbers
  them): set the caller's shown number (masked, or hidden when the caller asked for
  privacy), limit the call's length (``sched_hangup``), ``bridge`` to the meeting's
  backend (``sofia/<profile>/<pin>@<sip_host>``);
- **re-prompt**: a PIN no running meeting has: say so and ask again, up to
  ``max_attempts`` times (counted in the channel variable ``bbb_dialin_attempts``,
  which each answer sets and the next lookup posts back);
- **reject**: too many wrong PINs, or no PIN entered: say goodbye and hang up;
- **not found** (mod_xml_curl's ``result status="not found"``): a section other than
  dialplan, or no destination: FreeSWITCH goes on with its next binding or its files.

Everything taken from the request is checked before it reaches the document: the
PIN is digits, the context a plain token, and the caller's number is reduced to digits
(and a leading ``+``) before it is masked, because FreeSWITCH expands ``${...}`` in
application data (a caller ID is the caller's to choose).  lxml escapes the rest.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from lxml import etree

from proxy.bbb.numbers import parse_count
from proxy.config import FsapiSettings

ATTEMPTS_VARIABLE = "bbb_dialin_attempts"
PIN_VARIABLE = "bbb_dialin_pin"
FAILED_DESTINATION = "bbb-dialin-failed"  # where play_and_get_digits sends a caller who gave none
HIDDEN_NAME = "Anonymous"
HIDDEN_NUMBER = "anonymous"
_CONTEXT = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_PRIVACY_TOKENS = frozenset({"id", "user", "header", "full"})  # RFC 3323/3325 Privacy values
_DESTINATION_FIELDS = ("Caller-Destination-Number", "Hunt-Destination-Number", "destination_number")
_CONTEXT_FIELDS = ("Hunt-Context", "Caller-Context")
_PIN_DIGITS = (1, 10)  # what the prompt takes: any PIN, and a breakout room's one digit more
_FIRST_DIGIT_MS = 10_000  # waits this long for the first digit after the prompt
_NEXT_DIGIT_MS = 3_000  # and this long between digits (or '#' ends the PIN)


@dataclass(frozen=True, slots=True)
class Target:
    """Where a PIN's call goes: the conference ``pin`` on the FreeSWITCH at ``sip_host``."""

    pin: str
    sip_host: str


type Lookup = Callable[[str], Target | None]  # a PIN -> its running meeting's target


@dataclass(frozen=True, slots=True)
class Call:
    """What one mod_xml_curl dialplan lookup says about the call."""

    section: str
    destination: str
    context: str
    caller_number: str
    private: bool
    attempts: int


def read_call(form: Mapping[str, str], settings: FsapiSettings) -> Call:
    """The lookup's fields; anything missing or malformed reads as absent (total)."""
    context = _first(form, _CONTEXT_FIELDS)
    return Call(
        section=form.get("section", ""),
        destination=_first(form, _DESTINATION_FIELDS).strip(),
        context=context if _CONTEXT.fullmatch(context) else settings.context,
        caller_number=form.get("Caller-Caller-ID-Number", "") or form.get("Caller-ANI", ""),
        private=_privacy_requested(form),
        attempts=parse_count(form.get(f"variable_{ATTEMPTS_VARIABLE}"), max_digits=3),
    )


def answer(
    form: Mapping[str, str], settings: FsapiSettings, lookup: Lookup, pin_length: int
) -> bytes:
    """The document FreeSWITCH gets for this lookup (see the module docstring).

    ``pin_length``: the digits of the gateway's voice bridges; a first destination of
    that many digits (or one more) was meant as a PIN, so a wrong one is told so.
    """
    call = read_call(form, settings)
    if call.section != "dialplan" or not call.destination:
        return not_found()
    target = route(call.destination, lookup)
    if target is not None:
        return _document(call.context, "bbb-dial-in-bridge", _bridge(call, target, settings))
    if call.destination == FAILED_DESTINATION or call.attempts >= settings.max_attempts:
        return _document(call.context, "bbb-dial-in-reject", _reject(settings))
    wrong = call.attempts > 0 or _looks_like_pin(call.destination, pin_length)
    return _document(call.context, "bbb-dial-in-prompt", _prompt(call, settings, wrong))


def route(destination: str, lookup: Lookup) -> Target | None:
    """A running meeting's target for ``destination``, or its breakout room's."""
    if not destination.isascii() or not destination.isdigit():
        return None
    found = lookup(destination)
    if found is not None or len(destination) < 2:
        return found
    parent = lookup(destination[:-1])  # breakout rooms: the meeting's bridge and one digit
    return None if parent is None else Target(destination, parent.sip_host)


def masked(number: str, digits: int) -> str:
    """``number`` as a meeting shows it: digits only (a leading ``+`` kept), the last
    ``digits`` of them replaced by X (all, when it has no more than that)."""
    plus = "+" if number.strip().startswith("+") else ""
    kept = "".join(c for c in number if c.isascii() and c.isdigit())
    if not kept:
        return HIDDEN_NUMBER
    cut = max(len(kept) - digits, 0)
    return plus + kept[:cut] + "X" * (len(kept) - cut)


# -- the documents -----------------------------------------------------------------------------

type Action = tuple[str, str]  # (application, data)


def not_found() -> bytes:
    """mod_xml_curl's "no such thing here": FreeSWITCH tries its next source."""
    document = etree.Element("document", type="freeswitch/xml")
    section = etree.SubElement(document, "section", name="result")
    etree.SubElement(section, "result", status="not found")
    return _serialise(document)


def _document(context: str, extension: str, actions: list[Action]) -> bytes:
    document = etree.Element("document", type="freeswitch/xml")
    section = etree.SubElement(
        document, "section", name="dialplan", description="BigBlueButton dial-in"
    )
    where = etree.SubElement(section, "context", name=context)
    entry = etree.SubElement(where, "extension", name=extension)
    condition = etree.SubElement(entry, "condition", field="destination_number", expression="^.*$")
    for application, data in actions:
        action = etree.SubElement(condition, "action", application=application)
        if data:
            action.set("data", data)
    return _serialise(document)


def _prompt(call: Call, settings: FsapiSettings, wrong: bool) -> list[Action]:
    low, high = _PIN_DIGITS
    ask = (
        f"{low} {high} 3 {_FIRST_DIGIT_MS} # {settings.prompt_sound} {settings.invalid_sound} "
        f"{PIN_VARIABLE} ^[0-9]+$ {_NEXT_DIGIT_MS} {FAILED_DESTINATION} XML {call.context}"
    )
    said = [("playback", settings.invalid_sound)] if wrong else []
    return [
        ("answer", ""),
        *said,
        ("set", f"{ATTEMPTS_VARIABLE}={call.attempts + 1}"),
        ("play_and_get_digits", ask),
        ("transfer", f"${{{PIN_VARIABLE}}} XML {call.context}"),
    ]


def _bridge(call: Call, target: Target, settings: FsapiSettings) -> list[Action]:
    if call.private:
        shown = [
            ("privacy", "full"),
            ("set", f"effective_caller_id_name={HIDDEN_NAME}"),
            ("set", f"effective_caller_id_number={HIDDEN_NUMBER}"),
        ]
    else:
        number = masked(call.caller_number, settings.mask_digits)
        shown = [
            ("set", f"effective_caller_id_name={number}"),
            ("set", f"effective_caller_id_number={number}"),
        ]
    limit = (
        [("sched_hangup", f"+{int(settings.max_duration)} allotted_timeout")]
        if settings.max_duration >= 1
        else []
    )
    dial = f"sofia/{settings.sip_profile}/{target.pin}@{target.sip_host}"
    return [*shown, *limit, ("bridge", dial)]


def _reject(settings: FsapiSettings) -> list[Action]:
    return [("answer", ""), ("playback", settings.goodbye_sound), ("hangup", "NORMAL_CLEARING")]


def _serialise(document: etree._Element) -> bytes:
    return etree.tostring(document, xml_declaration=True, encoding="UTF-8", standalone=False)


# -- reading the request -----------------------------------------------------------------------


def _first(form: Mapping[str, str], names: tuple[str, ...]) -> str:
    return next((form[n] for n in names if form.get(n)), "")


def _looks_like_pin(destination: str, length: int) -> bool:
    """Digits a caller meant as a PIN (not the platform's phone number, which is longer)."""
    return destination.isascii() and destination.isdigit() and len(destination) - length in (0, 1)


def _privacy_requested(form: Mapping[str, str]) -> bool:
    """The caller withheld its number: FreeSWITCH's privacy flag, or a SIP Privacy
    header asking for it (``id``, ``user``, ``header``; RFC 3323, 3325)."""
    if form.get("Caller-Privacy-Hide-Number", "").lower() == "true":
        return True
    for name in ("variable_sip_Privacy", "variable_sip_h_Privacy", "variable_sip_i_privacy"):
        tokens = re.split(r"[;,\s]+", form.get(name, "").lower())
        if _PRIVACY_TOKENS.intersection(tokens):
            return True
    return form.get("Caller-Caller-ID-Number", "").strip().lower() in {"anonymous", "restricted"}
