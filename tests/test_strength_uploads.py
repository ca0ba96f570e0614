"""Tests written to kill mutants of ``proxy.bbb.uploads`` that survived (docs/mutation.md)."""

from __future__ import annotations

import pytest

from proxy.bbb import uploads


@pytest.mark.parametrize(
    ("data", "tail", "cut"),
    [
        (b"abcdef", 3, 6),  # no line break at all: everything may go
        (b"ab\r\ncd", 10, 2),  # the first break of the window, CR first
        (b"ab\n\rcd", 10, 2),  # LF first
        (b"abc\rdef", 10, 3),  # a lone CR holds back too
        (b"abc\ndef", 10, 3),  # a lone LF
        (b"a\rb\rc\rd", 10, 1),  # the first CR, not the last
        (b"a\nb\nc\nd", 10, 1),  # the first LF, not the last
        (b"a\rb\nc", 10, 1),
        (b"\r\n" + b"x" * 8, 4, 10),  # breaks before the window are fed
        (b"x" * 6 + b"\r" + b"y" * 3, 4, 6),  # the window starts exactly len - tail
        (b"x" * 5 + b"\r" + b"y" * 4, 4, 10),  # one byte earlier: outside it
    ],
)
def test_safe_end_leaves_no_line_break_in_the_last_tail_bytes(
    data: bytes, tail: int, cut: int
) -> None:
    assert uploads._safe_end(data, tail) == cut
    fed = data[:cut]
    assert b"\r" not in fed[-tail:] and b"\n" not in fed[-tail:]
