"""The TOML configuration: every key checked, every error names its key."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from proxy import config
from proxy.errors import ConfigError

FULL = """
[proxy]
bind = "0.0.0.0:9090"
public_url = "https://bbb.example.org/"
state_dir = "/var/lib/bbb-proxy"
disabled_calls = ["updateRecordings", "putRecordingTextTrack"]
logout_url = "https://example.org/bye"
max_query_bytes = 8192
backend_connections = 4

[proxy.timeouts]
connect = 1
read = 2.5

[[backends]]
id = "bbb-1"
url = "http://127.0.0.1:9001/bigbluebutton/api/"
secret = "backend-secret-1"
capacity = 300

[[backends]]
id = "bbb-2"
url = "https://bbb2.example.org/bigbluebutton/api"
secret = "backend-secret-2"
capacity = 150
checksum_algorithm = "sha512"

[[customers]]
id = "acme"
secret = "customer-secret"
enabled = true
max_connections = 20
default_max_participants = 10
default_duration = 60
hosts = ["BBB.Acme.example"]

[[customers]]
id = "globex-2"
secrets = ["new-secret", "old-secret"]
enabled = false
max_connections = 5
default_max_participants = 2
default_duration = 30

[texts]
welcome = "Hello %%DIALNUM%%"
"""


def minimal() -> dict[str, Any]:
    """The smallest valid configuration, as tomllib would return it."""
    return {
        "proxy": {"bind": "127.0.0.1:8080"},
        "backends": [
            {
                "id": "bbb-1",
                "url": "http://127.0.0.1:9001/bigbluebutton/api",
                "secret": "bs",
                "capacity": 300,
            },
            {
                "id": "bbb-2",
                "url": "http://127.0.0.1:9002/bigbluebutton/api",
                "secret": "bs",
                "capacity": 300,
            },
        ],
        "customers": [
            {
                "id": "acme",
                "secret": "cs",
                "max_connections": 20,
                "default_max_participants": 10,
                "default_duration": 60,
            },
            {
                "id": "globex",
                "secret": "gs",
                "max_connections": 20,
                "default_max_participants": 10,
                "default_duration": 60,
                "hosts": ["bbb.globex.example", "[::1]"],
            },
        ],
    }


def load_text(tmp_path: Path, text: str) -> config.Config:
    path = tmp_path / "proxy.toml"
    path.write_text(text, encoding="utf-8")
    return config.load(path)


def assert_rejected(data: dict[str, Any], *fragments: str) -> str:
    with pytest.raises(ConfigError) as info:
        config.from_mapping(data)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message
    return message


def test_full_config_loads(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, FULL)
    proxy = cfg.proxy
    assert proxy.bind == "0.0.0.0:9090"
    assert proxy.public_url == "https://bbb.example.org"
    assert proxy.state_dir == Path("/var/lib/bbb-proxy")
    assert proxy.disabled_calls == frozenset({"updateRecordings", "putRecordingTextTrack"})
    assert proxy.logout_url == "https://example.org/bye"
    assert proxy.join_error_url == "https://example.org/bye"
    assert proxy.max_query_bytes == 8192
    assert proxy.max_body_bytes == 4 * 1024 * 1024
    assert proxy.backend_connections == 4
    assert proxy.timeouts == config.Timeouts(connect=1.0, read=2.5)
    assert isinstance(proxy.timeouts.connect, float)

    assert [b.id for b in cfg.backends] == ["bbb-1", "bbb-2"]
    b1, b2 = cfg.backends
    assert b1.url == "http://127.0.0.1:9001/bigbluebutton/api"
    assert (b1.secret, b1.capacity, b1.checksum_algorithm) == ("backend-secret-1", 300, "sha256")
    assert (b2.secret, b2.capacity, b2.checksum_algorithm) == ("backend-secret-2", 150, "sha512")

    acme = cfg.customer("acme")
    assert acme is not None
    assert acme.secrets == ("customer-secret",)
    assert acme.enabled is True
    assert (acme.max_connections, acme.default_max_participants, acme.default_duration) == (
        20,
        10,
        60,
    )
    assert acme.hosts == ("bbb.acme.example",)
    globex = cfg.customer("globex-2")
    assert globex is not None
    assert globex.secrets == ("new-secret", "old-secret")
    assert globex.enabled is False
    assert cfg.customer("nobody") is None

    assert cfg.texts.welcome == "Hello %%DIALNUM%%"
    assert cfg.texts.moderator_only_message == config.DEFAULT_MODERATOR_ONLY_MESSAGE


def test_defaults() -> None:
    cfg = config.from_mapping(minimal())
    assert cfg.proxy.public_url == "http://127.0.0.1:8080"
    assert cfg.proxy.join_error_url == "http://127.0.0.1:8080/"
    assert cfg.proxy.state_dir == Path("state")
    assert cfg.proxy.disabled_calls == frozenset()
    assert cfg.proxy.timeouts == config.Timeouts()
    assert cfg.texts == config.Texts()
    assert cfg.customers[0].enabled is True
    assert cfg.customers[0].hosts == ()


def test_customer_for_host() -> None:
    cfg = config.from_mapping(minimal())
    globex = cfg.customer("globex")
    assert cfg.customer_for_host("bbb.globex.example") is globex
    assert cfg.customer_for_host("BBB.Globex.Example") is globex
    assert cfg.customer_for_host("bbb.globex.example:8443") is globex
    assert cfg.customer_for_host("[::1]") is globex
    assert cfg.customer_for_host("other.example") is None
    assert cfg.customer_for_host("other.example:80") is None
    assert cfg.customer_for_host("") is None


def test_customer_for_ipv6_host_with_port() -> None:
    # A Host header for a bracketed IPv6 address may carry a port too (RFC 7230 §5.4).
    cfg = config.from_mapping(minimal())
    assert cfg.customer_for_host("[::1]:8443") is cfg.customer("globex")


def test_repr_never_shows_secrets(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, FULL)
    secrets = [
        "backend-secret-1",
        "backend-secret-2",
        "customer-secret",
        "new-secret",
        "old-secret",
    ]
    texts = [repr(cfg), str(cfg), *map(repr, cfg.backends), *map(repr, cfg.customers)]
    for text in texts:
        for secret in secrets:
            assert secret not in text
    assert "bbb-1" in repr(cfg.backends[0])
    assert "acme" in repr(cfg.customers[0])


@pytest.mark.parametrize(
    ("where", "path"),
    [
        (lambda d: d, "colour"),
        (lambda d: d["proxy"], "proxy.colour"),
        (lambda d: d["backends"][1], "backends[1].colour"),
        (lambda d: d["customers"][0], "customers[0].colour"),
    ],
)
def test_unknown_key(where: Any, path: str) -> None:
    data = minimal()
    where(data)["colour"] = "blue"
    assert_rejected(data, path, "unknown key")


def test_unknown_key_in_timeouts_and_texts() -> None:
    data = minimal()
    data["proxy"]["timeouts"] = {"conect": 1}
    assert_rejected(data, "proxy.timeouts.conect", "unknown key")
    data = minimal()
    data["texts"] = {"welcom": "x"}
    assert_rejected(data, "texts.welcom", "unknown key")


@pytest.mark.parametrize(
    ("section", "index", "key"),
    [
        ("backends", 0, "id"),
        ("backends", 1, "url"),
        ("backends", 0, "secret"),
        ("backends", 1, "capacity"),
        ("customers", 0, "id"),
        ("customers", 1, "max_connections"),
        ("customers", 0, "default_max_participants"),
        ("customers", 1, "default_duration"),
    ],
)
def test_missing_required_key(section: str, index: int, key: str) -> None:
    data = minimal()
    del data[section][index][key]
    assert_rejected(data, f"{section}[{index}].{key}: required")


def test_missing_secret() -> None:
    data = minimal()
    del data["customers"][1]["secret"]
    assert_rejected(data, "customers[1]", "'secret' or 'secrets'")


def test_no_backends() -> None:
    data = minimal()
    del data["backends"]
    assert_rejected(data, "backends", "required")


@pytest.mark.parametrize(
    ("section", "index", "key", "value"),
    [
        ("backends", 0, "capacity", "300"),
        ("backends", 0, "capacity", 2.5),
        ("backends", 0, "capacity", True),
        ("backends", 1, "secret", 5),
        ("backends", 1, "url", 5),
        ("customers", 0, "enabled", "yes"),
        ("customers", 1, "hosts", "bbb.globex.example"),
        ("customers", 1, "hosts", [1]),
        ("customers", 0, "secrets", "one"),
        ("customers", 0, "max_connections", "20"),
    ],
)
def test_wrong_type(section: str, index: int, key: str, value: object) -> None:
    data = minimal()
    if key == "secrets":
        del data[section][index]["secret"]
    data[section][index][key] = value
    assert_rejected(data, f"{section}[{index}].{key}:")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("disabled_calls", "create"),
        ("max_query_bytes", "64k"),
        ("backend_connections", 0),
    ],
)
def test_wrong_type_in_proxy(key: str, value: object) -> None:
    data = minimal()
    data["proxy"][key] = value
    assert_rejected(data, f"proxy.{key}:")


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("proxy", "bind", 8080),
        ("proxy", "public_url", ["http://a"]),
        ("proxy", "state_dir", 1),
        ("proxy", "logout_url", False),
        ("texts", "welcome", 5),
    ],
)
def test_wrong_type_for_string_keys(section: str, key: str, value: object) -> None:
    # A number where a string belongs is a mistake, not something to str() silently.
    data = minimal()
    data.setdefault(section, {})[key] = value
    assert_rejected(data, f"{section}.{key}:")


def test_wrong_timeout() -> None:
    data = minimal()
    data["proxy"]["timeouts"] = {"read": 0}
    assert_rejected(data, "proxy.timeouts.read:", "> 0")
    data["proxy"]["timeouts"] = {"read": "10s"}
    assert_rejected(data, "proxy.timeouts.read:")


@pytest.mark.parametrize("section", ["proxy", "texts"])
def test_section_not_a_table(section: str) -> None:
    data = minimal()
    data[section] = [{"bind": "x"}]
    assert_rejected(data, f"{section}: must be a table")


def test_backends_not_an_array() -> None:
    data = minimal()
    data["backends"] = data["backends"][0]
    assert_rejected(data, "backends: must be an array")
    data = minimal()
    data["customers"] = ["acme"]
    assert_rejected(data, "customers[0]: must be a table")


def test_duplicate_backend_id() -> None:
    data = minimal()
    data["backends"][1]["id"] = "bbb-1"
    assert_rejected(data, "backends", "'bbb-1'", "twice")


def test_duplicate_customer_id() -> None:
    data = minimal()
    data["customers"][1]["id"] = "acme"
    assert_rejected(data, "customers", "'acme'", "twice")


def test_duplicate_host() -> None:
    data = minimal()
    data["customers"][0]["hosts"] = ["BBB.globex.example"]
    assert_rejected(data, "customers", "hosts", "'bbb.globex.example'", "twice")


@pytest.mark.parametrize(
    "bad_id", ["Acme", "ac me", "acme/x", "-acme", "", "a" * 64, "acmé", "acme_1", "acme\n"]
)
@pytest.mark.parametrize("section", ["backends", "customers"])
def test_bad_id_characters(section: str, bad_id: str) -> None:
    data = minimal()
    data[section][0]["id"] = bad_id
    assert_rejected(data, f"{section}[0].id:", "a-z")


@pytest.mark.parametrize("good_id", ["a", "0acme", "acme-2", "a" * 63])
def test_good_ids(good_id: str) -> None:
    data = minimal()
    data["customers"][0]["id"] = good_id
    assert config.from_mapping(data).customers[0].id == good_id


def test_secret_and_secrets_both_given() -> None:
    data = minimal()
    data["customers"][0]["secrets"] = ["a", "b"]
    assert_rejected(data, "customers[0]", "exactly one of 'secret' or 'secrets'")


@pytest.mark.parametrize("secrets", [[], ["ok", ""]])
def test_empty_secrets(secrets: list[str]) -> None:
    data = minimal()
    del data["customers"][1]["secret"]
    data["customers"][1]["secrets"] = secrets
    assert_rejected(data, "customers[1].secrets:", "non-empty")


def test_empty_secret() -> None:
    data = minimal()
    data["customers"][0]["secret"] = ""
    assert_rejected(data, "customers[0].secret:", "non-empty")
    data = minimal()
    data["backends"][0]["secret"] = ""
    assert_rejected(data, "backends[0].secret:", "non-empty")


@pytest.mark.parametrize("algorithm", ["md5", "SHA256", "sha224", ""])
def test_bad_checksum_algorithm(algorithm: str) -> None:
    data = minimal()
    data["backends"][1]["checksum_algorithm"] = algorithm
    assert_rejected(data, "backends[1].checksum_algorithm", "sha1")


@pytest.mark.parametrize("algorithm", ["sha1", "sha256", "sha384", "sha512"])
def test_good_checksum_algorithm(algorithm: str) -> None:
    data = minimal()
    data["backends"][1]["checksum_algorithm"] = algorithm
    assert config.from_mapping(data).backends[1].checksum_algorithm == algorithm


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ("backends", "capacity"),
        ("customers", "max_connections"),
        ("customers", "default_max_participants"),
        ("customers", "default_duration"),
    ],
)
@pytest.mark.parametrize("value", [0, -5])
def test_non_positive_numbers(section: str, key: str, value: int) -> None:
    data = minimal()
    data[section][0][key] = value
    assert_rejected(data, f"{section}[0].{key}:", ">= 1")


@pytest.mark.parametrize(
    "url", ["127.0.0.1:9001/bigbluebutton/api", "ftp://bbb.example/api", "http://", "http:///x", ""]
)
def test_bad_backend_url(url: str) -> None:
    data = minimal()
    data["backends"][0]["url"] = url
    assert_rejected(data, "backends[0].url:", "http")


def test_invalid_toml(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[proxy\nbind = 1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        config.load(path)
    assert str(path) in str(info.value)


def test_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[texts]\nwelcome = "caf\xe9"\n')
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(path)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.toml"
    with pytest.raises(ConfigError, match="cannot read") as info:
        config.load(path)
    assert str(path) in str(info.value)


def test_minimal_is_valid_and_unchanged_by_loading() -> None:
    # Guards the rejection tests: they fail for the one change they make.
    data = minimal()
    before = copy.deepcopy(data)
    cfg = config.from_mapping(data)
    assert data == before
    assert len(cfg.backends) == 2
    assert len(cfg.customers) == 2
