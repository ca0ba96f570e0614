"""Tests written to kill mutants of ``proxy.bbb.bodies`` that survived (docs/mutation.md).

On the module's functions: the XML parser's options, each seen in what
:func:`~proxy.bbb.bodies.checked_xml` answers (an external entity or DTD naming a local
file is never read: such a document is refused for its DOCTYPE, not for what the file
holds), and :func:`~proxy.bbb.bodies.nests_within`'s bound.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.bbb import bodies
from proxy.errors import ValidationError


def refusal(data: bytes, call: str = "create") -> tuple[str, str]:
    with pytest.raises(ValidationError) as caught:
        bodies.checked_xml(call, bodies.parse("application/xml", data))
    return caught.value.message_key, str(caught.value)


DOCTYPE = ("validationError", "The XML body must not have a DOCTYPE")


def test_an_external_entity_is_not_resolved(tmp_path: Path) -> None:
    broken = tmp_path / "broken.xml"
    broken.write_text("<unclosed>")
    doc = f'<!DOCTYPE modules [<!ENTITY e SYSTEM "{broken.as_uri()}">]><modules>&e;</modules>'
    assert refusal(doc.encode()) == DOCTYPE  # not "could not be parsed": the file is not read


def test_an_external_dtd_is_not_loaded(tmp_path: Path) -> None:
    broken = tmp_path / "broken.dtd"
    broken.write_text("<!ELEMENT garbage")
    doc = f'<!DOCTYPE modules SYSTEM "{broken.as_uri()}"><modules/>'
    assert refusal(doc.encode()) == DOCTYPE
    param = f'<!DOCTYPE modules [<!ENTITY % p SYSTEM "{broken.as_uri()}"> %p;]><modules/>'
    assert refusal(param.encode()) == DOCTYPE


def test_nesting_deeper_than_libxml2s_bound_is_refused() -> None:
    deep = b"<modules>" + b"<a>" * 300 + b"</a>" * 300 + b"</modules>"
    assert refusal(deep) == ("validationError", "The XML body could not be parsed")
    within = b"<modules>" + b"<a>" * 200 + b"</a>" * 200 + b"</modules>"
    assert bodies.checked_xml("create", bodies.parse("text/xml", within)) == (
        b"<modules>" + b"<a>" * 199 + b"<a/>" + b"</a>" * 199 + b"</modules>"
    )


def test_cdata_is_forwarded_as_cdata() -> None:
    doc = b"<modules><module name='x'><![CDATA[a<b & c]]></module></modules>"
    assert bodies.checked_xml("insertDocument", bodies.parse("text/xml", doc)) == (
        b'<modules><module name="x"><![CDATA[a<b & c]]></module></modules>'
    )


def test_a_body_without_content_is_no_media_type() -> None:
    assert bodies.Body().media_type == ""
    assert bodies.Body().form == ()
    assert bodies.Body().xml is None


def test_nests_within_counts_levels_below_the_top() -> None:
    assert bodies.nests_within(1, 0)
    assert bodies.nests_within([], 0)
    assert bodies.nests_within({}, 0)
    assert not bodies.nests_within([1], 0)
    assert bodies.nests_within([1], 1)
    assert not bodies.nests_within({"a": 1}, 0)
    assert bodies.nests_within({"a": {"b": 1}}, 2)
    assert not bodies.nests_within({"a": {"b": 1}}, 1)
    assert bodies.nests_within({"a": [[]]}, 2)
    assert not bodies.nests_within({"a": [[1]]}, 2)
    assert not bodies.nests_within([1, 2, [3, [4]]], 2)  # the last branch decides
    assert not bodies.nests_within([[[1]], 2, 3], 2)  # the first branch decides
    assert bodies.nests_within({"k" * 3: "v"}, 1)  # keys are not levels
    deep: list[object] = []
    for _ in range(5000):
        deep = [deep]
    assert bodies.nests_within(deep, 5000)  # walked without recursion
    assert not bodies.nests_within(deep, 4999)
