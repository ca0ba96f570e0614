"""Request bodies: what a POST may carry, parsed and checked without I/O.

bbb-web checks a body's Content-Type only when there is a body
(``ContentTypeValidator``); an empty body is fine with any type.  The gateway
never passes a body to a backend as it came: every body is one of

- ``application/x-www-form-urlencoded``: parameters, parsed like a query;
- ``multipart/form-data``: its text fields are parameters, parsed into the
  same list; a file part answers ``unsupportedContentType`` (no call the
  gateway serves takes a file);
- ``application/xml`` / ``text/xml`` on ``create`` and ``insertDocument``: a
  ``<modules>`` document, parsed with a bounded parser (no DTD loading, no
  entity resolution, no network, no huge-tree mode), refused when it has a
  DOCTYPE, and re-serialised from the parsed tree, so what reaches the
  backend is the tree the gateway checked (no prolog, no DTD, ASCII with
  character references);
- anything else, or XML on another call: ``unsupportedContentType``.

Body parameters then go through the same checksum rules and the same filters
as query parameters (:func:`proxy.bbb.checksum.signed_params`, the call
handlers).

Error handling: every function here raises only
:class:`~proxy.errors.ValidationError` (messageKey ``unsupportedContentType``
or ``validationError``); the foreign exceptions of the multipart decoder and of
lxml are translated here.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl

from lxml import etree
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.http import parse_options_header
from werkzeug.sansio.multipart import Data, Epilogue, Field, File, MultipartDecoder

from proxy.errors import ValidationError

FORM = "application/x-www-form-urlencoded"
MULTIPART = "multipart/form-data"
XML_TYPES = frozenset({"application/xml", "text/xml"})
XML_CALLS = frozenset({"create", "insertDocument"})
MAX_FIELDS = 1000  # body parameters; a query of max_query_bytes holds fewer useful ones

type Params = tuple[tuple[str, str], ...]

_PARSER = etree.XMLParser(
    resolve_entities=False,
    no_network=True,
    load_dtd=False,
    dtd_validation=False,
    huge_tree=False,
    strip_cdata=False,
)


@dataclass(frozen=True, slots=True)
class Body:
    """A POST body as the gateway reads it: parameters, or an XML document not yet checked."""

    form: Params = ()
    xml: bytes | None = None
    media_type: str = ""  # lower-case, no parameters; "" when there is no body


def unsupported() -> ValidationError:
    return ValidationError(
        "POST request Content-Type is missing or unsupported",
        message_key="unsupportedContentType",
    )


def media_type(content_type: str | None) -> str:
    """``text/xml; charset=utf-8`` -> ``text/xml``."""
    return (content_type or "").split(";")[0].strip().lower()


def parse(content_type: str | None, data: bytes) -> Body:
    """Read a body: parameters for the form types, XML kept for :func:`checked_xml`."""
    if not data:
        return Body()
    media = media_type(content_type)
    if media == FORM:
        return Body(form=form_params(data), media_type=media)
    if media == MULTIPART:
        return Body(form=multipart_params(content_type or "", data), media_type=media)
    if media in XML_TYPES:
        return Body(xml=data, media_type=media)
    raise unsupported()


def form_params(data: bytes) -> Params:
    """An urlencoded body's parameters, decoded as a query's are (UTF-8, blanks kept)."""
    try:
        pairs = parse_qsl(
            data.decode(errors="replace"), keep_blank_values=True, max_num_fields=MAX_FIELDS
        )
    except ValueError:  # more than MAX_FIELDS fields
        raise ValidationError("The request body has too many parameters") from None
    return tuple(pairs)


def multipart_params(content_type: str, data: bytes) -> Params:
    """The text fields of a ``multipart/form-data`` body; a file part is refused."""
    _, options = parse_options_header(content_type)
    boundary = options.get("boundary")
    if not boundary or not boundary.isascii():
        raise unsupported()
    try:
        return _decode_multipart(boundary.encode(), data)
    except ValidationError:
        raise
    except (ValueError, LookupError, TypeError, AttributeError, RequestEntityTooLarge):
        # werkzeug's decoder raises these (and UnicodeDecodeError, a ValueError) on
        # malformed input: missing Content-Disposition, no closing boundary, bad headers.
        raise ValidationError("The multipart body could not be parsed") from None


def _decode_multipart(boundary: bytes, data: bytes) -> Params:
    decoder = MultipartDecoder(boundary, max_parts=MAX_FIELDS)
    decoder.receive_data(data)
    decoder.receive_data(None)
    fields: list[tuple[str, bytearray]] = []
    # Every event but the last consumes input (complete input that makes no progress
    # raises ValueError), so this bound is never reached; it only guards the event loop.
    for _ in range(len(data) + 2):
        event = decoder.next_event()
        if isinstance(event, File):
            raise unsupported()
        if isinstance(event, Field):
            if not isinstance(event.name, str):  # werkzeug gives None for a part without a name
                raise ValidationError("A multipart field has no name")
            fields.append((event.name, bytearray()))
        elif isinstance(event, Data) and fields:
            fields[-1][1].extend(event.data)
        elif isinstance(event, Epilogue):
            return tuple((name, value.decode(errors="replace")) for name, value in fields)
    raise ValidationError("The multipart body could not be parsed")


def checked_xml(call: str, body: Body) -> bytes | None:
    """The XML body to forward for ``call``: a checked ``<modules>`` document, re-serialised.

    None when the body has no XML.  XML on a call that takes none is ``unsupportedContentType``;
    a document that does not parse (libxml2 without huge-tree mode also refuses nesting deeper
    than 256 and text nodes over 10 MB), has a DOCTYPE or is not ``<modules>`` is a
    ``validationError``.
    """
    if body.xml is None:
        return None
    if call not in XML_CALLS:
        raise unsupported()
    root = _parse_xml(body.xml)
    if root.getroottree().docinfo.internalDTD is not None:
        raise ValidationError("The XML body must not have a DOCTYPE")
    if root.tag != "modules":
        raise ValidationError("The XML body must be a <modules> document")
    return bytes(etree.tostring(root))


def _parse_xml(data: bytes) -> etree._Element:
    try:
        return etree.fromstring(data, _PARSER)
    except (etree.XMLSyntaxError, ValueError):
        raise ValidationError("The XML body could not be parsed") from None


def nests_within(value: object, limit: int) -> bool:
    """Whether parsed JSON ``value`` nests at most ``limit`` levels below its top (walked
    without recursion: a peer's document never recurses us)."""
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        current, depth = stack.pop()
        if depth > limit:
            return False
        if isinstance(current, dict):
            stack.extend((v, depth + 1) for v in current.values())
        elif isinstance(current, list):
            stack.extend((v, depth + 1) for v in current)
    return True
