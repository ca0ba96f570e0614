"""The platform's default chat texts on create (SPEC §5).

Unless the customer passes ``deactivateBbbserverDefaultChatTexts=true``, the
``welcome`` and ``moderatorOnlyMessage`` sent to the backend are the
platform's text followed by the customer's own.  ``%%DIALNUM%%``,
``%%CONFNUM%%``, ``%%CONFNAME%%`` and ``%%SERVERURL%%`` are left for BBB to
fill.  The switch itself is never forwarded.
"""

from __future__ import annotations

from collections.abc import Sequence

from proxy.bbb.rewrite import first_values
from proxy.config import Texts

SWITCH = "deactivateBbbserverDefaultChatTexts"
SEPARATOR = "<br><br>"


def apply_default_texts(params: Sequence[tuple[str, str]], texts: Texts) -> list[tuple[str, str]]:
    """``params`` for the backend: switch removed, platform texts put in front."""
    values = first_values(params)
    deactivated = values.get(SWITCH, "").strip().lower() == "true"
    out = [(k, v) for k, v in params if k not in (SWITCH, "welcome", "moderatorOnlyMessage")]
    for name, default in (
        ("welcome", texts.welcome),
        ("moderatorOnlyMessage", texts.moderator_only_message),
    ):
        own = values.get(name)
        text = own if deactivated else _join(default, own)
        if text:
            out.append((name, text))
    return out


def _join(default: str, own: str | None) -> str:
    if not default:
        return own or ""
    return f"{default}{SEPARATOR}{own}" if own else default
