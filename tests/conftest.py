from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

from tests.harness import Stack, StackFactory, start_stack


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
