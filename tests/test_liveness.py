"""Silent peers: keepalives and a user timeout on every connection, and the watchdog for a silent server above TCP.

The silence is real: the kit's proxy stops forwarding without a reset (``TcpProxy.hang()``: the kernel
still acknowledges, so keepalives never fire, as behind a hung proxy or a stopped server process).
"""

import asyncio
import os
import socket
import time
import typing

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from db_retry import build_connection_factory, liveness, postgres_retry
from db_retry.liveness import _transport_of, probe
from db_retry.retriable import ErrorKind, classify
from db_retry.settings import get_settings
from db_retry.testing import PostgresCluster
from db_retry.testing.cluster import free_port
from db_retry.testing.proxy import TcpProxy


pytestmark = pytest.mark.standby

DRIVERS: typing.Final = ("asyncpg", "psycopg")


async def _socket_options(engine: AsyncEngine) -> tuple[int, int, int, int, int]:
    async with engine.connect() as connection:
        driver: typing.Any = (await connection.get_raw_connection()).driver_connection
        transport = _transport_of(driver)
        sock = (
            transport.get_extra_info("socket")
            if transport is not None
            else socket.socket(fileno=os.dup(driver.pgconn.socket))
        )
        try:
            return (
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
            )
        finally:
            if transport is None:
                sock.close()


@pytest.mark.parametrize("driver", DRIVERS)
async def test_every_connection_gets_keepalives_and_a_user_timeout(pg_cluster: PostgresCluster, driver: str) -> None:
    primary = pg_cluster.primary
    engines = [create_async_engine(primary.dsn(driver=driver))]  # a plain URL: the pool's connect event
    if driver == "asyncpg":  # the multi-host factory makes asyncpg connections
        url = primary.dsn(driver="asyncpg")
        engines.append(create_async_engine(url, async_creator=build_connection_factory(url, timeout=2)))
    try:
        for engine in engines:
            assert await _socket_options(engine) == (1, 3, 1, 3, 6000)
    finally:
        for engine in engines:
            await engine.dispose()


async def test_keepalives_follow_the_settings_and_can_be_turned_off(
    pg_cluster: PostgresCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    primary = pg_cluster.primary
    monkeypatch.setenv("DB_RETRY_KEEPALIVE_IDLE", "7")
    monkeypatch.setenv("DB_RETRY_KEEPALIVE_INTERVAL", "2")
    monkeypatch.setenv("DB_RETRY_KEEPALIVE_COUNT", "4")
    monkeypatch.setenv("DB_RETRY_TCP_USER_TIMEOUT", "0")
    engine = create_async_engine(primary.dsn(driver="asyncpg"))
    try:
        assert await _socket_options(engine) == (1, 7, 2, 4, 0)
        await engine.dispose()
        monkeypatch.setenv("DB_RETRY_KEEPALIVE_IDLE", "0")
        assert (await _socket_options(engine))[0] == 0
        monkeypatch.setenv("DB_RETRY_PROBE_AFTER", "0")
        assert liveness.watchdog(get_settings()) is None  # the watchdog is off too
    finally:
        await engine.dispose()


@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_query_on_a_server_gone_silent_is_cut_and_retried_elsewhere(
    pg_cluster: PostgresCluster, monkeypatch: pytest.MonkeyPatch, driver: str
) -> None:
    # The proxy goes silent mid-query (no reset, the kernel still acknowledges). The watchdog probes the
    # server, gets no answer, and cuts the waiting connection: the call fails as a lost connection and the
    # retry runs on the healthy server, instead of hanging for as long as TCP lets it.
    monkeypatch.setenv("DB_RETRY_PROBE_AFTER", "1")
    monkeypatch.setenv("DB_RETRY_PROBE_TIMEOUT", "0.5")
    primary = pg_cluster.primary
    async with TcpProxy(primary.host, primary.port) as proxy:
        silent = create_async_engine(sa.make_url(primary.dsn(driver=driver)).set(host=proxy.host, port=proxy.port))
        healthy = create_async_engine(primary.dsn(driver=driver))
        engines = [silent, healthy]
        errors: list[BaseException] = []

        @postgres_retry(on_retry=lambda event: errors.append(event.error))
        async def work() -> int:
            engine = engines[len(errors)]
            async with engine.connect() as connection:
                if engine is silent:
                    asyncio.get_running_loop().call_later(0.3, proxy.hang)
                return int((await connection.execute(sa.text("SELECT 7 FROM pg_sleep(2)"))).scalar_one())

        try:
            async with asyncio.timeout(30):  # without the watchdog: hung for good
                assert await work() == 7
        finally:
            proxy.pass_through()
            await silent.dispose()
            await healthy.dispose()
    assert len(errors) == 1
    assert classify(errors[0]) is ErrorKind.OUTAGE


@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_long_query_on_a_server_that_answers_its_probe_is_never_cut(
    pg_cluster: PostgresCluster, monkeypatch: pytest.MonkeyPatch, driver: str
) -> None:
    monkeypatch.setenv("DB_RETRY_PROBE_AFTER", "0.4")
    engine = create_async_engine(pg_cluster.primary.dsn(driver=driver))
    try:
        async with engine.connect() as connection:
            slept = await connection.execute(sa.text("SELECT 'slept' FROM pg_sleep(2)"))
            assert slept.scalar_one() == "slept"  # probed several times meanwhile: answered each time
    finally:
        await engine.dispose()


async def test_a_probe_says_who_answers(pg_cluster: PostgresCluster) -> None:
    primary = pg_cluster.primary
    assert await probe((primary.host, primary.port), 2.0)
    assert not await probe(("127.0.0.1", free_port()), 2.0)  # refused
    async with TcpProxy(primary.host, primary.port) as proxy:
        proxy.hang()
        assert not await probe((proxy.host, proxy.port), 0.3)  # accepted, never answered


async def test_psycopg_connections_let_a_cancellation_go_on_at_once(pg_cluster: PostgresCluster) -> None:
    # The one private name db-retry replaces on a psycopg connection: this fails loudly if psycopg renames it.
    import psycopg  # noqa: PLC0415 - the optional driver

    assert hasattr(psycopg.AsyncConnection, "_try_cancel")
    engine = create_async_engine(pg_cluster.primary.dsn(driver="psycopg"))
    try:
        async with engine.connect() as connection:
            driver: typing.Any = (await connection.get_raw_connection()).driver_connection
            assert driver._try_cancel is liveness._interrupt_again
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.2):
                    await connection.execute(sa.text("SELECT pg_sleep(5)"))
            assert connection.invalidated  # SQLAlchemy discards it; psycopg closed it at once
    finally:
        await engine.dispose()


@pytest.mark.parametrize("driver", DRIVERS)
async def test_closing_never_hangs_on_a_silent_server(pg_cluster: PostgresCluster, driver: str) -> None:
    # Returning a connection to the pool rolls it back: on a silent server that ROLLBACK is cut after 1 s
    # (any server answers it at once), not left to the watchdog's probe. Disposing the engine then closes
    # the pooled connections without waiting on the dead sockets. (The bounds below are safety nets, far
    # under what the watchdog alone would take.)
    primary = pg_cluster.primary
    async with TcpProxy(primary.host, primary.port) as proxy:
        engine = create_async_engine(sa.make_url(primary.dsn(driver=driver)).set(host=proxy.host, port=proxy.port))
        barrier = asyncio.Barrier(3)

        async def hold() -> None:
            async with engine.connect() as connection:
                await connection.execute(sa.text("SELECT 1"))
                await barrier.wait()

        try:
            await asyncio.gather(*(hold() for _ in range(3)))  # three idle connections in the pool
            async with asyncio.timeout(3.5):
                with pytest.raises(sa.exc.DBAPIError) as caught:  # the block's ROLLBACK: lost
                    async with engine.connect() as connection:
                        await connection.execute(sa.text("SELECT 1"))
                        proxy.hang()
            assert classify(caught.value) is ErrorKind.OUTAGE
            assert engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
            async with asyncio.timeout(3.5):
                await engine.dispose()
        finally:
            proxy.pass_through()
            await engine.dispose()


async def test_the_watchdog_cuts_the_waits_on_a_silent_server_and_spares_an_answering_one(
    pg_cluster: PostgresCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The watchdog's own steps, driven directly (the end-to-end cuts are proven above): which wires it
    # cuts, and that a server which answered is left alone for probe_after seconds.
    monkeypatch.setenv("DB_RETRY_PROBE_AFTER", "0.2")
    monkeypatch.setenv("DB_RETRY_PROBE_TIMEOUT", "0.3")
    primary = pg_cluster.primary
    healthy = (primary.host, primary.port)
    cut: list[str] = []
    async with TcpProxy(primary.host, primary.port) as proxy:
        proxy.hang()
        silent = (proxy.host, proxy.port)
        dog = liveness.Watchdog(get_settings())
        waiting_on_silent = liveness.Wire(silent, lambda: cut.append("silent"), dog)
        waiting_on_healthy = liveness.Wire(healthy, lambda: cut.append("healthy"), dog)
        answered = liveness.Wire(silent, lambda: cut.append("answered"), dog)
        waiting_on_silent.waiting()
        waiting_on_healthy.waiting()
        answered.waiting()
        answered.answered()
        await dog._probe({silent: [waiting_on_silent, answered], healthy: [waiting_on_healthy]})
        assert cut == ["silent"]
        assert healthy in dog.alive
        # A ROLLBACK unanswered past its limit is cut at the next look, without a probe.
        quick = liveness.Wire(healthy, lambda: cut.append("quick"), dog)
        quick.waiting(limit=0.0)
        dog._look(dog.generation)
        assert cut == ["silent", "quick"]
        # A cut connection is done with: forgotten, never cut again (before, every look cut the ROLLBACK's
        # again, and every probe of a silent server the connections of an engine nobody disposed).
        assert waiting_on_silent not in dog.wires
        assert quick not in dog.wires
        dog._look(dog.generation)
        assert cut == ["silent", "quick"]
        dog._look(dog.generation - 1)  # a superseded timer does nothing
        for wire in (waiting_on_silent, waiting_on_healthy, quick):
            wire.answered()
        dog._look(dog.generation)  # nothing waits: no timer is set
        assert dog.timer_at is None


def test_a_reused_descriptor_is_never_shut_down() -> None:
    # The psycopg wire cuts the socket by its descriptor only if it still is the same connection.
    left, right = socket.socketpair()
    with left, right:
        liveness._shutdown(left.fileno(), (("127.0.0.1", 1), ("127.0.0.1", 2)))
        left.sendall(b"x")
        assert right.recv(1) == b"x"  # still open both ways


def test_a_sync_engine_gets_keepalives_and_a_probed_connection(pg_cluster: PostgresCluster) -> None:
    # No event loop: keepalives and the first-query probe, no watchdog (the deadline and the watchdog are async).
    engine = sa.create_engine(pg_cluster.primary.dsn(driver="psycopg"))
    try:
        with engine.connect() as connection:
            assert connection.execute(sa.text("SELECT 1")).scalar_one() == 1
            driver: typing.Any = connection.connection.driver_connection
            with socket.socket(fileno=os.dup(driver.pgconn.socket)) as sock:
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    finally:
        engine.dispose()


async def test_a_host_found_silent_is_tried_last_by_a_driver_that_walks_the_hosts(
    pg_cluster: PostgresCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # libpq (psycopg) tries the hosts of a multi-host DSN in order, each for its whole connect_timeout. Once
    # the watchdog has found the first one silent, new connections try it last: none is even attempted
    # there, where without it each would wait connect_timeout on the silent host before the next one.
    monkeypatch.setenv("DB_RETRY_PROBE_AFTER", "0.5")
    monkeypatch.setenv("DB_RETRY_PROBE_TIMEOUT", "0.5")
    primary, standby = pg_cluster.primary, pg_cluster.standbys[0]
    async with TcpProxy(primary.host, primary.port) as proxy:
        hosts = f"host={proxy.host}:{proxy.port}&host={standby.host}:{standby.port}"
        engine = create_async_engine(
            f"postgresql+psycopg://{primary.user}@/{primary.database}?{hosts}&target_session_attrs=any",
            connect_args={"connect_timeout": 5},
        )
        try:
            async with asyncio.timeout(30):
                async with engine.connect() as connection:
                    assert (await connection.execute(sa.text("SELECT inet_server_port()"))).scalar_one() == primary.port
                    asyncio.get_running_loop().call_later(0.2, proxy.hang)
                    with pytest.raises(sa.exc.OperationalError):  # cut by the watchdog
                        await connection.execute(sa.text("SELECT pg_sleep(10)"))
                accepted = proxy.connections_accepted
                for _ in range(3):
                    async with engine.connect() as connection:
                        port = (await connection.execute(sa.text("SELECT inet_server_port()"))).scalar_one()
                        assert port == standby.port
                    await engine.dispose()  # a new connection each time
                assert proxy.connections_accepted == accepted  # the silent host was not tried again
        finally:
            proxy.pass_through()
            await engine.dispose()


def test_only_hosts_found_silent_lately_move_and_never_all_of_them(monkeypatch: pytest.MonkeyPatch) -> None:
    now = time.monotonic()
    silent = {("10.0.0.1", 5432): now, ("10.0.0.3", 5432): now - liveness.SILENT_MEMORY - 1}
    monkeypatch.setattr(liveness, "_SILENT", silent)
    hosts, ports = ["10.0.0.1", "10.0.0.2", "10.0.0.3"], ["5432", "5432", "5432"]
    assert liveness.silent_last(hosts, ports) == (["10.0.0.2", "10.0.0.3", "10.0.0.1"], ports)
    assert liveness.silent_last(["10.0.0.1"], ["5432"]) is None  # every host silent: the order is the DSN's
    assert liveness.silent_last(hosts, ["5432"]) is None  # one port for every host: left to the driver
