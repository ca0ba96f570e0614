"""A real BBB client library drives per-meeting hooks through the gateway, end to end.

bigbluebutton-js 0.2.0 (npm, pinned in ``tests/clients/js/package-lock.json``) builds,
signs and parses every hooks call itself (``tests/clients/js/hook.js`` runs one call per
process).  A hook it creates for a meeting gets that meeting's events from the simulated
backend, signed with the customer's secret and without the participant's address, client
or session token; once it destroys the hook, nothing more arrives.  The packages are
installed from the lock file when missing (``tests/npm.py``): never skipped.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import trio

from tests import npm
from tests.harness import SECRETS, Stack, wait_until
from tests.test_webhooks_e2e import USER_AGENT, join, registered, start_receiver, valid_checksum


@pytest.fixture(scope="session")
def clients() -> Path:
    return npm.installed()


async def bigbluebutton_js(clients: Path, stack: Stack, *args: str) -> Any:
    """What bigbluebutton-js parsed from the gateway's answer to one hooks call."""
    env = {
        **os.environ,
        "BBB_URL": f"{stack.url}/acme/bigbluebutton",
        "BBB_SECRET": SECRETS["acme"],
    }
    command = [npm.tool("node"), str(clients / "hook.js"), *args]
    with trio.fail_after(30):
        done = await trio.run_process(
            command, env=env, capture_stdout=True, capture_stderr=True, check=False
        )
    assert done.returncode == 0, done.stderr.decode()
    return json.loads(done.stdout)


async def test_a_hook_created_by_bigbluebutton_js_gets_its_meetings_events(
    clients: Path, stack: Stack, nursery: trio.Nursery
) -> None:
    receiver, posts = await start_receiver(nursery)
    callback = f"{receiver}/lms/events?course=7"
    await registered(stack)
    created = await bigbluebutton_js(
        clients, stack, "create", callback, "lesson-1", "user-joined,meeting-ended"
    )
    assert created["returncode"] == "SUCCESS", created
    hook_id = str(created["hookID"])
    listed = await bigbluebutton_js(clients, stack, "list", "lesson-1")
    assert listed["hooks"]["hook"]["hookID"] == hook_id
    assert listed["hooks"]["hook"]["callbackURL"] == callback

    await stack.create("lesson-1")
    await stack.create("lesson-2")  # another meeting of the same customer: not this hook's
    await join(stack, "lesson-1", "Ann Example")
    await join(stack, "lesson-2", "Bob Example")
    await stack.call("end", [("meetingID", "lesson-1")])
    await wait_until(lambda: [p.name() for p in posts] == ["user-joined", "meeting-ended"])

    for post in posts:
        assert post.path == "/lms/events"
        assert valid_checksum(post, callback, SECRETS["acme"])  # sha1, as the library signed
        assert post.meeting_id() == "lesson-1"
    user = posts[0].event()["data"]["attributes"]["user"]
    assert user["name"] == "Ann Example" and user["external-user-id"] == "lms-7"
    assert user["ip-address"] == "" and user["user-agent"] == "" and user["referer"] == ""
    assert user["session-token"] == ""
    delivered = json.dumps([p.event() for p in posts])  # (the form's domain is the gateway's)
    for personal in ("127.0.0.1", "Firefox", USER_AGENT, "Bob Example"):
        assert personal not in delivered, personal

    destroyed = await bigbluebutton_js(clients, stack, "destroy", hook_id)
    assert destroyed == {"returncode": "SUCCESS", "removed": True}
    await stack.create("lesson-1")
    await join(stack, "lesson-1", "Carol Example")
    await stack.call("end", [("meetingID", "lesson-1")])
    listed_after = await bigbluebutton_js(clients, stack, "list")
    assert listed_after == {"returncode": "SUCCESS", "hooks": ""}
    assert len(posts) == 2  # the destroyed hook gets nothing more


async def test_bigbluebutton_js_hears_the_gateways_refusals(clients: Path, stack: Stack) -> None:
    without_meeting = await bigbluebutton_js(clients, stack, "create", "http://127.0.0.1:9/x", "")
    assert without_meeting["returncode"] == "FAILED"
    assert without_meeting["messageKey"] == "missingParamMeetingID"
    unknown = await bigbluebutton_js(clients, stack, "destroy", "no-such-hook")
    assert unknown["messageKey"] == "destroyMissingHook"


def test_the_pinned_client_installs_from_its_lock_file(tmp_path: Path) -> None:
    """Missing or unlike the lock, the packages are installed again (``npm ci`` works here)."""
    for name in ("package.json", "package-lock.json"):
        shutil.copy(npm.CLIENTS / name, tmp_path / name)
    manifest = tmp_path / "node_modules" / "bigbluebutton-js" / "package.json"
    assert not manifest.exists()
    assert npm.installed(tmp_path) == tmp_path
    assert json.loads(manifest.read_text())["version"] == "0.2.0"
    manifest.write_text(json.dumps({"name": "bigbluebutton-js", "version": "0.1.9"}))
    npm.installed(tmp_path)
    assert json.loads(manifest.read_text())["version"] == "0.2.0"
