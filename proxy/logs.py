"""Logging set-up: JSON lines or readable text, with secrets kept out of every line.

A BBB URL carries ``checksum=``, join URLs may carry ``password=``, the gateway's
meeting-ended URL a ``sig=`` and a recording-ready notice a ``signed_parameters=``
JWT; :class:`RedactingFilter` masks the values of such parameters, and of a
``Bearer`` token, in every record before it is written: the message, the fields
of a structured line, and the text of a logged exception's traceback and of a
stack, which often quote a URL.  httpx's own request log is kept at WARNING: it
would print every URL.

Two formats, chosen by ``[proxy] log_format`` or ``--log-format``:

- ``json``: one JSON object per line (:class:`JsonFormatter`): ``time``, ``level``,
  ``logger``, ``message``, ``request_id`` when the line was written while answering a
  request, the fields of a request or backend-call line (:mod:`proxy.request_log`),
  and ``exception`` when there is one;
- ``text``: ``time level logger [request id] message``, for a person at a terminal.

``auto`` (the default) is ``text`` when stderr is a terminal, else ``json``.
"""

from __future__ import annotations

import logging
import re
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import TextIO

import orjson

# A value already masked ("***" and then a delimiter or punctuation) is left as it is, so that
# masking twice (shown() and then the handler's filter) changes nothing more.
_MASKED = r"\*\*\*(?=[&\s\"',;:)\]]|$)"
_SECRET_PARAMS = re.compile(
    r"((?:checksum|sig|password|moderatorPW|attendeePW|secret|sessionToken|signed_parameters"
    r"|token)=)(?:" + _MASKED + r"|[^&\s\"']+)",
    re.I,
)
_BEARER = re.compile(r"(Bearer\s+)(?:" + _MASKED + r"|[^\s\"',]+)", re.I)
_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
SHOWN_CHARS = 300  # a peer's value quoted in a log line is cut to this
FORMATS = ("auto", "json", "text")

# The id of the request the current task is answering (set by proxy.request_log).
REQUEST_ID: ContextVar[str | None] = ContextVar("bbb_proxy_request_id", default=None)


def redact(text: str) -> str:
    if "=" not in text and "bearer" not in text.lower():
        return text  # neither pattern can match (the common case): no regex work per line
    return _BEARER.sub(r"\1***", _SECRET_PARAMS.sub(r"\1***", text))


def shown(value: str) -> str:
    """A peer's value as a log line may quote it: redacted, non-printables escaped, cut."""
    text = redact(value[:SHOWN_CHARS])
    if not text.isprintable():
        text = text.encode("unicode_escape").decode("ascii")
    return text + ("..." if len(value) > SHOWN_CHARS else "")


class RedactingFilter(logging.Filter):
    """Masks secrets in a record's message, fields, exception text and stack text."""

    _formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            record.fields = {k: _redacted(v) for k, v in fields.items()}
        if record.exc_info and not record.exc_text:
            record.exc_text = self._formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def _redacted(value: object) -> object:
    return redact(value) if isinstance(value, str) else value


class RequestIdFilter(logging.Filter):
    """Gives every record a ``request_id``: the request being answered, or None."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = REQUEST_ID.get()
        return True


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(_TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, "request_id", None) is None:
            record.request_id = "-"
        return super().format(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per record (orjson); see the module docstring for the keys."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id is not None and request_id != "-":
            line["request_id"] = request_id
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = record.stack_info
        return orjson.dumps(line, default=str).decode()


def chosen_format(log_format: str, stream: TextIO) -> str:
    """``json`` or ``text``: ``auto`` is text on a terminal, JSON otherwise."""
    if log_format != "auto":
        return log_format
    isatty = getattr(stream, "isatty", None)
    return "text" if isatty is not None and isatty() else "json"


def redacting_handler(stream: TextIO | None = None, log_format: str = "text") -> logging.Handler:
    """The gateway's log handler: to ``stream`` (stderr by default), every record redacted."""
    handler = logging.StreamHandler(stream)
    chosen = chosen_format(log_format, handler.stream)
    handler.setFormatter(JsonFormatter() if chosen == "json" else TextFormatter())
    handler.addFilter(RequestIdFilter())
    handler.addFilter(RedactingFilter())
    return handler


# Libraries whose INFO lines say what the gateway's own WARNING lines say better: coredis logs
# a traceback at INFO for every connection Redis drops, and a line per retry.
NOISY = ("httpx", "httpcore", "coredis")


def setup_logging(
    level: str = "INFO", log_format: str = "auto", stream: TextIO | None = None
) -> None:
    """Send every log record to stderr (or ``stream``) through :func:`redacting_handler`."""
    root = logging.getLogger()
    root.handlers[:] = [redacting_handler(stream or sys.stderr, log_format)]
    root.setLevel(level)
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(logging.WARNING)
