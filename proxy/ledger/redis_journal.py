"""The ledger's records on Redis (``[store] kind = "redis"``): their replay.

The ledger's records go to the Redis log ``ledger`` (:class:`~proxy.store.redis.RedisLog`,
one stream), numbered by ``seq`` as in the file journal.  A compaction replaces the
stream with a header ``{"op": "snapshot", "seq": N, "count": K}`` and the K
reservations, each ``{"op": "held", ...its fields}``; the records after it follow
with ``seq`` N+1, N+2, ...  Replay checks the numbering has no gap.  Several gateway
instances write it, each deciding on its replica (:mod:`proxy.ledger.shared`).

Error handling: ``StateError`` naming the record for one that is not the ledger's, a
gap in ``seq``, or a snapshot missing reservations.
"""

from __future__ import annotations

from proxy.errors import StateError
from proxy.ledger.codec import decode_record
from proxy.ledger.model import LedgerState, Reserve
from proxy.store import Record as LogRecord

__all__ = ["replay"]


def replay(records: list[LogRecord]) -> tuple[LedgerState, int]:
    """The ledger state the log's records make, and the last ``seq``.

    Error handling: ``StateError`` naming the record's position for one that is not
    the ledger's, a gap in ``seq``, or a snapshot missing reservations.
    """
    state, last, expected_held = LedgerState(), 0, 0
    for index, payload in enumerate(records):
        where = f"redis ledger log, record {index + 1}"
        try:
            last, expected_held = _replay_one(state, payload, last, expected_held)
        except (ValueError, TypeError, KeyError) as e:
            raise StateError(f"{where}: {type(e).__name__}: {e}") from None
    if expected_held:
        raise StateError(f"redis ledger log: its snapshot misses {expected_held} reservations")
    return state, last


def _replay_one(
    state: LedgerState, payload: LogRecord, last: int, expected_held: int
) -> tuple[int, int]:
    op = payload.get("op")
    if op == "snapshot":
        seq, count = payload["seq"], payload["count"]
        if not isinstance(seq, int) or not isinstance(count, int) or last or expected_held:
            raise ValueError("a snapshot header only at the start, with int seq and count")
        return seq, count
    if op == "held":
        if not expected_held:
            raise ValueError("a snapshot reservation without its header")
        entry = decode_record({**payload, "op": "reserve", "seq": last})
        assert isinstance(entry.record, Reserve)
        state.apply(entry.record)
        return last, expected_held - 1
    if expected_held:
        raise ValueError(f"the snapshot misses {expected_held} reservations")
    entry = decode_record(payload)
    if entry.seq != last + 1:
        raise ValueError(f"record {entry.seq} follows record {last}")
    state.apply(entry.record)
    return entry.seq, 0
