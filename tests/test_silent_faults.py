"""Silent nodes for real: a partition (iptables drops the packets) and a freeze (SIGSTOP), on the kit's servers.

A silent node neither answers nor refuses: a query on an open connection gets nothing back, a new connect
times out (never ``ConnectionRefusedError``), and once the fault ends the same connection gets its answer.
"""

import asyncio
import collections.abc
import functools
import json
import logging
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import asyncpg
import pytest

from db_retry.testing import _binaries, faults
from db_retry.testing import cluster as kit
from db_retry.testing.cluster import ClusterError, ClusterFactory, PostgresNode
from db_retry.testing.pytest_plugin import DSN_ENV, FRESH_SKIP_REASON
from db_retry.testing.silence import RULE_COMMENT_PREFIX, Freeze, Partition, process_state
from db_retry.testing.topology_fixtures import PatroniFactory, PgBouncerFactory


IS_ROOT = os.geteuid() == 0
# The only skip: iptables rules need root. CI runs as root with iptables installed (.ci/run), where a missing
# iptables fails the test with a MissingComponentError naming what to install.
needs_root = pytest.mark.skipif(not IS_ROOT, reason="a network partition needs root (CAP_NET_ADMIN) for iptables")
SILENT = 1.0  # how long a query or a connect is given to show that nothing answers


def kit_rules() -> list[str]:
    """The iptables rules of the kit, this process's or any other's (``iptables -S``)."""
    listed = subprocess.run(  # noqa: S603 - the located iptables
        [_binaries.find_program(_binaries.IPTABLES), "-w", "10", "-S"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return [rule for rule in listed.stdout.splitlines() if f"--comment {RULE_COMMENT_PREFIX}" in rule]


def own_rules() -> list[str]:
    return [rule for rule in kit_rules() if f"--comment {RULE_COMMENT_PREFIX}{os.getpid()}" in rule]


async def assert_silent(node_dsn: str, query: "asyncio.Task[object]") -> None:
    """``query`` (already sent) gets no answer, and a new connection is neither made nor refused."""
    done, _ = await asyncio.wait({query}, timeout=SILENT)
    assert not done, "the silent node answered"
    with pytest.raises(TimeoutError):
        await asyncpg.connect(node_dsn, timeout=SILENT)


def asked(connection: "asyncpg.Connection[asyncpg.Record]", value: int) -> "asyncio.Task[object]":
    return asyncio.create_task(connection.fetchval("SELECT $1::int", value))


async def eventually(condition: collections.abc.Callable[[], collections.abc.Awaitable[bool]]) -> None:
    deadline = time.monotonic() + 60
    while not await condition():
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.05)


# -- partition ----------------------------------------------------------------------------------------
@needs_root
async def test_a_partitioned_node_is_silent_then_answers_on_the_same_connection(fresh_cluster: ClusterFactory) -> None:
    node = fresh_cluster().primary
    connection = await node.connect()
    try:
        async with faults.partition(node) as fault:
            assert "active=True" in repr(fault)
            assert len(own_rules()) == 2  # to and from the port, in the INPUT chain of lo
            assert all("-i lo" in rule and "-j DROP" in rule and str(node.port) in rule for rule in own_rules())
            query = asked(connection, 1)
            await assert_silent(node.dsn(driver=None), query)
            assert not query.done()
        assert own_rules() == []
        assert not fault.active
        # No RST ever came: the connection lived through it, and the query sent meanwhile gets its answer.
        assert await query == 1
        assert await connection.fetchval("SELECT 2") == 2
        assert await node.fetchval("SELECT 3") == 3
    finally:
        connection.terminate()


@needs_root
async def test_rules_already_gone_end_the_partition_with_a_warning(
    fresh_cluster: ClusterFactory, caplog: pytest.LogCaptureFixture
) -> None:
    node = fresh_cluster().primary
    with caplog.at_level(logging.WARNING, logger="db_retry.testing.silence"):
        async with faults.partition(node.port, node) as fault:  # one port, named twice: one pair of rules
            assert len(fault.rules) == 2
            for rule in fault.rules:  # someone flushes the rules behind the kit's back
                await asyncio.to_thread(
                    functools.partial(subprocess.run, [fault.program, "-w", "10", "-D", *rule], check=True)
                )
    assert "does a matching rule exist" in caplog.text
    assert own_rules() == []
    assert await node.fetchval("SELECT 1") == 1


def test_partition_arguments(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    node = PostgresNode(
        name="n",
        port=25432,
        data_dir=tmp_path,
        log_path=tmp_path / "log",
        bindir=tmp_path,
        account=kit._Account.resolve(None),
    )
    with pytest.raises(ValueError, match="at least one node or port"):
        Partition()
    for host in ("192.0.2.1", "::1"):
        node.host = host
        with pytest.raises(ValueError, match=f"IPv4 loopback only .* got host '{host}'"):
            Partition(node)
    for port in (0, 40000):
        with pytest.raises(ValueError, match=f"1 to 32767, got {port}"):
            Partition(port)
    with pytest.raises(ValueError, match="limit must be a number of seconds > 0, got 0"):
        Partition(25432, limit=0)
    # Whoever runs this suite as root cannot be another user on demand: the uid check is what is under test.
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(
        _binaries.NeedsRootError, match=r"needs root \(CAP_NET_ADMIN\) for iptables; running as uid 1000"
    ):
        Partition(25432)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setenv("DB_RETRY_IPTABLES", "/nonexistent/iptables")
    with pytest.raises(_binaries.MissingComponentError, match="apt-get install iptables"):
        Partition(25432)
    monkeypatch.setenv("DB_RETRY_IPTABLES", "/bin/false")
    fault = Partition(25432)
    with pytest.raises(ClusterError, match=r"false -I INPUT .* exited with 1"):
        fault.begin()
    assert not fault.active
    fault.end()  # ending a fault that never began is harmless
    assert "25432" in repr(fault)


# -- freeze -------------------------------------------------------------------------------------------
async def test_a_frozen_node_is_silent_then_answers_on_the_same_connection(fresh_cluster: ClusterFactory) -> None:
    node = fresh_cluster().primary
    connection = await node.connect()
    try:
        async with faults.freeze(node) as fault:
            frozen = list(fault.stopped)
            # The postmaster first, then every child: the connection's backend, checkpointer, WAL writer, ...
            assert frozen[0] == node.pid
            assert connection.get_server_pid() in frozen
            assert len(frozen) > 4
            assert {process_state(pid) for pid in frozen} == {"T"}
            query = asked(connection, 1)
            await assert_silent(node.dsn(driver=None), query)
        assert all(process_state(pid) not in {"T", None} for pid in frozen)
        assert await query == 1
        assert await node.fetchval("SELECT 2") == 2
    finally:
        connection.terminate()


async def test_a_freeze_ends_at_its_limit(fresh_cluster: ClusterFactory, caplog: pytest.LogCaptureFixture) -> None:
    cluster = fresh_cluster()
    node = cluster.primary
    victim = await node.connect()
    backend = victim.get_server_pid()
    with caplog.at_level(logging.WARNING, logger="db_retry.testing.silence"):
        async with faults.freeze(node, limit=0.5) as fault:
            # A process that dies while frozen (SIGKILL needs no SIGCONT) is neither continued nor waited for.
            os.kill(backend, signal.SIGKILL)
            # The block is still running; the limit ended the fault (and the postmaster reset after the kill).
            await eventually(lambda: answers(node))
            assert not fault.active
            assert fault.stopped == {}
    victim.terminate()
    assert process_state(backend) is None  # reaped by the postmaster once it ran again
    assert "after its limit of 0.5s" in caplog.text
    await faults.stop(node)
    with pytest.raises(ClusterError, match="primary runs no process to freeze"):
        Freeze(node)


async def answers(node: PostgresNode) -> bool:
    try:
        return bool(await asyncio.wait_for(node.fetchval("SELECT true"), SILENT))
    except (TimeoutError, OSError, asyncpg.PostgresError):
        return False


async def test_a_frozen_patroni_member_is_a_frozen_vm(patroni_cluster: PatroniFactory) -> None:
    cluster = patroni_cluster(members=2)
    leader = await asyncio.to_thread(cluster.leader)
    replica = next(member for member in cluster.members if member is not leader)
    assert {replica.process.pid, replica.node.pid, leader.node.pid} <= set(cluster.pids())
    async with faults.freeze(replica) as fault:
        assert {replica.process.pid, replica.node.pid} <= set(fault.stopped)  # Patroni and its PostgreSQL
        assert (await asyncio.to_thread(replica.rest, "GET", "/replica", timeout=SILENT))[0] == 0  # no answer
        with pytest.raises(TimeoutError):
            await replica.node.connect(timeout=SILENT)
        assert await asyncio.to_thread(lambda: leader.is_leader)  # the rest of the cluster carries on
    await cluster.wait_streaming()
    assert await asyncio.to_thread(cluster.leader) is leader
    assert (await asyncio.to_thread(replica.rest, "GET", "/replica"))[0] == 200
    async with faults.freeze(replica, patroni=False) as fault:
        assert replica.process.pid not in fault.stopped
        assert replica.node.pid in fault.stopped


async def test_freezing_the_server_behind_pgbouncer_and_pgbouncer_itself(
    fresh_cluster: ClusterFactory, pgbouncer: PgBouncerFactory
) -> None:
    node = fresh_cluster().primary
    bouncer = pgbouncer(node.host, node.port, pool_mode="transaction")
    connection = await asyncpg.connect(bouncer.dsn(driver=None), statement_cache_size=0)
    try:
        assert await connection.fetchval("SELECT 0") == 0
        async with faults.freeze(node):  # the server behind PgBouncer
            query = asked(connection, 1)
            done, _ = await asyncio.wait({query}, timeout=SILENT)
            assert not done
        assert await query == 1
        async with faults.freeze(bouncer) as fault:  # PgBouncer itself
            assert list(fault.stopped) == bouncer.pids()
            query = asked(connection, 2)
            await assert_silent(bouncer.dsn(driver=None), query)
        assert await query == 2
        assert await connection.fetchval("SELECT 3") == 3
    finally:
        connection.terminate()


# -- a process that dies inside the block ----------------------------------------------------------------
@needs_root
@pytest.mark.skipif(bool(os.environ.get(DSN_ENV)), reason=FRESH_SKIP_REASON)  # it starts a cluster of its own
def test_a_killed_process_leaves_no_rule_and_no_stopped_process() -> None:
    """SIGKILL inside both blocks: the reaper continues the frozen server, deletes the rules, stops the server."""
    code = textwrap.dedent(
        """
        import json, os, signal
        from db_retry.testing import PostgresCluster, cluster as kit
        from db_retry.testing.silence import Freeze, Partition

        cluster = PostgresCluster().start()
        node = cluster.primary
        partition = Partition(node).begin()
        frozen = Freeze(node).begin()
        report = {"pids": list(frozen.stopped), "comment": partition.comment, "reaper": kit._reaper.pid}
        print(json.dumps(report), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    completed = subprocess.run(  # noqa: S603
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120
    )
    assert completed.returncode == -signal.SIGKILL, completed.stderr
    report = json.loads(completed.stdout)
    pids = report["pids"]
    assert len(pids) > 4
    deadline = time.monotonic() + 90
    while any(kit._alive(pid) for pid in [*pids, report["reaper"]]):
        # A server left stopped could not be shut down: it would stay, in state T, and fail this.
        assert time.monotonic() < deadline, [(pid, process_state(pid)) for pid in pids]
        time.sleep(0.05)
    assert not [rule for rule in kit_rules() if f"--comment {report['comment']}" in rule]
