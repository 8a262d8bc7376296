"""A loopback TCP proxy that passes, hangs, cuts or delays PostgreSQL traffic on demand.

:class:`TcpProxy` sits between a client and one server. Its mode changes at run time and applies to
open connections as well as new ones. It also reads the PostgreSQL frontend protocol, so it can cut a
connection right after the server has executed a chosen client message (``cut_after_query("COMMIT")``):
the server applies the commit, the client never hears back. :class:`ProxiedCluster` puts one proxy in
front of every node of a :class:`~db_retry.testing.cluster.PostgresCluster`.
"""

import asyncio
import collections.abc
import contextlib
import dataclasses
import enum
import functools
import logging
import socket
import struct
import types
import typing

from db_retry.testing.cluster import DATABASE, HOST, PostgresCluster, PostgresNode, free_port


__all__ = [
    "FrontendMessage",
    "MessagePredicate",
    "ProxiedCluster",
    "ProxyMode",
    "ProxyOptions",
    "TcpProxy",
    "query_starts_with",
]

logger = logging.getLogger(__name__)

_CHUNK: typing.Final = 65536
_LINGER_RESET: typing.Final = struct.pack("ii", 1, 0)
# Untyped packets of the startup phase are told apart by the code after their length.
_SSL_REQUEST: typing.Final = 80877103
_GSSENC_REQUEST: typing.Final = 80877104
_CANCEL_REQUEST: typing.Final = 80877102
_MAX_STARTUP_LENGTH: typing.Final = 10000  # PostgreSQL's own limit on a startup packet
# Client messages after which the server sends ReadyForQuery: simple Query, Sync, FunctionCall.
_REQUEST_TYPES: typing.Final = frozenset({b"Q", b"S", b"F"})


class ProxyMode(enum.Enum):
    """What a :class:`TcpProxy` does with traffic."""

    PASS_THROUGH = "pass-through"  # noqa: S105 - a mode name, not a password
    HANG = "hang"
    CUT = "cut"


@dataclasses.dataclass(frozen=True, slots=True)
class FrontendMessage:
    """One message a client sent, as a ``cut_after`` predicate sees it.

    ``kind`` is the type byte (``b"Q"``, ``b"P"``, ``b"E"``, ...) or ``b""`` for the untyped packets of
    the startup phase. ``sql`` is the statement text it carries or runs: the query of a ``Q`` or ``P``,
    and for ``B`` and ``E`` the query of the prepared statement bound to that portal (``None`` otherwise).
    """

    kind: bytes
    body: bytes = dataclasses.field(repr=False)
    sql: str | None = None


MessagePredicate: typing.TypeAlias = collections.abc.Callable[[FrontendMessage], bool]


def query_starts_with(prefix: str | bytes) -> MessagePredicate:
    """A predicate matching a statement that *runs* (simple ``Q`` or extended ``E``) and starts with ``prefix``.

    Leading white space is skipped and case is ignored: ``query_starts_with("commit")`` matches
    asyncpg's ``COMMIT;``, psycopg's ``COMMIT`` and a prepared ``commit`` executed through a portal.
    """
    wanted = (prefix.decode() if isinstance(prefix, bytes) else prefix).strip().upper()
    if not wanted:
        msg = "query_starts_with needs a non-empty prefix"
        raise ValueError(msg)

    def predicate(message: FrontendMessage) -> bool:
        return message.kind in {b"Q", b"E"} and (message.sql or "").lstrip().upper().startswith(wanted)

    return predicate


def _cstring(body: bytes, start: int) -> tuple[bytes, int]:
    """The NUL-terminated string at ``start`` and the offset just past its NUL."""
    end = body.find(b"\0", start)
    if end < 0:
        return body[start:], len(body)
    return body[start:end], end + 1


class _Frame(typing.NamedTuple):
    raw: bytes
    message: FrontendMessage | None = None
    request: bool = False  # the server answers it with a ReadyForQuery


class _Session:
    """What both directions of one proxied connection know about the protocol state."""

    def __init__(self) -> None:
        self.opaque = False  # encrypted (TLS / GSS) or unparseable: bytes pass, nothing is matched
        self.negotiations = 0  # SSL / GSSENC requests whose one-byte answer the server still owes
        self.requests = 0  # requests forwarded that the server answers with ReadyForQuery
        self.ready = 0  # ReadyForQuery messages the server sent


class _FrontendParser:
    """Splits the client's byte stream into messages, keeping each message's exact bytes."""

    def __init__(self, session: _Session) -> None:
        self._session = session
        self._buffer = bytearray()
        self._startup = True
        self._statements: dict[bytes, str] = {}
        self._portals: dict[bytes, str | None] = {}

    def feed(self, data: bytes) -> list[_Frame]:
        """The complete messages in what was buffered plus ``data``; an incomplete one waits in the buffer.

        In opaque mode bytes pass as they come, with no message.
        """
        if self._session.opaque:
            return [_Frame(data)]
        self._buffer += data
        out: list[_Frame] = []
        while True:
            header = 4 if self._startup else 5
            if len(self._buffer) < header:
                break
            length = int.from_bytes(self._buffer[header - 4 : header], "big")
            if length < 4 or (self._startup and not 8 <= length <= _MAX_STARTUP_LENGTH):  # noqa: PLR2004
                self._session.opaque = True  # not a protocol we can follow; pass the rest untouched
                break
            size = header - 4 + length
            if len(self._buffer) < size:
                break
            raw = bytes(self._buffer[:size])
            del self._buffer[:size]
            out.append(self._frame(raw, header))
        if self._session.opaque and self._buffer:
            out.append(_Frame(bytes(self._buffer)))
            self._buffer.clear()
        return out

    def _frame(self, raw: bytes, header: int) -> "_Frame":
        body = raw[header:]
        if self._startup:
            code = int.from_bytes(body[:4], "big")
            if code in {_SSL_REQUEST, _GSSENC_REQUEST}:
                self._session.negotiations += 1
            elif code != _CANCEL_REQUEST:
                self._startup = False  # the StartupMessage: authentication ends with a ReadyForQuery
                return _Frame(raw, FrontendMessage(kind=b"", body=body), request=True)
            return _Frame(raw, FrontendMessage(kind=b"", body=body))
        kind = raw[:1]
        sql: str | None = None
        if kind == b"Q":
            sql = _cstring(body, 0)[0].decode(errors="replace")
        elif kind == b"P":
            name, offset = _cstring(body, 0)
            sql = _cstring(body, offset)[0].decode(errors="replace")
            self._statements[name] = sql
        elif kind == b"B":
            portal, offset = _cstring(body, 0)
            sql = self._statements.get(_cstring(body, offset)[0])
            self._portals[portal] = sql
        elif kind == b"E":
            sql = self._portals.get(_cstring(body, 0)[0])
        return _Frame(raw, FrontendMessage(kind=kind, body=body, sql=sql), request=kind in _REQUEST_TYPES)


class _BackendScanner:
    """Counts ReadyForQuery messages in the server's byte stream without buffering message bodies."""

    def __init__(self, session: _Session) -> None:
        self._session = session
        self._header = bytearray()
        self._skip = 0

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view and not self._session.opaque:
            if self._skip:
                step = min(self._skip, len(view))
                self._skip -= step
                view = view[step:]
            elif self._session.negotiations and not self._header:
                self._session.negotiations -= 1
                if bytes(view[:1]) in {b"S", b"G"}:  # the server took up TLS or GSS encryption
                    self._session.opaque = True
                view = view[1:]
            else:
                step = min(5 - len(self._header), len(view))
                self._header += view[:step]
                view = view[step:]
                if len(self._header) == 5:  # noqa: PLR2004 - type byte and int32 length
                    if self._header[:1] == b"Z":
                        self._session.ready += 1
                    self._skip = int.from_bytes(self._header[1:], "big") - 4
                    self._header.clear()


@dataclasses.dataclass(eq=False)
class _Trigger:
    predicate: MessagePredicate
    once: bool


class _Link:
    """One client connection and its connection to the server."""

    def __init__(self) -> None:
        self.session = _Session()
        self.frontend = _FrontendParser(self.session)
        self.backend = _BackendScanner(self.session)
        self.client: asyncio.StreamWriter | None = None
        self.server: asyncio.StreamWriter | None = None
        self.holding = False  # a trigger matched: the server's replies no longer reach the client
        self.cut_at: int | None = None  # cut once the server has sent this many ReadyForQuery messages
        self.replied = asyncio.Event()

    def note_server_data(self, data: bytes) -> None:
        self.backend.feed(data)
        self.check_replied()

    def check_replied(self) -> None:
        if self.cut_at is not None and self.session.ready >= self.cut_at:
            self.replied.set()


def _reset(writer: asyncio.StreamWriter | None) -> None:
    """Close ``writer``'s socket at once with a TCP RST (``SO_LINGER`` 0), dropping anything unsent."""
    if writer is None:
        return
    with contextlib.suppress(OSError):  # a socket already closed needs no reset
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    writer.transport.abort()


async def _close(writer: asyncio.StreamWriter | None, timeout: float = 1.0) -> None:
    """Close ``writer`` after flushing what it holds, within ``timeout``; then drop whatever a stalled peer left."""
    if writer is None:
        return
    writer.close()
    with contextlib.suppress(OSError, TimeoutError):
        await asyncio.wait_for(writer.wait_closed(), timeout)
    writer.transport.abort()  # a no-op once closed


class TcpProxy:
    """A TCP proxy on 127.0.0.1 in front of ``target_host:target_port``, with faults switchable at run time.

    Modes: :meth:`pass_through` (the default), :meth:`hang`, :meth:`cut`, :meth:`delay`; and the one-shot
    trigger :meth:`cut_after` / :meth:`cut_after_query`. Use ``async with TcpProxy(host, port) as proxy``
    or :meth:`start` / :meth:`stop`; clients connect to :attr:`host` / :attr:`port`.
    """

    def __init__(  # noqa: PLR0913 - every option is keyword-only and optional
        self,
        target_host: str,
        target_port: int,
        *,
        port: int = 0,
        connect_timeout: float = 10.0,
        reply_timeout: float = 10.0,
        name: str = "proxy",
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.host = HOST
        self.port = port
        self.connect_timeout = connect_timeout
        self.reply_timeout = reply_timeout
        self.name = name
        self.connections_accepted = 0
        self.connections_reset = 0
        self.cuts_fired = 0
        self._mode = ProxyMode.PASS_THROUGH
        self._delay = 0.0
        self._trigger: _Trigger | None = None
        self._flowing = asyncio.Event()  # set while traffic may flow (not hanging)
        self._flowing.set()
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._links: dict[_Link, asyncio.Task[None]] = {}

    def __repr__(self) -> str:
        return (
            f"TcpProxy({self.name!r}, {self.address} -> {self.target_host}:{self.target_port}, "
            f"mode={self._mode.value}, delay={self._delay})"
        )

    @property
    def address(self) -> str:
        """``host:port`` the proxy listens on."""
        return f"{self.host}:{self.port}"

    @property
    def mode(self) -> ProxyMode:
        return self._mode

    @property
    def open_connections(self) -> int:
        return len(self._links)

    # -- lifecycle -------------------------------------------------------------
    async def start(self) -> typing.Self:
        """Listen (on :attr:`port`, a free one if 0) and start accepting connections."""
        if self._listener is not None:
            msg = f"{self!r} is already started"
            raise RuntimeError(msg)
        attempts = 1 if self.port else 5  # a free port can be taken by another process before we bind it
        attempt = 1
        while True:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind((self.host, self.port or free_port()))
                listener.listen(128)
                listener.setblocking(False)  # noqa: FBT003 - the socket API
            except OSError:
                listener.close()
                if attempt >= attempts:
                    raise
                attempt += 1
            else:
                break
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._accepting = asyncio.get_running_loop().create_task(self._accept(listener), name=f"{self.name}-accept")
        return self

    async def stop(self) -> None:
        """Stop listening, close every connection and wait for every task of the proxy to end."""
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
            self._accepting = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        while self._links:
            links = dict(self._links)
            for link, task in links.items():
                for writer in (link.client, link.server):
                    if writer is not None:
                        writer.transport.abort()
                task.cancel()
            await asyncio.gather(*links.values(), return_exceptions=True)
            for link in links:
                self._links.pop(link, None)

    async def __aenter__(self) -> typing.Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: types.TracebackType | None,
    ) -> None:
        await self.stop()

    # -- faults ----------------------------------------------------------------
    def pass_through(self) -> None:
        """Forward everything again, with no delay; disarm any :meth:`cut_after` trigger."""
        self._mode = ProxyMode.PASS_THROUGH
        self._delay = 0.0
        self._trigger = None
        self._set_flowing(flowing=True)

    def hang(self) -> None:
        """Stop forwarding in both directions on every connection; still accept new ones (which then hang)."""
        self._mode = ProxyMode.HANG
        self._set_flowing(flowing=False)

    def cut(self) -> None:
        """Reset (TCP RST) every open connection, and reset new ones as they arrive, until :meth:`pass_through`."""
        self._mode = ProxyMode.CUT
        self._set_flowing(flowing=True)
        self._reset_all()

    def retarget(self, host: str, port: int, *, cut: bool = False) -> None:
        """Send new connections to ``host:port`` (a DNS name or VIP that moved); open ones stay, unless ``cut``.

        Kept sessions still talk to the old server; with ``cut=True`` they are reset (TCP RST), as by HAProxy's
        ``on-marked-down shutdown-sessions``.
        """
        self.target_host, self.target_port = host, port
        if cut:
            self._reset_all()

    def delay(self, seconds: float) -> None:
        """Forward everything, each chunk ``seconds`` late (in both directions)."""
        if seconds < 0:
            msg = f"delay must be >= 0 seconds, got {seconds!r}"
            raise ValueError(msg)
        self._mode = ProxyMode.PASS_THROUGH
        self._delay = seconds
        self._set_flowing(flowing=True)

    def cut_after(self, predicate: MessagePredicate, *, once: bool = True) -> None:
        """Cut the connection right after the server has executed the first client message ``predicate`` matches.

        From the match on, the server's replies are held back; the matched message is forwarded (for an
        extended-protocol ``Execute``, up to the ``Sync`` that ends it); once the server has answered it
        (``ReadyForQuery``, or after :attr:`reply_timeout`) the client connection is reset and the server
        connection closed. So the server did the work and the client cannot know. One-shot unless
        ``once=False``.
        """
        self._trigger = _Trigger(predicate=predicate, once=once)

    def cut_after_query(self, prefix: str | bytes = "COMMIT", *, once: bool = True) -> None:
        """:meth:`cut_after` a statement that starts with ``prefix`` (default ``COMMIT``), simple or extended."""
        self.cut_after(query_starts_with(prefix), once=once)

    # -- internals -------------------------------------------------------------
    def _set_flowing(self, *, flowing: bool) -> None:
        if flowing:
            self._flowing.set()
        else:
            self._flowing.clear()

    def _reset_all(self) -> None:
        for link, task in list(self._links.items()):
            self._reset_link(link)
            task.cancel()

    def _reset_link(self, link: _Link) -> None:
        self.connections_reset += 1
        _reset(link.client)
        _reset(link.server)

    async def _gate(self) -> None:
        """Wait while the proxy hangs, then add the configured delay."""
        await self._flowing.wait()
        if self._delay:
            await asyncio.sleep(self._delay)
            await self._flowing.wait()

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock, _ = await loop.sock_accept(listener)
            self.connections_accepted += 1
            link = _Link()
            task = loop.create_task(self._serve(link, sock), name=f"{self.name}-connection")
            self._links[link] = task
            task.add_done_callback(functools.partial(self._forget, link, sock))

    def _forget(self, link: _Link, sock: socket.socket, _: object) -> None:
        # A task cancelled before its first step never runs its finally clause: close the socket here.
        sock.close()
        self._links.pop(link, None)

    async def _serve(self, link: _Link, sock: socket.socket) -> None:
        try:
            client_reader, link.client = await asyncio.open_connection(sock=sock)
            if self._mode is ProxyMode.CUT:
                self._reset_link(link)
                return
            await self._gate()
            try:
                server_reader, server = await asyncio.wait_for(
                    asyncio.open_connection(self.target_host, self.target_port), self.connect_timeout
                )
            except (OSError, TimeoutError) as exc:
                logger.debug("%s: cannot reach %s:%s: %r", self.name, self.target_host, self.target_port, exc)
                self._reset_link(link)
                return
            link.server = server
            await self._pump_both(link, client_reader, link.client, server_reader, server)
        finally:
            if link.holding:  # whatever ends a connection under a cut, the client must not get a clean close
                _reset(link.client)
                _reset(link.server)
            await _close(link.client)
            await _close(link.server)

    async def _pump_both(
        self,
        link: _Link,
        client_reader: asyncio.StreamReader,
        client: asyncio.StreamWriter,
        server_reader: asyncio.StreamReader,
        server: asyncio.StreamWriter,
    ) -> None:
        upstream = asyncio.create_task(self._client_to_server(link, client_reader, server), name=f"{self.name}-up")
        downstream = asyncio.create_task(self._server_to_client(link, server_reader, client), name=f"{self.name}-down")
        try:
            await asyncio.wait({upstream, downstream}, return_when=asyncio.FIRST_COMPLETED)
            if link.holding:  # a cut is under way: give it the time to happen rather than closing cleanly
                await asyncio.wait({upstream}, timeout=self.reply_timeout)
        finally:
            upstream.cancel()
            downstream.cancel()
            await asyncio.gather(upstream, downstream, return_exceptions=True)

    async def _client_to_server(self, link: _Link, reader: asyncio.StreamReader, server: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(_CHUNK):
                await self._gate()
                for frame in link.frontend.feed(data):
                    if frame.message is not None and not link.holding:
                        self._match(link, frame.message)
                    if frame.request:
                        link.session.requests += 1
                        if link.holding and link.cut_at is None:
                            link.cut_at = link.session.requests  # the answer to this request is the last one
                    server.write(frame.raw)
                    if link.cut_at is not None:
                        await server.drain()
                        await self._cut_after_reply(link)
                        return
                await server.drain()

    def _match(self, link: _Link, message: FrontendMessage) -> None:
        trigger = self._trigger
        if trigger is None or not trigger.predicate(message):
            return
        if trigger.once:
            self._trigger = None
        link.holding = True
        # The message kind only: its SQL may hold a secret (ALTER ROLE ... PASSWORD).
        logger.info("%s: will cut after this %r message once the server has answered it", self.name, message.kind)

    async def _cut_after_reply(self, link: _Link) -> None:
        link.check_replied()
        try:
            await asyncio.wait_for(link.replied.wait(), self.reply_timeout)
        except TimeoutError:
            logger.warning("%s: no answer within %ss; cutting anyway", self.name, self.reply_timeout)
        self.cuts_fired += 1
        self._reset_link(link)

    async def _server_to_client(self, link: _Link, reader: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(_CHUNK):
                await self._gate()
                link.note_server_data(data)
                if not link.holding:
                    client.write(data)
                    await client.drain()
        link.replied.set()  # the server closed: no answer will come, let a pending cut go ahead


class ProxyOptions(typing.TypedDict, total=False):
    """Options :class:`ProxiedCluster` passes to each of its :class:`TcpProxy` objects."""

    port: int
    connect_timeout: float
    reply_timeout: float


class ProxiedCluster:
    """One :class:`TcpProxy` in front of every node of a started :class:`PostgresCluster`.

    Proxies are keyed by node, so they survive :func:`~db_retry.testing.faults.failover` (which reorders
    ``cluster.nodes``) and a rebuild of a node on its own port. Use ``async with ProxiedCluster(cluster)``.
    """

    def __init__(self, cluster: PostgresCluster, **options: typing.Unpack[ProxyOptions]) -> None:
        self.cluster = cluster
        self._options = options
        self.proxies: dict[PostgresNode, TcpProxy] = {}

    def __repr__(self) -> str:
        return f"ProxiedCluster({self.cluster!r}, proxies={list(self.proxies.values())!r})"

    async def start(self) -> typing.Self:
        try:
            for node in self.cluster.nodes:
                await self.add(node)
        except BaseException:
            await self.stop()
            raise
        return self

    async def add(self, node: PostgresNode) -> TcpProxy:
        """Start a proxy for ``node`` (e.g. one from ``cluster.add_standby()``), or return the one it has."""
        if node not in self.proxies:
            proxy = TcpProxy(node.host, node.port, name=f"proxy-{node.name}", **self._options)
            self.proxies[node] = await proxy.start()
        return self.proxies[node]

    async def stop(self) -> None:
        while self.proxies:
            _, proxy = self.proxies.popitem()
            await proxy.stop()

    async def __aenter__(self) -> typing.Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: types.TracebackType | None,
    ) -> None:
        await self.stop()

    def proxy(self, node: PostgresNode) -> TcpProxy:
        """The proxy in front of ``node``."""
        return self.proxies[node]

    @property
    def primary(self) -> TcpProxy:
        """The proxy in front of the cluster's current primary."""
        return self.proxies[self.cluster.primary]

    def pass_through(self) -> None:
        """Clear the faults of every proxy."""
        for proxy in self.proxies.values():
            proxy.pass_through()

    def multihost_dsn(
        self,
        nodes: typing.Iterable[PostgresNode] | None = None,
        *,
        driver: str | None = "asyncpg",
        target_session_attrs: str | None = None,
        database: str = DATABASE,
    ) -> str:
        """Like :meth:`PostgresCluster.multihost_dsn`, over the proxies of ``nodes`` (default: all, primary first)."""
        chosen = self.cluster.nodes if nodes is None else nodes
        return self.cluster.multihost_dsn(
            [],
            driver=driver,
            target_session_attrs=target_session_attrs,
            database=database,
            extra_hosts=[self.proxies[node].address for node in chosen],
        )
