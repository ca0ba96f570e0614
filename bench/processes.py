"""The servers under test, each in its own process, started and stopped cleanly.

:func:`open_server` owns one child process: it starts it with stdout piped
(servers print their URLs there once listening) and stderr to a log file, and
on exit sends SIGTERM, waits, and kills what is still running.

Error handling: :class:`ServerFailed` when a server exits or stays silent
during start-up; its message ends with the tail of the server's log.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from bench.client import ConnectionFailed, fetch

START_TIMEOUT = 20.0  # seconds for a server to listen (and, for the gateway, be ready)
STOP_TIMEOUT = 10.0  # seconds after SIGTERM before SIGKILL
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class ServerFailed(Exception):
    """A server process did not start."""


@dataclass(frozen=True, slots=True)
class Server:
    name: str
    process: trio.Process
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def failed(self, what: str) -> ServerFailed:
        tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
        return ServerFailed(f"{self.name}: {what}\n--- {self.log} (tail) ---\n{tail}")


@asynccontextmanager
async def open_server(name: str, argv: Sequence[str], log_dir: Path) -> AsyncIterator[Server]:
    """Run ``argv`` until the block exits."""
    log = log_dir / f"{name}.log"
    with log.open("wb") as sink:
        process = await trio.lowlevel.open_process(list(argv), stdout=subprocess.PIPE, stderr=sink)
    try:
        yield Server(name, process, log)
    finally:
        with trio.CancelScope(shield=True):
            await _stop(process)


async def _stop(process: trio.Process) -> None:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
    with trio.move_on_after(STOP_TIMEOUT):
        await process.wait()
        return
    process.kill()
    await process.wait()


async def read_lines(server: Server, count: int) -> list[str]:
    """The first ``count`` lines the server prints on stdout."""
    stream = server.process.stdout
    assert stream is not None
    data = b""
    with trio.move_on_after(START_TIMEOUT):
        while data.count(b"\n") < count:
            chunk = await stream.receive_some()
            if not chunk:
                raise server.failed("exited during start-up")
            data += chunk
        return data.decode().splitlines()[:count]
    raise server.failed(f"printed no {count} line(s) within {START_TIMEOUT} s")


async def wait_ready(server: Server, host: str, port: int, path: str) -> None:
    """Poll ``path`` until it answers 200."""
    with trio.move_on_after(START_TIMEOUT):
        while server.process.returncode is None:
            try:
                if (await fetch(host, port, path)).status == 200:
                    return
            except ConnectionFailed:
                pass
            await trio.sleep(0.1)
        raise server.failed(f"exited with status {server.process.returncode}")
    raise server.failed(f"{path} not ready within {START_TIMEOUT} s")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (Linux /proc)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime: proc(5) 14, 15
