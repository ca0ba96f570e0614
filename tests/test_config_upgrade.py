"""A configuration written for an earlier release still starts: retired keys warn, not stop."""

from __future__ import annotations

import logging

import pytest

from proxy import config
from proxy.errors import ConfigError
from tests.test_config import minimal


def test_retired_release_after_is_ignored_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    data = minimal()
    data["proxy"]["health"] = {"release_after": 300, "interval": 7}
    with caplog.at_level(logging.WARNING, logger="proxy.config"):
        loaded = config.from_mapping(data)
    assert loaded.proxy.health.interval == 7
    assert "proxy.health.release_after is no longer used" in caplog.text


def test_other_unknown_health_keys_still_stop_start_up() -> None:
    data = minimal()
    data["proxy"]["health"] = {"release_aftr": 300}
    with pytest.raises(ConfigError, match="release_aftr"):
        config.from_mapping(data)
