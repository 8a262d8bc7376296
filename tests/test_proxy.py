"""The test kit's TCP proxy, against real PostgreSQL traffic (asyncpg, SQLAlchemy, psycopg)."""

import asyncio
import collections.abc
import contextlib
import itertools
import logging
import secrets
import socket

import asyncpg
import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from db_retry.connections import build_connection_factory, session_role
from db_retry.retriable import sqlstate_on_chain
from db_retry.testing.cluster import PostgresCluster, PostgresNode, free_port
from db_retry.testing.proxy import (
    FrontendMessage,
    ProxiedCluster,
    ProxyMode,
    TcpProxy,
    _BackendScanner,
    _FrontendParser,
    _Session,
    query_starts_with,
)


pytestmark = pytest.mark.standby  # the session cluster of the kit (a primary and a standby)


@pytest.fixture
def primary(pg_cluster: PostgresCluster) -> PostgresNode:
    return pg_cluster.primary


@pytest.fixture
async def proxy(primary: PostgresNode) -> collections.abc.AsyncIterator[TcpProxy]:
    async with TcpProxy(primary.host, primary.port) as started:
        yield started


@pytest.fixture
async def table(primary: PostgresNode) -> collections.abc.AsyncIterator[str]:
    """A fresh table ``(id int primary key)`` on the primary."""
    name = f"proxy_{secrets.token_hex(4)}"
    await primary.execute(f"CREATE TABLE {name} (id int PRIMARY KEY)")
    yield name
    await primary.execute(f"DROP TABLE {name}")


async def connect(proxy: TcpProxy, **kwargs: object) -> "asyncpg.Connection[asyncpg.Record]":
    kwargs.setdefault("timeout", 10)
    connection: asyncpg.Connection[asyncpg.Record] = await asyncpg.connect(
        host=proxy.host, port=proxy.port, user="postgres", database="postgres", **kwargs
    )
    return connection


async def eventually(condition: collections.abc.Callable[[], bool], *, step: float = 0.01) -> None:
    """Wait (10 s at most) until ``condition()`` holds."""
    async with asyncio.timeout(10):
        for _ in itertools.count():
            if condition():
                return
            await asyncio.sleep(step)


def proxy_tasks() -> list[asyncio.Task[object]]:
    return [task for task in asyncio.all_tasks() if task.get_name().startswith("proxy-")]


async def test_passes_traffic_and_counts_connections(proxy: TcpProxy, primary: PostgresNode) -> None:
    assert proxy.host == "127.0.0.1"
    assert proxy.port != 0
    assert proxy.address == f"127.0.0.1:{proxy.port}"
    assert repr(proxy) == (
        f"TcpProxy('proxy', 127.0.0.1:{proxy.port} -> 127.0.0.1:{primary.port}, mode=pass-through, delay=0.0)"
    )
    connection = await connect(proxy)
    try:
        assert await connection.fetchval("SELECT $1::int + 1", 41) == 42
        assert await connection.fetchval("SELECT repeat('x', 200000)") == "x" * 200000  # several chunks
        assert proxy.open_connections == 1
    finally:
        await connection.close()
    assert proxy.connections_accepted == 1
    assert proxy.connections_reset == proxy.cuts_fired == 0
    assert proxy.mode is ProxyMode.PASS_THROUGH


async def test_hang_holds_open_and_new_connections_until_pass_through(proxy: TcpProxy) -> None:
    connection = await connect(proxy)
    try:
        proxy.hang()
        assert proxy.mode is ProxyMode.HANG
        query = asyncio.create_task(connection.fetchval("SELECT 7"))
        with pytest.raises(TimeoutError):  # the TCP handshake succeeds, the server never answers
            await connect(proxy, timeout=0.5)
        assert proxy.connections_accepted == 2
        done, _ = await asyncio.wait({query}, timeout=0.3)
        assert not done  # held, not lost
        proxy.pass_through()
        assert await query == 7
        assert await connection.fetchval("SELECT 8") == 8
    finally:
        await connection.close()
    late = await connect(proxy)
    await late.close()


async def test_cut_resets_open_connections_and_new_ones_until_pass_through(proxy: TcpProxy) -> None:
    connection = await connect(proxy)
    proxy.cut()
    assert proxy.mode is ProxyMode.CUT
    with pytest.raises(asyncpg.ConnectionDoesNotExistError) as lost:
        await connection.fetchval("SELECT 1")
    assert isinstance(lost.value.__cause__, ConnectionResetError)
    connection.terminate()
    with pytest.raises((ConnectionResetError, asyncpg.ConnectionDoesNotExistError)):
        await connect(proxy)
    assert proxy.connections_reset == 2
    proxy.pass_through()
    again = await connect(proxy)
    assert await again.fetchval("SELECT 1") == 1
    await again.close()


async def test_cut_during_hang_resets_waiting_connections(proxy: TcpProxy) -> None:
    proxy.hang()
    pending = asyncio.create_task(connect(proxy, timeout=10))
    await eventually(lambda: proxy.open_connections == 1)
    proxy.cut()
    with pytest.raises((ConnectionResetError, asyncpg.ConnectionDoesNotExistError)):
        await pending


async def test_delay_adds_latency_to_each_chunk(proxy: TcpProxy) -> None:
    connection = await connect(proxy)
    try:
        proxy.delay(0.1)
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await connection.fetchval("SELECT 1") == 1
        assert loop.time() - started >= 0.2  # a lower bound: one delay each way
        proxy.hang()
        proxy.delay(0)  # back to flowing
        assert await connection.fetchval("SELECT 2") == 2
    finally:
        await connection.close()
    with pytest.raises(ValueError, match=r"delay must be >= 0 seconds, got -1"):
        proxy.delay(-1)


async def test_cut_after_commit_applies_it_and_the_client_never_learns(
    proxy: TcpProxy, primary: PostgresNode, table: str
) -> None:
    """The asyncpg ``Transaction.commit`` sends ``COMMIT;`` as a simple query."""
    connection = await connect(proxy)
    proxy.cut_after_query("COMMIT")
    with pytest.raises(asyncpg.ConnectionDoesNotExistError):
        async with connection.transaction():
            await connection.execute(f"INSERT INTO {table} VALUES (1)")
    connection.terminate()
    assert await primary.fetchval(f"SELECT count(*) FROM {table}") == 1  # committed all the same
    assert proxy.cuts_fired == 1
    # One shot: the next commit goes through.
    connection = await connect(proxy)
    async with connection.transaction():
        await connection.execute(f"INSERT INTO {table} VALUES (2)")
    await connection.close()
    assert proxy.cuts_fired == 1
    assert await primary.fetchval(f"SELECT count(*) FROM {table}") == 2


async def test_cut_after_commit_run_as_a_prepared_statement(proxy: TcpProxy, primary: PostgresNode, table: str) -> None:
    """``fetch("COMMIT")`` goes through Parse / Bind / Execute / Sync: the cut waits for the Sync's answer."""
    connection = await connect(proxy)
    proxy.cut_after_query(b"commit", once=False)
    for row in (1, 2):
        if row == 2:
            connection = await connect(proxy)
        await connection.execute("BEGIN")
        await connection.execute(f"INSERT INTO {table} VALUES ({row})")
        with pytest.raises(asyncpg.ConnectionDoesNotExistError):
            await connection.fetch("COMMIT")
        connection.terminate()
    assert await primary.fetchval(f"SELECT count(*) FROM {table}") == 2
    assert proxy.cuts_fired == 2


async def test_cut_after_commit_through_sqlalchemy(proxy: TcpProxy, primary: PostgresNode, table: str) -> None:
    engine = create_async_engine(f"postgresql+asyncpg://postgres@{proxy.address}/postgres")
    try:
        async with AsyncSession(engine) as session:
            await session.execute(sa.text(f"INSERT INTO {table} VALUES (1)"))
            proxy.cut_after_query("COMMIT")
            with pytest.raises(sa.exc.DBAPIError) as failed:
                await session.commit()
        assert sqlstate_on_chain(failed.value) == "08003"  # asyncpg's ConnectionDoesNotExistError, wrapped
    finally:
        await engine.dispose()
    assert await primary.fetchval(f"SELECT count(*) FROM {table}") == 1


async def test_cut_after_commit_through_psycopg(proxy: TcpProxy, primary: PostgresNode, table: str) -> None:
    connection = await psycopg.AsyncConnection.connect(
        f"host={proxy.host} port={proxy.port} user=postgres dbname=postgres"
    )
    try:
        await connection.execute(f"INSERT INTO {table} VALUES (1)")
        proxy.cut_after_query("COMMIT")
        with pytest.raises(psycopg.OperationalError):
            await connection.commit()
    finally:
        await connection.close()
    assert await primary.fetchval(f"SELECT count(*) FROM {table}") == 1


async def test_cut_after_a_custom_predicate_when_the_answer_is_late(
    primary: PostgresNode, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[FrontendMessage] = []

    def slow_query(message: FrontendMessage) -> bool:
        seen.append(message)
        return message.kind == b"Q" and "pg_sleep" in (message.sql or "")

    async with TcpProxy(primary.host, primary.port, reply_timeout=0.2, name="proxy-late") as proxy:
        connection = await connect(proxy)
        proxy.cut_after(slow_query)
        with caplog.at_level(logging.INFO, logger="db_retry.testing.proxy"):
            assert await connection.fetchval("SELECT 1") == 1  # extended protocol: no match
            with pytest.raises(asyncpg.ConnectionDoesNotExistError):
                await connection.execute("SELECT pg_sleep(2)")
        connection.terminate()
        assert proxy.cuts_fired == 1
    kinds = {message.kind for message in seen}
    assert {b"P", b"B", b"E", b"S", b"Q"} <= kinds
    assert "proxy-late: no answer within 0.2s; cutting anyway" in caplog.messages


async def test_cut_after_a_statement_that_ends_its_own_session(proxy: TcpProxy) -> None:
    """The server closes instead of answering: the cut still resets the client."""
    connection = await connect(proxy)
    proxy.cut_after_query("SELECT pg_terminate_backend")
    with pytest.raises(asyncpg.ConnectionDoesNotExistError):
        await connection.execute("SELECT pg_terminate_backend(pg_backend_pid())")
    connection.terminate()
    assert proxy.cuts_fired == 1


async def test_unreachable_target_resets_the_client() -> None:
    async with TcpProxy("127.0.0.1", free_port()) as proxy:
        with pytest.raises((ConnectionResetError, asyncpg.ConnectionDoesNotExistError)):
            await connect(proxy)
        assert proxy.connections_reset == 1


async def test_stop_closes_every_connection_and_leaves_no_task(primary: PostgresNode) -> None:
    before = set(asyncio.all_tasks())
    proxy = TcpProxy(primary.host, primary.port)
    await proxy.start()
    with pytest.raises(RuntimeError, match="already started"):
        await proxy.start()
    active = await connect(proxy)
    proxy.hang()
    hanging = asyncio.create_task(connect(proxy, timeout=10))  # accepted, never connected upstream
    with contextlib.closing(socket.create_connection((proxy.host, proxy.port))):
        await eventually(lambda: proxy.open_connections == 3)
        assert len(proxy_tasks()) >= 4  # the acceptor, three connections and the pumps of the active one
        await proxy.stop()
        await proxy.stop()  # idempotent
        assert proxy.open_connections == 0
        assert proxy_tasks() == []
    with pytest.raises((ConnectionError, asyncpg.ConnectionDoesNotExistError)):  # closed, not reset
        await hanging
    with pytest.raises((asyncpg.ConnectionDoesNotExistError, asyncpg.InterfaceError)):  # closed while idle
        await active.fetchval("SELECT 1")
    active.terminate()
    assert set(asyncio.all_tasks()) <= before
    with pytest.raises(ConnectionRefusedError):
        await connect(proxy)


async def test_a_proxy_started_hanging(primary: PostgresNode) -> None:
    proxy = TcpProxy(primary.host, primary.port)
    proxy.hang()
    async with proxy:
        with pytest.raises(TimeoutError):
            await connect(proxy, timeout=0.3)
        proxy.pass_through()
        connection = await connect(proxy)
        await connection.close()


async def test_stop_right_after_accepting(primary: PostgresNode) -> None:
    """A connection accepted but not yet served is closed too (its task never ran)."""
    proxy = await TcpProxy(primary.host, primary.port).start()
    with contextlib.closing(socket.create_connection((proxy.host, proxy.port))):
        await eventually(lambda: proxy.connections_accepted == 1, step=0)
        await proxy.stop()
    assert proxy.open_connections == 0


async def test_a_fixed_port_survives_a_restart_of_the_proxy(primary: PostgresNode) -> None:
    port = free_port()
    for _ in range(2):
        async with TcpProxy(primary.host, primary.port, port=port) as proxy:
            assert proxy.port == port
            connection = await connect(proxy)
            await connection.close()


async def test_port_in_use_fails_start(primary: PostgresNode) -> None:
    proxy = TcpProxy(primary.host, primary.port, port=primary.port)
    with pytest.raises(OSError, match="in use"):
        await proxy.start()


# -- the protocol parsers, fed bytes in memory ---------------------------------------
def startup_packet(code: int, payload: bytes = b"") -> bytes:
    return (8 + len(payload)).to_bytes(4, "big") + code.to_bytes(4, "big") + payload


def message(kind: bytes, body: bytes) -> bytes:
    return kind + (len(body) + 4).to_bytes(4, "big") + body


def test_frontend_parser_splits_messages_across_chunks_and_tracks_portals() -> None:
    session = _Session()
    parser = _FrontendParser(session)
    startup = startup_packet(196608, b"user\0postgres\0\0")
    parse = message(b"P", b"s1\0COMMIT\0\0\0")
    bind = message(b"B", b"p1\0s1\0\0\0\0\0\0\0")
    execute = message(b"E", b"p1\0\0\0\0\0")
    stray = message(b"B", b"p2\0unknown\0")
    close = message(b"C", b"Sx")
    unterminated = message(b"Q", b"SELECT 1")  # no NUL: taken as it is
    stream = startup + parse + bind + execute + stray + close + message(b"S", b"") + unterminated
    frames = [frame for index in range(0, len(stream), 7) for frame in parser.feed(stream[index : index + 7])]
    assert b"".join(frame.raw for frame in frames) == stream
    messages = [frame.message for frame in frames]
    assert [(item.kind, item.sql) for item in messages if item is not None] == [
        (b"", None),
        (b"P", "COMMIT"),
        (b"B", "COMMIT"),
        (b"E", "COMMIT"),
        (b"B", None),
        (b"C", None),
        (b"S", None),
        (b"Q", "SELECT 1"),
    ]
    assert [frame.request for frame in frames] == [True, False, False, False, False, False, True, True]


@pytest.mark.parametrize(
    ("stream", "answer", "opaque"),
    [
        (startup_packet(80877103), b"S", True),  # SSLRequest taken up: TLS follows
        (startup_packet(80877104), b"G", True),  # GSSENCRequest taken up
        (startup_packet(80877103), b"N", False),
        (startup_packet(80877102, b"\0" * 8), b"", False),  # CancelRequest
    ],
)
def test_encryption_negotiation(stream: bytes, answer: bytes, opaque: bool) -> None:
    session = _Session()
    parser = _FrontendParser(session)
    scanner = _BackendScanner(session)
    [frame] = parser.feed(stream)
    assert frame.message is not None
    assert frame.message.kind == b""
    scanner.feed(answer + message(b"Z", b"I"))
    assert session.opaque is opaque
    assert session.ready == (0 if opaque else 1)
    if opaque:
        tls = b"\x16\x03\x01\x02\x00" + b"\x01" * 20
        assert parser.feed(tls) == [(tls, None, False)]


@pytest.mark.parametrize(
    "stream",
    [
        (3).to_bytes(4, "big") + b"xxxx",  # a startup packet shorter than its own header
        (1 << 20).to_bytes(4, "big") + b"xxxx",  # longer than PostgreSQL accepts
        startup_packet(196608, b"user\0u\0\0") + b"Q" + (2).to_bytes(4, "big") + b"rest",
    ],
)
def test_frontend_parser_passes_what_it_cannot_follow(stream: bytes) -> None:
    session = _Session()
    frames = _FrontendParser(session).feed(stream)
    assert session.opaque
    assert b"".join(frame.raw for frame in frames) == stream
    assert frames[-1].message is None


def test_backend_scanner_counts_ready_for_query_across_chunks() -> None:
    session = _Session()
    scanner = _BackendScanner(session)
    stream = message(b"R", b"\0\0\0\0") + message(b"D", b"x" * 100) + message(b"Z", b"I") + message(b"Z", b"T")
    for index in range(0, len(stream), 3):
        scanner.feed(stream[index : index + 3])
    assert session.ready == 2


def test_query_starts_with() -> None:
    commit = query_starts_with("commit")
    assert commit(FrontendMessage(kind=b"Q", body=b"", sql="  COMMIT;"))
    assert commit(FrontendMessage(kind=b"E", body=b"", sql="Commit"))
    assert not commit(FrontendMessage(kind=b"P", body=b"", sql="COMMIT"))  # parsing runs nothing
    assert not commit(FrontendMessage(kind=b"E", body=b""))
    assert not commit(FrontendMessage(kind=b"Q", body=b"", sql="ROLLBACK"))
    with pytest.raises(ValueError, match="non-empty prefix"):
        query_starts_with(b" ")


# -- a proxy per node --------------------------------------------------------------
async def test_proxied_cluster_routes_through_the_proxies(pg_cluster: PostgresCluster) -> None:
    async with ProxiedCluster(pg_cluster, connect_timeout=5) as proxied:
        primary, standby = pg_cluster.nodes
        assert proxied.primary is proxied.proxy(primary)
        assert await proxied.add(standby) is proxied.proxy(standby)
        assert repr(proxied).startswith("ProxiedCluster(PostgresCluster(")
        addresses = [proxied.proxy(node).address for node in (primary, standby)]
        assert proxied.multihost_dsn() == (
            f"postgresql+asyncpg://postgres@/postgres?host={addresses[0]}&host={addresses[1]}"
        )
        only_standby = proxied.multihost_dsn([standby], target_session_attrs="read-only", driver=None)
        assert only_standby == f"postgresql://postgres@/postgres?host={addresses[1]}&target_session_attrs=read-only"

        factory = build_connection_factory(proxied.multihost_dsn(target_session_attrs="read-write"), timeout=5)
        connection = await factory()
        assert not (await session_role(connection)).read_only
        await connection.close()

        proxied.primary.cut()
        factory = build_connection_factory(proxied.multihost_dsn(target_session_attrs="any"), timeout=5)
        connection = await factory()
        assert (await session_role(connection)).hot_standby  # the primary's proxy refused: the standby answered
        await connection.close()
        proxied.pass_through()
        assert proxied.primary.mode is ProxyMode.PASS_THROUGH
    assert proxied.proxies == {}


async def test_proxied_cluster_that_cannot_start_stops_what_it_started(pg_cluster: PostgresCluster) -> None:
    proxied = ProxiedCluster(pg_cluster, port=pg_cluster.primary.port)  # a port taken by the primary itself
    with pytest.raises(OSError, match="in use"):
        await proxied.start()
    assert proxied.proxies == {}
