"""The bare quart-trio endpoint: the framework's floor under the gateway.

It routes the gateway's URL shapes (``/<customer>/bigbluebutton/api/<call>``)
and answers without looking at the query: join with a 302, every other call
with a fixed small XML document.  It is served by hypercorn's trio worker with
the gateway's own hypercorn settings, so the gateway's figure divided by this
one is the cost of the gateway's own work.

``python -m bench.bare --fixed`` serves the stack's floor instead: one route taking
every path, answering a fixed 200 body without looking at the URL (no customer,
no call; the framework's own per-request cost and nothing else).

``python -m bench.bare [--port P] [--fixed]`` prints its base URL once listening.
"""

from __future__ import annotations

import argparse
import contextlib

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from quart import Response
from quart_trio import QuartTrio

from proxy.server import hypercorn_config

XML = b"<response><returncode>SUCCESS</returncode><version>2.0</version></response>"
JOIN_LOCATION = "http://127.0.0.1:1/bigbluebutton/api/join?bare=1"
MAX_HEADER_BYTES = 128 * 1024


def create_app() -> QuartTrio:
    app = QuartTrio(__name__)

    @app.route("/<customer>/bigbluebutton/api/<path:call>")
    async def api(customer: str, call: str) -> Response:
        if call == "join":
            return Response(b"", 302, headers={"Location": JOIN_LOCATION})
        return Response(XML, content_type="text/xml;charset=utf-8")

    return app


def create_fixed_app() -> QuartTrio:
    """The floor: every path answered 200 with the same body, the URL never read."""
    app = QuartTrio(__name__)

    @app.route("/", defaults={"anything": ""})
    @app.route("/<path:anything>")
    async def fixed(anything: str) -> Response:
        return Response(XML, content_type="text/xml;charset=utf-8")

    return app


async def serve_bare(port: int, fixed: bool = False) -> None:
    config = hypercorn_config(f"127.0.0.1:{port}", MAX_HEADER_BYTES)
    app = create_fixed_app() if fixed else create_app()
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(_serve, app, config)
        print(binds[0], flush=True)


async def _serve(
    app: QuartTrio, config: Config, *, task_status: trio.TaskStatus[list[str]]
) -> None:
    await serve(app, config, shutdown_trigger=trio.sleep_forever, task_status=task_status)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bare", description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--fixed", action="store_true", help="the fixed 200, no routing")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(serve_bare, args.port, args.fixed)


if __name__ == "__main__":
    main()
