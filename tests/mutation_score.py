"""The mutation score per module, from ``mutmut results --all true`` on stdin (``./run mutate``).

A mutant counts as killed when a test failed or timed out with it; the score is killed
over checked (mutants not yet run are left out).  See docs/mutation.md.
"""

from __future__ import annotations

import sys
from collections import Counter, defaultdict
from collections.abc import Iterable


def scores(lines: Iterable[str]) -> dict[str, Counter[str]]:
    """Status counts per module, from lines like ``proxy.placement.x_f__mutmut_3: killed``."""
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for line in lines:
        name, _, status = line.strip().rpartition(": ")
        if "__mutmut_" in name:
            counts[name.split(".x")[0]][status] += 1
    return counts


def row(name: str, c: Counter[str]) -> str:
    checked = c.total() - c["not checked"]
    killed = c["killed"] + c["timeout"]
    score = 100 * killed / checked if checked else 0.0
    survived = c["survived"] + c["no tests"]
    return f"{name:28} {killed:5} / {checked:<5} {score:5.1f} %   survived {survived}"


def main() -> None:
    counts = scores(sys.stdin)
    total: Counter[str] = Counter()
    for module, c in sorted(counts.items()):
        total.update(c)
        print(row(module, c))
    print(row("all", total))


if __name__ == "__main__":
    main()
