"""What the portal's forms accept; no I/O.

Error handling: :func:`defaults` returns the errors by field (a message key and its
parameters) instead of raising; nothing a browser posts raises here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from proxy.bbb.numbers import parse_int

MAX_DURATION = 7 * 24 * 60  # minutes: a default longer than a week is a typo


@dataclass(frozen=True, slots=True)
class Checked:
    values: dict[str, int] = field(default_factory=dict)
    errors: dict[str, tuple[str, dict[str, int]]] = field(default_factory=dict)


def defaults(form: Mapping[str, str], max_connections: int) -> Checked:
    """The default maxParticipants and duration a form asks for, checked: whole numbers
    >= 1, maxParticipants not above the subscription, duration at most a week."""
    values: dict[str, int] = {}
    errors: dict[str, tuple[str, dict[str, int]]] = {}
    participants = parse_int(form.get("default_max_participants"), max_digits=9)
    if participants is None or participants < 1:
        errors["default_max_participants"] = ("whole_number", {})
    elif participants > max_connections:
        errors["default_max_participants"] = ("above_subscription", {"max": max_connections})
    else:
        values["default_max_participants"] = participants
    duration = parse_int(form.get("default_duration"), max_digits=9)
    if duration is None or duration < 1:
        errors["default_duration"] = ("whole_number", {})
    elif duration > MAX_DURATION:
        errors["default_duration"] = ("too_long", {"max": MAX_DURATION})
    else:
        values["default_duration"] = duration
    return Checked(values, errors)
