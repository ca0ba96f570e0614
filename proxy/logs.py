"""Logging set-up, with secrets kept out of every line.

A BBB URL carries ``checksum=`` and join URLs may carry ``password=``; a
filter masks those values (and anything configured as a secret) in every
record before it is written.
"""

from __future__ import annotations

import logging
import re

_SECRET_PARAMS = re.compile(
    r"((?:checksum|password|moderatorPW|attendeePW|secret|sessionToken)=)[^&\s\"']+", re.I
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
