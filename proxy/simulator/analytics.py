"""The simulated BBB's learning-analytics callback (post_events' analytics script).

When a meeting created with ``meta_analytics-callback-url`` ends, BBB POSTs the
meeting's learning-dashboard document to that URL: JSON, ``Authorization: Bearer
<JWT>`` signed HS512 with the server's secret (payload: an ``exp``).  The document here
has BBB's outer fields (``version``, ``meeting_id`` = the external meetingID,
``internal_meeting_id``, ``data``) and a small ``data``: the meeting's name, times,
metadata and its attendees as they were when it ended.

Error handling: none needed; the sending layer drops a POST that fails, as BBB's
script logs it and gives up.
"""

from __future__ import annotations

import warnings

import jwt
import orjson
from jwt.warnings import InsecureKeyLengthWarning

from .model import Meeting

KEY = "analytics-callback-url"
TOKEN_LIFETIME_S = 24 * 3600


def callback(meeting: Meeting, secret: str, now_ms: int) -> tuple[str, str, bytes] | None:
    """(URL, JWT, JSON body) of the meeting's analytics POST; None without the metadata."""
    url = meeting.metadata.get(KEY, "")
    if not url:
        return None
    document = {
        "version": "1.0",
        "meeting_id": meeting.meeting_id,
        "internal_meeting_id": meeting.internal_id,
        "data": {
            "metadata": {
                "meeting_name": meeting.name,
                "start_time": meeting.create_time,
                "end_time": now_ms,
                **meeting.metadata,
            },
            "duration": max(0, (now_ms - meeting.create_time) // 1000),
            "attendees": [
                {
                    "ext_user_id": a.user_id,
                    "name": a.full_name,
                    "moderator": a.role == "MODERATOR",
                }
                for a in meeting.attendees.values()
            ],
        },
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InsecureKeyLengthWarning)
        token = jwt.encode({"exp": now_ms // 1000 + TOKEN_LIFETIME_S}, secret, algorithm="HS512")
    return url, token, orjson.dumps(document)
