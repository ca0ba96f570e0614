"""Logging set-up, with secrets kept out of every line.

A BBB URL carries ``checksum=``, join URLs may carry ``password=`` and the
gateway's meeting-ended URL a ``sig=``; a filter masks the values of such
parameters in every record before it is written: the message, and the text of
a logged exception's traceback and of a stack, which often quote a URL.
httpx's own request log is kept at WARNING: it would print every backend URL.
"""

from __future__ import annotations

import logging
import re
from typing import TextIO

_SECRET_PARAMS = re.compile(
    r"((?:checksum|sig|password|moderatorPW|attendeePW|secret|sessionToken)=)[^&\s\"']+", re.I
)
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
SHOWN_CHARS = 300  # a peer's value quoted in a log line is cut to this


def redact(text: str) -> str:
    return _SECRET_PARAMS.sub(r"\1***", text)


def shown(value: str) -> str:
    """A peer's value as a log line may quote it: redacted, non-printables escaped, cut."""
    text = redact(value[:SHOWN_CHARS])
    if not text.isprintable():
        text = text.encode("unicode_escape").decode("ascii")
    return text + ("..." if len(value) > SHOWN_CHARS else "")


class RedactingFilter(logging.Filter):
    """Masks secrets in a record's message, exception text and stack text."""

    _formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = self._formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def redacting_handler(stream: TextIO | None = None) -> logging.Handler:
    """The gateway's log handler: to ``stream`` (stderr by default), every record redacted."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(_FORMAT))
    handler.addFilter(RedactingFilter())
    return handler


def setup_logging(level: str = "INFO") -> None:
    root = logging.getLogger()
    root.handlers[:] = [redacting_handler()]
    root.setLevel(level)
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
