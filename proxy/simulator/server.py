"""Running simulators under hypercorn's trio worker."""

from __future__ import annotations

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from .app import create_app
from .core import Simulator


async def serve_simulator(
    sim: Simulator,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``sim`` until cancelled; ``task_status.started(api_url)`` once listening.

    ``api_url`` is ``http://HOST:PORT/bigbluebutton/api`` with the port really
    bound (useful with ``port=0``).
    """
    config = Config()
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = None

    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(_serve, sim, config)
        task_status.started(binds[0] + "/bigbluebutton/api")


async def _serve(
    sim: Simulator,
    config: Config,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    await serve(
        create_app(sim), config, shutdown_trigger=trio.sleep_forever, task_status=task_status
    )
