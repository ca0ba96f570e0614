"""A faithful simulated BigBlueButton 3.0 server, for the demo, the end-to-end
tests and the benchmarks.

Layout (decisions without I/O first, the trio layer last)::

    model.py     Behaviour, Meeting, Attendee, ApiRequest, Reply
    params.py    parameter reading and validation (BBB messageKeys)
    render.py    the XML answers, element for element as bbb-web's templates
    meetings.py  create, end, getMeetingInfo, getMeetings, isMeetingRunning, ...
    join.py      join: admission, redirects, join errors
    recordings.py  recordings: made at end, getRecordings filters, publish/delete/update
    events.py    the mapped webhook events (bbb-webhooks' shapes) built from the state
    webhooks.py  the webhooks service: hooks/create|list|destroy, per-hook delivery queues
    core.py      Simulator: state, checksum check, dispatch, time
    app.py       quart-trio app: behaviour modes, background ticker, notifications
    webhook_sender.py  the webhook POSTs: in order per hook, retries, dropping a hook
    server.py    serve_simulator (hypercorn, trio worker)
    __main__.py  python -m proxy.simulator --port 9001 --count 3 --secret S
"""

from .app import create_app
from .core import Simulator
from .model import Attendee, Behaviour, Meeting, SimulatorStatistics
from .server import serve_simulator

__all__ = [
    "Attendee",
    "Behaviour",
    "Meeting",
    "Simulator",
    "SimulatorStatistics",
    "create_app",
    "serve_simulator",
]
