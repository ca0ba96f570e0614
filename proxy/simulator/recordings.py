"""Recordings on one simulated BBB server: made when a recorded meeting ends, listed and
changed as bbb-web 2.6+/3.0 does.

A meeting created with ``record=true`` leaves a recording when it ends (by ``end``, by
duration, or unjoined expiry).  It is ``processing`` for ``processing_seconds``, then
``published`` with two formats, ``presentation`` and ``video``, whose playback URLs point
at this server (``https://<server_name>/playback/...``).  Its metadata is the meeting's
(already lower-cased at create) plus ``isBreakout``, ``meetingId`` and ``meetingName``,
as the recording's ``metadata.xml`` holds them; a breakout's recording carries
``<breakout>`` (parent, sequence, freeJoin) and its parent's lists it in
``<breakoutRooms>``.  Real BBB only processes a recording when someone pressed the record
button; the simulator records every ``record=true`` meeting (tests want the recording).

getRecordings filters as ``ApiController.getRecordingsHandler`` and the recording
service do (bbb-api.md §2): ``recordID`` (comma list, prefix match; when given,
``meetingID`` is ignored), ``meetingID`` (comma list, each turned into
``sha1(meetingID)``, a recordID prefix), ``state`` (comma list, default
``published,unpublished``; ``any`` is every state), ``meta_*`` (exact match of the
lower-cased key), and ``offset``/``limit``: ``limit`` clamped to 1..100, ``offset`` below
0 or unreadable is 0, and without a readable ``limit`` there is no paging at all (offset
ignored); a paged answer ends with ``<totalElements>``.  The list is in
(startTime, recordID) order: bbb-web's own order is a HashSet's (none), a fake may pick
one, and a stable one makes tests exact.

publish/delete/updateRecordings match recordIDs exactly; none matching is ``notFound``.

Recording ready (bbb-api.md §4): when processing publishes a recording whose metadata names a
``bbb-recording-ready-url`` (else ``bn-``, else ``canvas-recording-ready-url``), a POST to it
is queued once per published format, as the post_publish script runs once per format: form
field ``signed_parameters``, an HS256 JWT signed with the server's secret (raw), payload
``{"meeting_id": <external meetingID>, "record_id": <recordID>}``, no ``exp``/``iat``.  The
trio layer sends each once (:meth:`RecordingStore.take_ready`), no retry.

Nothing here does I/O.  :meth:`RecordingStore.seed` adds many published recordings at
once for tests and benchmarks.
"""

from __future__ import annotations

import hashlib
import heapq
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import orjson

from proxy.bbb.envelope import element
from proxy.bbb.numbers import parse_int
from proxy.bbb.recording_ready import READY_KEYS as READY_URL_KEYS
from proxy.bbb.recording_ready import signed_jwt
from proxy.errors import ApiError, NotFound

from . import render
from .model import ApiRequest, Meeting, Reply
from .params import Params

if TYPE_CHECKING:
    from .core import Simulator

STATES = ("processing", "processed", "published", "unpublished", "deleted")
DEFAULT_STATES = frozenset({"published", "unpublished"})
MAX_LIMIT = 100
NOT_FOUND = "We could not find recordings"
MISSING_RECORD_ID = ("missingParamRecordID", "You must specify a recordID.")
MISSING_PUBLISH = ("missingParamPublish", "You must specify a publish value true or false.")
FORMATS = ("presentation", "video")


@dataclass
class Recording:
    """One recording as bbb-web lists it; field names follow ``get-recordings``' XML."""

    record_id: str  # == the meeting's internalMeetingID
    meeting_id: str  # the external meetingID
    name: str
    start_time: int
    end_time: int
    state: str = "processing"
    participants: int = 0
    metadata: dict[str, str] = field(default_factory=dict)
    is_breakout: bool = False
    parent_id: str = ""  # the parent meeting's internal id, for a breakout
    sequence: int = 0
    free_join: bool = False
    breakout_rooms: list[str] = field(default_factory=list)  # child recordIDs, for a parent
    formats: tuple[str, ...] = ()
    text_tracks: list[dict[str, str]] = field(default_factory=list)  # getRecordingTextTracks

    @property
    def published(self) -> bool:
        return self.state == "published"

    @property
    def length_minutes(self) -> int:
        return max(0, (self.end_time - self.start_time) // 60_000)


@dataclass(frozen=True, slots=True)
class Filters:
    """What one getRecordings asks for, decoded as bbb-web decodes it."""

    prefixes: tuple[str, ...] = ()  # recordID prefixes; empty: every recording
    states: frozenset[str] = DEFAULT_STATES
    meta: tuple[tuple[str, str], ...] = ()
    offset: int = 0
    limit: int | None = None  # None: not paged

    def matches(self, recording: Recording) -> bool:
        if self.prefixes and not any(recording.record_id.startswith(p) for p in self.prefixes):
            return False
        if recording.state not in self.states:
            return False
        return all(recording.metadata.get(k) == v for k, v in self.meta)


def split_ids(value: str | None) -> list[str]:
    """A comma list as ``ParamsProcessorUtil.decodeIds``: trimmed, empty items dropped."""
    return [part.strip() for part in (value or "").split(",") if part.strip()]


def filters_of(params: Params) -> Filters:
    prefixes = split_ids(params.get("recordID"))
    if not prefixes:
        prefixes = [_sha1(m) for m in split_ids(params.get("meetingID"))]
    return Filters(
        prefixes=tuple(prefixes),
        states=_states(params.get("state")),
        meta=tuple(
            (k[len("meta_") :].lower(), v) for k, v in params.pairs if k.lower().startswith("meta_")
        ),
        offset=_offset(params.get("offset")),
        limit=_limit(params.get("limit")),
    )


def _states(value: str | None) -> frozenset[str]:
    asked = {s.lower() for s in split_ids(value)}
    if not asked:
        return DEFAULT_STATES
    if "any" in asked:
        return frozenset(STATES)
    return frozenset(asked)


def _offset(value: str | None) -> int:
    number = None if value is None else parse_int(value, max_digits=9, signed=True)
    return max(0, number or 0)


def _limit(value: str | None) -> int | None:
    number = None if value is None else parse_int(value, max_digits=9, signed=True)
    return None if number is None else min(MAX_LIMIT, max(1, number))


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


class RecordingStore:
    """Every recording of one server, by recordID, and the ones still processing."""

    def __init__(self, server_name: str, processing_seconds: float = 0.0, secret: str = "") -> None:
        self.server_name = server_name
        self.processing_seconds = processing_seconds
        self.secret = secret  # signs the recording-ready JWTs
        self.ready_sent: list[tuple[str, str]] = []  # every (url, JWT) handed out, in order
        self._ready: list[tuple[str, str]] = []
        self.by_id: dict[str, Recording] = {}
        self._processing: list[tuple[int, str]] = []  # (due ms, recordID), a heap
        self._children: dict[str, list[str]] = {}  # parent internal id -> child recordIDs
        self.uploads: list[tuple[str, str, str, bytes]] = []  # (recordID, kind, lang, file)

    def __len__(self) -> int:
        return len(self.by_id)

    def add(self, recording: Recording, due_ms: int | None = None) -> None:
        """Hold ``recording``; one still ``processing`` is published at ``due_ms``."""
        self.by_id[recording.record_id] = recording
        if recording.is_breakout and recording.parent_id:
            self._children.setdefault(recording.parent_id, []).append(recording.record_id)
            parent = self.by_id.get(recording.parent_id)
            if parent is not None:
                parent.breakout_rooms.append(recording.record_id)
        recording.breakout_rooms.extend(
            c for c in self._children.get(recording.record_id, []) if c != recording.record_id
        )
        if recording.state == "processing" and due_ms is not None:
            heapq.heappush(self._processing, (due_ms, recording.record_id))

    def from_meeting(self, meeting: Meeting, now_ms: int) -> Recording:
        """The recording a recorded meeting leaves when it ends (processing until due)."""
        params = Params(meeting.params)
        recording = Recording(
            record_id=meeting.internal_id,
            meeting_id=meeting.meeting_id,
            name=meeting.name,
            start_time=meeting.create_time,
            end_time=now_ms,
            participants=len(meeting.unique_user_ids()) or int(meeting.has_user_joined),
            is_breakout=params.get("isBreakout") == "true",
            parent_id=params.get("parentMeetingID") or "",
            sequence=parse_int(params.get("sequence") or "0", max_digits=9) or 0,
            free_join=params.get("freeJoin") == "true",
        )
        recording.metadata = {
            **meeting.metadata,
            "isBreakout": "true" if recording.is_breakout else "false",
            "meetingId": meeting.meeting_id,
            "meetingName": meeting.name,
        }
        self.add(recording, now_ms + round(self.processing_seconds * 1000))
        return recording

    def tick(self, now_ms: int) -> list[Recording]:
        """Publish the recordings whose processing is done; returns them."""
        done = []
        while self._processing and self._processing[0][0] <= now_ms:
            _, record_id = heapq.heappop(self._processing)
            recording = self.by_id.get(record_id)
            if recording is not None and recording.state == "processing":
                recording.state = "published"
                recording.formats = FORMATS
                self._ready.extend(self._ready_notices(recording))
                done.append(recording)
        return done

    def _ready_notices(self, recording: Recording) -> list[tuple[str, str]]:
        url = next((recording.metadata[k] for k in READY_URL_KEYS if recording.metadata.get(k)), "")
        if not url:
            return []
        payload = {"meeting_id": recording.meeting_id, "record_id": recording.record_id}
        token = signed_jwt(payload, self.secret)
        return [(url, token) for _ in recording.formats]

    def take_ready(self) -> list[tuple[str, str]]:
        """The recording-ready POSTs to send now, (url, JWT), each handed out once."""
        ready, self._ready = self._ready, []
        self.ready_sent.extend(ready)
        return ready

    def seed(
        self,
        count: int,
        *,
        meeting_id: str = "seeded",
        name: str = "Seeded recording",
        metadata: Mapping[str, str] | None = None,
        start_ms: int = 1_700_000_000_000,
        step_ms: int = 60_000,
        state: str = "published",
    ) -> list[Recording]:
        """Add ``count`` recordings of ``meeting_id`` at once (tests, benchmarks)."""
        prefix = _sha1(meeting_id)
        made = []
        for i in range(count):
            start = start_ms + i * step_ms
            recording = Recording(
                record_id=f"{prefix}-{start}",
                meeting_id=meeting_id,
                name=name,
                start_time=start,
                end_time=start + 45 * 60_000,
                state=state,
                participants=3,
                metadata={
                    **(metadata or {}),
                    "isBreakout": "false",
                    "meetingId": meeting_id,
                    "meetingName": name,
                },
                formats=FORMATS if state in ("published", "unpublished") else (),
            )
            self.add(recording)
            made.append(recording)
        return made

    def select(self, filters: Filters) -> Iterator[Recording]:
        """The recordings ``filters`` asks for, in (startTime, recordID) order."""
        candidates: Iterable[Recording] = self.by_id.values()
        if filters.prefixes and all(p in self.by_id for p in filters.prefixes):
            candidates = self.exact(filters.prefixes)  # whole recordIDs: no scan (as BBB's index)
        found = (r for r in candidates if filters.matches(r))
        return iter(sorted(found, key=lambda r: (r.start_time, r.record_id)))

    def exact(self, record_ids: Iterable[str]) -> list[Recording]:
        return [self.by_id[i] for i in record_ids if i in self.by_id]


# -- handlers ----------------------------------------------------------------------------------


def get_recordings(sim: Simulator, req: ApiRequest, params: Params) -> Reply:
    filters = filters_of(params)
    listed = list(sim.recordings.select(filters))
    total = len(listed)
    if filters.limit is not None:
        listed = listed[filters.offset : filters.offset + filters.limit]
    return Reply.xml(recordings_xml(sim.recordings.server_name, listed, total, filters.limit))


def publish_recordings(sim: Simulator, req: ApiRequest, params: Params) -> Reply:
    params.required("recordID", *MISSING_RECORD_ID)
    publish = params.required("publish", *MISSING_PUBLISH)
    found = _named(sim, params)
    if publish.lower() not in ("true", "false"):
        raise ApiError("publish must be true or false", message_key="validationError")
    for recording in found:
        if recording.state in ("published", "unpublished"):
            recording.state = "published" if publish.lower() == "true" else "unpublished"
            sim.webhooks.recording_state(f"rap-{recording.state}", recording)
    return Reply.xml(render.response(element("published", publish.lower() == "true")))


def delete_recordings(sim: Simulator, req: ApiRequest, params: Params) -> Reply:
    for recording in _named(sim, params):
        recording.state = "deleted"
        sim.webhooks.recording_state("rap-deleted", recording)
    return Reply.xml(render.response(element("deleted", True)))


def update_recordings(sim: Simulator, req: ApiRequest, params: Params) -> Reply:
    """``meta_*`` set the recordings' metadata (keys lower-cased); an empty value removes it."""
    found = _named(sim, params)
    changes = [(k[len("meta_") :].lower(), v) for k, v in params.pairs if k.startswith("meta_")]
    for recording in found:
        for key, value in changes:
            if value:
                recording.metadata[key] = value
            else:
                recording.metadata.pop(key, None)
    return Reply.xml(render.response(element("updated", True)))


def _named(sim: Simulator, params: Params) -> list[Recording]:
    """The recordings ``recordID`` names exactly; ``notFound`` when none exists."""
    record_ids = split_ids(params.required("recordID", *MISSING_RECORD_ID))
    found = sim.recordings.exact(record_ids)
    if not found:
        raise NotFound(NOT_FOUND)
    return found


# -- text tracks (JSON, as RecordingController answers them) ----------------------------------


def json_failure(key: str, message: str) -> Reply:
    body = {"response": {"returncode": "FAILED", "messageKey": key, "message": message}}
    return Reply.json(orjson.dumps(body).decode())


def get_recording_text_tracks(sim: Simulator, req: ApiRequest, params: Params) -> Reply:
    """``{"response": {"returncode": "SUCCESS", "tracks": [...]}}``; JSON errors too."""
    record_id = params.given("recordID")
    if record_id is None:
        return json_failure("paramError", "Missing param recordID.")
    recording = sim.recordings.by_id.get(record_id.strip())
    if recording is None:
        return json_failure("noRecordings", f"No recording found for {record_id}")
    body = {"response": {"returncode": "SUCCESS", "tracks": recording.text_tracks}}
    return Reply.json(orjson.dumps(body).decode())


def text_track(
    server_name: str, record_id: str, lang: str, label: str, kind: str = "subtitles"
) -> dict[str, str]:
    """One uploaded text track, as bbb-web lists it."""
    return {
        "href": f"https://{server_name}/textTrack/{_sha1(record_id + lang)}/{record_id}"
        f"/{kind}_{lang}.vtt",
        "kind": kind,
        "label": label,
        "lang": lang,
        "source": "upload",
    }


_LANG = re.compile(r"[A-Za-z]{2,8}(?:[-_][A-Za-z0-9]{1,8})*")


def put_recording_text_track(sim: Simulator, req: ApiRequest, params: Params) -> Reply:
    """RecordingController's putRecordingTextTrack: recordID, kind, lang, optional label in
    the query, the ``file`` part in a multipart body; checked in bbb-web's order.  bbb-web
    hands the file to its captions queue and lists it once processed; the simulator lists it
    at once (replacing a track of the same kind and lang)."""
    record_id = (params.given("recordID") or "").strip()
    if not record_id:
        return json_failure("paramError", "Missing param recordID.")
    recording = sim.recordings.by_id.get(record_id)
    if recording is None:
        return json_failure("noRecordings", f"No recording found for {record_id}")
    kind = (params.given("kind") or "").strip()
    if not kind:
        return json_failure("paramError", "Missing param kind.")
    if kind not in ("subtitles", "captions"):
        message = f"Invalid kind parameter, expected='subtitles|captions' actual={kind}"
        return json_failure("invalidKind", message)
    lang = (params.given("lang") or "").strip()
    if not lang:
        return json_failure("paramError", "Missing param lang.")
    if not _LANG.fullmatch(lang):
        return json_failure("invalidLang", f"Malformed lang param, received={lang}")
    label = (params.given("label") or "").strip() or lang
    data = next((content for name, content in req.files if name == "file"), b"")
    if not data:
        return json_failure("empty_uploaded_text_track", "Empty uploaded text track.")
    kept = [t for t in recording.text_tracks if (t["kind"], t["lang"]) != (kind, lang)]
    recording.text_tracks = [*kept, text_track(sim.server_name, record_id, lang, label, kind)]
    sim.recordings.uploads.append((record_id, kind, lang, data))
    body = {
        "response": {
            "messageKey": "upload_text_track_success",
            "message": "Text track uploaded successfully",
            "recordId": record_id,
            "returncode": "SUCCESS",
        }
    }
    return Reply.json(orjson.dumps(body).decode())


# -- XML ---------------------------------------------------------------------------------------


def recordings_xml(server_name: str, listed: list[Recording], total: int, limit: int | None) -> str:
    """``get-recordings``: the list, or ``noRecordings``; ``totalElements`` when paged."""
    paged = element("totalElements", total) if limit is not None else ""
    if not listed:
        return render.response(
            "<recordings></recordings>", render.message(*render.NO_RECORDINGS), paged
        )
    inner = "".join(recording_xml(server_name, r) for r in listed)
    return render.response(render.container("recordings", inner), paged)


def recording_xml(server_name: str, r: Recording) -> str:
    head = render.fields(
        [
            ("recordID", r.record_id),
            ("meetingID", r.meeting_id),
            ("internalMeetingID", r.record_id),
            ("name", r.name),
            ("isBreakout", r.is_breakout),
            ("published", r.published),
            ("state", r.state),
            ("startTime", r.start_time),
            ("endTime", r.end_time),
            ("participants", r.participants),
            ("rawSize", 1_000_000),
        ]
    )
    metadata = render.container("metadata", render.fields(r.metadata.items()))
    return render.container("recording", head + metadata + _breakout(r) + _playback(server_name, r))


def _breakout(r: Recording) -> str:
    parts = ""
    if r.is_breakout:
        parts += render.container(
            "breakout",
            render.fields(
                [("parentId", r.parent_id), ("sequence", r.sequence), ("freeJoin", r.free_join)]
            ),
        )
    if r.breakout_rooms:
        rooms = "".join(element("breakoutRoom", c) for c in r.breakout_rooms)
        parts += render.container("breakoutRooms", rooms)
    return parts


def playback_url(server_name: str, kind: str, record_id: str) -> str:
    """Where BBB 2.3+ serves a format: on the server that recorded it."""
    if kind == "presentation":
        return f"https://{server_name}/playback/presentation/2.3/{record_id}"
    return f"https://{server_name}/playback/{kind}/{record_id}/"


def _playback(server_name: str, r: Recording) -> str:
    formats = "".join(
        render.container(
            "format",
            render.fields(
                [
                    ("type", kind),
                    ("url", playback_url(server_name, kind, r.record_id)),
                    ("processingTime", 5000),
                    ("length", r.length_minutes),
                    ("size", 250_000),
                ]
            ),
        )
        for kind in r.formats
    )
    return render.container("playback", formats)
