"""The gateway's exception tree.

Every failure a request can meet is one of these, and each knows how a BBB
client must see it (a ``messageKey`` and a ``message`` in BBB's envelope)::

    ProxyError
    ├── ApiError                    the customer's request cannot be served
    │   ├── ChecksumError           checksumError (also: unknown customer)
    │   ├── ApiNotEnabled           apiNotEnabled
    │   ├── UnsupportedRequest      unsupportedRequest
    │   ├── ValidationError         validationError, missingParam*, ...
    │   ├── NotFound                notFound
    │   ├── SubscriptionExhausted   subscriptionExhausted
    │   ├── NonUniqueVoiceBridge    nonUniqueVoiceBridge (the asked voiceBridge is in use)
    │   └── NoServerCapacity        noServerCapacity
    │       └── NoVoiceBridge       noServerCapacity: every voice bridge is in use
    ├── StorageUnavailable          serverUnavailable: the ledger cannot make a change durable
    └── BackendError                a BBB server failed us (never the customer's fault)
        ├── BackendTimeout          no answer within the configured phase timeout
        ├── BackendUnavailable      connection refused, reset, DNS, TLS
        └── BackendBadResponse      an answer that is not BBB's XML (HTML, 5xx, garbage)
            └── BackendRedirect     a 302 instead (how BBB answers a failed join)

``BackendError`` is raised only by :mod:`proxy.backends`, which translates
transport and lxml exceptions at exactly one boundary.  Callers that talk to the
customer turn any ``ProxyError`` into BBB's envelope with :func:`from_error`
in :mod:`proxy.bbb.envelope`.

``ConfigError`` and ``StateError`` stand apart: they stop start-up with a message naming the
key, or the state file and offset.  Once the gateway runs, a failing ``state_dir`` is a
``StorageUnavailable`` to the request that needed the write, never a ``StateError``.
"""

from __future__ import annotations


class ProxyError(Exception):
    """Base of every error the gateway turns into a BBB answer."""

    message_key = "internalError"
    message = "An internal error occurred"

    def __init__(self, message: str | None = None, *, message_key: str | None = None) -> None:
        if message is not None:
            self.message = message
        if message_key is not None:
            self.message_key = message_key
        super().__init__(self.message)


class ApiError(ProxyError):
    """The customer's request cannot be served as asked."""


class ChecksumError(ApiError):
    message_key = "checksumError"
    message = "Checksums do not match"


class ApiNotEnabled(ApiError):
    message_key = "apiNotEnabled"
    message = "The API is not enabled for this customer"


class UnsupportedRequest(ApiError):
    message_key = "unsupportedRequest"
    message = "This request is not supported."


class ValidationError(ApiError):
    message_key = "validationError"
    message = "The request is invalid"


class NotFound(ApiError):
    message_key = "notFound"
    message = "A meeting with that ID does not exist"


class SubscriptionExhausted(ApiError):
    message_key = "subscriptionExhausted"
    message = "The subscription has no free connections for a meeting of this size"


class NonUniqueVoiceBridge(ApiError):
    """BBB's answer to a voiceBridge a live meeting holds (here: on any backend)."""

    message_key = "nonUniqueVoiceBridge"
    message = "The selected voice bridge is already in use."


class NoServerCapacity(ApiError):
    message_key = "noServerCapacity"
    message = "No server has room for a meeting of this size"


class NoVoiceBridge(NoServerCapacity):
    message = "No conference number is free for a new meeting; try again later"


class ServerTagUnavailable(ApiError):
    """Scalelite's answer when no server with a required placement tag can take the
    meeting (proxy.placement); the message names the tags."""

    message_key = "serverTagUnavailable"
    message = "There is no available server with the required tag"


class StorageUnavailable(ProxyError):
    """The ledger's journal cannot write now (``state_dir`` full, read-only or too slow).

    ``serverUnavailable``, as for a server that cannot be reached: the client may retry,
    and will succeed once the journal writes again (docs/decisions.md, "Storage faults").
    """

    message_key = "serverUnavailable"
    message = "The gateway cannot record this change right now; try again shortly"


class BackendError(ProxyError):
    """A BBB server did not answer as a BBB server must."""

    message_key = "internalError"

    def __init__(self, backend_id: str, detail: str) -> None:
        super().__init__(self.message)
        self.backend_id = backend_id
        self.detail = detail

    def __str__(self) -> str:
        return f"{type(self).__name__}({self.backend_id}): {self.detail}"


class BackendTimeout(BackendError):
    message_key = "serverUnavailable"
    message = "The server hosting this meeting did not answer in time"


class BackendUnavailable(BackendError):
    message_key = "serverUnavailable"
    message = "The server hosting this meeting cannot be reached"


class BackendBadResponse(BackendError):
    message_key = "internalError"
    message = "The server hosting this meeting gave an invalid answer"


class BackendRedirect(BackendBadResponse):
    """A 302 where XML was expected; ``location`` is where BBB sent the browser.

    bbb-web answers a failed join with a redirect carrying ``errors=`` even when
    ``redirect=false``; everywhere else this is just a bad answer.
    """

    def __init__(self, backend_id: str, location: str) -> None:
        super().__init__(backend_id, "HTTP 302")
        self.location = location


class ConfigError(Exception):
    """The configuration file is missing, unreadable or wrong; names the key."""


class StateError(Exception):
    """The ledger's state under ``state_dir`` is corrupt, unreadable or unwritable; names it."""
