"""A private ``redis-server`` for the tests: loopback, a free port, its own directory.

Debian's ``redis-server`` package is needed; ``./run test`` installs it when missing and
sets ``BBB_PROXY_NEED_REDIS``, so there a missing binary fails the tests that need it
instead of skipping them.

The server runs with the persistence the README asks for (AOF on, ``appendfsync
always``), so :meth:`RedisServer.kill` (SIGKILL) followed by :meth:`RedisServer.start`
shows what a crash of Redis keeps: everything it acknowledged.

Error handling: a server that does not answer PING within ``START_TIMEOUT`` fails the
test with its log's tail.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

START_TIMEOUT = 10.0  # seconds for redis-server to answer PING


def redis_binary() -> str:
    """The path of ``redis-server``; skips (or, under ``./run test``, fails) without it."""
    binary = shutil.which("redis-server")
    if binary is None:
        message = "Debian's redis-server package is not installed (./run test installs it)"
        if os.environ.get("BBB_PROXY_NEED_REDIS"):
            pytest.fail(message)
        pytest.skip(message)
    return binary


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class RedisServer:
    """One redis-server process on 127.0.0.1:``port``, data under ``directory``."""

    def __init__(self, directory: Path, port: int | None = None, extra: Sequence[str] = ()) -> None:
        self.binary = redis_binary()
        self.directory = directory
        self.port = port or free_port()
        self.extra = tuple(extra)  # more redis-server options, e.g. ("--replicaof", ...)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start (or restart, on the same port and data) and wait until it answers."""
        assert self.process is None, "already running"
        log = self.directory / "redis.log"
        args = [
            self.binary,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.directory),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
            "--protected-mode", "yes",
            "--logfile", str(log),
            "--daemonize", "no",
            *self.extra,
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while not self.answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                self.stop()
                pytest.fail(f"redis-server did not start on port {self.port}:\n{tail}")
            time.sleep(0.02)

    def answers(self) -> bool:
        """PING answered with PONG (a plain socket: no client library needed)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL, as a crash: no shutdown, no final save."""
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
            self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A running private redis-server (AOF, ``appendfsync always``); stopped after."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
