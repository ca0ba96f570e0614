"""Blocking file work in worker threads, each bounded by a deadline: the journal's and logs'.

A write that overruns its deadline cannot be stopped (a thread blocked on a frozen disk
stays blocked); it is *abandoned*: the caller gets :class:`Overran` at the deadline and
the thread is left to finish.  :attr:`BoundedIo.running` says whether any such thread is
still at work, so that recovery never lets two threads share a file.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Awaitable, Callable

import trio

from proxy.errors import StateError, StorageUnavailable


class Overran(Exception):
    """A file operation ran past its deadline; its thread was left to finish."""


class BoundedIo:
    """Runs file operations in worker threads and tracks those still running."""

    def __init__(self, where: object) -> None:
        self.where = where  # for messages: the directory or file worked on
        self._deadlines: dict[int, float] = {}  # running operations: their deadlines
        self._ids = itertools.count()

    async def run[*Ts, T](self, deadline: float, fn: Callable[[*Ts], T], *args: *Ts) -> T:
        """``fn(*args)`` in a worker thread, waited for until ``deadline`` at most.

        Shielded from outside cancellation (a write must not be abandoned half done by
        a client that went away); past the deadline the thread is left to finish and
        ``Overran`` raised.
        """
        io_id = next(self._ids)
        self._deadlines[io_id] = deadline
        started = trio.current_time()

        def tracked() -> T:
            try:
                return fn(*args)
            finally:
                self._deadlines.pop(io_id, None)

        with trio.CancelScope(shield=True), trio.CancelScope(deadline=deadline):
            return await trio.to_thread.run_sync(tracked, abandon_on_cancel=True)
        raise Overran(
            f"{getattr(fn, '__name__', fn)} in {self.where} took over {deadline - started:.3g} s"
        )

    @property
    def running(self) -> bool:
        """An operation (perhaps abandoned) has not returned yet."""
        return bool(self._deadlines)

    def overrunning(self) -> bool:
        """An operation is running past its deadline (so the storage counts as failed)."""
        deadline = min(self._deadlines.copy().values(), default=math.inf)  # threads remove
        return deadline < math.inf and trio.current_time() > deadline


async def commit_within(
    seconds: float,
    lock: trio.Lock,
    covered: Callable[[], bool],
    write: Callable[[float], Awaitable[None]],
    what: str,
) -> None:
    """A group commit: under ``lock``, ``write(deadline)`` unless ``covered()`` (a batch
    written while this caller waited included its records); all within ``seconds``.

    Error handling: ``StorageUnavailable`` (from a ``StateError`` naming ``what``) past
    ``seconds``; whatever ``write`` raises.
    """
    with trio.move_on_after(seconds) as waiting:
        async with lock:
            if not covered():
                await write(waiting.deadline)
            return
    raise StorageUnavailable() from StateError(f"{what} did not write within {seconds} s")
