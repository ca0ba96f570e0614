"""A gateway process that accepts webhook events itself, for the ``kill -9`` test.

``python -m tests.webhooks_child CONFIG SETUP``: serves the gateway of ``CONFIG`` as
``bbb-proxy serve`` does (durable ledger, hooks and webhook queue under its
``state_dir``), then registers the hooks and accepts the events that ``SETUP`` (JSON)
lists, as intake does for a backend's POST, and writes ``SETUP``'s ``marker`` file
once :meth:`~proxy.webhooks.delivery.Webhooks.accept` has returned: the moment intake
would answer the backend 200.  Then it serves on until killed.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import orjson
import trio

from proxy.config import load
from proxy.gateway import Gateway
from proxy.server import serve_gateway


async def main(config_path: str, setup: dict[str, Any]) -> None:
    async with trio.open_nursery() as nursery:
        gw: Gateway
        gw, _binds = await nursery.start(serve_gateway, load(config_path))
        for hook in setup["hooks"]:
            await gw.hooks.create(hook["customer"], hook["meeting"], hook["url"], None, "sha1")
        await gw.webhooks.accept(setup["customer"], setup["meeting"], setup["events"])
        await trio.Path(setup["marker"]).write_text("accepted")


if __name__ == "__main__":
    trio.run(main, sys.argv[1], orjson.loads(Path(sys.argv[2]).read_bytes()))
