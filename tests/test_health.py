"""``check_hosts`` and ``db-retry check`` against the kit's real servers: up, stopped, hanging, lagging."""

import asyncio
import collections.abc
import json
import re
import socket
import urllib.parse

import pytest
import sqlalchemy as sa

from db_retry import build_connection_factory, cli
from db_retry.connections import TARGET_SESSION_ATTRS
from db_retry.dsn import DSNError, HostPort
from db_retry.health import HealthReport, HostStatus, check_hosts, format_report
from db_retry.testing.cluster import PostgresCluster, PostgresNode, free_port
from db_retry.testing.proxy import FrontendMessage, TcpProxy


PASSWORD = "Pw/n0t@2:b3#sh0wn"
PASSWORD_IN_URL = urllib.parse.quote(PASSWORD, safe="")
USERINFO = f"app:{PASSWORD_IN_URL}@"


def _assert_no_password(text: str) -> None:
    assert PASSWORD not in text
    assert PASSWORD_IN_URL not in text


@pytest.fixture
def hanging_address() -> collections.abc.Iterator[str]:
    """A loopback listener that completes TCP handshakes (in the kernel backlog) and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield f"127.0.0.1:{listener.getsockname()[1]}"


def _address(node: PostgresNode) -> HostPort:
    return HostPort(node.host, node.port)


def _by_address(report: HealthReport) -> dict[str, HostStatus]:
    return {str(host.address): host for host in report.hosts}


async def _version(node: PostgresNode) -> str:
    return str(await node.fetchval("SHOW server_version")).split(" ", 1)[0]


def _assert_primary(status: HostStatus, version: str) -> None:
    assert status.reachable
    assert status.error is None
    assert status.latency is not None
    assert status.latency > 0
    assert status.role == "primary"
    assert status.read_only is False
    assert status.server_version == version
    assert status.replay_lag_bytes is None
    assert status.unreplayed_bytes is None
    assert status.replay_lag_seconds is None


async def test_all_hosts_up(pg_cluster: PostgresCluster) -> None:
    await pg_cluster.wait_for_replay()
    report = await check_hosts(pg_cluster.multihost_dsn(), timeout=10)

    version = await _version(pg_cluster.primary)
    assert re.fullmatch(r"\d+\.\d+", version)
    primary, standby = report.hosts
    assert primary.address == _address(pg_cluster.primary)
    _assert_primary(primary, version)
    assert standby.address == _address(pg_cluster.standbys[0])
    assert standby.reachable
    assert standby.error is None
    assert standby.role == "standby"
    assert standby.read_only is True
    assert standby.server_version == version
    assert isinstance(standby.replay_lag_bytes, int)
    assert standby.replay_lag_bytes >= 0
    assert isinstance(standby.unreplayed_bytes, int)
    assert standby.unreplayed_bytes >= 0
    assert isinstance(standby.replay_lag_seconds, float)
    assert standby.replay_lag_seconds >= 0

    assert report.target_session_attrs == "any"
    assert report.ok
    assert dict(report.chosen) == {
        "any": primary.address,
        "primary": primary.address,
        "standby": standby.address,
        "prefer-standby": standby.address,
        "read-write": primary.address,
        "read-only": standby.address,
    }


@pytest.mark.parametrize(
    ("nodes", "expected"),
    [
        pytest.param(
            "standby,primary",
            {
                "any": "standby",
                "primary": "primary",
                "standby": "standby",
                "prefer-standby": "standby",
                "read-write": "primary",
                "read-only": "standby",
            },
            id="standby-first",
        ),
        pytest.param(
            "primary",
            {
                "any": "primary",
                "primary": "primary",
                "standby": None,
                "prefer-standby": "primary",
                "read-write": "primary",
                "read-only": None,
            },
            id="primary-only",
        ),
        pytest.param(
            "standby",
            {
                "any": "standby",
                "primary": None,
                "standby": "standby",
                "prefer-standby": "standby",
                "read-write": None,
                "read-only": "standby",
            },
            id="standby-only",
        ),
    ],
)
@pytest.mark.parametrize("target_session_attrs", TARGET_SESSION_ATTRS)
async def test_chosen_host_for_each_target_session_attrs(
    pg_cluster: PostgresCluster, nodes: str, expected: dict[str, str | None], target_session_attrs: str
) -> None:
    named = {"primary": pg_cluster.primary, "standby": pg_cluster.standbys[0]}
    dsn = pg_cluster.multihost_dsn(
        [named[name] for name in nodes.split(",")], target_session_attrs=target_session_attrs
    )
    report = await check_hosts(dsn, timeout=10)

    assert report.target_session_attrs == target_session_attrs
    assert dict(report.chosen) == {
        attrs: None if name is None else _address(named[name]) for attrs, name in expected.items()
    }
    assert report.ok is (expected[target_session_attrs] is not None)


async def test_standby_without_a_reachable_primary_has_no_byte_lag(pg_cluster: PostgresCluster) -> None:
    report = await check_hosts(pg_cluster.multihost_dsn(pg_cluster.standbys), timeout=10)
    (standby,) = report.hosts
    assert standby.role == "standby"
    assert standby.replay_lag_bytes is None  # nothing to compare with
    assert isinstance(standby.unreplayed_bytes, int)


async def test_single_host_dsn(pg_dsn: str) -> None:
    """Runs against ``DB_RETRY_TEST_DSN`` too."""
    url = sa.make_url(pg_dsn)
    report = await check_hosts(url)
    (host,) = report.hosts
    assert host.address == HostPort(str(url.host), url.port or 5432)
    assert host.reachable
    assert host.error is None
    assert host.role is not None
    assert report.ok
    assert report.chosen["any"] == host.address


async def test_stopped_and_hanging_hosts_are_reported(pg_cluster: PostgresCluster, hanging_address: str) -> None:
    refused_address = f"127.0.0.1:{free_port()}"
    dsn = pg_cluster.multihost_dsn(extra_hosts=[hanging_address, refused_address], target_session_attrs="read-write")
    # Long enough for the real servers to answer on a busy machine; the hanging host costs this once.
    report = await check_hosts(dsn, timeout=2.5)

    hosts = _by_address(report)
    assert hosts[hanging_address] == HostStatus(
        address=HostPort("127.0.0.1", int(hanging_address.rsplit(":", 1)[1])),
        reachable=False,
        error="timed out after 2.5s",
    )
    assert hosts[refused_address].reachable is False
    assert hosts[refused_address].error == "connection refused"
    assert hosts[refused_address].latency is None
    assert hosts[refused_address].role is None
    assert hosts[pg_cluster.primary.address].role == "primary"
    assert hosts[pg_cluster.standbys[0].address].role == "standby"
    assert report.ok
    assert report.chosen["read-write"] == _address(pg_cluster.primary)


async def _wait_until(node: PostgresNode, condition: str, timeout: float = 30) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await node.fetchval(f"SELECT {condition}"):
        assert asyncio.get_running_loop().time() < deadline, f"{node.name}: {condition} still false"
        await asyncio.sleep(0.02)


async def test_lagging_then_stopped_standby(fresh_cluster: collections.abc.Callable[..., PostgresCluster]) -> None:
    cluster = fresh_cluster(standbys=1)
    primary, standby = cluster.primary, cluster.standbys[0]
    await primary.execute("CREATE TABLE lag (n int)")
    await cluster.wait_for_replay()  # a replayed commit gives pg_last_xact_replay_timestamp() a value
    await standby.execute("SELECT pg_wal_replay_pause()")
    await primary.execute("INSERT INTO lag SELECT generate_series(1, 1000)")
    await _wait_until(standby, "pg_last_wal_receive_lsn() > pg_last_wal_replay_lsn()")

    report = await check_hosts(cluster.multihost_dsn(), timeout=10)
    lagging = _by_address(report)[standby.address]
    assert lagging.replay_lag_bytes is not None
    assert lagging.replay_lag_bytes > 0
    assert lagging.unreplayed_bytes is not None
    assert lagging.unreplayed_bytes > 0
    assert lagging.replay_lag_seconds is not None
    assert lagging.replay_lag_seconds >= 0

    standby.stop()
    for attrs, exit_status in [("standby", 1), ("prefer-standby", 0), ("read-write", 0)]:
        dsn = cluster.multihost_dsn(target_session_attrs=attrs)
        report = await check_hosts(dsn, timeout=10)
        stopped = _by_address(report)[standby.address]
        assert stopped.reachable is False
        assert stopped.error == "connection refused"
        assert report.chosen["standby"] is None
        assert report.chosen["prefer-standby"] == _address(primary)
        assert await asyncio.to_thread(cli.main, ["check", dsn, "--timeout", "10"]) == exit_status


async def test_reachable_host_whose_status_query_fails(
    fresh_cluster: collections.abc.Callable[..., PostgresCluster],
) -> None:
    primary = fresh_cluster().primary
    await primary.execute("CREATE ROLE probe LOGIN")
    await primary.execute("REVOKE EXECUTE ON FUNCTION pg_catalog.pg_current_wal_lsn() FROM PUBLIC")

    report = await check_hosts(f"postgresql+asyncpg://probe@{primary.address}/postgres", timeout=10)
    (host,) = report.hosts
    assert host.reachable
    assert host.latency is not None
    assert host.role == "primary"
    assert host.error == "InsufficientPrivilegeError: permission denied for function pg_current_wal_lsn"
    assert report.ok  # it connected and its role is known: a factory would use it


def _password_dsns(cluster: PostgresCluster, *extra_hosts: str) -> list[str]:
    netloc = cluster.multihost_dsn(extra_hosts=extra_hosts).replace("postgres@", f"postgres:{PASSWORD_IN_URL}@", 1)
    query = cluster.multihost_dsn(extra_hosts=extra_hosts) + f"&password={PASSWORD_IN_URL}"
    return [netloc, query]


async def test_cli_table_never_shows_the_password(
    pg_cluster: PostgresCluster, hanging_address: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for dsn in _password_dsns(pg_cluster, hanging_address, f"127.0.0.1:{free_port()}"):
        assert await asyncio.to_thread(cli.main, ["check", dsn, "--timeout", "2.5"]) == 0
        captured = capsys.readouterr()
        _assert_no_password(captured.out + captured.err)
        lines = captured.out.splitlines()
        assert lines[0].startswith("DSN postgresql+asyncpg://")
        assert "***" in lines[0]
        assert f"host={pg_cluster.primary.address}" in lines[0]  # decoded for reading
        assert lines[2].split() == [
            "HOST",
            "UP",
            "LATENCY",
            "MS",
            "ROLE",
            "VERSION",
            "READ-ONLY",
            "LAG",
            "BYTES",
            "UNREPLAYED",
            "LAG",
            "S",
            "ERROR",
        ]
        rows = {line.split()[0]: line.split() for line in lines[3:7]}
        assert rows[pg_cluster.primary.address][1:2] + rows[pg_cluster.primary.address][3:4] == ["yes", "primary"]
        assert rows[pg_cluster.standbys[0].address][3] == "standby"
        assert rows[hanging_address][1:] == ["no", "-", "-", "-", "-", "-", "-", "-", "timed", "out", "after", "2.5s"]
        assert "TARGET_SESSION_ATTRS  PICKS" in captured.out
        assert f"any (DSN)             {pg_cluster.primary.address}" in captured.out
        assert f"standby               {pg_cluster.standbys[0].address}" in captured.out
        assert lines[-1] == f"OK: {pg_cluster.primary.address} satisfies target_session_attrs=any"


async def test_cli_json_never_shows_the_password(
    pg_cluster: PostgresCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    for dsn in _password_dsns(pg_cluster):
        assert await asyncio.to_thread(cli.main, ["check", dsn, "--json"]) == 0
        captured = capsys.readouterr()
        _assert_no_password(captured.out + captured.err)
        document = json.loads(captured.out)
        assert document["ok"] is True
        assert document["target_session_attrs"] == "any"
        assert "***" in document["dsn"]
        assert [host["address"] for host in document["hosts"]] == [node.address for node in pg_cluster.nodes]
        assert [host["role"] for host in document["hosts"]] == ["primary", "standby"]
        for host in document["hosts"]:  # milliseconds, rounded; the seconds are kept for older scripts
            assert host["latency_ms"] == round(host["latency_ms"], 2)
            assert host["latency_ms"] == pytest.approx(host["latency"] * 1000, abs=0.01)
            assert host["latency"] == round(host["latency"], 6)
        assert set(document["hosts"][0]) == {
            "host",
            "port",
            "address",
            "reachable",
            "latency_ms",
            "latency",
            "error",
            "role",
            "server_version",
            "read_only",
            "replay_lag_bytes",
            "unreplayed_bytes",
            "replay_lag_seconds",
        }
        assert document["chosen"] == {
            "any": pg_cluster.primary.address,
            "primary": pg_cluster.primary.address,
            "standby": pg_cluster.standbys[0].address,
            "prefer-standby": pg_cluster.standbys[0].address,
            "read-write": pg_cluster.primary.address,
            "read-only": pg_cluster.standbys[0].address,
        }


def test_cli_fails_when_no_host_satisfies(capsys: pytest.CaptureFixture[str]) -> None:
    """No server needed: the only host refuses connections."""
    dsn = f"postgresql://{USERINFO}127.0.0.1:{free_port()}/db"
    assert cli.main(["check", dsn]) == 1
    captured = capsys.readouterr()
    _assert_no_password(captured.out + captured.err)
    assert "connection refused" in captured.out
    assert captured.out.splitlines()[-1] == "FAIL: no host satisfies target_session_attrs=any"


@pytest.mark.parametrize(
    ("dsn", "message"),
    [
        (f"postgresql://{USERINFO}/db?host=127.0.0.1:notaport", "bad port 'notaport'"),
        (
            f"postgresql://{USERINFO}127.0.0.1/db?target_session_attrs=primry",
            "unknown target_session_attrs",
        ),
        (f"postgresql://{USERINFO}127.0.0.1/db?connect_timeout=soon", "connect_timeout in the DSN"),
        (f"postgresql://{USERINFO}/db", "names no host"),
        (f"postgresql://{USERINFO}/db?password={PASSWORD_IN_URL}", "names no host"),
        (f"postgresql://{USERINFO}127.0.0.1:5432:5433/db", "malformed DSN"),
    ],
    ids=["bad-port", "unknown-attrs", "bad-timeout", "no-host", "no-host-query-password", "two-ports"],
)
def test_cli_malformed_dsn_exits_2(dsn: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check", dsn]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("db-retry check: ")
    assert message in captured.err
    _assert_no_password(captured.err)


async def test_malformed_dsn_raises_dsn_error() -> None:
    with pytest.raises(DSNError, match="names no host"):
        await check_hosts("postgresql://app@/db")


@pytest.mark.parametrize("timeout", ["0", "-1", "soon", "inf"])
def test_cli_rejects_a_bad_timeout(timeout: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["check", "postgresql://127.0.0.1/db", "--timeout", timeout])
    assert exited.value.code == 2
    assert f"must be a number of seconds > 0, got {timeout!r}" in capsys.readouterr().err


def test_cli_lists_check(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "probe every host of a DSN" in capsys.readouterr().out


def test_format_report_without_hosts_answering() -> None:
    """A pure rendering check: the table of a report where nothing answered."""
    address = HostPort("::1", 5432)
    report = HealthReport(
        dsn="postgresql://app:***@[::1]:5432/db",
        target_session_attrs="read-only",
        hosts=(HostStatus(address=address, reachable=False, error="connection refused"),),
        chosen=dict.fromkeys(TARGET_SESSION_ATTRS),
    )
    text = format_report(report)
    assert "[::1]:5432  no  -" in text
    assert "read-only (DSN)       -" in text
    assert text.endswith("FAIL: no host satisfies target_session_attrs=read-only")
    assert json.loads(report.to_json())["hosts"][0]["host"] == "::1"


async def test_a_libpq_connection_string_is_checked_and_connected_like_a_url(
    pg_cluster: PostgresCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    nodes = pg_cluster.nodes
    conninfo = (
        f"host={','.join(node.host for node in nodes)} port={','.join(str(node.port) for node in nodes)} "
        f"user=postgres dbname=postgres password='{PASSWORD}' target_session_attrs=read-only"
    )
    report = await check_hosts(conninfo, timeout=10)
    assert [host.address for host in report.hosts] == [_address(node) for node in nodes]
    assert report.ok
    assert report.chosen["read-only"] == _address(pg_cluster.standbys[0])
    _assert_no_password(report.dsn)

    connection = await build_connection_factory(conninfo, timeout=10)()
    try:
        assert await connection.fetchval("SELECT pg_is_in_recovery()") is True  # read-only: the standby
    finally:
        await connection.close()

    assert await asyncio.to_thread(cli.main, ["check", conninfo, "--json"]) == 0
    captured = capsys.readouterr()
    _assert_no_password(captured.out + captured.err)
    assert json.loads(captured.out)["target_session_attrs"] == "read-only"


@pytest.mark.parametrize(
    ("dsn", "message"),
    [
        ("http://app:secret@127.0.0.1/db", "http:// is not PostgreSQL"),
        ("mysql://app@127.0.0.1/db", "mysql:// is not PostgreSQL"),
        ("postgresql://app@127.0.0.1:abc/db", "bad port 'abc' in the DSN"),
        ("postgresql://app@[::1:5432/db", "malformed host '[::1:5432'"),
        ("host=a,b port=1,2,3", "2 hosts (a, b) but 3 ports (1, 2, 3)"),
    ],
)
def test_cli_names_the_bad_part_of_a_malformed_dsn(dsn: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    """No server needed: a non-PostgreSQL scheme or a bad host list is refused before any connect."""
    assert cli.main(["check", dsn]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert message in captured.err
    assert "secret" not in captured.err


async def test_a_cancelled_check_leaves_no_session_behind(pg_cluster: PostgresCluster) -> None:
    primary = pg_cluster.primary
    sessions = "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
    before = await primary.fetchval(sessions)
    asking = asyncio.Event()
    async with TcpProxy(primary.host, primary.port) as proxy:

        def hang_at_the_first_query(message: FrontendMessage) -> bool:
            if message.kind in {b"P", b"Q"}:  # connected: the check now asks its questions
                proxy.hang()  # this one reaches the server; its answer is held back
                asking.set()
            return False

        proxy.cut_after(hang_at_the_first_query, once=False)
        check = asyncio.ensure_future(check_hosts(f"postgresql://postgres@{proxy.address}/postgres", timeout=30))
        await asyncio.wait_for(asking.wait(), 30)
        check.cancel()
        with pytest.raises(asyncio.CancelledError):
            await check
        proxy.pass_through()
        for _ in range(100):  # the server notices the closed socket
            if await primary.fetchval(sessions) == before:
                break
            await asyncio.sleep(0.02)
    assert await primary.fetchval(sessions) == before


async def test_a_check_cancelled_while_connecting_is_cancelled(hanging_address: str) -> None:
    check = asyncio.ensure_future(check_hosts(f"postgresql://postgres@{hanging_address}/postgres", timeout=30))
    await asyncio.sleep(0.1)  # the connect is waiting for the host that never answers
    check.cancel()
    with pytest.raises(asyncio.CancelledError):
        await check
