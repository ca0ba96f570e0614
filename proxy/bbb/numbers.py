"""Reading integers from text a peer sent: total, bounded, ASCII digits only.

``int()`` accepts what no BBB peer means (``"²"`` passes ``str.isdigit`` and then
raises; ``"١٢"`` and ``"1_000"`` parse; a 5,000-digit string costs quadratic time
or raises ``ValueError`` past Python's digit limit).  Every integer the gateway
reads from a customer, an end user or a backend goes through :func:`parse_int`,
which never raises: it answers ``None`` for anything that is not a plain,
optionally signed, run of ASCII digits of bounded length.
"""

from __future__ import annotations

MAX_DIGITS = 18  # fits a signed 64-bit integer (BBB's epoch milliseconds have 13)
_DIGITS = frozenset("0123456789")


def parse_int(
    text: str | None, *, max_digits: int = MAX_DIGITS, signed: bool = False
) -> int | None:
    """The integer ``text`` spells (surrounding whitespace ignored), or None.

    A leading ``-`` is accepted only when ``signed``; ``+``, underscores,
    non-ASCII digits and more than ``max_digits`` digits are refused.
    """
    if text is None:
        return None
    text = text.strip()
    digits = text[1:] if signed and text.startswith("-") else text
    if not digits or len(digits) > max_digits or not _DIGITS.issuperset(digits):
        return None
    return int(text)


def parse_count(text: str | None, *, max_digits: int = MAX_DIGITS) -> int:
    """A non-negative integer from a backend's answer; 0 for anything else."""
    value = parse_int(text, max_digits=max_digits)
    return 0 if value is None else value
