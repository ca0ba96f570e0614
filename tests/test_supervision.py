"""Background tasks never take the gateway with them; customers' bad end URLs are dropped."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterator

import pytest
import trio

from proxy.bbb import callbacks
from proxy.bbb.callbacks import CustomerUrls
from proxy.logs import redacting_handler
from tests.harness import Stack, start_receiver, text, wait_until

# The issue's URLs that ended the process from a meeting-ended notice.
ISSUE_URLS = [
    "http://127.0.0.1:99999/ended",
    "http://a..example/x",
    "http://" + "a" * 64 + ".example/x",
    "http://127.0.0.1/a\x01b",
]


@pytest.fixture
def log_output() -> Iterator[io.StringIO]:
    """What the gateway's own log handler writes, while the test runs."""
    stream = io.StringIO()
    handler = redacting_handler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    level, root.level = root.level, logging.INFO
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


async def metric(stack: Stack, name: str, labels: str) -> float:
    exposition = (await stack.http.get(stack.url + "/metrics")).text
    match = re.search(rf"^{name}\{{{labels}\}} (\S+)$", exposition, re.M)
    return float(match.group(1)) if match else 0.0


async def assert_serves(stack: Stack, meeting_id: str) -> None:
    assert text(await stack.create(meeting_id), "returncode") == "SUCCESS"
    assert text(await stack.call("end", [("meetingID", meeting_id)]), "returncode") == "SUCCESS"


async def test_a_failing_task_is_logged_redacted_counted_and_nothing_else_stops(
    stack: Stack, log_output: io.StringIO
) -> None:
    async def fails() -> None:
        raise ValueError("GET https://lms.test/cb?checksum=s3cr3t&sig=t0ps3cr3t failed")

    stack.gateway.spawn("test-task", fails)
    await wait_until(lambda: stack.gateway.task_failures.get("test-task") == 1)
    written = log_output.getvalue()
    assert "background task test-task failed" in written
    assert "Traceback (most recent call last)" in written
    assert "ValueError: GET https://lms.test/cb?checksum=***&sig=***" in written
    assert "s3cr3t" not in written
    assert await metric(stack, "bbb_proxy_task_failures_total", 'kind="test-task"') == 1.0
    await assert_serves(stack, "after-failure")


@pytest.mark.parametrize("bad", ISSUE_URLS)
async def test_bad_end_url_is_dropped_at_create_and_the_meeting_works(
    stack: Stack, bad: str, log_output: io.StringIO
) -> None:
    dropped = await metric(stack, "bbb_proxy_customer_urls_total", 'outcome="dropped"')
    root = await stack.create("room", meetingEndedURL=bad, meta_endCallbackUrl=bad)
    assert text(root, "returncode") == "SUCCESS"
    sim, _ = stack.backend_meeting("acme", "room")
    [sent] = [dict(p) for name, p in sim.requests if name == "create"]
    assert "&cb=" not in sent["meta_endCallbackUrl"] and "&ecb=" not in sent["meta_endCallbackUrl"]
    assert "bbb-proxy-endcallbackurl" not in " ".join(sent)
    assert await metric(stack, "bbb_proxy_customer_urls_total", 'outcome="dropped"') == dropped + 2
    assert "create: dropped meetingEndedURL" in log_output.getvalue()
    end = await stack.call("end", [("meetingID", "room")])
    assert text(end, "returncode") == "SUCCESS"
    await wait_until(lambda: stack.gateway.ledger.get(("acme", "room")) is None)
    await trio.sleep(0.1)  # the backend's notices arrive and are handled
    assert stack.gateway.task_failures == {}
    await assert_serves(stack, "room-2")


async def test_a_notice_carrying_bad_urls_calls_nothing_and_breaks_nothing(stack: Stack) -> None:
    """A notice URL signed before URLs were checked at create (an older gateway)."""
    backend = stack.config.backends[0]
    urls = CustomerUrls(tuple(ISSUE_URLS), tuple(ISSUE_URLS))
    _, callback = callbacks.ended_urls(stack.url, backend, "acme~old", "old", urls, 1.0)
    before = await metric(stack, "bbb_proxy_customer_urls_total", 'outcome="invalid"')
    response = await stack.http.get(callback + "&recordingmarks=false&meetingID=acme~old")
    assert response.status_code == 200
    expected = before + 2 * len(ISSUE_URLS)
    with trio.fail_after(5):
        while await metric(stack, "bbb_proxy_customer_urls_total", 'outcome="invalid"') < expected:  # noqa: ASYNC110
            await trio.sleep(0.02)
    assert stack.gateway.task_failures == {}
    await assert_serves(stack, "still-serving")


async def test_only_the_first_end_url_of_each_kind_is_kept(
    stack: Stack, nursery: trio.Nursery
) -> None:
    receiver = await start_receiver(nursery)
    repeated = [("meetingEndedURL", f"{receiver.url}/ended?n={n}") for n in range(300)]
    repeated += [("meta_endCallbackUrl", f"{receiver.url}/callback?n={n}") for n in range(300)]
    root = await stack.call("create", [("meetingID", "many"), ("name", "Many"), *repeated])
    assert text(root, "returncode") == "SUCCESS"
    info = await stack.call("getMeetingInfo", [("meetingID", "many")])
    assert text(info, "metadata/endcallbackurl") == f"{receiver.url}/callback?n=0"
    assert text(await stack.call("end", [("meetingID", "many")]), "returncode") == "SUCCESS"
    await wait_until(lambda: len(receiver.seen) >= 2)
    await trio.sleep(0.2)  # any further call would have come by now
    assert sorted(receiver.seen) == [
        "/callback?n=0&recordingmarks=false&meetingID=many",
        "/ended?n=0",
    ]
