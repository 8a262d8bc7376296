"""The kit's deployment components (issue 11 item 1): Patroni + etcd, HAProxy, PgBouncer, a moving endpoint.

All real programs, run as the server account on loopback ports below the ephemeral range, stopped by
PID. Bounded: one two-member Patroni cluster carries the Patroni and HAProxy checks.
"""

import asyncio
import json
import os
import pathlib
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time
import typing

import asyncpg
import pytest
import sqlalchemy as sa

from db_retry import build_connection_factory
from db_retry.testing import _binaries
from db_retry.testing import cluster as kit
from db_retry.testing._binaries import PGBOUNCER, Component, MissingComponentError, find_program
from db_retry.testing.cluster import ClusterError, KitProcess, PostgresNode, free_port
from db_retry.testing.haproxy import HAProxy
from db_retry.testing.patroni import PatroniCluster, PatroniMember, _accepts_writes, _http
from db_retry.testing.pgbouncer import PgBouncer
from db_retry.testing.proxy import TcpProxy
from db_retry.testing.pytest_plugin import ClusterFactory
from db_retry.testing.topology_fixtures import HAProxyFactory, PatroniFactory, PgBouncerFactory, skip_if_missing


pytestmark = pytest.mark.standby


async def server_port(dsn: str, **kwargs: object) -> int:
    connection = await asyncpg.connect(dsn.replace("+asyncpg", ""), timeout=5, **kwargs)
    try:
        port: int = await connection.fetchval("SELECT inet_server_port()")
        return port
    finally:
        await connection.close()


async def eventually(condition: typing.Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(condition):
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_patroni_cluster_and_haproxy(  # noqa: PLR0915 - one cluster carries every check, to bound the time
    patroni_cluster: PatroniFactory, haproxy: HAProxyFactory
) -> None:
    cluster = patroni_cluster(2)
    first = cluster.leader()
    replica = cluster.member("m2" if first.name == "m1" else "m1")
    assert first.rest("GET", "/primary")[0] == 200
    assert first.rest("GET", "/replica")[0] == 503
    assert replica.rest("GET", "/primary")[0] == 503
    assert cluster.replicas == [replica]
    assert cluster.member_states()[replica.name] == "streaming"
    assert cluster.member_states("role")[first.name] == "leader"
    assert all(member.node.port < 32768 and member.rest_port < 32768 for member in cluster.members)
    connection = await build_connection_factory(sa.make_url(cluster.multihost_dsn()), timeout=2)()
    try:
        assert await connection.fetchval("SELECT inet_server_port()") == first.node.port
    finally:
        await connection.close()
    assert first.name in repr(cluster)
    with pytest.raises(KeyError, match="no member 'm9'"):
        cluster.member("m9")
    with pytest.raises(ClusterError, match="already started"):
        cluster.start()

    balancer = haproxy(cluster)
    # Checked before use: only the leader behind the primary listener, only the replica behind the other.
    assert balancer.up("primary") == [first.name]
    assert balancer.up("replicas") == [replica.name]
    assert await server_port(balancer.dsn(driver=None)) == first.node.port
    assert await server_port(balancer.dsn("replicas", driver=None)) == replica.node.port
    assert "primary@" in repr(balancer)
    with pytest.raises(ClusterError, match="already started"):
        balancer.start()

    switched = await cluster.switchover()
    assert (switched.old, switched.new) == (first, replica)
    assert switched.seconds > 0
    await eventually(lambda: balancer.up("primary") == [replica.name])
    assert await server_port(balancer.dsn(driver=None)) == replica.node.port
    await cluster.wait_streaming()
    back = await cluster.switchover(first)
    assert back.new is first
    with pytest.raises(ClusterError, match="POST /switchover"):
        await cluster.switchover(first)  # a switchover to the leader itself is refused
    await cluster.wait_streaming()

    old_pid = first.node.pid
    failed_over = await cluster.failover()
    assert (failed_over.old, failed_over.new) == (first, replica)
    await cluster.wait_streaming()  # Patroni started the old leader again, as a replica
    assert first.node.pid not in {None, old_pid}
    assert await first.node.is_in_recovery()

    assert await cluster.lose_node(first) is None  # a replica: no change of leader
    assert first.rest("GET", "/replica")[0] == 0  # nothing answers
    cluster.start_member(first)
    await cluster.wait_streaming()
    await eventually(lambda: balancer.up("replicas") == [first.name])

    with pytest.raises(ClusterError, match="no other member took writes"):
        await cluster.failover(timeout=0)  # gives up at once; Patroni still promotes
    await cluster.wait_streaming()
    leader = cluster.leader()
    losing = asyncio.create_task(cluster.lose_node())
    # Until the leader key expires no member is primary: HAProxy has no server UP behind that listener.
    await eventually(lambda: balancer.up("primary") == [])
    with pytest.raises(ClusterError, match="checks not settled"):
        balancer.wait_checked(timeout=0)
    lost = await losing
    assert lost is not None
    assert lost.old is leader
    assert lost.seconds > 10  # the leader key expires after the TTL (20 s)
    await eventually(lambda: balancer.up("primary") == [lost.new.name])

    # A killed Patroni leaves its postmaster running: stop() kills it by postmaster.pid.
    survivor = lost.new
    survivor.process.kill()
    postmaster = survivor.node.pid
    assert postmaster is not None
    cluster.stop()
    assert not kit._alive(postmaster)
    assert cluster.member_states() == {}
    with pytest.raises(ClusterError, match="no leader"):
        cluster.leader()


def test_patroni_cluster_arguments_and_failed_starts(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    with skip_if_missing():
        PatroniCluster()  # the programs are there; nothing starts
    with pytest.raises(ValueError, match="members must be >= 1, got 0"):
        PatroniCluster(members=0)
    with pytest.raises(ValueError, match="ttl must be >= 20"):
        PatroniCluster(ttl=5)
    with pytest.raises(ClusterError, match="no a leader in time"):
        PatroniCluster().start(timeout=0)  # what it started is stopped
    monkeypatch.setenv("DB_RETRY_ETCD", "/bin/false")
    with pytest.raises(ClusterError, match=r"etcd at .* did not become healthy"):
        PatroniCluster().start()
    script = tmp_path / "patroni"
    script.write_text("#!/bin/sh\nexit 3\n")
    script.chmod(0o755)
    monkeypatch.setenv("DB_RETRY_PATRONI", str(script))
    with pytest.raises(MissingComponentError, match="virtualenv the server account can execute"):
        PatroniCluster()


async def test_pgbouncer_pool_modes_and_retarget(fresh_cluster: ClusterFactory, pgbouncer: PgBouncerFactory) -> None:
    cluster = fresh_cluster(standbys=1)
    primary, standby = cluster.primary, cluster.standbys[0]
    transaction = pgbouncer(primary.host, primary.port)
    session = pgbouncer(primary.host, primary.port, pool_mode="session")
    assert transaction.port < 32768
    assert "pool_mode=transaction" in repr(transaction)
    kept_t = await asyncpg.connect(transaction.dsn(driver=None), statement_cache_size=0)
    kept_s = await asyncpg.connect(session.dsn(driver=None))
    try:
        assert await kept_t.fetchval("SELECT inet_server_port()") == primary.port
        assert await kept_s.fetchval("SELECT inet_server_port()") == primary.port
        await asyncio.to_thread(primary.restart)
        # Transaction pooling: the idle client never sees the restart (server_login_retry 1 s, not 15 s).
        assert await kept_t.fetchval("SELECT 1") == 1
        assert await server_port(session.dsn()) == primary.port  # session pooling serves new clients again
        transaction.retarget(standby.host, standby.port)
        deadline = time.monotonic() + 10
        while await kept_t.fetchval("SELECT inet_server_port()") != standby.port:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
    finally:
        await kept_t.close()
        kept_s.terminate()
    with pytest.raises(ClusterError, match="already started"):
        transaction.start()
    transaction.stop()
    assert transaction.log_tail() == "(not started)"
    with pytest.raises(ClusterError, match="not started"):
        _ = transaction.config_path
    with pytest.raises(ValueError, match="pool_mode must be one of session, transaction, statement, got 'x'"):
        PgBouncer("127.0.0.1", 1, pool_mode="x")  # type: ignore[arg-type]


def test_failed_starts_of_pgbouncer_and_haproxy_stop_what_they_started(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    monkeypatch.setenv("DB_RETRY_PGBOUNCER", "/bin/false")
    with pytest.raises(ClusterError, match="does not listen"):
        PgBouncer("127.0.0.1", 1).start()
    monkeypatch.setenv("DB_RETRY_HAPROXY", "/bin/false")
    # HAProxy's start is what is under test: a cluster object with no members stands in for a Patroni cluster.
    fake = PatroniCluster.__new__(PatroniCluster)
    fake.account = kit._Account.resolve(None)
    fake.members = []
    balancer = HAProxy(fake)
    with pytest.raises(ClusterError, match="not started"):
        _ = balancer.socket_path
    with pytest.raises(ClusterError, match="does not listen"):
        balancer.start()
    assert balancer.process is None
    balancer.stop()  # stopping again is harmless
    balancer.directory = tmp_path  # started, but HAProxy has not made its stats socket (yet)
    with pytest.raises(ClusterError, match="checks not settled"):
        balancer.wait_checked(timeout=0)
    balancer.directory = None
    with pytest.raises(ValueError, match="check_interval must be > 0 seconds, got 0"):
        HAProxy(fake, check_interval=0)
    assert "on-marked-down" not in _config_of(HAProxy(fake, shutdown_sessions=False))


def _config_of(balancer: HAProxy) -> str:
    balancer.directory = pathlib.Path("/nonexistent")
    balancer.ports = {"primary": 1, "replicas": 2}
    return balancer._config()


async def test_tcp_proxy_retargets_keeping_or_cutting_sessions(fresh_cluster: ClusterFactory) -> None:
    cluster = fresh_cluster(standbys=1)
    primary, standby = cluster.primary, cluster.standbys[0]
    async with TcpProxy(primary.host, primary.port) as proxy:
        assert proxy.port < 32768
        dsn = f"postgresql://postgres@{proxy.address}/postgres"
        kept = await asyncpg.connect(dsn)
        try:
            proxy.retarget(standby.host, standby.port)
            assert await kept.fetchval("SELECT inet_server_port()") == primary.port  # kept on the old server
            assert await server_port(dsn) == standby.port  # new connections go to the new one
            moved = await asyncpg.connect(dsn)
            proxy.retarget(primary.host, primary.port, cut=True)
            for connection in (kept, moved):
                with pytest.raises((asyncpg.InterfaceError, asyncpg.PostgresError, OSError)):
                    await connection.fetchval("SELECT 1")
            assert await server_port(dsn) == primary.port
        finally:
            kept.terminate()


async def test_tcp_proxy_picks_another_port_when_its_free_port_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", free_port()))
        squatter.listen()
        taken = squatter.getsockname()[1]
        ports = iter([taken, free_port()])
        monkeypatch.setattr("db_retry.testing.proxy.free_port", lambda: next(ports))
        async with TcpProxy("127.0.0.1", 1) as proxy:
            assert proxy.port != taken
        monkeypatch.setattr("db_retry.testing.proxy.free_port", lambda: taken)
        with pytest.raises(OSError, match="in use"):
            await TcpProxy("127.0.0.1", 1).start()
        with pytest.raises(OSError, match="in use"):
            await TcpProxy("127.0.0.1", 1, port=taken).start()


def test_free_port_stays_below_the_ephemeral_range(monkeypatch: pytest.MonkeyPatch) -> None:
    ports = {free_port() for _ in range(50)}
    assert len(ports) == 50
    assert all(20000 <= port < 32000 for port in ports)
    handed_out = next(iter(ports))
    wanted = free_port()
    kit._handed_out.discard(wanted)
    picks = iter([handed_out, wanted])
    with monkeypatch.context() as patch:
        patch.setattr(random, "choice", lambda _: next(picks))
        assert free_port() == wanted  # a port handed out before is passed over
    monkeypatch.setattr(kit, "_handed_out", set(range(20000, 30000)))
    assert free_port() in kit.PORT_RANGE  # a long run forgets old ports
    assert len(kit._handed_out) == 1


def pid_of(process: KitProcess) -> int | None:
    """``process.pid`` through a call, so that type checkers do not carry a narrowed value past a start."""
    return process.pid


def test_kit_process_lifecycle() -> None:
    account = kit._Account.resolve(None)
    directory = kit.kit_directory(account, "proc")
    stubborn = KitProcess(
        "stubborn",
        ["/bin/sh", "-c", "trap '' TERM; echo started; sleep 30"],
        account=account,
        cwd=directory,
        log_path=directory / "stubborn.log",
    )
    assert pid_of(stubborn) is None
    assert stubborn.log_tail() == "(no log yet)"
    stubborn.stop()  # never started: nothing to do
    stubborn.kill()
    stubborn.start()
    assert stubborn.pid is not None
    with pytest.raises(ClusterError, match="already running"):
        stubborn.start()
    deadline = time.monotonic() + 10
    while "started" not in stubborn.log_tail():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    stubborn.stop(timeout=0.2)  # SIGTERM is ignored: SIGKILL
    assert pid_of(stubborn) is None
    stubborn.signal(signal.SIGTERM)  # not running: a no-op
    assert repr(stubborn) == "KitProcess('stubborn', pid=None)"
    with pytest.raises(ClusterError, match="does not listen"):
        stubborn.wait_listening("127.0.0.1", free_port(), timeout=5)


def test_the_reaper_kills_watched_processes_by_pid() -> None:
    reaper = kit._Reaper()
    sleeper = subprocess.Popen(["/bin/sleep", "60"])
    done = subprocess.Popen(["/bin/true"])
    done.wait()
    reaper.watch_process(sleeper.pid)
    reaper.watch_process(done.pid)  # already gone: nothing to send
    reaper.close()
    assert sleeper.wait(10) == -signal.SIGKILL


def test_a_killed_process_leaves_no_kit_program() -> None:
    """SIGKILL runs no atexit hook: the reaper kills PgBouncer by PID and stops the server it fronts."""
    code = textwrap.dedent(
        """
        import json, os, signal
        from db_retry.testing.pgbouncer import PgBouncer
        from db_retry.testing.cluster import PostgresCluster

        cluster = PostgresCluster().start()
        bouncer = PgBouncer(cluster.primary.host, cluster.primary.port).start()
        print(json.dumps({"pids": [bouncer.process.pid, cluster.primary.pid], "port": bouncer.port}), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    completed = subprocess.run(  # noqa: S603
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120
    )
    assert completed.returncode == -signal.SIGKILL, completed.stderr
    report = json.loads(completed.stdout)
    deadline = time.monotonic() + 60
    while any(kit._alive(pid) for pid in report["pids"]):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert kit.port_is_free(report["port"])


def test_find_program(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    assert find_program(PGBOUNCER).name == "pgbouncer"
    monkeypatch.setenv("DB_RETRY_PGBOUNCER", str(tmp_path / "missing"))
    with pytest.raises(MissingComponentError, match=r"pgbouncer not found \(searched: DB_RETRY_PGBOUNCER=") as caught:
        find_program(PGBOUNCER)
    assert "apt-get install pgbouncer" in str(caught.value)
    monkeypatch.setenv("DB_RETRY_PGBOUNCER", "/bin/true")
    assert find_program(PGBOUNCER) == pathlib.Path("/bin/true")
    nowhere = Component("db-retry-no-such-program", "DB_RETRY_NO_SUCH", "nothing")
    with pytest.raises(MissingComponentError, match="no db-retry-no-such-program on PATH"):
        find_program(nowhere)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "db-retry-on-path").write_text("#!/bin/sh\n")
    (bindir / "db-retry-on-path").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    assert find_program(Component("db-retry-on-path", "DB_RETRY_ON_PATH", "x")) == bindir / "db-retry-on-path"
    assert _binaries.PATRONI.extra_places[0].name == "patroni"


def test_skip_if_missing_names_what_to_install() -> None:
    with pytest.raises(pytest.skip.Exception, match="apt-get install pgbouncer"), skip_if_missing():
        raise MissingComponentError(PGBOUNCER, ["here"])


async def test_helpers_report_silence(tmp_path: pathlib.Path) -> None:
    assert _http("GET", f"http://127.0.0.1:{free_port()}/")[0] == 0
    nobody = PostgresNode(
        name="nobody",
        port=free_port(),
        data_dir=tmp_path,
        log_path=tmp_path / "log",
        bindir=tmp_path,
        account=kit._Account.resolve(None),
    )
    assert not await _accepts_writes(nobody)  # refused: not a primary
    # The waiting loop of a change of leader, with no member to take over: it gives up after its timeout.
    empty = PatroniCluster.__new__(PatroniCluster)
    empty.members = []
    empty.name = "empty"
    with pytest.raises(ClusterError, match=r"no other member took writes within 0\.1s of the test"):
        await empty._transition("test", typing.cast("PatroniMember", None), time.monotonic(), 0.1)
