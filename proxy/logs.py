"""Logging set-up, with secrets kept out of every line.

A BBB URL carries ``checksum=``, join URLs may carry ``password=`` and the
gateway's meeting-ended URL a ``sig=``; a filter masks the values of such
parameters in every record before it is written.  httpx's own request log is
kept at WARNING: it would print every backend URL.
"""

from __future__ import annotations

import logging
import re

_SECRET_PARAMS = re.compile(
    r"((?:checksum|sig|password|moderatorPW|attendeePW|secret|sessionToken)=)[^&\s\"']+", re.I
)


def redact(text: str) -> str:
    return _SECRET_PARAMS.sub(r"\1***", text)


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        return True


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
