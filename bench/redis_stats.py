"""What a Redis server did: ``INFO commandstats`` totals and a ``MONITOR`` tally.

A few lines of RESP over a trio socket (no client library between the bench and what
it counts).

- :func:`command_calls`: the ``calls`` of every command in ``INFO commandstats``, summed.
  Redis counts the commands a Lua script runs too, so this is every operation the server
  executed (``EVALSHA`` once, plus the ``XADD``... inside it).
- :class:`Monitor`: every command ``MONITOR`` reports while it runs, split by source: a
  client's own commands (each one request the client sent; a ``MULTI`` ... ``EXEC``
  block counted once, as a client sends it in one write) against the commands run
  inside scripts (``[0 lua]``).  A client's top-level commands are an upper bound on its
  round trips: commands it pipelines without ``MULTI`` count one each.

Error handling: ``OSError`` / ``trio`` stream errors when Redis is not reachable;
``RuntimeError`` for an error reply.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import trio

HOST = "127.0.0.1"
_SOURCE = re.compile(rb'^\+[\d.]+ \[\d+ ([^\]]+)\] "([^"]*)"')


def encode(*args: str) -> bytes:
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


async def command(port: int, *args: str) -> bytes:
    """One command on a fresh connection; its bulk-string (or status) reply."""
    stream = await trio.open_tcp_stream(HOST, port)
    async with stream:
        await stream.send_all(encode(*args))
        data = b""
        while b"\r\n" not in data:
            data += await _receive(stream)
        head, _, rest = data.partition(b"\r\n")
        if head.startswith(b"-"):
            raise RuntimeError(head[1:].decode(errors="replace"))
        if not head.startswith(b"$"):
            return head[1:]
        size = int(head[1:])
        while len(rest) < size + 2:
            rest += await _receive(stream)
        return rest[:size]


async def _receive(stream: trio.SocketStream) -> bytes:
    chunk = await stream.receive_some(65536)
    if not chunk:
        raise RuntimeError("redis closed the connection")
    return chunk


def parse_commandstats(text: str) -> dict[str, int]:
    """``cmdstat_xadd:calls=12,usec=...`` lines -> ``{"xadd": 12}``."""
    calls = {}
    for line in text.splitlines():
        if line.startswith("cmdstat_"):
            name, _, fields = line[len("cmdstat_") :].partition(":")
            values = dict(f.split("=", 1) for f in fields.split(","))
            calls[name] = int(values["calls"])
    return calls


async def command_calls(port: int) -> dict[str, int]:
    """Calls per command since the server started (or its last ``CONFIG RESETSTAT``)."""
    return parse_commandstats((await command(port, "INFO", "commandstats")).decode())


def total_without_info(before: dict[str, int], after: dict[str, int]) -> int:
    """Commands executed between two readings, the readings' own ``INFO`` left out."""
    return sum(n - before.get(name, 0) for name, n in after.items() if name != "info")


@dataclass
class Tally:
    """What ``MONITOR`` showed: clients' top-level requests, commands run in scripts."""

    client_requests: int = 0
    script_commands: int = 0
    by_command: dict[str, int] = field(default_factory=dict)
    _in_multi: set[bytes] = field(default_factory=set)

    def line(self, line: bytes) -> None:
        found = _SOURCE.match(line)
        if found is None:
            return
        source, name = found.group(1), found.group(2).decode(errors="replace").lower()
        if source == b"lua":
            self.script_commands += 1
            return
        if name == "info":
            return  # the bench's own readings
        self.by_command[name] = self.by_command.get(name, 0) + 1
        if source in self._in_multi:  # queued in a MULTI block: sent with it
            if name in ("exec", "discard"):
                self._in_multi.discard(source)
            return
        if name == "multi":
            self._in_multi.add(source)
        self.client_requests += 1


class Monitor:
    """``MONITOR`` on its own connection, tallying until :meth:`stop`."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.tally = Tally()
        self._scope = trio.CancelScope()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        stream = await trio.open_tcp_stream(HOST, self.port)
        async with stream:
            await stream.send_all(encode("MONITOR"))
            pending = b""
            while b"\r\n" not in pending:
                pending += await _receive(stream)
            _, _, pending = pending.partition(b"\r\n")  # +OK
            task_status.started()
            with self._scope:
                while True:
                    pending += await _receive(stream)
                    *lines, pending = pending.split(b"\r\n")
                    for line in lines:
                        self.tally.line(line)

    def stop(self) -> None:
        self._scope.cancel()
