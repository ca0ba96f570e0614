"""``bbb-proxy demo``: simulated BBB servers, the gateway in front, one demo customer.

Everything runs in one process on 127.0.0.1; state goes to a fresh temporary
directory.  It prints the customer's API URL and secret and ready-to-open
signed ``create`` and ``join`` URLs.
"""

from __future__ import annotations

import tempfile
from typing import Any

import trio

from proxy.bbb.checksum import signed_query
from proxy.config import Config, from_mapping
from proxy.server import serve_gateway
from proxy.simulator import Simulator, serve_simulator

CUSTOMER = "demo"
CUSTOMER_SECRET = "demo-secret-change-me"
BACKEND_SECRET = "simulated-backend-secret"


def demo_config(port: int, backend_urls: list[str], state_dir: str) -> Config:
    """The embedded demo configuration: one customer, the given simulated backends."""
    data: dict[str, Any] = {
        "proxy": {
            "bind": f"127.0.0.1:{port}",
            "public_url": f"http://127.0.0.1:{port}",
            "state_dir": state_dir,
        },
        "backends": [
            {"id": f"sim-{i + 1}", "url": url, "secret": BACKEND_SECRET, "capacity": 100}
            for i, url in enumerate(backend_urls)
        ],
        "customers": [
            {
                "id": CUSTOMER,
                "secret": CUSTOMER_SECRET,
                "max_connections": 50,
                "default_max_participants": 10,
                "default_duration": 60,
            }
        ],
    }
    return from_mapping(data)


def signed_url(base: str, call: str, params: list[tuple[str, str]], secret: str) -> str:
    return f"{base}/{call}?{signed_query(call, params, secret, 'sha256')}"


async def run_demo(port: int, backends: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bbb-proxy-demo-") as state_dir:
        async with trio.open_nursery() as nursery:
            urls = [
                await nursery.start(serve_simulator, Simulator(BACKEND_SECRET, server_name=name))
                for name in (f"sim-{i}" for i in range(1, backends + 1))
            ]
            config = demo_config(port, urls, state_dir)
            await nursery.start(_gateway_until_signal, config, nursery)
            _print_welcome(config, urls)


async def _gateway_until_signal(
    config: Config,
    nursery: trio.Nursery,
    *,
    task_status: trio.TaskStatus[object] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until SIGTERM/SIGINT, then stop the simulators too."""
    await serve_gateway(config, handle_signals=True, task_status=task_status)
    nursery.cancel_scope.cancel()


def _print_welcome(config: Config, backend_urls: list[str]) -> None:
    api = f"{config.proxy.public_url}/{CUSTOMER}/bigbluebutton/api"
    create = signed_url(
        api, "create", [("meetingID", "demo-room"), ("name", "Demo room")], CUSTOMER_SECRET
    )
    join = signed_url(
        api,
        "join",
        [("meetingID", "demo-room"), ("fullName", "Demo User"), ("role", "MODERATOR")],
        CUSTOMER_SECRET,
    )
    print(
        "\nbbb-proxy demo is running (Ctrl-C to stop)\n"
        f"  simulated BBB servers: {', '.join(backend_urls)}\n"
        f"  API URL:  {api}\n"
        f"  secret:   {CUSTOMER_SECRET}\n\n"
        f"Create a meeting (open in a browser or curl):\n  {create}\n\n"
        f"Then join it (redirects to the simulated BBB server):\n  {join}\n",
        flush=True,
    )
