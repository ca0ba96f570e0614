"""BBB checksums: computed and verified as bbb-web does, over the raw query."""

from __future__ import annotations

import hashlib

import pytest

from proxy.bbb import checksum

SECRET = "secret"


def sign(call: str, query: str, secret: str = SECRET, algorithm: str = "sha1") -> str:
    """An independent signer: BBB's data string is call + query + secret."""
    return hashlib.new(algorithm, (call + query + secret).encode()).hexdigest()


def test_compute_literal_vectors() -> None:
    # Computed once by hand with coreutils (printf 'getMeetingssecret' | sha1sum).
    assert checksum.compute("getMeetings", "", "secret") == (
        "867e6596b930651c0cd4dd1912bec902fae56d5a"
    )
    assert checksum.compute("getMeetings", "", "secret", "sha256") == (
        "433f7e299bfebb264ee4ac11afeaf2e83475b7bbf38ce7913aa675576bc61ea5"
    )
    assert checksum.compute("create", "name=Test+Meeting&meetingID=abc123", "secret") == (
        "76d344df558982c914631fa600f7920e499a4c2d"
    )


@pytest.mark.parametrize("algorithm", ["sha1", "sha256", "sha384", "sha512"])
def test_compute_matches_hashlib(algorithm: str) -> None:
    query = "meetingID=room%201&name=A+B"
    expected = sign("create", query, "s3cr3t", algorithm)
    assert checksum.compute("create", query, "s3cr3t", algorithm) == expected


@pytest.mark.parametrize(
    ("algorithm", "length"), [("sha1", 40), ("sha256", 64), ("sha384", 96), ("sha512", 128)]
)
def test_verify_each_algorithm_by_length(algorithm: str, length: int) -> None:
    query = "meetingID=room-1&name=Room+1"
    cs = sign("create", query, algorithm=algorithm)
    assert len(cs) == length
    assert checksum.verify("create", f"{query}&checksum={cs}", [SECRET])
    assert not checksum.verify("create", f"{query}&checksum={cs}", ["other"])
    assert not checksum.verify("join", f"{query}&checksum={cs}", [SECRET])


def test_uppercase_hex_accepted() -> None:
    query = "meetingID=room-1"
    cs = sign("isMeetingRunning", query).upper()
    assert cs != cs.lower()
    assert checksum.verify("isMeetingRunning", f"{query}&checksum={cs}", [SECRET])


@pytest.mark.parametrize("cut", [1, 8])
def test_wrong_length_rejected(cut: int) -> None:
    query = "meetingID=room-1"
    cs = sign("end", query, algorithm="sha256")
    assert not checksum.verify("end", f"{query}&checksum={cs[:-cut]}", [SECRET])
    assert not checksum.verify("end", f"{query}&checksum={cs}0", [SECRET])


def test_a_sha1_truncated_sha256_is_not_accepted() -> None:
    # 40 characters select sha1; the first 40 hex digits of the sha256 are not it.
    query = "meetingID=room-1"
    cs = sign("end", query, algorithm="sha256")[:40]
    assert not checksum.verify("end", f"{query}&checksum={cs}", [SECRET])


def test_empty_query() -> None:
    cs = "867e6596b930651c0cd4dd1912bec902fae56d5a"
    assert checksum.verify("getMeetings", f"checksum={cs}", [SECRET])


def test_leading_ampersand() -> None:
    # bigbluebutton2 and the PHP library send ``?&checksum=...``.
    cs = sign("getMeetings", "")
    assert checksum.verify("getMeetings", f"&checksum={cs}", [SECRET])


def test_checksum_in_the_middle() -> None:
    cs = sign("getMeetingInfo", "meetingID=room-1&password=mp")
    assert checksum.verify(
        "getMeetingInfo", f"meetingID=room-1&checksum={cs}&password=mp", [SECRET]
    )


def test_checksum_first() -> None:
    cs = sign("getMeetingInfo", "meetingID=room-1")
    assert checksum.verify("getMeetingInfo", f"checksum={cs}&meetingID=room-1", [SECRET])


@pytest.mark.parametrize("space", ["+", "%20"])
def test_raw_string_semantics(space: str) -> None:
    query = f"meetingID=room-1&name=My{space}Room&welcome=%28hi%29"
    cs = sign("create", query)
    assert checksum.verify("create", f"{query}&checksum={cs}", [SECRET])
    other = "%20" if space == "+" else "+"
    reencoded = query.replace(space, other)
    assert not checksum.verify("create", f"{reencoded}&checksum={cs}", [SECRET])


def test_parameter_order_is_part_of_the_signature() -> None:
    cs = sign("create", "meetingID=room-1&name=Room")
    assert checksum.verify("create", f"meetingID=room-1&name=Room&checksum={cs}", [SECRET])
    assert not checksum.verify("create", f"name=Room&meetingID=room-1&checksum={cs}", [SECRET])


def test_control_characters_are_ignored() -> None:
    query = "meetingID=room-1"
    cs = sign("end", query)
    assert checksum.verify("end", f"meeting\nID=room-1\t&checksum={cs}", [SECRET])


def test_rotation_any_secret_works() -> None:
    query = "meetingID=room-1"
    secrets = ["new-secret", "old-secret", "older-secret"]
    for secret in secrets:
        cs = sign("end", query, secret, "sha512")
        assert checksum.verify("end", f"{query}&checksum={cs}", secrets)
    cs = sign("end", query, "retired-secret")
    assert not checksum.verify("end", f"{query}&checksum={cs}", secrets)
    assert not checksum.verify("end", f"{query}&checksum={sign('end', query)}", [])


def test_no_checksum_is_false() -> None:
    assert not checksum.verify("getMeetings", "", [SECRET])
    assert not checksum.verify("create", "meetingID=room-1&name=Room", [SECRET])
    assert not checksum.verify("create", "meetingID=room-1&checksum=", [SECRET])


def test_non_hex_checksum_is_false() -> None:
    assert not checksum.verify("getMeetings", "checksum=" + "z" * 40, [SECRET])
    assert not checksum.verify("getMeetings", "checksum=" + "é" * 40, [SECRET])


def test_find_and_strip_checksum() -> None:
    assert checksum.find_checksum("a=1&checksum=abc&b=2") == "abc"
    assert checksum.find_checksum("a=1&xchecksum=abc") is None
    assert checksum.strip_checksum("a=1&checksum=abc&b=2", "abc") == "a=1&b=2"
    assert checksum.strip_checksum("checksum=abc&b=2", "abc") == "b=2"
    assert checksum.strip_checksum("&checksum=abc", "abc") == ""


def test_post_canonical_fallback() -> None:
    # All parameters in the body: the checksum is over the parameters sorted by
    # name, values form-encoded (space as +, "/" as %2F).
    body = [("name", "My Room/1"), ("meetingID", "room-1"), ("attendeePW", "a&b")]
    canonical = "attendeePW=a%26b&meetingID=room-1&name=My+Room%2F1"
    assert checksum.canonical_query(body) == canonical
    cs = sign("create", canonical)
    assert checksum.verify("create", "", [SECRET], [*body, ("checksum", cs)])
    assert checksum.verify("create", f"checksum={cs}", [SECRET], body)
    assert not checksum.verify("create", f"checksum={cs}", ["other"], body)
    assert not checksum.verify("create", f"checksum={cs}", [SECRET], body[:2])


def test_post_canonical_includes_url_parameters() -> None:
    body = [("name", "Room")]
    cs = sign("create", "meetingID=room+1&name=Room")
    assert checksum.verify("create", f"meetingID=room%201&checksum={cs}", [SECRET], body)


def test_post_over_the_url_query_only() -> None:
    # The 3.0 docs: a POST's checksum covers the URL query; the body is not signed,
    # so the gateway refuses body parameters beside a signed query (issue 7 §2).
    cs = sign("create", "meetingID=room-1")
    body = [("name", "Anything")]
    assert checksum.verify("create", f"meetingID=room-1&checksum={cs}", [SECRET])
    assert not checksum.verify("create", f"meetingID=room-1&checksum={cs}", [SECRET], body)


@pytest.mark.parametrize("algorithm", ["sha1", "sha256", "sha384", "sha512"])
def test_signed_query_round_trip(algorithm: str) -> None:
    params = [("meetingID", "acme/room 1"), ("name", "Café (test)"), ("welcome", "a&b=c")]
    query = checksum.signed_query("create", params, "backend-secret", algorithm)
    assert checksum.verify("create", query, ["backend-secret"])
    assert not checksum.verify("create", query, [SECRET])
    assert query.startswith("meetingID=acme%2Froom+1&name=Caf%C3%A9+%28test%29&welcome=a%26b%3Dc&")
    cs = checksum.find_checksum(query)
    assert cs is not None
    assert len(cs) == {"sha1": 40, "sha256": 64, "sha384": 96, "sha512": 128}[algorithm]


def test_signed_query_without_parameters() -> None:
    query = checksum.signed_query("getMeetings", [], SECRET)
    assert query == "checksum=867e6596b930651c0cd4dd1912bec902fae56d5a"
    assert checksum.verify("getMeetings", query, [SECRET])
