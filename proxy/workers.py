"""Several gateway processes on one listening address (``[proxy] workers = N``).

``bbb-proxy serve`` with ``workers > 1`` becomes a small parent, :func:`serve_workers`,
which serves nothing itself:

- it binds ``[proxy] bind`` once per worker, N sockets on one port with ``SO_REUSEPORT``
  (the kernel spreads new connections evenly over them, by a hash of each connection's
  addresses; one socket shared by all would let whichever worker wakes first take most
  of a burst of connections), and starts N children, each ``python -m proxy.cli serve``
  on a copy of the configuration file made at start-up (a worker started again later
  runs the same configuration as the others).  Worker *i* inherits socket *i* and accepts
  on it; the parent keeps every socket open, so while a worker is started again the
  connections the kernel hands its socket wait in its queue (a few seconds), none is
  refused;
- every child is a whole gateway, an *instance* on the Redis store with its own replica of
  the shared ledger (``proxy.ledger.shared``); ``workers > 1`` with ``[store] kind =
  "local"`` is refused by :mod:`proxy.config`: the local journal belongs to one process;
- a child that dies is started again (logged, with a delay that doubles while it keeps
  dying young, up to ``MAX_RESTART_DELAY``); a child that cannot start at all when the
  parent starts (a configuration or state error: exit 2 or 3) stops the parent with its
  exit code, as a single process would;
- SIGTERM or SIGINT to the parent: SIGTERM to every child (each finishes its requests in
  flight, ``proxy.server.SHUTDOWN_DEADLINE``), SIGKILL to one still running
  ``STOP_DEADLINE`` later, then the parent removes its run directory and exits 0.  The
  children run in their own session, so a Ctrl-C at a terminal reaches the parent only;
- each child holds the reading end of a pipe (the *lifeline*) whose writing end only the
  parent holds: when the parent dies, even by SIGKILL, the children see the pipe close
  and stop as on SIGTERM: no orphan keeps serving.

Metrics: the parent makes ``<run dir>/prometheus`` and gives it to the children as
``PROMETHEUS_MULTIPROC_DIR`` (prometheus-client's multiprocess mode, see
:mod:`proxy.metrics`); it marks a dead child's live gauges dead.

A child learns its seat from the environment (``BBB_PROXY_WORKER``, see :class:`Seat`).

Error handling: ``ConfigError`` when the address cannot be listened on (exit 2);
:class:`StartFailed` (with the child's exit code) when a child does not start.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from proxy.config import Config
from proxy.errors import ConfigError, StateError
from proxy.server import resolve_bind

log = logging.getLogger(__name__)

SEAT_ENV = "BBB_PROXY_WORKER"  # set by the parent for its children only
METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's multiprocess directory
STOP_DEADLINE = 20.0  # seconds after SIGTERM before a child is killed (its graceful stop is 10)
YOUNG = 10.0  # seconds: a child that dies younger than this is started again after a delay
MAX_RESTART_DELAY = 30.0
BACKLOG = 1024


class StartFailed(Exception):
    """A worker exited before it was listening; ``code`` is its exit status."""

    def __init__(self, index: int, code: int) -> None:
        super().__init__(f"worker {index} did not start (exit status {code})")
        self.code = code if code > 0 else 1


@dataclass(frozen=True, slots=True)
class Seat:
    """What a worker is given by its parent: its number and three inherited descriptors."""

    index: int  # 1..count
    count: int
    listen_fd: int  # its listening socket
    ready_fd: int  # a pipe: written once when this worker listens
    lifeline_fd: int  # a pipe the parent never writes to: it closes when the parent dies

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> Seat | None:
        """This process's seat, or None when it was not started by :func:`serve_workers`."""
        text = environ.get(SEAT_ENV)
        if text is None:
            return None
        fields = json.loads(text)
        return cls(**{name: int(fields[name]) for name in cls.__dataclass_fields__})

    def encode(self) -> str:
        return json.dumps({name: getattr(self, name) for name in self.__dataclass_fields__})

    @property
    def bind(self) -> str:
        """hypercorn's bind for the inherited socket."""
        return f"fd://{self.listen_fd}"

    def ready(self) -> None:
        """Tell the parent this worker listens (once)."""
        with contextlib.suppress(OSError):  # the parent may be gone already
            os.write(self.ready_fd, b"ready\n")
        with contextlib.suppress(OSError):
            os.close(self.ready_fd)

    async def parent_gone(self) -> None:
        """Return when the parent has exited (the lifeline's writing end closed)."""
        stream = trio.lowlevel.FdStream(self.lifeline_fd)
        async with stream:
            while await stream.receive_some():
                pass


def listen(bind: str, count: int) -> list[socket.socket]:
    """``count`` listening sockets on ``bind``'s one port (``SO_REUSEPORT``), one per worker
    (blocking, before the event loop; port 0: the first one's free port for all).  A port
    some process listens on already is refused, as for one process: a second gateway's
    workers would otherwise share the port and its connections without a word.

    Error handling: ``ConfigError`` naming ``proxy.bind`` (the CLI exits 2).
    """
    family, kind, proto, address = resolve_bind(bind)
    sockets: list[socket.socket] = []
    try:
        with socket.socket(family, kind, proto) as probe:  # without SO_REUSEPORT: fails if
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # anyone listens
            probe.bind(address)  # there, even another gateway's SO_REUSEPORT workers
        for _ in range(count):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.bind(address)
            sock.listen(BACKLOG)
            sock.setblocking(False)
            address = sock.getsockname()  # port 0: the same free port for the next ones
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise ConfigError(f"proxy.bind {bind}: cannot listen: {exc.strerror}") from None
    return sockets


async def serve_workers(
    config: Config,
    config_file: str,
    cli_options: Sequence[str] = (),
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``config.proxy.workers`` gateway processes until SIGTERM/SIGINT (see above).

    ``cli_options`` go before ``serve`` on each child's command line (``--log-level``...).
    ``task_status`` gets the address listened on once every worker listens.
    """
    sockets = listen(config.proxy.bind, config.proxy.workers)
    run_dir = Path(tempfile.mkdtemp(prefix="bbb-proxy-workers-"))
    try:
        _prepare(config, config_file, run_dir)
        pool = _Pool([sock.fileno() for sock in sockets], run_dir, cli_options)
        await pool.run(_address(sockets[0]), task_status)
    finally:
        for sock in sockets:
            sock.close()
        shutil.rmtree(run_dir, ignore_errors=True)


def _prepare(config: Config, config_file: str, run_dir: Path) -> None:
    """The run directory's contents, and what the workers would race to make."""
    (run_dir / "prometheus").mkdir()
    try:
        shutil.copyfile(config_file, run_dir / "config.toml")
    except OSError as exc:
        raise ConfigError(f"{config_file}: cannot read: {exc.strerror}") from None
    try:  # the portal's cookie key: made once here, not by N workers at once
        from proxy.portal.service import cookie_key

        config.proxy.state_dir.mkdir(parents=True, exist_ok=True)
        cookie_key(config.portal, config.proxy.state_dir)
    except OSError as exc:
        raise StateError(f"{config.proxy.state_dir}: cannot create: {exc.strerror}") from None


def _address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class _Pool:
    """The workers: started, watched, started again, stopped."""

    def __init__(self, listen_fds: list[int], run_dir: Path, cli: Sequence[str]) -> None:
        self.count = len(listen_fds)
        self.listen_fds = listen_fds  # worker i's socket: listen_fds[i - 1]
        self.run_dir = run_dir
        self.cli = list(cli)
        self.stopping = False
        self.children: dict[int, trio.Process] = {}  # by seat index, while running
        self._started = 0
        self._all_started = trio.Event()

    async def run(self, address: str, task_status: trio.TaskStatus[str]) -> None:
        async with trio.open_nursery() as outer:
            outer.start_soon(self._stop_on_signal)
            async with trio.open_nursery() as keepers:
                for index in range(1, self.count + 1):
                    keepers.start_soon(self._keep, index)
                await self._all_started.wait()
                if not self.stopping:
                    log.info("%d workers listening on %s", self.count, address)
                    task_status.started(address)
            outer.cancel_scope.cancel()  # every worker has stopped

    async def _keep(self, index: int) -> None:
        """Run worker ``index``, and again whenever it dies, until the pool stops."""
        delay, first = 0.0, True
        while not self.stopping:
            started = trio.current_time()
            code, listened = await self._run_child(index, first)
            if self.stopping:
                return
            if first and not listened:
                raise StartFailed(index, code)
            first = False
            delay = min(MAX_RESTART_DELAY, max(1.0, 2 * delay))
            if trio.current_time() - started >= YOUNG:
                delay = 0.0
            log.error(
                "worker %d exited (%s)%s; starting it again in %.0f s",
                index,
                _status(code),
                "" if listened else " before listening",
                delay,
            )
            await trio.sleep(delay)

    async def _run_child(self, index: int, first: bool) -> tuple[int, bool]:
        """Start worker ``index`` and wait until it exits: its status, whether it listened."""
        ready_r, ready_w = os.pipe()
        life_r, life_w = os.pipe()
        listen_fd = self.listen_fds[index - 1]
        seat = Seat(index, self.count, listen_fd, ready_w, life_r)
        try:
            process = await trio.lowlevel.open_process(
                self._argv(),
                env=os.environ | {SEAT_ENV: seat.encode(), METRICS_ENV: str(self._metrics_dir)},
                pass_fds=(listen_fd, ready_w, life_r),
                start_new_session=True,  # a terminal's Ctrl-C goes to the parent only
            )
        finally:
            os.close(ready_w)
            os.close(life_r)
        self.children[index] = process
        log.info("worker %d started (pid %d)", index, process.pid)
        try:
            listened = await self._await_ready(ready_r, process)
            if first and listened:
                self._count_started()
            code = await process.wait()
            return code, listened
        finally:
            with trio.CancelScope(shield=True):
                await _stop(process)
            os.close(life_w)
            del self.children[index]
            _mark_dead(self._metrics_dir, process.pid)

    async def _await_ready(self, ready_fd: int, process: trio.Process) -> bool:
        stream = trio.lowlevel.FdStream(ready_fd)
        async with stream:
            data = b""
            while chunk := await stream.receive_some():
                data += chunk
            return data.startswith(b"ready")

    def _count_started(self) -> None:
        self._started += 1
        if self._started == self.count:
            self._all_started.set()

    @property
    def _metrics_dir(self) -> Path:
        return self.run_dir / "prometheus"

    def _argv(self) -> list[str]:
        config = str(self.run_dir / "config.toml")
        return [sys.executable, "-m", "proxy.cli", *self.cli, "serve", "--config", config]

    async def _stop_on_signal(self) -> None:
        # The receiver stays open to the end: a second signal changes nothing.
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("received %s, stopping the workers", signal.Signals(signum).name)
                break
            self.stopping = True
            self._all_started.set()  # no more waiting for a start
            for process in self.children.values():
                _signal(process, signal.SIGTERM)
            await trio.sleep(STOP_DEADLINE)  # cancelled once they have all stopped
            for index, process in self.children.items():
                log.error("worker %d (pid %d) still running: killed", index, process.pid)
                _signal(process, signal.SIGKILL)
            await trio.sleep_forever()


async def _stop(process: trio.Process) -> None:
    """SIGTERM (if still running), then SIGKILL after ``STOP_DEADLINE``."""
    if process.returncode is None:
        _signal(process, signal.SIGTERM)
    with trio.move_on_after(STOP_DEADLINE):
        await process.wait()
        return
    log.error("worker pid %d did not stop within %.0f s: killed", process.pid, STOP_DEADLINE)
    process.kill()
    await process.wait()


def _signal(process: trio.Process, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # exited a moment ago
        process.send_signal(signum)


def _mark_dead(directory: Path, pid: int) -> None:
    """A dead worker's live gauges leave the scrape; its counters stay in the sums."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]


def _status(code: int) -> str:
    if code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"exit status {code}"
