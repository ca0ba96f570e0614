"""getRecordings over the pool, decided without I/O: filters, the order, pages, rewriting.

A customer's getRecordings is answered from every backend in service
(:mod:`proxy.calls.recordings` does the I/O).  What is decided here:

*Filters* (bbb-api.md §2, bbb-web 2.6+): ``recordID`` (comma list, prefix match; when
given, ``meetingID`` is ignored) goes to the backends as it is, since recordIDs are the
backends' own (a recording's recordID is the internalMeetingID the customer saw in
getMeetingInfo); ``meetingID`` (comma list) is namespaced per customer
(:func:`proxy.bbb.rewrite.backend_meeting_id`), the backend turns each into its sha1
prefix; ``state`` goes as it is (the backend's default ``published,unpublished`` and
``any`` apply); ``meta_*`` goes as it is, and the gateway adds
``meta_bbb-proxy-customer=<customer>`` so a backend lists only that customer's
recordings.  A customer's filter on the gateway's own metadata matches nothing: that
metadata does not exist for the customer.  Each recording listed is checked again
(:func:`owner`: both the customer tag and the namespaced meetingID must agree) before
it is shown.

*Order and pages*: a backend's own order is not stable (bbb-web collects recordings in a
``HashSet``), so ``offset``/``limit`` are never sent to a backend.  The pool's order is
(startTime, recordID, backend's place in the configuration), ascending; ``offset`` and
``limit`` are read as bbb-web reads them (:func:`page_of`) and applied to that one list,
so pages are disjoint and together complete while the pool does not change.  A paged
answer ends with ``<totalElements>`` (the count over the pool), as bbb-web's does.

*Rewriting*: each recording's ``meetingID`` and ``metadata/meetingId`` become the
customer's meetingID and the gateway's metadata is removed, as for meetings
(:func:`proxy.bbb.rewrite.restore_metadata`).  Playback URLs stay as the backend wrote
them: they point at the BBB server that holds the recording.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import orjson
from lxml import etree

from proxy.bbb import rewrite
from proxy.bbb.envelope import element
from proxy.bbb.numbers import parse_count, parse_int
from proxy.bbb.uploads import UPLOAD_OVERHEAD as UPLOAD_OVERHEAD  # where the web layer looks
from proxy.bbb.uploads import too_large_track as too_large_track

MAX_LIMIT = 100
INT_MIN, INT_MAX = -(2**31), 2**31 - 1  # Java's int: what Integer.parseInt reads
HEAD = b"<response><returncode>SUCCESS</returncode><recordings>"
NO_RECORDINGS = (
    "<messageKey>noRecordings</messageKey>"
    "<message>There are no recordings for the meeting(s).</message>"
)


@dataclass(frozen=True, slots=True)
class Page:
    """``offset``/``limit`` as bbb-web reads them; ``limit`` None: not paged."""

    offset: int = 0
    limit: int | None = None

    def window(self, total_before: int) -> bool:
        """Whether the recording at position ``total_before`` of the pool's list is shown."""
        if self.limit is None:
            return True
        return self.offset <= total_before < self.offset + self.limit

    @property
    def end(self) -> int | None:
        """How many of the pool's first recordings can matter (None: all)."""
        return None if self.limit is None else self.offset + self.limit


def page_of(params: Sequence[tuple[str, str]]) -> Page:
    """bbb-web's reading: an unreadable or negative ``offset`` is 0; ``limit`` is clamped
    to 1..100, and without a readable ``limit`` nothing is paged (``offset`` ignored)."""
    values = rewrite.first_values(params)
    offset = java_int(values.get("offset", ""))
    limit = java_int(values.get("limit", ""))
    if limit is None:
        return Page()
    return Page(max(0, offset or 0), min(MAX_LIMIT, max(1, limit)))


def java_int(text: str) -> int | None:
    """``text`` read as bbb-web reads ``offset`` and ``limit`` (``Integer.parseInt``): a
    signed run of ASCII digits within Java's ``int``, or None (so ``limit=1000000000`` is a
    page of 100, and ``limit=9999999999`` no page at all, as on a BBB server)."""
    value = parse_int(text, signed=True)  # up to 18 digits: then Java's range
    if value is None or not INT_MIN <= value <= INT_MAX:
        return None
    return value


def split_ids(value: str | None) -> list[str]:
    """A comma list as ``ParamsProcessorUtil.decodeIds`` splits it: trimmed, empties dropped."""
    return [part.strip() for part in (value or "").split(",") if part.strip()]


def backend_filters(
    customer: str, params: Sequence[tuple[str, str]]
) -> list[tuple[str, str]] | None:
    """The getRecordings parameters each backend is sent; None when nothing can match
    (a filter on the gateway's own metadata)."""
    values = rewrite.first_values(params)
    out: list[tuple[str, str]] = []
    record_ids = split_ids(values.get("recordID"))
    meeting_ids = split_ids(values.get("meetingID"))
    if record_ids:
        out.append(("recordID", ",".join(record_ids)))
    elif meeting_ids:
        namespaced = [rewrite.backend_meeting_id(customer, m) for m in meeting_ids]
        out.append(("meetingID", ",".join(namespaced)))
    if "state" in values:
        out.append(("state", values["state"]))
    for key, value in values.items():
        if key.lower().startswith("meta_"):
            if rewrite.is_reserved_param(key):
                return None
            out.append((key, value))
    out.append((f"meta_{rewrite.CUSTOMER_TAG}", customer))
    return out


# -- one backend's answer, read as it arrives ---------------------------------------------------


@dataclass(frozen=True, slots=True, order=True)
class Listed:
    """One recording's place in the pool's order (its body is kept apart, if at all)."""

    start_time: int
    record_id: str
    backend_rank: int


type Found = Callable[[Listed, etree._Element | None], None]
FEED = 4096  # bytes handed to the parser at a time (about three recordings)


class AnswerReader:
    """One backend's getRecordings answer, parsed incrementally as its bytes arrive.

    Each of the customer's ``<recording>`` is handed to ``found`` with its :class:`Listed`
    key as soon as its end tag is read, rewritten (:func:`restore_recording`) when
    ``bodies()`` says bodies are wanted, else as None; then it is dropped from the tree, so
    memory does not grow with the answer.  Other customers'
    recordings are skipped.  Entities are not resolved and nothing is fetched.

    Error handling: :meth:`feed` and :meth:`close` never raise; an answer that is not
    BBB's XML sets :attr:`broken`.  :attr:`ok` says whether ``returncode`` was SUCCESS.
    """

    def __init__(
        self, customer: str, backend_rank: int, found: Found, bodies: Callable[[], bool]
    ) -> None:
        self._customer = customer
        self._rank = backend_rank
        self._found = found
        self._bodies = bodies
        self._parser = etree.XMLPullParser(
            events=("end",),
            tag=("recording", "returncode"),
            resolve_entities=False,
            no_network=True,
            huge_tree=False,
        )
        self.returncode = ""
        self.broken = False

    @property
    def ok(self) -> bool:
        return not self.broken and self.returncode == "SUCCESS"

    def feed(self, data: bytes) -> None:
        """Parse ``data`` a slice of :data:`FEED` bytes at a time, dropping each slice's
        recordings before the next: libxml2 builds the tree of all it is fed at once, so
        a 64 KiB read from each of 20 backends would otherwise hold 20 trees of about 50
        recordings each."""
        for start in range(0, len(data), FEED):
            if self.broken:
                return
            try:
                self._parser.feed(data[start : start + FEED])
                self._drain()
            except etree.XMLSyntaxError:
                self.broken = True

    def close(self) -> None:
        if self.broken:
            return
        try:
            root = self._parser.close()
            self._drain()
        except etree.XMLSyntaxError:
            self.broken = True
            return
        if root.tag != "response":
            self.broken = True

    def _drain(self) -> None:
        for _, found in self._parser.read_events():
            if not isinstance(found, etree._Element):
                continue  # only "end" events are asked for: always elements
            if found.tag == "returncode":
                if not self.returncode and found.getparent() is not None:
                    self.returncode = (found.text or "").strip()
                continue
            self._recording(found)

    def _recording(self, recording: etree._Element) -> None:
        parent = recording.getparent()
        owned = owner(recording)
        listed = parent is not None and parent.tag == "recordings"
        if listed and owned is not None and owned[0] == self._customer:
            start = parse_count(recording.findtext("startTime"), max_digits=15)
            record_id = (recording.findtext("recordID") or "").strip()
            body: etree._Element | None = None
            if self._bodies():
                restore_recording(recording, owned[1])
                recording.tail = None
                body = recording
            self._found(Listed(start, record_id, self._rank), body)
        if parent is not None:
            parent.remove(recording)  # done with it: the tree stays small


def owner(recording: etree._Element) -> tuple[str, str] | None:
    """(customer, customer's meetingID) of a recording of a meeting the gateway made."""
    metadata = recording.find("metadata")
    if metadata is None:
        return None
    customer = metadata.findtext(rewrite.CUSTOMER_TAG)
    meeting_id = metadata.findtext(rewrite.MEETING_TAG)
    if not customer or meeting_id is None:
        return None
    if not rewrite.owned_by(customer, recording.findtext("meetingID") or ""):
        return None
    return customer, meeting_id


def restore_recording(recording: etree._Element, meeting_id: str) -> None:
    """Rewrite one ``<recording>`` in place for the customer's eyes."""
    found = recording.find("meetingID")
    if found is not None:
        found.text = meeting_id
    metadata = recording.find("metadata")
    if metadata is not None:
        rewrite.restore_metadata(metadata)
        named = metadata.find("meetingId")  # bbb-web copies the meetingID into the metadata
        if named is not None:
            named.text = meeting_id


# -- the pool's answer --------------------------------------------------------------------------


ROUND = 500  # recordings whose bodies are fetched together, once the order is known
BATCH = 50  # recordIDs per request: the URL stays under about 3 KB
EARLY_BYTES = 512 * 1024  # bodies kept from the first pass, at most


def packed(item: Listed) -> bytes:
    """``item`` as one bytes object that sorts as :class:`Listed` sorts: the start time
    (8 bytes, big-endian), the recordID (UTF-8), a NUL (no XML text holds one, and it sorts
    a recordID before every longer one it prefixes), the backend's rank (2 bytes).

    The first pass keeps one of these per recording listed: about 100 bytes for a BBB
    recordID, where a :class:`Listed` with its int and str takes about 185."""
    return (
        item.start_time.to_bytes(8)
        + item.record_id.encode()
        + b"\0"
        + item.backend_rank.to_bytes(2)
    )


def unpacked(key: bytes) -> Listed:
    """The :class:`Listed` that :func:`packed` made ``key`` of."""
    return Listed(
        int.from_bytes(key[:8]), key[8:-3].decode(errors="replace"), int.from_bytes(key[-2:])
    )


def window[K: (Listed, bytes)](keys: Iterable[K], page: Page) -> list[K]:
    """The page of the pool's list: every backend's keys in the pool's order, windowed."""
    ordered = sorted(keys)
    return ordered if page.limit is None else ordered[page.offset : page.offset + page.limit]


def rounds[K: (Listed, bytes)](shown: list[K]) -> Iterator[list[K]]:
    for start in range(0, len(shown), ROUND):
        yield shown[start : start + ROUND]


def batches(missing: Iterable[Listed]) -> list[tuple[int, list[str]]]:
    """The bodies of one round still to fetch, as (backend rank, up to BATCH recordIDs)."""
    by_rank: dict[int, list[str]] = {}
    for item in missing:
        by_rank.setdefault(item.backend_rank, []).append(item.record_id)
    return [
        (rank, ids[i : i + BATCH])
        for rank, ids in sorted(by_rank.items())
        for i in range(0, len(ids), BATCH)
    ]


class Bodies:
    """Serialised recordings by (backend rank, recordID), kept up to ``budget`` bytes.

    The first pass keeps bodies while they fit (a course's few recordings are then listed
    in one round trip); past the budget it keeps none, and every body is fetched again,
    a round at a time, once the order is known."""

    def __init__(self, budget: int | None = None) -> None:
        self._budget = EARLY_BYTES if budget is None else budget
        self._size = 0
        self._bodies: dict[tuple[int, str], str] = {}
        self.full = False

    def keep(self, item: Listed, xml: str) -> None:
        if self.full:
            return
        self._size += len(xml)
        if self._size > self._budget:
            self.full = True
            self._bodies.clear()
            return
        self._bodies[(item.backend_rank, item.record_id)] = xml

    def take(self, item: Listed) -> str | None:
        return self._bodies.pop((item.backend_rank, item.record_id), None)

    def has(self, item: Listed) -> bool:
        return (item.backend_rank, item.record_id) in self._bodies


def tail(shown: int, total: int, page: Page) -> bytes:
    """What closes the answer: noRecordings when nothing was shown, totalElements when paged."""
    parts = "</recordings>"
    if not shown:
        parts += NO_RECORDINGS
    if page.limit is not None:
        parts += element("totalElements", total)
    return (parts + "</response>").encode()


# -- publish / delete / update: routed to the backends holding each recordID --------------------

CHANGES = frozenset({"publishRecordings", "deleteRecordings", "updateRecordings"})
MISSING_RECORD_ID = ("missingParamRecordID", "You must specify a recordID.")
MISSING_PUBLISH = ("missingParamPublish", "You must specify a publish value true or false.")
NOT_FOUND = "We could not find recordings"


def missing_param(call: str, params: Sequence[tuple[str, str]]) -> tuple[str, str] | None:
    """bbb-web's parameter checks of a recording change, before anything is looked up:
    (messageKey, message) of the first one that fails, or None."""
    values = rewrite.first_values(params)
    if not split_ids(values.get("recordID")):
        return MISSING_RECORD_ID
    if call == "publishRecordings" and not values.get("publish"):
        return MISSING_PUBLISH
    return None


def lookup_filters(customer: str, record_ids: Sequence[str]) -> list[tuple[str, str]]:
    """The getRecordings that finds which backend holds which of ``record_ids``."""
    return [
        ("recordID", ",".join(record_ids)),
        ("state", "any"),
        (f"meta_{rewrite.CUSTOMER_TAG}", customer),
    ]


def change_params(
    params: Sequence[tuple[str, str]], record_ids: Sequence[str]
) -> list[tuple[str, str]]:
    """A change's parameters for one backend: its share of the recordIDs; the gateway's
    own metadata can never be set by a customer (updateRecordings ``meta_bbb-proxy-*``)."""
    kept = rewrite.without(params, ["recordID"])
    return [("recordID", ",".join(record_ids)), *kept]


# -- text tracks: JSON, as bbb-web's RecordingController answers them ----------------------------

JSON_CALLS = frozenset({"getRecordingTextTracks", "putRecordingTextTrack"})
MISSING_RECORD_ID_JSON = ("paramError", "Missing param recordID.")


def json_failure(message_key: str, message: str) -> bytes:
    """BBB's JSON error: ``{"response": {"returncode": "FAILED", "messageKey", "message"}}``."""
    body = {"response": {"returncode": "FAILED", "messageKey": message_key, "message": message}}
    return orjson.dumps(body)


def no_recording(record_id: str) -> tuple[str, str]:
    return "noRecordings", f"No recording found for {record_id}"


def text_tracks_answer(content: bytes) -> bytes | None:
    """A backend's getRecordingTextTracks answer if it is BBB's JSON shape, else None."""
    try:
        body = orjson.loads(content)
    except orjson.JSONDecodeError:
        return None
    response = body.get("response") if isinstance(body, dict) else None
    if not isinstance(response, dict) or response.get("returncode") not in ("SUCCESS", "FAILED"):
        return None
    return orjson.dumps(body)


# -- putRecordingTextTrack: the upload, checked as bbb-web's RecordingController does ------------

TEXT_TRACK_KINDS = ("subtitles", "captions")
UPLOADED = ("upload_text_track_success", "Text track uploaded successfully")
EMPTY_UPLOAD = ("empty_uploaded_text_track", "Empty uploaded text track.")
_LANG = re.compile(r"[A-Za-z]{2,8}(?:[-_][A-Za-z0-9]{1,8})*")


@dataclass(frozen=True, slots=True)
class TrackUpload:
    """A putRecordingTextTrack's parameters, checked."""

    record_id: str
    kind: str
    lang: str
    label: str


def track_upload(
    record_id: str, params: Sequence[tuple[str, str]]
) -> TrackUpload | tuple[str, str]:
    """bbb-web's checks after the recording was found, in its order: ``kind`` given and
    ``subtitles|captions``, ``lang`` given and well formed; ``label`` defaults to ``lang``.
    The checked upload, or (messageKey, message)."""
    values = rewrite.first_values(params)
    kind = values.get("kind", "").strip()
    if not kind:
        return "paramError", "Missing param kind."
    if kind not in TEXT_TRACK_KINDS:
        return "invalidKind", f"Invalid kind parameter, expected='subtitles|captions' actual={kind}"
    lang = values.get("lang", "").strip()
    if not lang:
        return "paramError", "Missing param lang."
    if not _LANG.fullmatch(lang):
        return "invalidLang", f"Malformed lang param, received={lang}"
    label = values.get("label", "").strip() or lang
    return TrackUpload(record_id, kind, lang, label)


def track_params(upload: TrackUpload) -> list[tuple[str, str]]:
    """The signed query sent to the backend holding the recording."""
    return [
        ("recordID", upload.record_id),
        ("kind", upload.kind),
        ("lang", upload.lang),
        ("label", upload.label),
    ]


def upload_answer(content: bytes) -> bytes | None:
    """A backend's putRecordingTextTrack answer if it is BBB's JSON shape, else None."""
    return text_tracks_answer(content)
