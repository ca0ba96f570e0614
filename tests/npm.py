"""The npm packages the real-client tests run (``tests/clients/js``), installed on demand.

A missing ``node_modules`` is installed with ``npm ci`` from the pinned lock file, not
skipped: the tests of a real client must run wherever the suite runs (CI included), and
the npm registry is one of the suite's requirements, as PyPI is.  Several test runs may
share one working tree, so the install holds an exclusive lock on a file beside it.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import subprocess
from pathlib import Path

import pytest

CLIENTS = Path(__file__).resolve().parent / "clients" / "js"
INSTALL_TIMEOUT = 300  # seconds; a cold npm cache fetches 8 small packages


def tool(name: str) -> str:
    """The path of ``node`` or ``npm``; fails the test (never skips) when it is missing."""
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: the real-client tests need Node.js 18+ and npm")
    return found


def _locked_versions(directory: Path) -> dict[str, str]:
    lock = json.loads((directory / "package-lock.json").read_text(encoding="utf-8"))
    packages: dict[str, dict[str, str]] = lock["packages"]
    return {path: entry["version"] for path, entry in packages.items() if path}


def _is_installed(directory: Path) -> bool:
    for path, version in _locked_versions(directory).items():
        manifest = directory / path / "package.json"
        if not manifest.is_file():
            return False
        if json.loads(manifest.read_text(encoding="utf-8")).get("version") != version:
            return False
    return True


def npm_ci(directory: Path) -> None:
    """``npm ci`` in ``directory``; fails the test with npm's own words if it fails."""
    done = subprocess.run(
        [tool("npm"), "ci", "--no-audit", "--no-fund", "--prefer-offline", "--loglevel=error"],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(f"npm ci in {directory} failed ({done.returncode}):\n{done.stderr}")


def installed(directory: Path = CLIENTS) -> Path:
    """``directory`` with every package of its lock file installed, as locked."""
    with (directory / ".install.lock").open("a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        if not _is_installed(directory):
            npm_ci(directory)
        assert _is_installed(directory), f"npm ci left {directory} unlike its lock file"
    return directory
