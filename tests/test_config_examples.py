"""The files under ``config/`` stay true to the code: they load, and they name real things.

- every ``config/*.toml`` loads with :func:`proxy.config.load`;
- ``config/example.toml`` mentions every key the loader accepts (commented out
  when it shows the default), so a new key cannot go undocumented;
- ``config/demo.toml`` points at the servers the simulator's command line starts;
- ``config/grafana-dashboard.json`` queries only metrics :mod:`proxy.metrics`
  exports, and every exported family at least once.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import pytest

from proxy import config, demo
from proxy.gateway import open_gateway
from proxy.ledger.journal import open_durable_ledger
from proxy.metrics import Metrics
from proxy.simulator.__main__ import parse_args

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"
EXAMPLE = CONFIG_DIR / "example.toml"
DEMO = CONFIG_DIR / "demo.toml"
DASHBOARD = CONFIG_DIR / "grafana-dashboard.json"


# -- TOML examples -----------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.toml")), ids=lambda p: p.name)
def test_every_example_loads(path: Path) -> None:
    loaded = config.load(path)
    assert loaded.backends
    assert loaded.customers


def test_the_examples_are_there() -> None:
    assert {EXAMPLE, DEMO} <= set(CONFIG_DIR.glob("*.toml"))


def test_example_values() -> None:
    loaded = config.load(EXAMPLE)
    assert loaded.proxy.bind == "127.0.0.1:8080"
    assert loaded.proxy.timeouts.read == 15.0
    assert loaded.proxy.timeouts.connect == config.Timeouts().connect
    assert [b.id for b in loaded.backends] == ["bbb-1", "bbb-2"]
    assert [b.checksum_algorithm for b in loaded.backends] == ["sha256", "sha1"]
    acme, globex = loaded.customers
    assert acme.secrets == ("acme-customer-secret",)
    assert (acme.max_connections, acme.default_duration, acme.enabled) == (20, 60, True)
    assert globex.secrets == ("globex-new-secret", "globex-old-secret")
    assert loaded.customer_for_host("BBB.globex.example:443") is globex
    assert "%%DIALNUM%%" in loaded.texts.welcome
    assert loaded.texts.moderator_only_message == config.DEFAULT_MODERATOR_ONLY_MESSAGE


def _proxy_tables() -> set[str]:
    """The sub-tables of [proxy] ([proxy.timeouts], ...): fields holding a dataclass."""
    defaults = config.ProxySettings()
    return {f.name for f in fields(defaults) if is_dataclass(getattr(defaults, f.name))}


def _accepted_keys() -> set[str]:
    defaults = config.ProxySettings()
    keys = {f.name for f in fields(defaults)} - _proxy_tables()
    for table in _proxy_tables():
        keys |= {f.name for f in fields(getattr(defaults, table))}
    for cls in (config.Backend, config.Customer, config.Texts, config.StoreSettings):
        keys |= set(cls.__dataclass_fields__)
    return keys | {"secret"}  # a customer gives `secret` or `secrets`


@pytest.mark.parametrize("key", sorted(_accepted_keys()))
def test_example_documents_every_key(key: str) -> None:
    assert re.search(rf"^#?\s*{key}\s*=", EXAMPLE.read_text(), re.MULTILINE), (
        f"config/example.toml does not show the key {key!r}"
    )


@pytest.mark.parametrize("table", sorted(_proxy_tables()))
def test_example_documents_every_table(table: str) -> None:
    assert f"[proxy.{table}]" in EXAMPLE.read_text()


def test_demo_config_matches_the_simulator_command_line() -> None:
    # The command documented in config/demo.toml and the README.
    args = parse_args(["--port", "9001", "--count", "2", "--secret", demo.BACKEND_SECRET])
    expected = [f"http://{args.host}:{args.port + i}/bigbluebutton/api" for i in range(args.count)]
    loaded = config.load(DEMO)
    assert [b.url for b in loaded.backends] == expected
    assert {b.secret for b in loaded.backends} == {args.secret}
    (customer,) = loaded.customers
    assert (customer.id, customer.secrets) == (demo.CUSTOMER, (demo.CUSTOMER_SECRET,))


# -- Grafana dashboard -------------------------------------------------------------------------

_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.])([A-Za-z_:][\w:]*)\b(?!\s*\()")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "group_left", "group_right"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (enough PromQL for a dashboard)."""
    for pattern in (_STRINGS, _MATCHERS, _RANGES, _GROUPING):
        expr = pattern.sub(" ", expr)
    return {m for m in _IDENTIFIER.findall(expr) if m not in _KEYWORDS}


def test_metric_names_parser() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (call, le) (rate(a_bucket{x=~"$i", y!="}"}[5m])))'
        " / on (call) group_left b_total offset 5m"
    )
    assert metric_names(expr) == {"a_bucket", "b_total"}


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item)


def _dashboard_names() -> set[str]:
    board = json.loads(DASHBOARD.read_text())
    names: set[str] = set()
    for node in _walk(board):
        if isinstance(node.get("expr"), str):
            names |= metric_names(node["expr"])
        definition = node.get("definition")
        if isinstance(definition, str):
            names |= set(re.findall(r"label_values\(\s*([A-Za-z_:][\w:]*)", definition))
    return names


async def _exported_names(state_dir: Path) -> set[str]:
    """Sample names in a real exposition, with every labelled family populated."""
    example = config.load(CONFIG_DIR / "example.toml")
    async with open_durable_ledger(state_dir) as ledger, open_gateway(example, ledger) as gw:
        metrics = Metrics(gw)
        metrics.observe("create", "success", 0.01)
        metrics.observe_backend("bbb-1", "create", "ok", 0.01)
        text = metrics.exposition().decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1].isalpha()}


def _families(names: set[str]) -> set[str]:
    return {re.sub(r"_(total|created|bucket|sum|count)$", "", n) for n in names}


def test_dashboard_is_grafana_json() -> None:
    board = json.loads(DASHBOARD.read_text())
    assert board["schemaVersion"] >= 36
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    for node in _walk(board["panels"]):
        if "datasource" in node:
            assert node["datasource"]["uid"] == "${datasource}"


async def test_dashboard_uses_only_exported_metrics(tmp_path: Path) -> None:
    used, exported = _dashboard_names(), await _exported_names(tmp_path)
    assert used, "no expressions found in the dashboard"
    assert used <= exported, f"not exported by proxy.metrics: {sorted(used - exported)}"


async def test_dashboard_shows_every_exported_family(tmp_path: Path) -> None:
    missing = _families(await _exported_names(tmp_path)) - _families(_dashboard_names())
    assert not missing, f"exported but not on the dashboard: {sorted(missing)}"
