"""A real BBB client library drives the hooks API through the gateway: bigbluebutton-js.

bigbluebutton-js 0.2.0 (npm) has hooks.create/list/destroy; ``tests/clients/js/hooks.js``
calls them as an application would, for a per-meeting hook, and prints what the library
parsed.  Needs ``node`` and ``npm``; the packages are installed from the lock file when
missing (``tests/npm.py``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio

from tests import npm
from tests.harness import Stack

CLIENT = Path(__file__).resolve().parent / "clients" / "js"
NODE = shutil.which("node")


@pytest.fixture(autouse=True, scope="module")
def _installed() -> None:
    npm.installed(CLIENT)  # npm ci from the lock file when missing: never a skip


async def run_client(stack: Stack, callback_url: str, meeting_id: str) -> dict[str, Any]:
    assert NODE is not None
    base = f"{stack.url}/acme/bigbluebutton"
    args = [NODE, str(CLIENT / "hooks.js"), base, stack.secrets["acme"], callback_url, meeting_id]
    with trio.fail_after(30):
        done = await trio.run_process(args, capture_stdout=True, capture_stderr=True, check=False)
    assert done.returncode == 0, done.stderr.decode()
    result: dict[str, Any] = json.loads(done.stdout)
    return result


async def test_bigbluebutton_js_creates_lists_and_destroys_a_per_meeting_hook(
    stack: Stack,
) -> None:
    url = "http://127.0.0.1:9/lms/bbb-events?course=7"
    steps = await run_client(stack, url, "lesson-42")
    created = steps["created"]
    assert created["returncode"] == "SUCCESS"
    assert created["permanentHook"] is False and created["rawData"] is False
    hook_id = created["hookID"]
    assert isinstance(hook_id, str) and len(hook_id) == 36  # a UUID, as bbb-webhooks 3.x
    assert steps["again"]["messageKey"] == "duplicateWarning"
    assert steps["again"]["hookID"] == hook_id
    assert steps["global"]["returncode"] == "FAILED"
    assert steps["global"]["messageKey"] == "missingParamMeetingID"
    listed = steps["listed"]["hooks"]["hook"]  # one hook: fast-xml-parser gives an object
    assert listed["hookID"] == hook_id and listed["callbackURL"] == url
    assert listed["meetingID"] == "lesson-42"
    assert listed["eventID"] == "meeting-ended,user-joined"
    assert steps["destroyed"] == {"returncode": "SUCCESS", "removed": True}
    assert steps["listedAfter"] == {"returncode": "SUCCESS", "hooks": ""}
    assert steps["destroyedAgain"]["messageKey"] == "destroyMissingHook"
    assert stack.gateway.hooks.listed("acme") == []


def test_the_client_is_pinned() -> None:
    lock = json.loads((CLIENT / "package-lock.json").read_text())
    assert lock["packages"]["node_modules/bigbluebutton-js"]["version"] == "0.2.0"
    assert subprocess.run([NODE or "node", "--version"], capture_output=True, check=True).stdout
