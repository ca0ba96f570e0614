"""End-to-end over real sockets: the meeting calls of SPEC §6 through the gateway."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import orjson
import trio

from proxy.bbb import rewrite
from proxy.bbb.checksum import compute, signed_query
from proxy.config import DEFAULT_WELCOME
from proxy.ledger.service import NullJournal
from proxy.metrics import Metrics
from tests.harness import BACKEND_SECRET, Stack, query_of, start_receiver, text, wait_until


def sent(stack: Stack, call: str) -> list[dict[str, str]]:
    """Parameters of every ``call`` the simulated backends received."""
    return [dict(params) for sim in stack.sims for name, params in sim.requests if name == call]


async def test_version_document_needs_no_checksum(stack: Stack) -> None:
    for url in (stack.api(), stack.api() + "/", f"{stack.url}/bigbluebutton/api"):
        response = await stack.http.get(url)
        assert response.status_code == 200
        assert "<version>2.0</version>" in response.text
        assert "<returncode>SUCCESS</returncode>" in response.text


async def test_create_answers_with_customers_ids_and_sends_namespaced_meeting(stack: Stack) -> None:
    root = await stack.create("room-1", maxParticipants="7", duration="45", meta_course="Maths")
    assert text(root, "returncode") == "SUCCESS"
    assert text(root, "meetingID") == "room-1"
    assert text(root, "duration") == "45"
    assert text(root, "messageKey") == ""
    [params] = sent(stack, "create")
    assert params["meetingID"] == "acme~room-1"
    assert params["duration"] == "0"
    assert params["maxParticipants"] == "7"
    assert params["meta_course"] == "Maths"
    info = await stack.call("getMeetingInfo", [("meetingID", "room-1")])
    assert text(info, "meetingID") == "room-1"
    assert text(info, "duration") == "45"
    assert text(info, "maxUsers") == "7"
    metadata = info.find("metadata")
    assert metadata is not None
    assert [child.tag for child in metadata] == ["course"]


async def test_create_defaults_and_default_chat_texts(stack: Stack) -> None:
    await stack.create("room-1", welcome="Hello class")
    [params] = sent(stack, "create")
    assert params["maxParticipants"] == "10"  # acme's default_max_participants
    assert params["welcome"] == DEFAULT_WELCOME + "<br><br>Hello class"
    assert "%%DIALNUM%%" in params["welcome"] and "%%CONFNUM%%" in params["welcome"]
    assert "deactivateBbbserverDefaultChatTexts" not in params
    reservation = stack.gateway.ledger.get(("acme", "room-1"))
    assert reservation is not None
    assert (reservation.connections, reservation.duration) == (10, 60)


async def test_negative_size_and_duration_mean_not_given(stack: Stack) -> None:
    root = await stack.create("room-1", maxParticipants="-1", duration="-1")
    assert text(root, "returncode") == "SUCCESS"
    assert text(root, "duration") == "0"
    [params] = sent(stack, "create")
    assert params["maxParticipants"] == "10"  # acme's default
    reservation = stack.gateway.ledger.get(("acme", "room-1"))
    assert reservation is not None
    assert (reservation.connections, reservation.duration) == (10, 60)


async def test_deactivated_default_texts_send_only_customers_texts(stack: Stack) -> None:
    await stack.create(
        "room-1",
        welcome="Only mine",
        moderatorOnlyMessage="Mods only",
        deactivateBbbserverDefaultChatTexts="true",
    )
    [params] = sent(stack, "create")
    assert params["welcome"] == "Only mine"
    assert params["moderatorOnlyMessage"] == "Mods only"
    assert "deactivateBbbserverDefaultChatTexts" not in params


async def test_repeated_create_is_duplicate_warning_on_same_backend(stack: Stack) -> None:
    first = await stack.create("room-1")
    again = await stack.create("room-1")
    assert text(again, "returncode") == "SUCCESS"
    assert text(again, "messageKey") == "duplicateWarning"
    assert text(again, "meetingID") == "room-1"
    assert text(again, "internalMeetingID") == text(first, "internalMeetingID")
    assert text(again, "createTime") == text(first, "createTime")
    assert stack.gateway.ledger.statistics().connections_by_customer == {"acme": 10}
    backends = {s.server_name for s in stack.sims if "acme~room-1" in s.meetings}
    assert len(backends) == 1


async def test_two_customers_same_meeting_id_are_kept_apart(stack: Stack) -> None:
    await stack.create("room-1", customer="acme", meta_owner="acme")
    await stack.create("room-1", customer="globex", meta_owner="globex")
    for customer in ("acme", "globex"):
        info = await stack.call("getMeetingInfo", [("meetingID", "room-1")], customer)
        assert text(info, "metadata/owner") == customer
        listing = await stack.call("getMeetings", [], customer)
        meetings = listing.findall("meetings/meeting")
        assert [text(m, "meetingID") for m in meetings] == ["room-1"]
        assert [text(m, "metadata/owner") for m in meetings] == [customer]
    await stack.call("end", [("meetingID", "room-1")], "acme")
    still = await stack.call("getMeetingInfo", [("meetingID", "room-1")], "globex")
    assert text(still, "returncode") == "SUCCESS"


async def test_customer_cannot_see_or_end_another_customers_meeting(stack: Stack) -> None:
    await stack.create("secret-room", customer="globex")
    for call in ("getMeetingInfo", "end", "sendChatMessage"):
        root = await stack.call(call, [("meetingID", "secret-room"), ("message", "hi")])
        assert text(root, "returncode") == "FAILED"
        assert text(root, "messageKey") == "notFound"
    running = await stack.call("isMeetingRunning", [("meetingID", "secret-room")])
    assert text(running, "running") == "false"
    listing = await stack.call("getMeetings", [])
    assert text(listing, "messageKey") == "noMeetings"
    join = await stack.http.get(
        stack.signed("join", [("meetingID", "secret-room"), ("fullName", "X"), ("role", "VIEWER")])
    )
    assert join.status_code == 302
    assert "notFound" in join.headers["location"]


async def test_customer_cannot_smuggle_gateway_metadata(stack: Stack) -> None:
    smuggled = [
        ("meta_bbb-proxy-customer", "globex"),
        ("META_BBB-PROXY-MEETING", "other-room"),
        ("meta_bbb-proxy-duration", "999"),
        ("Meta_Bbb-Proxy-EndCallbackUrl", "http://10.0.0.1/internal"),
        ("meta_bbb-proxy-anything", "x"),
    ]
    await stack.call("create", [("meetingID", "room-1"), ("name", "Room 1"), *smuggled])
    [(_, params)] = [r for sim in stack.sims for r in sim.requests if r[0] == "create"]
    # Every value under the gateway's tags (any case) is the gateway's own, each once:
    # a dict() of the parameters would hide a smuggled first value behind the last.
    ours = [(k.lower(), v) for k, v in params if k.lower().startswith("meta_bbb-proxy-")]
    assert sorted(ours) == sorted(
        [
            ("meta_bbb-proxy-customer", "acme"),
            ("meta_bbb-proxy-meeting", "room-1"),
            ("meta_bbb-proxy-duration", "0"),
            *[(k, v) for k, v in ours if k == "meta_bbb-proxy-created"],
        ]
    )
    assert not {v for _, v in params} & {v for _, v in smuggled}
    listing = await stack.call("getMeetings", [], "globex")
    assert text(listing, "messageKey") == "noMeetings"
    info = await stack.call("getMeetingInfo", [("meetingID", "room-1")])
    assert text(info, "duration") == "0"
    assert info.find("metadata/endcallbackurl") is None


async def test_join_redirects_to_backend_resigned_and_user_arrives(stack: Stack) -> None:
    created = await stack.create("room-1")
    create_time = text(created, "createTime")
    params = [
        ("meetingID", "room-1"),
        ("fullName", "Ada Lovelace"),
        ("role", "MODERATOR"),
        ("createTime", create_time),
        ("userID", "lms-42"),
    ]
    response = await stack.http.get(stack.signed("join", params))
    assert response.status_code == 302
    location = response.headers["location"]
    sim, backend_id = stack.backend_meeting("acme", "room-1")
    assert location.startswith(stack.sim_urls[stack.sims.index(sim)] + "/join?")
    q = query_of(location)
    assert q["meetingID"] == backend_id
    assert q["createTime"] == create_time
    query = urlsplit(location).query
    without = query[: query.index("&checksum=")]
    assert q["checksum"] == compute("join", without, BACKEND_SECRET, "sha256")
    assert sim.requests == [r for r in sim.requests if r[0] != "join"]  # BBB not contacted
    landed = await stack.http.get(location, follow_redirects=True)
    assert landed.status_code == 200
    info = await stack.call("getMeetingInfo", [("meetingID", "room-1")])
    assert text(info, "participantCount") == "1"
    assert text(info, "attendees/attendee/fullName") == "Ada Lovelace"
    assert text(info, "attendees/attendee/userID") == "lms-42"
    running = await stack.call("isMeetingRunning", [("meetingID", "room-1")])
    assert text(running, "running") == "true"


async def test_join_redirect_false_is_answered_with_the_backends_xml(stack: Stack) -> None:
    await stack.create("room-1")
    params = [("meetingID", "room-1"), ("fullName", "A"), ("role", "VIEWER"), ("redirect", "false")]
    response = await stack.http.get(stack.signed("join", params))
    assert response.status_code == 200  # more in tests/test_join.py
    assert "<messageKey>successfullyJoined</messageKey>" in response.text


async def test_join_errors_redirect_to_logout_url_with_errors(stack: Stack) -> None:
    params = [
        ("meetingID", "nope"),
        ("fullName", "A"),
        ("role", "VIEWER"),
        ("logoutURL", "https://lms.test/bye?x=1"),
    ]
    response = await stack.http.get(stack.signed("join", params))
    assert response.status_code == 302
    location = response.headers["location"]
    assert location.startswith("https://lms.test/bye?x=1&errors=")
    errors = orjson.loads(query_of(location)["errors"])
    assert errors == [{"key": "notFound", "message": "A meeting with that ID does not exist"}]
    bad = stack.signed("join", params).replace("checksum=", "checksum=0")
    response = await stack.http.get(bad)
    assert response.status_code == 302
    assert orjson.loads(query_of(response.headers["location"])["errors"])[0]["key"] == (
        "checksumError"
    )


async def test_end_frees_connections_and_meeting_is_gone(stack: Stack) -> None:
    await stack.create("room-1", maxParticipants="15")
    root = await stack.call("end", [("meetingID", "room-1")])
    assert text(root, "returncode") == "SUCCESS"
    assert text(root, "messageKey") == "sentEndMeetingRequest"
    assert stack.gateway.ledger.get(("acme", "room-1")) is None
    assert stack.gateway.ledger.statistics().connections_by_customer == {}
    info = await stack.call("getMeetingInfo", [("meetingID", "room-1")])
    assert text(info, "messageKey") == "notFound"
    again = await stack.create("room-2", maxParticipants="20")
    assert text(again, "returncode") == "SUCCESS"


async def test_is_meeting_running_unknown_is_false(stack: Stack) -> None:
    root = await stack.call("isMeetingRunning", [("meetingID", "never")])
    assert text(root, "returncode") == "SUCCESS"
    assert text(root, "running") == "false"


async def test_get_meetings_lists_only_own_meetings_across_backends(stack: Stack) -> None:
    for i in range(6):
        await stack.create(f"room-{i}", maxParticipants="1")
    await stack.create("other", customer="globex")
    assert all(sim.meetings for sim in stack.sims), "meetings should spread over backends"
    listing = await stack.call("getMeetings", [])
    ids = sorted(text(m, "meetingID") for m in listing.findall("meetings/meeting"))
    assert ids == [f"room-{i}" for i in range(6)]


async def test_insert_document_and_send_chat_message_are_forwarded(stack: Stack) -> None:
    await stack.create("room-1")
    body = b'<modules><module name="presentation"><document url="https://x.test/a.pdf"/></module></modules>'
    response = await stack.http.post(
        stack.signed("insertDocument", [("meetingID", "room-1")]),
        content=body,
        headers={"Content-Type": "application/xml"},
    )
    assert "<returncode>SUCCESS</returncode>" in response.text
    assert sent(stack, "insertDocument")[0]["meetingID"] == "acme~room-1"
    chat = await stack.call("sendChatMessage", [("meetingID", "room-1"), ("message", "Hi all")])
    assert text(chat, "returncode") == "SUCCESS"
    assert sent(stack, "sendChatMessage")[0]["message"] == "Hi all"


async def test_post_form_create_with_checksum_over_empty_query(stack: Stack) -> None:
    checksum = compute("create", "", stack.secrets["acme"], "sha256")
    response = await stack.http.post(
        f"{stack.api()}/create?checksum={checksum}",
        data={"meetingID": "form-room", "name": "Form room"},
    )
    assert "<returncode>SUCCESS</returncode>" in response.text
    assert "<meetingID>form-room</meetingID>" in response.text


async def test_health_and_metrics(stack: Stack) -> None:
    await stack.create("room-1")
    assert (await stack.http.get(f"{stack.url}/healthz")).status_code == 200
    assert (await stack.http.get(f"{stack.url}/readyz")).status_code == 200
    metrics = (await stack.http.get(f"{stack.url}/metrics")).text
    assert 'bbb_proxy_requests_total{call="create",result="success"} 1.0' in metrics
    assert 'bbb_proxy_customer_connections{customer="acme"} 10.0' in metrics
    assert 'bbb_proxy_customer_max_connections{customer="acme"} 20.0' in metrics
    assert 'bbb_proxy_backend_health{backend="bbb-1",state="up"} 1.0' in metrics
    assert re.search(
        r'bbb_proxy_backend_requests_total\{backend="bbb-\d",call="create",outcome="ok"\} 1\.0',
        metrics,
    )
    assert "bbb_proxy_journal_fsyncs_total" in metrics
    # The backend refuses a one-character name; the gateway passes its answer on.
    refused = await stack.call("create", [("meetingID", "room-2"), ("name", "x")])
    assert text(refused, "messageKey") == "validationError"
    metrics = (await stack.http.get(f"{stack.url}/metrics")).text
    assert 'bbb_proxy_requests_total{call="create",result="validationError"} 1.0' in metrics


async def test_meeting_end_notice_frees_connections_and_calls_customer(
    stack: Stack, nursery: trio.Nursery
) -> None:
    receiver = await start_receiver(nursery)
    await stack.create(
        "room-1",
        meetingEndedURL=f"{receiver.url}/ended?room=1",
        meta_endCallbackUrl=f"{receiver.url}/callback",
    )
    [params] = sent(stack, "create")
    assert params["meetingEndedURL"].startswith(stack.url + "/callbacks/v1/ended?k=ended&")
    assert params["meta_endCallbackUrl"].startswith(stack.url + "/callbacks/v1/ended?k=callback&")
    assert f"{receiver.url}/callback" not in params["meta_endCallbackUrl"].split("&ecb=")[0]
    info = await stack.call("getMeetingInfo", [("meetingID", "room-1")])
    assert text(info, "metadata/endcallbackurl") == f"{receiver.url}/callback"
    metadata = info.find("metadata")
    assert metadata is not None and len(metadata.findall("endcallbackurl")) == 1
    sim, backend_meeting = stack.backend_meeting("acme", "room-1")
    # The meeting ends on the backend by itself (not through the gateway).
    sim_url = stack.sim_urls[stack.sims.index(sim)]
    query = signed_query("end", [("meetingID", backend_meeting)], BACKEND_SECRET)
    await stack.http.get(f"{sim_url}/end?{query}")
    await wait_until(lambda: stack.gateway.ledger.get(("acme", "room-1")) is None)
    await wait_until(lambda: len(receiver.seen) == 2)
    assert sorted(receiver.seen) == [
        "/callback?recordingmarks=false&meetingID=room-1",
        "/ended?room=1",
    ]


async def test_forged_end_notice_releases_nothing(stack: Stack) -> None:
    await stack.create("room-1")
    [params] = sent(stack, "create")
    genuine = params["meetingEndedURL"]
    forged = genuine[: genuine.index("&sig=")] + "&sig=" + "0" * 64
    assert (await stack.http.get(forged)).status_code == 403
    tampered = genuine.replace("m=acme", "m=globex")
    assert tampered != genuine
    assert (await stack.http.get(tampered)).status_code == 403
    assert stack.gateway.ledger.get(("acme", "room-1")) is not None
    assert (await stack.http.get(genuine)).status_code == 200
    assert stack.gateway.ledger.get(("acme", "room-1")) is None


async def test_readiness_is_honest(stack: Stack) -> None:
    ready = f"{stack.url}/readyz"
    assert (await stack.http.get(ready)).status_code == 200
    for backend in stack.config.backends:
        stack.gateway.modes[backend.id] = "drain"
    assert (await stack.http.get(ready)).status_code == 503
    stack.gateway.modes["bbb-1"] = "active"
    assert (await stack.http.get(ready)).status_code == 200
    journal = stack.gateway.ledger.journal

    class Failed(NullJournal):
        failed = True

    stack.gateway.ledger.journal = Failed()
    try:
        response = await stack.http.get(ready)
        assert response.status_code == 503
        assert [r["check"] for r in response.json()["reasons"]] == ["journal"]
    finally:
        stack.gateway.ledger.journal = journal


async def test_metric_labels_stay_bounded(stack: Stack) -> None:
    m = Metrics(stack.gateway)  # the label guard lives in Metrics; drive it directly
    for i in range(50):
        m.observe("create", f"weirdKey{i}", 0.01)
        m.observe(f"call{i}", "success", 0.01)
    text_out = m.exposition().decode()
    assert 'result="otherFailure"} 50.0' in text_out
    assert 'call="other",result="success"} 50.0' in text_out
    assert "weirdKey" not in text_out and "call7" not in text_out


async def test_get_meetings_asks_only_backends_holding_the_customers_meetings(
    stack: Stack,
) -> None:
    def polls() -> int:
        return len([r for sim in stack.sims for r in sim.requests if r[0] == "getMeetings"])

    await stack.create("room-1")
    holder, backend_meeting = stack.backend_meeting("acme", "room-1")
    before = polls()
    empty = await stack.call("getMeetings", [], "globex")
    assert text(empty, "messageKey") == "noMeetings"
    assert polls() == before  # globex holds nothing: no backend is asked
    listing = await stack.call("getMeetings", [], "acme")
    assert [text(m, "meetingID") for m in listing.findall("meetings/meeting")] == ["room-1"]
    assert polls() == before + 1
    assert holder.requests[-1][0] == "getMeetings"
    # A meeting the ledger does not hold is not listed, even if tagged as acme's.
    stray = [("meetingID", "acme~stray"), ("name", "Stray room"), *rewrite.tags("acme", "stray", 0)]
    sim_url = stack.sim_urls[stack.sims.index(holder)]
    await stack.http.get(f"{sim_url}/create?{signed_query('create', stray, BACKEND_SECRET)}")
    listing = await stack.call("getMeetings", [], "acme")
    assert [text(m, "meetingID") for m in listing.findall("meetings/meeting")] == ["room-1"]
    assert backend_meeting in holder.meetings
