"""No secret reaches a log line."""

from __future__ import annotations

import logging

import pytest

from proxy.logs import RedactingFilter, redact


@pytest.mark.parametrize(
    "line",
    [
        "GET /api/create?meetingID=x&checksum=abcdef0123&name=y",
        "join?password=hunter2&fullName=A",
        "http://gw/callbacks/v1/ended?b=b1&m=acme~x&sig=deadbeef",
        "moderatorPW=mp1 attendeePW=ap1",
    ],
)
def test_secret_parameters_are_masked(line: str) -> None:
    masked = redact(line)
    for secret in ("abcdef0123", "hunter2", "deadbeef", "mp1", "ap1"):
        assert secret not in masked
    assert "***" in masked


def test_filter_masks_arguments_too() -> None:
    record = logging.LogRecord(
        "x", logging.INFO, __file__, 1, "calling %s", ("/end?checksum=s3cr3t",), None
    )
    RedactingFilter().filter(record)
    assert record.getMessage() == "calling /end?checksum=***"
