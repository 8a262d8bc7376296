"""Liveness: a silent peer never holds a connection for ever.

Two kinds of silence, two defences, both on by default and both settings (``DB_RETRY_KEEPALIVE_*``,
``DB_RETRY_TCP_USER_TIMEOUT``, ``DB_RETRY_PROBE_*``):

- **The peer's kernel is gone** (a partition, a host or VM frozen whole): nothing acknowledges
  anything. Every new connection gets TCP keepalives and ``TCP_USER_TIMEOUT`` (:func:`tune_socket`,
  called by the pool's ``connect`` event in :mod:`db_retry.engine`), so the kernel fails it within
  seconds whether it waits for an answer (keepalive probes go unanswered) or has data in flight that
  is never acknowledged (the user timeout).
- **The kernel answers but nothing above it does** (a hung proxy or load balancer, a stopped server
  process): keepalives are acknowledged and never fire. A :class:`Watchdog` per event loop, started
  only while a connection waits for the server, notices a wait older than ``probe_after``, probes that
  connection's server on a separate TCP connection (PostgreSQL's 8-byte ``SSLRequest``, which any
  server or pooler answers with one byte before authentication) and, if the probe gets no answer
  within ``probe_timeout``, aborts the sockets of every connection waiting on that server. The waiting
  call then fails as a lost connection: retried, or outcome-unknown if it was a COMMIT. A server that
  answers its probe keeps its long queries. No thread is started; nothing runs at import.

``architecture/liveness.md`` has the reasons and the measured detection times.
"""

import asyncio
import contextlib
import functools
import logging
import math
import os
import socket
import struct
import sys
import time
import typing
import weakref


if typing.TYPE_CHECKING:
    from db_retry.settings import RetrySettings


logger = logging.getLogger("db_retry.liveness")

Peer: typing.TypeAlias = tuple[str, int]
_SSL_REQUEST: typing.Final = struct.pack("!ii", 8, 80877103)
_ANSWERS: typing.Final = frozenset(b"SNE")  # SSL yes, SSL no, an error: someone is there


class Wire:
    """One connection's socket as the watchdog sees it: where it goes, whether it waits, how to cut it at once."""

    __slots__ = ("__weakref__", "abort", "cut_at", "peer", "waiting_since", "watchdog")

    def __init__(self, peer: Peer, abort: typing.Callable[[], None], watchdog: "Watchdog | None") -> None:
        self.peer = peer
        self.abort = abort
        self.watchdog = watchdog
        self.waiting_since: float | None = None  # monotonic time the client began waiting for the server
        self.cut_at: float | None = None  # a quick command (ROLLBACK) unanswered by then is cut without a probe
        if watchdog is not None:
            watchdog.wires.add(self)

    def waiting(self, limit: float | None = None) -> None:
        """The client sends something and waits for the answer (a statement, COMMIT, ROLLBACK).

        ``limit``: a command any server answers at once (ROLLBACK); unanswered after ``limit`` seconds, the
        connection is cut without a probe (a false alarm costs one reconnect; a silent server, no more).
        """
        self.waiting_since = now = time.monotonic()
        self.cut_at = None if limit is None else now + limit
        dog = self.watchdog
        if dog is not None:
            due = now + dog.probe_after if self.cut_at is None else self.cut_at
            if dog.timer_at is None or due < dog.timer_at:
                dog.arm(due)

    def answered(self) -> None:
        self.waiting_since = None
        self.cut_at = None


def _transport_of(driver: typing.Any) -> asyncio.Transport | None:  # noqa: ANN401 - any driver's connection
    """Asyncpg's transport: no public accessor; the one place that reads ``Connection._transport``."""
    transport = getattr(driver, "_transport", None)
    return transport if isinstance(transport, asyncio.Transport) else None


def tune_socket(dbapi_connection: typing.Any, settings: "RetrySettings") -> Wire | None:  # noqa: ANN401
    """Set keepalives and the user timeout on a new connection's TCP socket; its :class:`Wire`, if TCP."""
    driver = getattr(dbapi_connection, "driver_connection", dbapi_connection)
    transport = _transport_of(driver)
    if transport is not None:  # asyncpg
        sock = transport.get_extra_info("socket")
        if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):  # pragma: no cover - a Unix socket
            return None  # (the kit's servers listen on TCP only: unix_socket_directories is empty)
        _tune(sock, settings)
        return Wire(_peer(sock.getpeername()), transport.abort, watchdog(settings))
    pgconn = getattr(driver, "pgconn", None)
    if pgconn is None:  # pragma: no cover - another driver: left as it is
        return None
    descriptor = pgconn.socket  # psycopg 3: libpq's socket; a duplicate of it is the same socket
    with socket.socket(fileno=os.dup(descriptor)) as sock:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):  # pragma: no cover - a Unix socket, as above
            return None
        _tune(sock, settings)
        ends = (sock.getsockname(), sock.getpeername())
    return Wire(_peer(ends[1]), functools.partial(_shutdown, descriptor, ends), watchdog(settings))


def cancel_at_once(dbapi_connection: typing.Any) -> None:  # noqa: ANN401 - any driver's connection
    """Let the caller's cancellation of a psycopg statement end the wait at once, even on a silent server.

    On cancellation psycopg 3.2+ asks the server to cancel the statement on a second connection and
    waits for the statement to end, up to 5 s each (``AsyncConnection._try_cancel``, then ``wait``):
    against a server that does not answer, the caller's cancellation reaches it seconds late. SQLAlchemy
    discards a connection interrupted by a cancellation anyway, so the dance buys nothing: this is the
    one place that replaces the private ``_try_cancel`` of a psycopg connection, with one that lets the
    interruption go on (psycopg then closes the connection). A test fails loudly if psycopg renames it.
    (asyncpg sends its cancel request in the background and never holds the caller.)
    """
    driver = getattr(dbapi_connection, "driver_connection", dbapi_connection)
    if hasattr(type(driver), "_try_cancel"):
        driver._try_cancel = _interrupt_again  # noqa: SLF001 - see above


async def _interrupt_again(*, timeout: float = 0.0) -> None:  # noqa: ARG001 - psycopg's signature
    """Raise the interruption psycopg is handling, so that it closes the connection and lets it go on."""
    handled = sys.exc_info()[1]
    raise handled if handled is not None else asyncio.CancelledError


def _shutdown(descriptor: int, ends: tuple[typing.Any, typing.Any]) -> None:
    """Cut the socket both ways (a read waiting on it returns at once), if ``descriptor`` is still that socket."""
    with contextlib.suppress(OSError), socket.socket(fileno=os.dup(descriptor)) as sock:
        if (sock.getsockname(), sock.getpeername()) == ends:  # the number may have been reused since
            sock.shutdown(socket.SHUT_RDWR)


def _peer(address: typing.Any) -> Peer:  # noqa: ANN401 - what getpeername returns
    return str(address[0]), int(address[1])


def _tune(sock: socket.socket, settings: "RetrySettings") -> None:
    if not settings.keepalive_idle:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, round(settings.keepalive_idle)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, round(settings.keepalive_interval)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, settings.keepalive_count)
    if settings.tcp_user_timeout:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, round(settings.tcp_user_timeout * 1000))


async def probe(peer: Peer, timeout: float) -> bool:
    """Whether something at ``peer`` answers PostgreSQL's first message within ``timeout`` seconds."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(*peer)
            try:
                writer.write(_SSL_REQUEST)
                await writer.drain()
                answer = await reader.read(1)
            finally:
                writer.transport.abort()  # no goodbye: the peer may be the silent one
    except (OSError, TimeoutError):
        return False
    return bool(answer) and answer[0] in _ANSWERS


class Watchdog:
    """Per event loop: probes the servers of connections that wait too long, and cuts those that are silent.

    It costs nothing while connections get their answers: one timer per ``probe_after`` seconds while
    any connection of the loop waits, no task until one has waited too long. It holds its wires weakly
    and never its loop (it keeps the time its timer is set for, not the handle), so it keeps neither
    connections nor loops alive.
    """

    def __init__(self, settings: "RetrySettings") -> None:
        self.probe_after = settings.probe_after
        self.probe_timeout = settings.probe_timeout
        self.wires: weakref.WeakSet[Wire] = weakref.WeakSet()
        self.timer_at: float | None = None  # monotonic time the pending timer fires
        self.generation = 0  # the pending timer's; an earlier timer supersedes a later one
        self.probing = False  # a probe task runs (held by _PROBES, never here: a task references its loop)
        self.alive: dict[Peer, float] = {}  # when each server last answered a probe

    def arm(self, at: float) -> None:
        """Look again at (monotonic) time ``at`` (the timer set before, if any, then does nothing)."""
        self.timer_at = at
        self.generation += 1
        asyncio.get_running_loop().call_later(max(0.0, at - time.monotonic()), self._look, self.generation)

    def _look(self, generation: int) -> None:
        if generation != self.generation:
            return  # superseded by an earlier timer
        self.timer_at = None
        now = time.monotonic()
        waits = [(wire, since) for wire in list(self.wires) if (since := wire.waiting_since) is not None]
        if not waits:
            return  # nothing waits: no timer until something does
        stuck: dict[Peer, list[Wire]] = {}
        dues: list[float] = []
        for wire, since in waits:
            if wire.cut_at is not None:
                if now >= wire.cut_at:
                    logger.info("%s:%s did not answer a ROLLBACK in time; cutting the connection", *wire.peer)
                    self._cut(wire)
                else:
                    dues.append(wire.cut_at)
                continue
            dues.append(since + self.probe_after)
            if now - since >= self.probe_after and now - self.alive.get(wire.peer, -math.inf) >= self.probe_after:
                stuck.setdefault(wire.peer, []).append(wire)
        if stuck and not self.probing:
            self.probing = True
            task = asyncio.get_running_loop().create_task(self._probe(stuck), name="db-retry probe")
            _PROBES.add(task)
            task.add_done_callback(self._probed)  # also when cancelled before its first step
        if dues:
            self.arm(max(min(dues), now + min(self.probe_after, QUICK) / 2))

    def _probed(self, task: "asyncio.Task[None]") -> None:
        _PROBES.discard(task)
        self.probing = False

    async def _probe(self, stuck: dict[Peer, list[Wire]]) -> None:
        for peer, wires in stuck.items():
            self._judge(peer, wires, answered=await probe(peer, self.probe_timeout))

    def _judge(self, peer: Peer, wires: list[Wire], *, answered: bool) -> None:
        if answered:
            self.alive[peer] = time.monotonic()  # its long queries go on
            _SILENT.pop(peer, None)
            return
        _SILENT[peer] = time.monotonic()
        cut = [wire for wire in wires if wire.waiting_since is not None]
        logger.warning(
            "%s:%s did not answer a probe within %gs; cutting %d connection(s) waiting on it",
            *peer,
            self.probe_timeout,
            len(cut),
            extra={"db_retry_peer": f"{peer[0]}:{peer[1]}"},
        )
        for wire in cut:
            self._cut(wire)

    def _cut(self, wire: Wire) -> None:
        """Abort the connection at once; it is done with: the watchdog looks at it no more."""
        wire.abort()
        self.wires.discard(wire)


QUICK: typing.Final = 1.0  # seconds a ROLLBACK may go unanswered before its connection is cut
# Servers a probe found silent, and when (monotonic), for the whole process: a host silent for one event
# loop is silent for all. New connections try them last (``silent_last``).
_SILENT: dict[Peer, float] = {}
SILENT_MEMORY: typing.Final = 60.0  # seconds a silent server is tried last, unless a probe hears it again


def silent_last(hosts: list[str], ports: list[str]) -> tuple[list[str], list[str]] | None:
    """The hosts (and their ports) with those a probe found silent lately moved last; ``None``: no change.

    For a driver that tries the hosts of a multi-host DSN in order (libpq's, psycopg's): a frozen
    primary first in the list would cost every new connection its whole ``connect_timeout``.
    """
    if not _SILENT or len(hosts) != len(ports):
        return None
    now = time.monotonic()
    silent = [
        (host, port) in {(peer[0], str(peer[1])) for peer, since in _SILENT.items() if now - since < SILENT_MEMORY}
        for host, port in zip(hosts, ports, strict=True)
    ]
    if not any(silent) or all(silent):
        return None
    order = sorted(range(len(hosts)), key=lambda index: silent[index])  # stable: the DSN's order otherwise
    return [hosts[index] for index in order], [ports[index] for index in order]


_PROBES: set["asyncio.Task[None]"] = set()  # running probes (the loop itself keeps only weak references)
_WATCHDOGS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Watchdog] = weakref.WeakKeyDictionary()


def watchdog(settings: "RetrySettings") -> Watchdog | None:
    """The running loop's watchdog (made on first use); ``None`` outside an event loop or when turned off."""
    if not settings.probe_after:
        return None
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # a sync engine: no loop to watch from
        return None
    found = _WATCHDOGS.get(loop)
    if found is None or (found.probe_after, found.probe_timeout) != (settings.probe_after, settings.probe_timeout):
        found = _WATCHDOGS[loop] = Watchdog(settings)
    return found
