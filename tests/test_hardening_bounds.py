"""Bounded everything a peer controls: slow clients, big or nasty backend answers, floods."""

from __future__ import annotations

from urllib.parse import urlsplit

import trio

from tests.harness import Stack, StackFactory, text

BOUND = 1.0  # client_read and client_idle in these tests, seconds
SLACK = 2.5  # a loaded 2-core machine: closed within BOUND + SLACK


async def _closed_after(stack: Stack, head: bytes, trickle: bytes) -> float:
    """Open a connection, send ``head``, then one byte of ``trickle`` every 0.2 s.

    Returns the seconds until the gateway closed the connection.
    """
    port = int(urlsplit(stack.url).port or 0)
    started = trio.current_time()
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream, trio.open_nursery() as nursery:

        async def send_slowly() -> None:
            try:
                await stream.send_all(head)
                for byte in trickle:
                    await trio.sleep(0.2)
                    await stream.send_all(bytes([byte]))
                await trio.sleep_forever()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                await trio.sleep_forever()

        nursery.start_soon(send_slowly)
        try:
            while await stream.receive_some(65536):
                pass
        except trio.BrokenResourceError:
            pass  # reset by the gateway: closed too
        nursery.cancel_scope.cancel()
    return trio.current_time() - started


async def test_slow_clients_are_closed_within_the_bound_while_others_are_served(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack(
        proxy={"timeouts": {"client_read": BOUND, "client_idle": BOUND}}, backends=1
    )
    target = urlsplit(stack.signed("create", [("meetingID", "slow"), ("name", "Slow")]))
    path = f"{target.path}?{target.query}"
    slow_body = (
        f"POST {path} HTTP/1.1\r\nHost: gw\r\nContent-Length: 100000\r\n"
        "Content-Type: application/x-www-form-urlencoded\r\n\r\n"
    ).encode()
    slow_head = f"GET {path} HTTP/1.1\r\n".encode()
    kinds = [
        (slow_body, b"x" * 1000),  # a body that trickles in: the whole-body bound
        (slow_body, b""),  # a body that never comes: the silence bound
        (slow_head, b"X-Slow: " + b"y" * 1000),  # a head that trickles in: the idle bound
    ]
    times: list[float] = []

    async def one(head: bytes, trickle: bytes) -> None:
        times.append(await _closed_after(stack, head, trickle))

    with trio.fail_after(BOUND + SLACK + 5):
        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(one, *kinds[i % 3])
            await trio.sleep(0.3)
            for n in range(5):  # normal requests meanwhile, answered at once
                with trio.fail_after(BOUND):
                    root = await stack.create(f"ok-{n}", maxParticipants="1")
                    assert text(root, "returncode") == "SUCCESS", text(root, "messageKey")
    assert len(times) == 200
    assert max(times) < BOUND + SLACK, sorted(times)[-5:]
    assert min(times) >= BOUND * 0.9  # closed by the bound, not refused for another reason
    assert stack.gateway.ledger.get(("acme", "slow")) is None
