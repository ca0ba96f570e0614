"""A real Prometheus scrapes a running gateway; every query of the Grafana dashboard answers.

Debian's ``prometheus`` package (prometheus and promtool) is needed; ``./run test`` installs
it when missing and sets ``BBB_PROXY_NEED_PROMETHEUS``, so there a missing binary fails the
test; a bare ``pytest`` without it skips.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from proxy.bbb import recording_ready
from proxy.health import Health, State
from proxy.metrics import TALLIES
from tests.harness import Stack, StackFactory, free_port

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"
SHIPPED = CONFIG_DIR / "prometheus.yml"
DASHBOARD = CONFIG_DIR / "grafana-dashboard.json"
TOKEN = "prometheus-scrape-token"
ADMIN = "admin-token-for-prometheus-test"
HOUR = 3600.0
# Grafana's variables, as a dashboard user with every instance selected would see them.
GRAFANA_VARIABLES = {"$instance": ".*", "$__rate_interval": "1m", "$__interval": "15s"}
SHIPPED_AUTH = (
    "    # authorization:\n"
    "    #   type: Bearer\n"
    "    #   credentials_file: /etc/prometheus/bbb-proxy-metrics-token\n"
)


def tools() -> tuple[str, str]:
    prometheus, promtool = shutil.which("prometheus"), shutil.which("promtool")
    if prometheus is None or promtool is None:
        message = "Debian's prometheus package is not installed (./run test installs it)"
        if os.environ.get("BBB_PROXY_NEED_PROMETHEUS"):
            pytest.fail(message)
        pytest.skip(message)
    return prometheus, promtool


def scrape_config(gateway: str, token_file: Path) -> str:
    """config/prometheus.yml, pointed at the test's gateway, scraping every second."""
    text = SHIPPED.read_text()
    for old, new in {
        '"127.0.0.1:8080"': f'"{gateway}"',
        "scrape_interval: 15s": "scrape_interval: 1s",
        "evaluation_interval: 15s": "evaluation_interval: 1s",
        "scrape_timeout: 10s": "scrape_timeout: 1s",
        SHIPPED_AUTH: (
            f"    authorization:\n      type: Bearer\n      credentials_file: {token_file}\n"
        ),
    }.items():
        assert text.count(old) == 1, f"config/prometheus.yml no longer has {old!r}"
        text = text.replace(old, new)
    return text


def dashboard_queries() -> list[str]:
    def walk(panels: list[dict[str, Any]]) -> Iterator[str]:
        for panel in panels:
            yield from walk(panel.get("panels", []))
            yield from (t["expr"] for t in panel.get("targets", []))

    return list(walk(json.loads(DASHBOARD.read_text())["panels"]))


def evaluable(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"a Grafana variable the test does not know: {expr}"
    return expr


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url
        self.http = httpx.AsyncClient(timeout=5)

    async def query(self, expr: str) -> list[dict[str, Any]]:
        response = await self.http.get(f"{self.url}/api/v1/query", params={"query": expr})
        answer = response.json()
        assert answer["status"] == "success", (expr, answer)
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    async def value(self, expr: str) -> float | None:
        result = await self.query(expr)
        return float(result[0]["value"][1]) if result else None

    async def wait_for(self, expr: str, wanted: float, deadline: float = 60) -> None:
        """Until ``expr`` evaluates to ``wanted`` (scrapes are a second apart)."""
        with trio.move_on_after(deadline):
            while await self.value(expr) != wanted:  # noqa: ASYNC110 - another process's state
                await trio.sleep(0.25)
        assert await self.value(expr) == wanted, expr


async def start_prometheus(nursery: trio.Nursery, tmp: Path, gateway: str) -> Prometheus:
    prometheus, _ = tools()
    token_file = tmp / "token"
    token_file.write_text(TOKEN)
    config = tmp / "prometheus.yml"
    config.write_text(scrape_config(gateway, token_file))
    port = free_port()
    command = [
        prometheus,
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    with (tmp / "prometheus.log").open("wb") as log:  # the process keeps its own copy
        run = partial(trio.run_process, command, stdout=log, stderr=log, check=False)
        await nursery.start(run)  # killed when the test's nursery is cancelled
    server = Prometheus(f"http://127.0.0.1:{port}")
    with trio.fail_after(30):
        while True:
            try:
                if (await server.http.get(f"{server.url}/-/ready")).status_code == 200:
                    return server
            except httpx.TransportError:
                pass
            await trio.sleep(0.1)


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def load(stack: Stack) -> None:
    """A little of everything the dashboard shows: successes, refusals of every kind,
    a preempted overtime meeting, an admin change, a recording-ready notice."""
    clock = Clock()
    stack.gateway.ledger.clock = clock
    await stack.create("old", maxParticipants="10", duration="10")
    clock.now += HOUR  # "old" is overtime
    await stack.create("new", maxParticipants="15", duration="60")  # preempts "old"
    for call in ("getMeetingInfo", "isMeetingRunning"):
        await stack.call(call, [("meetingID", "new")])
    await stack.call("getMeetings", [])
    await stack.call("getRecordings", [("meetingID", "new")])
    join = [("meetingID", "new"), ("fullName", "A"), ("role", "VIEWER")]
    await stack.http.get(stack.signed("join", join))
    await stack.create("huge", maxParticipants="30")  # subscriptionExhausted
    await stack.http.get(stack.signed("getMeetings", []).replace("checksum=", "checksum=0"))
    await stack.http.get(stack.signed("nope", []))
    held = stack.gateway.ledger.get(("acme", "new"))
    assert held is not None
    stack.gateway.set_health(held.backend_id, Health(State.DOWN, failures=3, down_since=0.0))
    await stack.http.get(stack.signed("join", join))  # serverUnavailable: its server is down
    await stack.call("getRecordings", [])  # the DOWN server is left out
    stack.gateway.set_health(held.backend_id, Health())
    admin = {"Authorization": f"Bearer {ADMIN}"}
    ended = await stack.http.delete(f"{stack.url}/admin/v1/meetings/acme/new", headers=admin)
    assert ended.status_code == 200, ended.text
    assert (await stack.http.post(stack.url + recording_ready.PATH)).status_code == 403


async def test_every_dashboard_query_answers_from_a_real_prometheus(
    nursery: trio.Nursery, make_stack: StackFactory, tmp_path: Path
) -> None:
    stack = await make_stack(proxy={"metrics_token": TOKEN, "admin_token": ADMIN})
    prometheus = await start_prometheus(nursery, tmp_path, stack.url.removeprefix("http://"))
    try:
        await _every_query_answers(stack, prometheus)
    finally:
        await prometheus.http.aclose()


async def _every_query_answers(stack: Stack, prometheus: Prometheus) -> None:
    await prometheus.wait_for('up{job="bbb-proxy"}', 1)  # scraped, with the token
    await load(stack)
    await prometheus.wait_for('bbb_proxy_preemptions_total{outcome="ended"}', 1)
    await prometheus.wait_for('bbb_proxy_admin_changes_total{change="meeting_ended"}', 1)
    for reason in ("subscription", "server_unavailable", "checksum", "unsupported_call"):
        await prometheus.wait_for(f'sum(bbb_proxy_refusals_total{{reason="{reason}"}})', 1)
    await prometheus.wait_for('bbb_proxy_recording_ready_notices_total{answer="unsigned_url"}', 1)
    await prometheus.wait_for('bbb_proxy_recordings_backends_left_out_total{reason="down"}', 1)
    await prometheus.wait_for("count(bbb_proxy_requests_total)", await _series(stack))
    await trio.sleep(2.5)  # two more scrapes: every series has the two samples a rate needs
    queries = dashboard_queries()
    assert len(queries) > 30
    empty = [expr for expr in queries if not await prometheus.query(evaluable(expr))]
    assert empty == []
    instances = await prometheus.query("count by (instance) (bbb_proxy_meetings)")
    assert [i["metric"]["instance"] for i in instances] == [stack.url.removeprefix("http://")]


async def _series(stack: Stack) -> float:
    """How many bbb_proxy_requests_total series the gateway exports now."""
    body = await _scrape(stack)
    return float(
        sum(1 for line in body.splitlines() if line.startswith("bbb_proxy_requests_total{"))
    )


async def _scrape(stack: Stack) -> str:
    response = await stack.http.get(
        f"{stack.url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert response.status_code == 200
    return response.text


async def test_promtool_accepts_a_scrape(make_stack: StackFactory) -> None:
    _, promtool = tools()
    stack = await make_stack(proxy={"metrics_token": TOKEN})
    await stack.create("m-1")
    await stack.http.get(stack.signed("getMeetings", []).replace("checksum=", "checksum=0"))
    body = await _scrape(stack)
    assert "bbb_proxy_refusals_total" in body and "bbb_proxy_admin_changes_total" in body
    checked = await trio.run_process(
        [promtool, "check", "metrics"],
        stdin=body.encode(),
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    broken = await trio.run_process(  # promtool does find what breaks the conventions
        [promtool, "check", "metrics"],
        stdin=b"# HELP x_count a counter\n# TYPE x_count counter\nx_count 1\n",
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert broken.returncode != 0


def test_the_shipped_config_is_valid() -> None:
    _, promtool = tools()
    checked = subprocess.run(
        [promtool, "check", "config", str(SHIPPED)], capture_output=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_every_tally_family_is_on_the_dashboard() -> None:
    text = DASHBOARD.read_text()
    assert [t.name for t in TALLIES.values() if f"{t.name}_total" not in text] == []
