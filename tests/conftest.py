from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import trio

from proxy.logs import RedactingFilter
from tests.harness import Stack, StackFactory, start_stack


@pytest.fixture(autouse=True)
def _gateway_log_handlers_removed() -> Iterator[None]:
    """A test that runs ``bbb-proxy``'s main() sets up the process's logging (a handler on
    the root logger, writing to that test's captured stderr); take it away afterwards, so
    no later test writes to a closed stream or sees its records changed by its filter."""
    root = logging.getLogger()
    before, level = set(root.handlers), root.level
    yield
    for handler in root.handlers[:]:
        if handler not in before and any(isinstance(f, RedactingFilter) for f in handler.filters):
            root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture
async def make_stack(
    nursery: trio.Nursery, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[StackFactory]:
    """Start simulated BBB servers and a gateway on loopback; closes its clients after."""
    stacks: list[Stack] = []

    async def make(**options: Any) -> Stack:
        stack = await start_stack(nursery, tmp_path_factory.mktemp("state"), **options)
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        await stack.http.aclose()


@pytest.fixture
async def stack(make_stack: StackFactory) -> Stack:
    """Two simulated BBB servers (capacity 100 each) behind a gateway, three customers."""
    return await make_stack()
