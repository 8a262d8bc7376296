"""build_connection_factory against a real primary + standby, a hanging host and a refused port."""

import asyncio
import collections.abc
import socket

import asyncpg
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from db_retry import DSNError, NoHostAvailableError, build_connection_factory, build_db_dsn
from db_retry.connections import TARGET_SESSION_ATTRS, ConnectTimeoutError, _Connector
from db_retry.dsn import HostPort
from db_retry.retriable import ErrorKind, classify
from db_retry.testing import PostgresCluster


pytestmark = pytest.mark.standby

# Where each target_session_attrs value must land with a primary and a standby up: True = standby.
EXPECTED_IN_RECOVERY = {
    "any": None,
    "primary": False,
    "standby": True,
    "prefer-standby": True,
    "read-write": False,
    "read-only": True,
}


@pytest.fixture(scope="module")
def hanging_host() -> collections.abc.Iterator[str]:
    """A loopback listener that accepts TCP connections and never says a word."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield f"127.0.0.1:{listener.getsockname()[1]}"


@pytest.fixture(scope="module")
def refused_host() -> collections.abc.Iterator[str]:
    """A loopback port that refuses connections: bound, never listening."""
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{bound.getsockname()[1]}"


def _dsn(cluster: PostgresCluster, attrs: str | None, *extra: str, password: str = "s3cret") -> str:
    dsn = cluster.multihost_dsn(target_session_attrs=attrs, extra_hosts=extra)
    return dsn.replace("postgres@", f"postgres:{password}@", 1)


async def _in_recovery(connection: "asyncpg.Connection[asyncpg.Record]") -> bool:
    try:
        return bool(await connection.fetchval("SELECT pg_is_in_recovery()"))
    finally:
        await connection.close()


@pytest.mark.parametrize("attrs", TARGET_SESSION_ATTRS)
async def test_each_target_session_attrs_lands_on_the_right_node(
    pg_cluster: PostgresCluster,
    hanging_host: str,
    refused_host: str,
    attrs: str,
) -> None:
    tasks_before = len(asyncio.all_tasks())
    for _ in range(5):  # a new factory each time: a new random order
        factory = build_connection_factory(_dsn(pg_cluster, attrs, hanging_host, refused_host), timeout=1)
        for _ in range(2):  # the second connect starts with the remembered host
            landed = await _in_recovery(await factory())
            expected = EXPECTED_IN_RECOVERY[attrs]
            assert expected is None or landed is expected
    assert len(asyncio.all_tasks()) == tasks_before  # no attempt left running


async def test_losing_attempts_leave_no_server_connection_behind(
    pg_cluster: PostgresCluster,
    hanging_host: str,
) -> None:
    query = "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND usename = 'postgres'"
    admin = await pg_cluster.standbys[0].connect()
    try:
        before = await admin.fetchval(query)
        factory = build_connection_factory(_dsn(pg_cluster, "read-write", hanging_host), timeout=1, stagger=0)
        connection = await factory()  # every host is tried at once; the standby loses
        await asyncio.sleep(0.2)  # let the standby notice the closed socket
        assert await admin.fetchval(query) == before
        assert not await _in_recovery(connection)
    finally:
        await admin.close()


async def test_prefer_standby_keeps_looking_after_reaching_the_primary(pg_cluster: PostgresCluster) -> None:
    primary, standby = pg_cluster.primary, pg_cluster.standbys[0]
    factory = build_connection_factory(_dsn(pg_cluster, "prefer-standby"), timeout=2, stagger=0.2)
    assert isinstance(factory, _Connector)
    factory.last_good = HostPort(primary.host, primary.port)  # the primary is tried first and answers first
    assert await _in_recovery(await factory()) is True  # ... but a standby answered too: it wins
    assert factory.last_good == HostPort(standby.host, standby.port)


async def test_random_order_spreads_connections_over_hosts(pg_cluster: PostgresCluster) -> None:
    landed = set()
    for _ in range(30):
        factory = build_connection_factory(_dsn(pg_cluster, "any"), timeout=1, stagger=0.2)
        landed.add(await _in_recovery(await factory()))
    assert landed == {True, False}


async def test_works_as_sqlalchemy_async_creator(pg_cluster: PostgresCluster) -> None:
    url = build_db_dsn(_dsn(pg_cluster, None), "postgres", drivername="postgresql+asyncpg")
    engine = create_async_engine(url, async_creator=build_connection_factory(url, timeout=2))
    try:
        async with engine.connect() as connection:
            assert (await connection.execute(sa.text("SELECT pg_is_in_recovery()"))).scalar() is False
    finally:
        await engine.dispose()


async def test_prefer_standby_falls_back_to_the_primary(
    fresh_cluster: collections.abc.Callable[..., PostgresCluster],
    hanging_host: str,
) -> None:
    cluster = fresh_cluster(standbys=1)
    cluster.standbys[0].stop()
    factory = build_connection_factory(_dsn(cluster, "prefer-standby", hanging_host), timeout=0.5)
    assert await _in_recovery(await factory()) is False

    factory = build_connection_factory(_dsn(cluster, "standby", hanging_host), timeout=0.5)
    with pytest.raises(NoHostAvailableError) as caught:
        await factory()
    error = caught.value
    assert isinstance(error, asyncpg.TargetServerAttributeNotMatched)
    message = str(error)
    assert "target_session_attrs='standby'" in message
    assert f"{cluster.primary.address}: is a read-write primary" in message
    assert f"{cluster.standbys[0].address}: connection refused" in message
    assert f"{hanging_host}: timed out after 0.5s" in message
    assert "s3cret" not in message
    assert len(error.failures) == 3
    assert classify(error) is ErrorKind.UNAVAILABLE  # worth waiting for: a standby may come back


async def test_a_lasting_failure_is_not_worth_waiting_for(pg_cluster: PostgresCluster) -> None:
    dsn = _dsn(pg_cluster, "read-write").replace("/postgres?", "/no_such_database?")
    with pytest.raises(NoHostAvailableError) as caught:
        await build_connection_factory(dsn, timeout=2)()
    assert "InvalidCatalogNameError" in str(caught.value)
    assert classify(caught.value) is None


async def test_single_host_errors_propagate(refused_host: str, hanging_host: str) -> None:
    with pytest.raises(ConnectionRefusedError):
        await build_connection_factory(f"postgresql://u:p@{refused_host}/db", timeout=1)()
    with pytest.raises(TimeoutError) as caught:  # what asyncpg raises, still ...
        await build_connection_factory(f"postgresql://u:p@{hanging_host}/db?timeout=0.2", timeout=60)()
    # ... but a connect timeout, unlike a query's, is worth waiting for (a proxy with no server behind it).
    assert isinstance(caught.value, ConnectTimeoutError)
    assert str(caught.value) == f"{hanging_host}: timed out after 0.2s"
    assert classify(caught.value) is ErrorKind.UNAVAILABLE


async def test_single_host_connects_with_the_dsn_arguments(pg_cluster: PostgresCluster) -> None:
    dsn = f"postgresql://postgres:s3cret@{pg_cluster.primary.address}/postgres?connect_timeout=5"
    connection = await build_connection_factory(dsn, timeout=2)()
    try:
        assert await connection.fetchval("SELECT current_database()") == "postgres"
    finally:
        await connection.close()


async def test_single_host_honours_target_session_attrs(pg_cluster: PostgresCluster) -> None:
    # A DNS name pointing at a node mid-failover: the same named, retried error as with several hosts.
    standby = pg_cluster.standbys[0]
    dsn = f"postgresql://postgres@{standby.address}/postgres?target_session_attrs=read-write"
    with pytest.raises(NoHostAvailableError) as caught:
        await build_connection_factory(dsn, timeout=2)()
    assert isinstance(caught.value, asyncpg.TargetServerAttributeNotMatched)  # what 0.8.4 code catches
    assert f"{standby.address}: is a standby" in str(caught.value)
    assert classify(caught.value) is ErrorKind.UNAVAILABLE
    connection = await build_connection_factory(dsn.replace("read-write", "standby"), timeout=2)()
    await connection.close()


async def test_an_unknown_host_name_is_reported_at_once_behind_one_host_or_several(pg_cluster: PostgresCluster) -> None:
    with pytest.raises(socket.gaierror):
        await build_connection_factory("postgresql://u@no-such-host.invalid/db", timeout=2)()
    dsn = f"postgresql://postgres@/postgres?host=no-such-host.invalid:5432&host={pg_cluster.standbys[0].address}"
    with pytest.raises(
        NoHostAvailableError, match=r"no-such-host\.invalid:5432: cannot resolve the host name"
    ) as caught:
        await build_connection_factory(f"{dsn}&target_session_attrs=read-write", timeout=2)()
    assert classify(caught.value) is None  # a name that does not exist will not appear by waiting


async def test_driver_and_adapter_options_in_the_dsn(pg_cluster: PostgresCluster) -> None:
    # The usual advice behind PgBouncer: asyncpg's statement cache off, and SQLAlchemy's adapter cache off.
    url = sa.make_url(pg_cluster.primary.dsn(driver="asyncpg")).update_query_dict(
        {"prepared_statement_cache_size": "0", "statement_cache_size": "0", "command_timeout": "5"},
    )
    engine = create_async_engine(url, async_creator=build_connection_factory(url, timeout=2))
    try:
        async with engine.connect() as connection:
            assert (await connection.execute(sa.text("SELECT 1"))).scalar_one() == 1
            raw = (await connection.get_raw_connection()).driver_connection
            assert raw is not None
            assert raw._config.statement_cache_size == 0
            assert raw._config.command_timeout == 5.0
    finally:
        await engine.dispose()
    with pytest.raises(DSNError, match="statement_cache_size in the DSN must be an integer >= 0, got 'none'"):
        build_connection_factory(url.update_query_dict({"statement_cache_size": "none"}), timeout=2)


async def test_the_callers_cancellation_is_never_swallowed(
    pg_cluster: PostgresCluster,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A losing attempt that takes a while to unwind once cancelled (as a TLS shutdown can) is made by
    # wrapping asyncpg.connect: no server does that on demand. The caller is cancelled meanwhile.
    connect = asyncpg.connect
    unwinding = asyncio.Event()

    async def slow_to_cancel(*args: object, **kwargs: object) -> object:
        if kwargs.get("port") != pg_cluster.standbys[0].port:
            return await connect(*args, **kwargs)
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            unwinding.set()
            await asyncio.sleep(0.5)
            raise
        raise AssertionError  # pragma: no cover - cancelled above

    clients = "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
    before = await pg_cluster.primary.fetchval(clients)
    monkeypatch.setattr("db_retry.connections.asyncpg.connect", slow_to_cancel)
    factory = build_connection_factory(_dsn(pg_cluster, "read-write"), timeout=5, stagger=0)
    caller = asyncio.ensure_future(factory())
    await unwinding.wait()  # the primary won; the standby's attempt is being abandoned
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    await asyncio.sleep(0.2)  # let the server notice the closed socket
    assert await pg_cluster.primary.fetchval(clients) == before  # the winner was closed, not leaked


@pytest.mark.parametrize("key", ["timeout", "connect_timeout"])
async def test_timeout_in_the_dsn_is_the_connect_timeout(
    pg_cluster: PostgresCluster,
    hanging_host: str,
    refused_host: str,
    key: str,
) -> None:
    dsn = _dsn(pg_cluster, "standby", hanging_host, refused_host).replace("?", f"?{key}=0.3&", 1)
    pg_cluster.standbys[0].stop()
    try:
        with pytest.raises(NoHostAvailableError, match=r"timed out after 0\.3s"):
            await build_connection_factory(dsn, timeout=60)()
    finally:
        pg_cluster.standbys[0].start()


async def test_a_url_object_and_a_unix_socket_default_are_accepted(
    pg_cluster: PostgresCluster,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    factory = build_connection_factory(sa.make_url("postgresql://u@/db?host=/nonexistent-dir&port=1"), timeout=1)
    with pytest.raises(OSError):  # noqa: PT011 - the OS decides: no such file, refused
        await factory()
    # No host at all: asyncpg's defaults (PGHOST, the usual Unix socket directories, then localhost).
    monkeypatch.delenv("PGHOST", raising=False)
    monkeypatch.setenv("PGPORT", "1")
    with pytest.raises(OSError):  # noqa: PT011 - nothing listens on port 1, on a socket or on localhost
        await build_connection_factory("postgresql://u@/db", timeout=1)()
    monkeypatch.setenv("PGHOST", pg_cluster.primary.host)
    monkeypatch.setenv("PGPORT", str(pg_cluster.primary.port))
    connection = await build_connection_factory("postgresql://postgres@/postgres", timeout=2)()
    assert await connection.fetchval("SELECT current_database()") == "postgres"
    await connection.close()


@pytest.mark.parametrize(
    ("dsn", "timeout", "message"),
    [
        (
            "postgresql://u@/db?host=a:1&host=b:2&target_session_attrs=master",
            1,
            "unknown target_session_attrs 'master'",
        ),
        ("postgresql://u@a/db", 0, "timeout must be a number of seconds > 0, got 0"),
        ("postgresql://u@a/db", float("inf"), "timeout must be"),
        ("postgresql://u@a/db?connect_timeout=soon", 1, "connect_timeout in the DSN must be .* got 'soon'"),
        ("postgresql://u@a/db?timeout=-1", 1, "timeout in the DSN must be"),
    ],
)
def test_bad_configuration_fails_when_the_factory_is_built(dsn: str, timeout: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_connection_factory(dsn, timeout=timeout)


def test_bad_stagger_is_refused() -> None:
    with pytest.raises(ValueError, match="stagger must be a number of seconds >= 0"):
        build_connection_factory("postgresql://u@a/db", timeout=1, stagger=-1)


def test_unknown_attrs_error_is_a_dsn_error() -> None:
    with pytest.raises(DSNError, match="expected one of any, primary, standby, prefer-standby"):
        build_connection_factory("postgresql://u@a/db?target_session_attrs=nope", timeout=1)
