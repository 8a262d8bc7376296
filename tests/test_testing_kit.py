"""The test kit itself, against real PostgreSQL servers: clusters, process control, accounts, binaries, plugin."""

import ast
import asyncio
import json
import logging
import os
import pathlib
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
import typing
import uuid

import asyncpg
import psycopg
import pytest
import sqlalchemy
from sqlalchemy.ext.asyncio import create_async_engine

from db_retry.testing import (
    BINDIR_ENV,
    ClusterError,
    PostgresBinariesNotFoundError,
    PostgresCluster,
    PostgresNode,
    _binaries,
    find_postgres_bindir,
    free_port,
)
from db_retry.testing import cluster as kit
from db_retry.testing.pytest_plugin import DSN_ENV, FRESH_SKIP_REASON, STANDBY_SKIP_REASON, ClusterFactory, external_dsn


IS_ROOT = os.geteuid() == 0
# Tests that start servers without the plugin's fixtures; the fixtures skip themselves under DB_RETRY_TEST_DSN.
kit_only = pytest.mark.skipif(bool(os.environ.get(DSN_ENV)), reason=FRESH_SKIP_REASON)
SERVER_PROGRAMS = ("initdb", "pg_ctl", "postgres", "pg_basebackup")


def proc_uids(pid: int) -> list[int]:
    """Real, effective, saved and filesystem uid of a process, from /proc."""
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return [int(field) for field in line.split()[1:]]
    msg = f"no Uid line for {pid}"
    raise AssertionError(msg)


def children_of(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (the postmaster's backends, walsenders, checkpointer, ...)."""
    found = []
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except FileNotFoundError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def can_listen(port: int) -> bool:
    """Whether a new server could listen on 127.0.0.1:``port`` (as PostgreSQL does, with SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
        except OSError:
            return False
        return True


def is_up(node: PostgresNode) -> bool:
    """``node.is_running``, in a call so that type checkers do not carry a narrowed value past a restart."""
    return node.is_running


def table_name() -> str:
    return f"kit_{uuid.uuid4().hex[:12]}"


def fake_server(directory: pathlib.Path, programs: typing.Iterable[str] = SERVER_PROGRAMS) -> pathlib.Path:
    """A directory of executables named like the server programs (enough for the search, not to run)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in programs:
        program = directory / name
        program.write_text("#!/bin/sh\nexit 1\n")
        program.chmod(0o755)
    return directory


def script(path: pathlib.Path, body: str) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


# -- the session cluster -------------------------------------------------------------------------------


async def test_primary_takes_writes(pg_cluster: PostgresCluster) -> None:
    primary = pg_cluster.primary
    name = table_name()
    assert await primary.role() == "primary"
    assert not await primary.is_in_recovery()
    await primary.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, note text)")
    assert await primary.execute(f"INSERT INTO {name} VALUES (1, 'one'), (2, 'two')") == "INSERT 0 2"
    assert await primary.fetchval(f"SELECT string_agg(note, ',' ORDER BY id) FROM {name}") == "one,two"


async def test_standby_is_in_recovery_and_replays(pg_cluster: PostgresCluster) -> None:
    (standby,) = pg_cluster.standbys
    assert await standby.role() == "standby"
    assert await standby.is_in_recovery()
    name = table_name()
    await pg_cluster.primary.execute(f"CREATE TABLE {name} (id int)")
    await pg_cluster.primary.execute(f"INSERT INTO {name} SELECT generate_series(1, 100)")
    await pg_cluster.wait_for_replay(standby)
    assert await standby.fetchval(f"SELECT sum(id) FROM {name}") == 5050
    with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
        await standby.execute(f"INSERT INTO {name} VALUES (101)")


async def test_wait_for_replay_times_out_while_replay_is_paused(pg_cluster: PostgresCluster) -> None:
    (standby,) = pg_cluster.standbys
    name = table_name()
    await standby.execute("SELECT pg_wal_replay_pause()")
    try:
        await pg_cluster.primary.execute(f"CREATE TABLE {name} (id int)")
        with pytest.raises(ClusterError, match=r"standby1 did not replay up to WAL byte \d+ within 0.3s"):
            await pg_cluster.wait_for_replay(timeout=0.3)
    finally:
        await standby.execute("SELECT pg_wal_replay_resume()")
    await pg_cluster.wait_for_replay()
    assert await standby.fetchval(f"SELECT count(*) FROM {name}") == 0


def test_servers_run_as_an_unprivileged_account(pg_cluster: PostgresCluster) -> None:
    expected_uid = pwd.getpwnam(kit.DEFAULT_RUN_AS).pw_uid if IS_ROOT else os.geteuid()
    assert expected_uid != 0
    for node in pg_cluster.nodes:
        assert node.pid is not None
        assert proc_uids(node.pid) == [expected_uid] * 4
        assert node.data_dir.stat().st_uid == expected_uid
        assert stat.S_IMODE(node.data_dir.stat().st_mode) == 0o700
        # Every backend is the postmaster's child and runs as the same account.
        assert children_of(node.pid)
        assert all(proc_uids(child)[1] == expected_uid for child in children_of(node.pid))
    assert pg_cluster.account.uid == expected_uid


async def test_node_addresses(pg_cluster: PostgresCluster) -> None:
    primary = pg_cluster.primary
    port = primary.port
    assert primary.address == f"127.0.0.1:{port}"
    assert primary.dsn() == f"postgresql+asyncpg://postgres@127.0.0.1:{port}/postgres"  # as multihost_dsn()
    assert primary.dsn(driver=None) == f"postgresql://postgres@127.0.0.1:{port}/postgres"
    assert primary.dsn(driver="asyncpg", database="other") == f"postgresql+asyncpg://postgres@127.0.0.1:{port}/other"
    assert primary.conninfo() == f"host=127.0.0.1 port={port} user=postgres dbname=postgres"
    # Both forms reach the server with psycopg, the URL one with asyncpg too.
    for dsn in (primary.dsn(driver=None), primary.conninfo()):
        with psycopg.connect(dsn, connect_timeout=10) as connection:
            row = connection.execute("SELECT current_user, inet_server_port()").fetchone()
        assert row == ("postgres", port)
    connection = await asyncpg.connect(primary.dsn(driver=None), timeout=10)
    try:
        assert await connection.fetchval("SELECT inet_server_addr()::text") == "127.0.0.1/32"
    finally:
        await connection.close()


def test_multihost_dsn(pg_cluster: PostgresCluster) -> None:
    primary, standby = pg_cluster.nodes
    url = sqlalchemy.make_url(pg_cluster.multihost_dsn(target_session_attrs="read-write"))
    assert url.drivername == "postgresql+asyncpg"
    assert url.username == "postgres"
    assert url.host is None
    assert url.database == "postgres"
    assert url.query == {"host": (primary.address, standby.address), "target_session_attrs": "read-write"}

    dsn = pg_cluster.multihost_dsn([standby], driver=None, database="app", extra_hosts=["127.0.0.1:1"])
    assert dsn == f"postgresql://postgres@/app?host={standby.address}&host=127.0.0.1:1"

    with pytest.raises(ValueError, match="at least one host"):
        pg_cluster.multihost_dsn([])


async def test_pg_dsn_is_the_session_primary(pg_cluster: PostgresCluster, pg_dsn: str) -> None:
    assert pg_dsn == pg_cluster.primary.dsn(driver="asyncpg")
    engine = create_async_engine(pg_dsn)
    try:
        async with engine.connect() as connection:
            assert await connection.scalar(sqlalchemy.text("SELECT pg_is_in_recovery()")) is False
    finally:
        await engine.dispose()


def test_log_tail(pg_cluster: PostgresCluster, tmp_path: pathlib.Path) -> None:
    primary = pg_cluster.primary
    assert primary.log_path.is_file()
    assert len(primary.log_tail(lines=1).splitlines()) <= 1
    missing = PostgresNode(
        name="ghost",
        port=1,
        data_dir=tmp_path / "data",
        log_path=tmp_path / "ghost.log",
        bindir=primary.bindir,
        account=primary.account,
    )
    assert missing.log_tail() == "(no log yet)"


# -- process control on fresh clusters ----------------------------------------------------------------


async def test_stop_leaves_no_process_and_frees_the_ports(fresh_cluster: ClusterFactory) -> None:
    cluster = fresh_cluster(standbys=1)
    directory = cluster.directory
    assert directory is not None
    assert directory.is_dir()
    await cluster.wait_for_replay()
    postmasters = [node.pid for node in cluster.nodes]
    assert None not in postmasters
    processes = [pid for pid in postmasters if pid is not None]
    processes += [child for pid in processes for child in children_of(pid)]
    assert len(processes) > 2 * len(postmasters)  # checkpointer, walwriter, walsender, walreceiver, ...
    ports = [node.port for node in cluster.nodes]
    assert not any(can_listen(port) for port in ports)
    assert not any(kit.port_is_free(port) for port in ports)

    cluster.stop()

    assert not any(kit._alive(pid) for pid in processes)
    assert all(can_listen(port) for port in ports)
    assert all(kit.port_is_free(port) for port in ports)
    assert cluster.nodes == []
    assert cluster.directory is None
    assert not directory.exists()
    assert repr(cluster) == "PostgresCluster('fresh1', [])"
    cluster.stop()  # stopping twice is harmless


async def test_restart_keeps_data_and_replaces_the_postmaster(fresh_cluster: ClusterFactory) -> None:
    node = fresh_cluster().primary
    name = table_name()
    await node.execute(f"CREATE TABLE {name} AS SELECT 7 AS x")
    modes: tuple[kit.StopMode, ...] = ("fast", "immediate", "smart")
    for mode in modes:
        before = node.pid
        node.restart(mode)
        assert node.pid not in {None, before}
        assert before is not None
        assert not kit._alive(before)
        assert await node.fetchval(f"SELECT x FROM {name}") == 7
    # "immediate" is a crash: the server went through crash recovery.
    assert "database system was not properly shut down" in node.log_path.read_text()


async def test_kill_crashes_the_server_and_start_recovers(fresh_cluster: ClusterFactory) -> None:
    node = fresh_cluster().primary
    name = table_name()
    await node.execute(f"CREATE TABLE {name} AS SELECT 1 AS x")
    pid = node.pid
    assert pid is not None
    children = children_of(pid)
    node.kill()
    assert not is_up(node)
    assert not kit._alive(pid)
    with pytest.raises(ConnectionRefusedError):
        await node.connect(timeout=2)
    node.kill()  # killing a stopped server is a no-op
    node.stop()  # and so is stopping it
    node.start()
    assert is_up(node)
    assert not any(kit._alive(child) for child in children)
    assert await node.fetchval(f"SELECT x FROM {name}") == 1


async def test_start_without_waiting(fresh_cluster: ClusterFactory) -> None:
    node = fresh_cluster().primary
    node.stop()
    node.start(wait=False)
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        try:
            assert await node.fetchval("SELECT 1") == 1
            break
        except (OSError, asyncpg.CannotConnectNowError):
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
    assert node.is_running


async def test_promote_a_standby(fresh_cluster: ClusterFactory) -> None:
    cluster = fresh_cluster(standbys=1)
    primary, standby = cluster.nodes
    name = table_name()
    await primary.execute(f"CREATE TABLE {name} (x int)")
    await cluster.wait_for_replay()
    primary.stop()
    standby.promote()
    assert await standby.role() == "primary"
    await standby.execute(f"INSERT INTO {name} VALUES (1)")
    assert await standby.fetchval(f"SELECT count(*) FROM {name}") == 1
    # pg_ctl's complaint and the server's log tail both reach the error.
    with pytest.raises(ClusterError) as raised:
        standby.promote()
    message = str(raised.value)
    assert re.match(r"standby1 \(127\.0\.0\.1:\d+\): pg_ctl exited with 1: .*not in standby mode", message)
    assert "\n--- server log ---\n" in message
    assert "database system is ready to accept connections" in message


async def test_cascading_standby(fresh_cluster: ClusterFactory) -> None:
    cluster = fresh_cluster(standbys=1)
    first = cluster.standbys[0]
    second = cluster.add_standby(upstream=first)
    assert second.name == "standby2"
    assert cluster.nodes == [cluster.primary, first, second]
    name = table_name()
    await cluster.primary.execute(f"CREATE TABLE {name} AS SELECT 3 AS x")
    await cluster.wait_for_replay()
    assert await second.fetchval(f"SELECT x FROM {name}") == 3
    assert await second.fetchval("SELECT sender_port FROM pg_stat_wal_receiver") == first.port


# -- lifecycle and errors -----------------------------------------------------------------------------


@kit_only
async def test_context_manager_starts_and_stops() -> None:
    with PostgresCluster(name="ctx") as cluster:
        assert cluster.primary.is_running
        assert repr(cluster) == f"PostgresCluster('ctx', [primary@{cluster.primary.address}])"
        assert cluster in kit._live
        with pytest.raises(ClusterError, match="is already started"):
            cluster.start()
        pid = cluster.primary.pid
    assert pid is not None
    assert not kit._alive(pid)
    assert cluster not in kit._live


@kit_only
def test_an_unstarted_cluster_says_so() -> None:
    cluster = PostgresCluster()
    with pytest.raises(ClusterError, match=r"PostgresCluster\('pg', \[\]\) is not started"):
        _ = cluster.primary
    with pytest.raises(ClusterError, match="is not started"):
        cluster.add_standby()
    node = PostgresNode(
        name="x", port=1, data_dir=pathlib.Path("/nonexistent"), log_path=pathlib.Path("/nonexistent.log"),
        bindir=cluster.bindir, account=cluster.account,
    )  # fmt: skip
    with pytest.raises(ClusterError, match="is not started"):
        cluster.add_standby(upstream=node)
    with pytest.raises(ValueError, match="standbys must be >= 0, got -1"):
        PostgresCluster(standbys=-1)


@kit_only
def test_a_port_taken_before_the_server_binds_it_is_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        ports = iter([taken, taken, free_port()])
        monkeypatch.setattr(kit, "free_port", lambda: next(ports))
        with PostgresCluster(name="race") as cluster:
            assert cluster.primary.port not in {taken, 0}
            assert cluster.primary.log_path.read_text().count("could not bind") == 2


@kit_only
def test_start_gives_up_on_a_port_that_stays_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        monkeypatch.setattr(kit, "free_port", lambda: taken)
        cluster = PostgresCluster(name="taken")
        with pytest.raises(ClusterError, match="could not bind"):
            cluster.start()
    # The half-started cluster cleaned up after itself.
    assert cluster.directory is None
    assert cluster.nodes == []
    assert cluster not in kit._live


@kit_only
def test_the_template_is_made_once_and_again_if_removed(pg_cluster: PostgresCluster) -> None:
    key = (pg_cluster.bindir, pg_cluster.account.uid)
    template = kit._Template._made[key]
    assert (template / "PG_VERSION").is_file()
    assert "# db-retry test kit" in (template / "postgresql.conf").read_text()
    root, _ = kit._kit_root(pg_cluster.account)
    assert kit._Template.get(pg_cluster.bindir, pg_cluster.account, root) == template

    moved = template.with_name(template.name + "-moved")
    template.rename(moved)
    try:
        remade = kit._Template.get(pg_cluster.bindir, pg_cluster.account, root)
        assert remade != template
        assert (remade / "PG_VERSION").is_file()
    finally:
        moved.rename(template)
        kit._Template._made[key] = template
    shutil.rmtree(remade)


@kit_only
def test_clusters_left_running_are_stopped_at_exit(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A private root and registry so the session's own clusters are not touched.
    account = kit._Account.resolve(None)
    root = pathlib.Path(tempfile.mkdtemp(prefix="db-retry-exit-"))
    root.chmod(0o755)
    account.own(root)
    monkeypatch.setattr(kit, "_root", root)
    monkeypatch.setattr(kit, "_live", set())
    reaper = kit._Reaper()
    monkeypatch.setattr(kit, "_reaper", reaper)
    cluster = PostgresCluster(name="forgotten").start()
    assert cluster.directory is not None
    assert cluster.directory.parent == root
    pid = cluster.primary.pid
    assert pid is not None

    with caplog.at_level(logging.WARNING, logger=kit.__name__):
        kit._stop_all_at_exit()

    assert not kit._alive(pid)
    assert not root.exists()
    assert kit._live == set()
    assert reaper.pid is None  # closed, after it found nothing left to do
    assert "stopping PostgresCluster('forgotten'" in caplog.text
    monkeypatch.setattr(kit, "_root", None)  # a program that never started a cluster
    monkeypatch.setattr(kit, "_reaper", None)
    kit._stop_all_at_exit()


@kit_only
def test_interpreter_exit_stops_a_forgotten_cluster() -> None:
    code = textwrap.dedent(
        """
        import json, logging
        from db_retry.testing import PostgresCluster, cluster as kit

        logging.basicConfig()
        cluster = PostgresCluster(standbys=1).start()
        pids = [node.pid for node in cluster.nodes]
        print(json.dumps({"pids": pids, "ports": [node.port for node in cluster.nodes], "root": str(kit._root)}))
        """
    )
    completed = subprocess.run(  # noqa: S603
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout)
    assert len(report["pids"]) == 2
    assert not any(kit._alive(pid) for pid in report["pids"])
    assert all(can_listen(port) for port in report["ports"])
    assert not pathlib.Path(report["root"]).exists()
    assert "left running at exit" in completed.stderr


def wait_until_gone(pids: typing.Iterable[int], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while any(kit._alive(pid) for pid in pids):
        assert time.monotonic() < deadline, f"still alive: {[pid for pid in pids if kit._alive(pid)]}"
        time.sleep(0.05)


@kit_only
def test_a_killed_process_leaves_no_server() -> None:
    """SIGKILL runs no atexit hook: the reaper process stops the servers and removes the kit's directory."""
    code = textwrap.dedent(
        """
        import json, os, signal
        from db_retry.testing import PostgresCluster, cluster as kit

        cluster = PostgresCluster(standbys=1).start()
        pids = [node.pid for node in cluster.nodes]
        report = {"pids": pids, "ports": [node.port for node in cluster.nodes], "root": str(kit._root)}
        print(json.dumps({**report, "reaper": kit._reaper.pid}), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    completed = subprocess.run(  # noqa: S603
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120
    )
    assert completed.returncode == -signal.SIGKILL, completed.stderr
    report = json.loads(completed.stdout)
    assert len(report["pids"]) == 2
    wait_until_gone([*report["pids"], report["reaper"]])
    assert all(can_listen(port) for port in report["ports"])
    assert not pathlib.Path(report["root"]).exists()


async def test_the_reaper_stops_what_it_watches(fresh_cluster: ClusterFactory, tmp_path: pathlib.Path) -> None:
    cluster = fresh_cluster(standbys=1)
    pids = [node.pid for node in cluster.nodes]
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    reaper = kit._Reaper()
    for node in cluster.nodes:
        reaper.watch(node)
    reaper.remove_at_end(scratch)
    reaper_pid = reaper.pid
    assert reaper_pid is not None
    assert pids[0] is not None
    assert all(kit._alive(pid) for pid in pids if pid is not None)

    reaper.close()  # as if this process had ended

    assert reaper.pid is None
    assert not kit._alive(reaper_pid)
    assert not any(kit._alive(pid) for pid in pids if pid is not None)
    assert not scratch.exists()
    assert "immediate shutdown request" in cluster.primary.log_path.read_text()
    reaper.close()  # closing twice is harmless


def test_without_a_reaper_the_kit_still_works(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: pathlib.Path
) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-such-python"))
    with caplog.at_level(logging.WARNING, logger=kit.__name__):
        reaper = kit._Reaper()
    assert reaper.pid is None
    assert "no reaper process" in caplog.text
    reaper.remove_at_end(tmp_path)  # nothing to tell: a no-op
    reaper.close()
    assert tmp_path.exists()


def test_a_reaper_that_died_is_reported_once(caplog: pytest.LogCaptureFixture, tmp_path: pathlib.Path) -> None:
    reaper = kit._Reaper()
    pid = reaper.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_until_gone([pid])
    with caplog.at_level(logging.WARNING, logger=kit.__name__):
        reaper.remove_at_end(tmp_path)
        reaper.remove_at_end(tmp_path)
    assert caplog.text.count("the reaper process is gone") == 1
    assert reaper.pid is None
    assert tmp_path.exists()


# -- accounts -----------------------------------------------------------------------------------------

AS_ACCOUNT = textwrap.dedent(
    """
    import asyncio, json, os, pathlib, pwd, sys

    from db_retry.testing import PostgresCluster

    if os.geteuid() == 0:
        # The interpreter lives under /root, which the account cannot read: import first, then drop root.
        entry = pwd.getpwnam(sys.argv[1])
        os.setgroups([])
        os.setgid(entry.pw_gid)
        os.setuid(entry.pw_uid)
        os.environ["HOME"] = entry.pw_dir

    def uid_of(pid):
        lines = pathlib.Path(f"/proc/{pid}/status").read_text().splitlines()
        return int(next(line for line in lines if line.startswith("Uid:")).split()[1])

    async def exercise(cluster):
        await cluster.primary.execute("CREATE TABLE probe AS SELECT 42 AS x")
        await cluster.wait_for_replay()
        return [await node.role() for node in cluster.nodes], await cluster.standbys[0].fetchval("SELECT x FROM probe")

    with PostgresCluster(standbys=1) as cluster:
        roles, replayed = asyncio.run(exercise(cluster))
        report = {
            "uid": os.getuid(),
            "euid": os.geteuid(),
            "account": [cluster.account.name, cluster.account.uid],
            "pids": [node.pid for node in cluster.nodes],
            "server_uids": [uid_of(node.pid) for node in cluster.nodes],
            "owners": [node.data_dir.stat().st_uid for node in cluster.nodes],
            "roles": roles,
            "replayed": replayed,
        }
    print(json.dumps(report))
    """
)


@kit_only
def test_a_normal_user_runs_a_cluster() -> None:
    """Started by an unprivileged process, the kit runs the servers as that very user."""
    account = os.environ.get(kit.RUN_AS_ENV) or kit.DEFAULT_RUN_AS
    completed = subprocess.run(  # noqa: S603
        [sys.executable, "-c", AS_ACCOUNT, account], capture_output=True, text=True, check=False, timeout=120, cwd="/"
    )
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout)
    uid = report["uid"]
    assert uid != 0
    assert report["euid"] == uid
    if IS_ROOT:
        assert uid == pwd.getpwnam(account).pw_uid
    assert report["account"] == [pwd.getpwuid(uid).pw_name, uid]
    assert report["server_uids"] == [uid, uid]
    assert report["owners"] == [uid, uid]
    assert report["roles"] == ["primary", "standby"]
    assert report["replayed"] == 42
    assert not any(kit._alive(pid) for pid in report["pids"])


def test_root_hands_the_servers_to_the_run_as_account(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.delenv(kit.RUN_AS_ENV, raising=False)
    default = pwd.getpwnam(kit.DEFAULT_RUN_AS)
    assert kit._Account.resolve(None) == kit._Account(uid=default.pw_uid, gid=default.pw_gid, name="postgres")
    nobody = pwd.getpwnam("nobody")
    monkeypatch.setenv(kit.RUN_AS_ENV, "nobody")
    assert kit._Account.resolve(None).uid == nobody.pw_uid
    assert kit._Account.resolve("postgres").uid == default.pw_uid  # the argument wins over the variable


@pytest.mark.parametrize("how", ["argument", "variable"])
def test_a_missing_run_as_account_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    name = "db-retry-no-such-account"
    if how == "variable":
        monkeypatch.setenv(kit.RUN_AS_ENV, name)
    with pytest.raises(ClusterError) as raised:
        kit._Account.resolve(name if how == "argument" else None)
    message = str(raised.value)
    assert f"the account {name!r} does not exist" in message
    assert f"useradd --system --user-group {name}" in message
    assert kit.RUN_AS_ENV in message
    if IS_ROOT:  # the same error from the public constructor
        with pytest.raises(ClusterError, match="does not exist"):
            PostgresCluster(run_as=name)


def test_root_as_the_run_as_account_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.delenv(kit.RUN_AS_ENV, raising=False)
    with pytest.raises(ClusterError, match=r"^run_as='root' is root; PostgreSQL needs an unprivileged account"):
        kit._Account.resolve("root")  # the argument is named, not a variable that was not used
    monkeypatch.setenv(kit.RUN_AS_ENV, "root")
    with pytest.raises(ClusterError, match=r"^DB_RETRY_PG_USER='root' is root; PostgreSQL needs an unprivileged"):
        kit._Account.resolve(None)


def test_a_normal_user_is_its_own_account(monkeypatch: pytest.MonkeyPatch) -> None:
    nobody = pwd.getpwnam("nobody")
    monkeypatch.setattr(os, "geteuid", lambda: nobody.pw_uid)
    monkeypatch.setattr(os, "getegid", lambda: nobody.pw_gid)
    assert kit._Account.resolve("postgres") == kit._Account(uid=nobody.pw_uid, gid=nobody.pw_gid, name="nobody")
    unnamed = 54321  # container platforms run arbitrary uids with no passwd entry
    with pytest.raises(KeyError):
        pwd.getpwuid(unnamed)
    monkeypatch.setattr(os, "geteuid", lambda: unnamed)
    assert kit._Account.resolve(None).name == "54321"


def test_the_current_account_runs_programs_itself(tmp_path: pathlib.Path) -> None:
    me = kit._Account(uid=os.geteuid(), gid=os.getegid(), name="me")
    assert me.is_current
    bindir = find_postgres_bindir()
    assert me.run([bindir / "pg_ctl", "--version"], cwd=tmp_path).startswith("pg_ctl (PostgreSQL)")
    with pytest.raises(ClusterError, match=r"^sh exited with 3: out\nerr$"):
        me.run(["/bin/sh", "-c", "echo out; echo err >&2; exit 3"], cwd=tmp_path)
    target = tmp_path / "owned"
    target.mkdir()
    if IS_ROOT:  # own() must leave the file alone: it would make it root's again
        os.chown(target, pwd.getpwnam("nobody").pw_uid, -1)
    owner = target.stat().st_uid
    me.own(target)
    assert target.stat().st_uid == owner


# -- process helpers ----------------------------------------------------------------------------------


def test_alive_sees_through_zombies() -> None:
    child = subprocess.Popen(["/bin/sh", "-c", "exit 0"])
    try:
        deadline = time.monotonic() + 10
        while kit._alive(child.pid):  # a zombie once it exits, until reaped below
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert pathlib.Path(f"/proc/{child.pid}").exists()
    finally:
        child.wait()
    assert not kit._alive(child.pid)
    assert kit._alive(os.getpid())


def test_wait_gone(tmp_path: pathlib.Path) -> None:
    node = PostgresNode(
        name="n", port=1, data_dir=tmp_path, log_path=tmp_path / "n.log", bindir=tmp_path,
        account=kit._Account(uid=os.geteuid(), gid=os.getegid(), name="me"),
    )  # fmt: skip
    brief = subprocess.Popen(["/bin/sleep", "0.3"])
    try:
        started = time.monotonic()
        node._wait_gone(brief.pid)
        assert time.monotonic() - started >= 0.2
    finally:
        brief.wait()
    lasting = subprocess.Popen(["/bin/sleep", "30"])
    try:
        with pytest.raises(ClusterError, match=f"n: postmaster {lasting.pid} still alive 0.1s after SIGQUIT"):
            node._wait_gone(lasting.pid, timeout=0.1)
    finally:
        lasting.kill()
        lasting.wait()


def test_pid_file_states(tmp_path: pathlib.Path) -> None:
    node = PostgresNode(
        name="n", port=1, data_dir=tmp_path, log_path=tmp_path / "n.log", bindir=tmp_path,
        account=kit._Account(uid=os.geteuid(), gid=os.getegid(), name="me"),
    )  # fmt: skip
    assert node.pid is None
    pid_file = tmp_path / "postmaster.pid"
    pid_file.write_text("")  # created, PID not written yet
    assert node.pid is None
    child = subprocess.Popen(["/bin/sh", "-c", "exit 0"])
    child.wait()
    pid_file.write_text(f"{child.pid}\n{tmp_path}\n")  # left behind by a server that died
    assert node.pid is None
    assert not node.is_running
    pid_file.write_text(f"{os.getpid()}\n")
    assert node.pid == os.getpid()


def test_port_helpers() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert not kit.port_is_free(port)
    assert kit.port_is_free(port)
    assert kit.port_is_free(free_port())


def test_read_from(tmp_path: pathlib.Path) -> None:
    log = tmp_path / "server.log"
    assert kit._read_from(log, 0) == ""
    log.write_bytes(b"old line\nnew \xff line\n")
    assert kit._read_from(log, len(b"old line\n")) == "new \ufffd line\n"


# -- binaries -----------------------------------------------------------------------------------------


@pytest.fixture
def bare_search(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> pathlib.Path:
    """A search with nothing to find: empty PATH, no usual locations, no DB_RETRY_PG_BINDIR. Returns PATH's dir."""
    path_dir = tmp_path / "path"
    path_dir.mkdir()
    monkeypatch.setenv("PATH", str(path_dir))
    monkeypatch.delenv(BINDIR_ENV, raising=False)
    monkeypatch.setattr(_binaries, "_USUAL_PATTERNS", (str(tmp_path / "usual-*" / "bin"),))
    return path_dir


def test_found_here() -> None:
    bindir = find_postgres_bindir()
    for name in SERVER_PROGRAMS:
        assert os.access(bindir / name, os.X_OK)
    version = subprocess.run(  # noqa: S603
        [bindir / "postgres", "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert version.startswith("postgres (PostgreSQL) ")


def test_explicit_choices_come_first(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    chosen = fake_server(tmp_path / "chosen")
    from_env = fake_server(tmp_path / "env")
    monkeypatch.setenv(BINDIR_ENV, str(from_env))
    assert find_postgres_bindir(chosen) == chosen
    assert find_postgres_bindir(str(chosen)) == chosen
    assert find_postgres_bindir() == from_env


def test_an_empty_bindir_variable_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv(BINDIR_ENV, str(empty))
    with pytest.raises(PostgresBinariesNotFoundError) as raised:
        PostgresCluster()
    message = str(raised.value)
    assert message.startswith(f"PostgreSQL server binaries not found (searched: {BINDIR_ENV}={empty}).")
    assert "apt-get install postgresql" in message
    assert raised.value.searched == (f"{BINDIR_ENV}={empty}",)
    # A wrong explicit choice never falls back to another server.
    with pytest.raises(PostgresBinariesNotFoundError, match=re.escape(f"argument={empty}; {BINDIR_ENV}={empty}")):
        find_postgres_bindir(empty)


@pytest.mark.usefixtures("bare_search")
def test_nothing_anywhere_is_a_clear_error(tmp_path: pathlib.Path) -> None:
    with pytest.raises(PostgresBinariesNotFoundError) as raised:
        find_postgres_bindir()
    assert raised.value.searched == (
        "pg_config --bindir (no pg_config on PATH)",
        str(tmp_path / "usual-*" / "bin"),
        "PATH (no postgres on PATH)",
    )
    message = str(raised.value)
    for hint in ("apt-get install postgresql", "dnf install postgresql-server", "brew install", BINDIR_ENV):
        assert hint in message


def test_pg_config_bindir(bare_search: pathlib.Path, tmp_path: pathlib.Path) -> None:
    server = fake_server(tmp_path / "server")
    pg_config = script(bare_search / "pg_config", f"echo {server}")
    assert find_postgres_bindir() == server

    script(pg_config, f"echo {tmp_path / 'client-only'}")  # a client install: pg_config but no server
    with pytest.raises(PostgresBinariesNotFoundError) as raised:
        find_postgres_bindir()
    assert raised.value.searched[0] == f"{pg_config} --bindir ({tmp_path / 'client-only'})"

    script(pg_config, "exit 3")
    with pytest.raises(PostgresBinariesNotFoundError) as raised:
        find_postgres_bindir()
    assert raised.value.searched[0] == f"{pg_config} --bindir (failed)"


@pytest.mark.usefixtures("bare_search")
def test_usual_locations_newest_first(tmp_path: pathlib.Path) -> None:
    fake_server(tmp_path / "usual-9.6" / "bin")
    newest = fake_server(tmp_path / "usual-15" / "bin")
    (tmp_path / "usual-16" / "bin").mkdir(parents=True)  # a newer client-only install is passed over
    fake_server(tmp_path / "usual-17" / "bin", programs=["initdb", "pg_ctl", "postgres"])
    assert find_postgres_bindir() == newest


def test_path_and_symlinks_on_it(bare_search: pathlib.Path, tmp_path: pathlib.Path) -> None:
    server = fake_server(tmp_path / "server")
    link = bare_search / "postgres"
    link.symlink_to(server / "postgres")  # a lone symlink on PATH, as /usr/local/bin/postgres
    assert find_postgres_bindir() == server.resolve()

    link.unlink()
    fake_server(bare_search)
    assert find_postgres_bindir() == bare_search

    for name in SERVER_PROGRAMS:
        (bare_search / name).unlink()
    fake_server(bare_search, programs=["postgres"])  # postgres alone is not a usable server
    with pytest.raises(PostgresBinariesNotFoundError) as raised:
        find_postgres_bindir()
    assert raised.value.searched[-1] == f"PATH ({bare_search / 'postgres'})"


# -- the pytest plugin --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("postgresql://app:s3cret@db:5432/app", "postgresql+asyncpg://app:s3cret@db:5432/app"),
        ("postgres://app@db/app?sslmode=disable", "postgresql+asyncpg://app@db/app?sslmode=disable"),
        ("postgresql+asyncpg://app@db/app", "postgresql+asyncpg://app@db/app"),
        ("postgresql+psycopg://app@db/app", "postgresql+psycopg://app@db/app"),
        (
            "postgresql://app@/app?host=h1:5432&host=h2:5433",
            "postgresql+asyncpg://app@/app?host=h1%3A5432&host=h2%3A5433",
        ),
    ],
)
def test_external_dsn(monkeypatch: pytest.MonkeyPatch, value: str, expected: str) -> None:
    monkeypatch.setenv(DSN_ENV, value)
    assert external_dsn() == expected
    assert sqlalchemy.make_url(external_dsn() or "") == sqlalchemy.make_url(expected)


def test_no_external_dsn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DSN_ENV, raising=False)
    assert external_dsn() is None
    monkeypatch.setenv(DSN_ENV, "")
    assert external_dsn() is None


INNER_INI = "[pytest]\nasyncio_default_fixture_loop_scope = function\n"


def test_plugin_with_an_external_server(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DSN_ENV, "postgresql://app@db.invalid:5432/app")
    pytester.makeini(INNER_INI)
    pytester.makepyfile(
        """
        def test_entry_point(request):
            assert request.config.pluginmanager.get_plugin("db_retry") is not None
            # The topology fixtures come with it, as a plugin of their own the plugin names.
            assert request.config.pluginmanager.get_plugin("db_retry.testing.topology_fixtures") is not None

        def test_dsn(pg_dsn):
            assert pg_dsn == "postgresql+asyncpg://app@db.invalid:5432/app"

        def test_cluster(pg_cluster):
            raise AssertionError("not reached")

        def test_fresh(fresh_cluster):
            raise AssertionError("not reached")
        """
    )
    result = pytester.runpytest("-rs", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, skipped=2)
    assert STANDBY_SKIP_REASON in result.stdout.str()
    assert FRESH_SKIP_REASON in result.stdout.str()


@kit_only
def test_plugin_clusters_and_failure_logs(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DSN_ENV, raising=False)
    pytester.makeini(INNER_INI)
    pytester.makepyfile(
        """
        import json, pathlib

        def record(name, clusters):
            pids = [node.pid for cluster in clusters for node in cluster.nodes]
            pathlib.Path(name + ".json").write_text(json.dumps(pids))

        def test_fresh_fails(fresh_cluster):
            first, second = fresh_cluster(), fresh_cluster()
            record("fresh_fails", [first, second])
            assert (first.name, second.name) == ("fresh1", "fresh2")
            raise AssertionError("boom")

        def test_fresh_passes(fresh_cluster):
            record("fresh_passes", [fresh_cluster()])

        def test_session_fails(pg_cluster, pg_dsn):
            record("session", [pg_cluster])
            assert pg_dsn == pg_cluster.primary.dsn(driver="asyncpg")
            assert [node.name for node in pg_cluster.nodes] == ["primary", "standby1"]
            raise AssertionError("boom")

        def test_plain_fails():
            raise AssertionError("boom")
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=3)
    output = result.stdout.str()
    # Each failed test that used a cluster carries its servers' logs, and only those.
    for title in (
        "server log fresh1/primary",
        "server log fresh2/primary",
        "server log session/primary",
        "server log session/standby1",
    ):
        assert output.count(title) == 1, title
    assert "database system is ready to accept" in output
    failures = output.split("= FAILURES =")[1]
    assert "server log" not in failures.split(" test_plain_fails ")[1]
    # Every server any of them started is gone, failed test or not.
    for name in ("fresh_fails", "fresh_passes", "session"):
        pids = json.loads((pytester.path / f"{name}.json").read_text())
        assert pids
        assert not any(kit._alive(pid) for pid in pids), name


def kit_imports(path: pathlib.Path) -> set[str]:
    """The kit modules ``path`` imports anywhere (top level, functions, ``TYPE_CHECKING`` blocks)."""
    package = pathlib.Path(kit.__file__).parent
    found: set[str] = set()
    for statement in ast.walk(ast.parse(path.read_text())):
        if isinstance(statement, ast.Import):
            names = [alias.name for alias in statement.names]
        elif isinstance(statement, ast.ImportFrom) and statement.module == "db_retry.testing":
            names = [f"db_retry.testing.{alias.name}" for alias in statement.names]
        elif isinstance(statement, ast.ImportFrom) and statement.module is not None:
            names = [statement.module]
        else:
            continue
        prefix = "db_retry.testing."
        found |= {
            name for name in names if name.startswith(prefix) and (package / f"{name.removeprefix(prefix)}.py").exists()
        }
    return found


def test_the_kit_modules_import_no_cycle() -> None:
    package = pathlib.Path(kit.__file__).parent
    graph = {
        f"db_retry.testing.{path.stem}": kit_imports(path) for path in package.glob("*.py") if path.stem != "__init__"
    }
    assert "db_retry.testing.proxy" in graph["db_retry.testing.faults"]  # the walk sees what is there
    assert "db_retry.testing.patroni" in graph["db_retry.testing.haproxy"]  # TYPE_CHECKING imports count too
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, " -> ".join((*path, module))
        if module not in done:
            for imported in sorted(graph[module]):
                visit(imported, (*path, module))
            done.add(module)

    for module in sorted(graph):
        visit(module, ())
