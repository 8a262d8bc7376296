"""Faults on demand for a :class:`~db_retry.testing.cluster.PostgresCluster`, each one bounded in time.

Process faults (restart, crash, failover, rebuild) run ``pg_ctl`` in a worker thread, so a
:class:`~db_retry.testing.proxy.TcpProxy` on the same event loop keeps working meanwhile. The context
managers make a real server answer with one SQLSTATE for as long as the block lasts:

=========  ================================================  =====================================
SQLSTATE   what the client sees                              helper
=========  ================================================  =====================================
``57P01``  ``AdminShutdownError`` on a running query         :func:`terminate_backends`, :func:`restart`
``57P02``  a warning, then the connection drops (``08003``)  :func:`kill_backend`
``57P03``  ``CannotConnectNowError`` on connect              :func:`cannot_connect_now`
``53300``  ``TooManyConnectionsError`` on connect            :func:`limited_role`, :func:`exhaust_connections`
``25006``  ``ReadOnlySQLTransactionError`` on a write        :func:`read_only` (or any standby)
refused    ``ConnectionRefusedError`` on connect             :func:`crash`, :func:`stop`
silence    no answer: a query, a connect time out            :func:`partition`, :func:`freeze`
=========  ================================================  =====================================

Silence comes in three kinds, all real: :meth:`TcpProxy.hang() <db_retry.testing.proxy.TcpProxy.hang>`
(a proxy stops forwarding; the TCP handshake with the proxy still succeeds), :func:`partition` (iptables
drops every packet to and from a node's loopback port: no SYN-ACK, no acknowledgement; root only) and
:func:`freeze` (``SIGSTOP`` of a node's processes: the kernel still completes handshakes, nothing
answers). See :mod:`db_retry.testing.silence`.
"""

import asyncio
import collections.abc
import contextlib
import logging
import os
import secrets
import shutil
import signal
import typing

import asyncpg

from db_retry.testing.cluster import SUPERUSER, ClusterError, PostgresCluster, PostgresNode, StopMode
from db_retry.testing.proxy import TcpProxy
from db_retry.testing.silence import DEFAULT_LIMIT, Freeze, FreezeTarget, Partition, PartitionTarget


__all__ = [
    "cannot_connect_now",
    "crash",
    "exhaust_connections",
    "failover",
    "freeze",
    "kill_backend",
    "limited_role",
    "partition",
    "read_only",
    "rebuild_as_standby",
    "replication_link",
    "restart",
    "set_read_only",
    "start",
    "stop",
    "terminate_backends",
    "wait_accepting",
]

logger = logging.getLogger(__name__)

# What a connect attempt may meet while a server stops, crash-restarts or recovers.
_NOT_READY: typing.Final = (
    OSError,
    TimeoutError,
    asyncpg.CannotConnectNowError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
)
_POLL: typing.Final = 0.02


# -- process faults -------------------------------------------------------------
async def start(node: PostgresNode) -> None:
    """Start ``node`` and wait until it accepts connections."""
    await asyncio.to_thread(node.start)


async def stop(node: PostgresNode, mode: StopMode = "fast") -> None:
    """Stop ``node``; new connections are then refused (``ConnectionRefusedError``)."""
    await asyncio.to_thread(node.stop, mode)


async def restart(node: PostgresNode, mode: StopMode = "fast") -> None:
    """Stop ``node`` with ``mode`` and start it again on the same port.

    ``fast`` ends running queries with ``57P01``; ``immediate`` is a crash: sessions get a ``57P01``
    warning and lose the connection, and the server replays WAL before it accepts connections again.
    """
    await asyncio.to_thread(node.restart, mode)


async def crash(node: PostgresNode) -> None:
    """Stop ``node`` as a crash would (immediate shutdown); start it again with :func:`start`."""
    await stop(node, "immediate")


async def terminate_backends(
    node: PostgresNode,
    *,
    database: str | None = None,
    application_name: str | None = None,
    pids: collections.abc.Iterable[int] | None = None,
    timeout: float = 10.0,
) -> int:
    """End client sessions on ``node`` with ``pg_terminate_backend``; return how many ended.

    Only client backends match (never WAL senders or background workers), optionally narrowed to a
    database, an application name or a set of PIDs; the helper's own session is never one of them. A
    running query fails with ``57P01``. Waits up to ``timeout`` for each session to exit (PostgreSQL 14+).
    """
    connection = await node.connect()
    try:
        ended: int = await connection.fetchval(
            """
            SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, $4))
            FROM pg_stat_activity
            WHERE backend_type = 'client backend'
              AND pid <> pg_backend_pid()
              AND ($1::text IS NULL OR datname = $1)
              AND ($2::text IS NULL OR application_name = $2)
              AND ($3::int[] IS NULL OR pid = ANY($3))
            """,
            database,
            application_name,
            None if pids is None else list(pids),
            int(timeout * 1000),
        )
    finally:
        await connection.close()
    return ended


def _timed_out(node: PostgresNode, what: str, timeout: float) -> ClusterError:
    return ClusterError(f"{node.name} ({node.address}) {what} after {timeout}s\n--- server log ---\n{node.log_tail()}")


# The waits below poll inline, in the frame that catches the driver's error: a coroutine that catches an
# exception and returns to its caller makes coverage.py (7.x, CPython 3.11) lose the caller's next lines.
async def wait_accepting(node: PostgresNode, *, timeout: float = 30.0) -> None:
    """Wait until ``node`` accepts connections; raise :class:`ClusterError` after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            connection = await node.connect(timeout=min(timeout, 5.0))
        except _NOT_READY as exc:
            if loop.time() >= deadline:
                raise _timed_out(node, "is not accepting connections", timeout) from exc
            await asyncio.sleep(_POLL)
        else:
            await connection.close()
            return


async def kill_backend(node: PostgresNode, pid: int | None = None, *, timeout: float = 30.0) -> None:
    """Kill one backend of ``node`` with ``SIGKILL`` (``pid``, or a throwaway session of the helper's own).

    The postmaster then assumes shared memory is corrupt: every other session gets a ``57P02`` warning
    ("terminating connection because of crash of another server process") and loses its connection,
    and the server restarts through crash recovery, answering ``57P03`` meanwhile. Returns once it
    accepts connections again.
    """
    sentinel = await node.connect()
    victim: asyncpg.Connection[asyncpg.Record] | None = None
    try:
        if pid is None:
            victim = await node.connect()
            pid = victim.get_server_pid()
        elif not await sentinel.fetchval(
            "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE pid = $1 AND backend_type = 'client backend')", pid
        ):
            msg = f"{pid} is not a client backend of {node.name} ({node.address})"
            raise ValueError(msg)
        # The sentinel's own session ends when the postmaster resets: that is when the crash has happened.
        waiting = asyncio.create_task(sentinel.execute(f"SELECT pg_sleep({float(timeout)})"))
        os.kill(pid, signal.SIGKILL)
        try:
            await waiting
        except _NOT_READY:
            logger.debug("%s: backend %s killed, the server resets", node.name, pid)
        else:  # pragma: no cover - PostgreSQL ends every session once a backend dies of SIGKILL
            msg = f"{node.name}: killing backend {pid} did not reset the server within {timeout}s"
            raise ClusterError(msg)
    finally:
        sentinel.terminate()
        if victim is not None:
            victim.terminate()
    await wait_accepting(node, timeout=timeout)


async def failover(
    cluster: PostgresCluster, *, standby: PostgresNode | None = None, mode: StopMode = "fast"
) -> PostgresNode:
    """Stop the primary with ``mode``, promote ``standby`` (default: the first running one), and return it.

    ``cluster.nodes`` is reordered: the new primary first, the other standbys next (now streaming from
    the new primary), the stopped old primary last, until :func:`rebuild_as_standby` brings it back.
    Every node keeps its port. A ``fast`` stop first ships all WAL to the standbys, so no committed
    transaction is lost; ``immediate`` is a crash and may lose the last ones, as asynchronous
    replication does.
    """
    old = cluster.primary
    if standby is None:
        running = [node for node in cluster.standbys if node.is_running]
        if not running:
            msg = f"{cluster!r} has no running standby to promote"
            raise ClusterError(msg)
        standby = running[0]
    elif standby is old or standby not in cluster.nodes:
        msg = f"{standby.name} is not a standby of {cluster!r}"
        raise ValueError(msg)
    await stop(old, mode)
    await asyncio.to_thread(standby.promote)
    others = [node for node in cluster.nodes if node is not standby and node is not old]
    cluster.nodes[:] = [standby, *others, old]
    for node in others:
        if node.is_running:
            await _follow(node, standby)
    return standby


async def _follow(node: PostgresNode, upstream: PostgresNode) -> None:
    """Point the standby ``node`` at ``upstream``; it follows the new timeline by itself."""
    await _set_primary_conninfo(
        node, f"host={upstream.host} port={upstream.port} user={SUPERUSER} application_name={node.name}"
    )


async def _set_primary_conninfo(node: PostgresNode, conninfo: str) -> None:
    """Set the standby ``node``'s ``primary_conninfo``; the reload restarts its WAL receiver."""
    connection = await node.connect()
    try:
        statement = await connection.fetchval(
            "SELECT format('ALTER SYSTEM SET primary_conninfo = %L', $1::text)", conninfo
        )
        await connection.execute(statement)
        await connection.execute("SELECT pg_reload_conf()")
    finally:
        await connection.close()


@contextlib.asynccontextmanager
async def replication_link(
    cluster: PostgresCluster, standby: PostgresNode, *, timeout: float = 30.0
) -> collections.abc.AsyncIterator[TcpProxy]:
    """Inside the block ``standby`` streams WAL from the primary through a :class:`TcpProxy`; yields the proxy.

    The network between a standby and its primary, to break for real: ``link.cut()`` resets the WAL
    receiver's connection and every reconnect (``pg_stat_wal_receiver`` empties, nothing more is
    received), ``link.hang()`` stops the bytes while the receiver still reports ``streaming`` (until
    ``wal_receiver_timeout``), ``link.pass_through()`` lets it reconnect or resume by itself. Enters
    once the standby streams through the proxy; on exit its own ``primary_conninfo`` is restored.
    """
    original: str = await standby.fetchval("SELECT current_setting('primary_conninfo')")
    primary = cluster.primary
    async with TcpProxy(primary.host, primary.port, name=f"{standby.name}-replication") as link:
        conninfo = f"host={link.host} port={link.port} user={SUPERUSER} application_name={standby.name}"
        try:
            await _set_primary_conninfo(standby, conninfo)
            await _wait_streaming_from(standby, link.port, timeout=timeout)
            yield link
        finally:
            link.pass_through()
            await _set_primary_conninfo(standby, original)


async def _wait_streaming_from(node: PostgresNode, port: int, *, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    query = "SELECT EXISTS (SELECT FROM pg_stat_wal_receiver WHERE status = 'streaming' AND sender_port = $1)"
    while not await node.fetchval(query, port):
        if loop.time() >= deadline:
            raise _timed_out(node, f"does not stream WAL through port {port}", timeout)
        await asyncio.sleep(_POLL)


async def rebuild_as_standby(cluster: PostgresCluster, node: PostgresNode) -> PostgresNode:
    """Make ``node`` (e.g. the old primary after :func:`failover`) a fresh standby of the current primary.

    Its data directory is cloned again from the primary with ``pg_basebackup``, and it starts on its old
    port, so DSNs naming it keep working. Fails with :class:`ClusterError` if something else took that port.
    """
    if node is cluster.primary or node not in cluster.nodes:
        msg = f"{node.name} is not a standby or retired node of {cluster!r}"
        raise ValueError(msg)
    primary = cluster.primary
    await stop(node, "fast")
    await asyncio.to_thread(_reclone, cluster, node, primary)
    await start(node)
    return node


def _reclone(cluster: PostgresCluster, node: PostgresNode, primary: PostgresNode) -> None:
    shutil.rmtree(node.data_dir)
    cluster.clone(primary, node.data_dir)
    with (node.data_dir / "postgresql.conf").open("a") as conf:
        conf.write(f"port = {node.port}\n")


# -- servers that answer with one SQLSTATE ----------------------------------------
@contextlib.asynccontextmanager
async def cannot_connect_now(node: PostgresNode, *, timeout: float = 30.0) -> collections.abc.AsyncIterator[None]:
    """Inside the block new connections to ``node`` fail with ``57P03`` ("the database system is shutting down").

    A smart shutdown waits for open sessions to end, refusing new ones meanwhile; the helper keeps one
    session open to hold it there. Sessions opened before the block keep working. On exit the server is
    stopped (``fast``: those sessions end with ``57P01``) and started again on the same port.
    """
    held = await node.connect()
    try:
        await asyncio.to_thread(_smart_shutdown_request, node)
        await _wait_refusing(node, timeout=timeout)
        yield
    finally:
        await stop(node, "fast")  # while the held session is open, so the shutdown cannot finish first
        held.terminate()
        await start(node)


def _smart_shutdown_request(node: PostgresNode) -> None:
    node.account.run(
        [node.bindir / "pg_ctl", "-D", node.data_dir, "-m", "smart", "--no-wait", "stop"], cwd=node.data_dir.parent
    )


async def _wait_refusing(node: PostgresNode, *, timeout: float) -> None:
    """Wait until ``node`` answers a new connection with ``57P03`` (a signal takes effect asynchronously)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            connection = await node.connect()
        except asyncpg.CannotConnectNowError:
            return
        await connection.close()
        if loop.time() >= deadline:
            raise _timed_out(node, "still accepts connections after a smart shutdown request", timeout)
        await asyncio.sleep(_POLL)


@contextlib.asynccontextmanager
async def limited_role(node: PostgresNode, *, limit: int = 1) -> collections.abc.AsyncIterator[str]:
    """A login role with ``CONNECTION LIMIT limit``; yields its name.

    Its connection beyond ``limit`` fails with ``53300`` ("too many connections for role"). The role may
    read and write every table. On exit its sessions are terminated and it is dropped. Superusers are
    exempt from such limits, hence a role of its own: connect with ``user=<name>``.
    """
    if limit < 0:
        msg = f"limit must be >= 0, got {limit}"
        raise ValueError(msg)
    name = f"db_retry_limited_{secrets.token_hex(4)}"
    await node.execute(f"CREATE ROLE {name} LOGIN CONNECTION LIMIT {limit}")
    try:
        await node.execute(f"GRANT pg_read_all_data, pg_write_all_data TO {name}")
        yield name
    finally:
        connection = await node.connect()
        try:
            await connection.execute(
                "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity WHERE usename = $1", name
            )
            await connection.execute(f"DROP ROLE {name}")
        finally:
            await connection.close()


@contextlib.asynccontextmanager
async def exhaust_connections(node: PostgresNode, *, limit: int = 1000) -> collections.abc.AsyncIterator[int]:
    """Hold every free connection slot of ``node``; yields how many the helper holds.

    Inside the block any new connection, a superuser's too, fails with ``53300`` ("sorry, too many
    clients already"). At most ``limit`` connections are opened (a guard against a huge
    ``max_connections``); on exit they are all closed.
    """
    held: list[asyncpg.Connection[asyncpg.Record]] = []
    try:
        while True:
            try:
                connection = await node.connect()
            except asyncpg.TooManyConnectionsError:
                break
            held.append(connection)
            if len(held) >= limit:
                msg = f"{node.name} still accepts connections after {limit}; raise limit or lower max_connections"
                raise ClusterError(msg)
        yield len(held)
    finally:
        await asyncio.gather(*(connection.close() for connection in held))


@contextlib.asynccontextmanager
async def read_only(node: PostgresNode, *, timeout: float = 30.0) -> collections.abc.AsyncIterator[None]:
    """Inside the block ``node`` acts as a demoted primary: writes fail with ``25006``.

    Sets ``default_transaction_read_only`` (``ALTER SYSTEM`` and a reload), so new sessions report
    ``transaction_read_only = on`` (a ``read-write`` target rejects the node) and open sessions follow
    at their next statement. Reset on exit.
    """
    await _set_read_only(node, value=True, timeout=timeout)
    try:
        yield
    finally:
        await _set_read_only(node, value=False, timeout=timeout)


async def set_read_only(node: PostgresNode, *, value: bool = True, timeout: float = 30.0) -> None:
    """Make ``node`` refuse writes (``25006``) from now on, open sessions too; ``value=False`` undoes it.

    What :func:`read_only` does for a block, for a node that is stopped or rebuilt while read-only.
    """
    await _set_read_only(node, value=value, timeout=timeout)


async def _set_read_only(node: PostgresNode, *, value: bool, timeout: float) -> None:
    settings = {"default_transaction_read_only": "off"}  # so that the helper itself may run ALTER SYSTEM
    connection = await node.connect(server_settings=settings)
    try:
        if value:
            await connection.execute("ALTER SYSTEM SET default_transaction_read_only = on")
        else:
            await connection.execute("ALTER SYSTEM RESET default_transaction_read_only")
        await connection.execute("SELECT pg_reload_conf()")
    finally:
        await connection.close()
    # The postmaster rereads its configuration asynchronously: wait until a new session sees the value.
    await _wait_for_setting(node, "default_transaction_read_only", "on" if value else "off", timeout=timeout)


async def _wait_for_setting(node: PostgresNode, name: str, value: str, *, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while await node.fetchval("SELECT current_setting($1)", name) != value:
        if loop.time() >= deadline:
            raise _timed_out(node, f"has not set {name}={value}", timeout)
        await asyncio.sleep(_POLL)


# -- silent nodes -------------------------------------------------------------------
@contextlib.asynccontextmanager
async def partition(
    *targets: PartitionTarget, limit: float = DEFAULT_LIMIT
) -> collections.abc.AsyncIterator[Partition]:
    """Inside the block packets to and from the loopback ports of ``targets`` are dropped: the nodes fall silent.

    A target is a :class:`PostgresNode` (or anything with a loopback ``host`` and ``port``: a PgBouncer, a
    :class:`TcpProxy`) or a port on 127.0.0.1. A query on an established connection gets no answer and no
    error (the client's TCP retransmits until the block ends, then the answer comes); a new connect times out
    rather than being refused. Rules are iptables ``DROP`` rules in ``INPUT`` on ``lo`` with the comment
    ``db-retry-kit-<pid>``, deleted on exit, after ``limit`` seconds at most, or by the kit's reaper if the
    process dies. Needs root: raises :class:`~db_retry.testing._binaries.NeedsRootError` otherwise, and
    :class:`~db_retry.testing._binaries.MissingComponentError` without iptables.
    """
    fault = Partition(*targets, limit=limit)
    await asyncio.to_thread(fault.begin)
    try:
        yield fault
    finally:
        await asyncio.to_thread(fault.end)


@contextlib.asynccontextmanager
async def freeze(
    target: FreezeTarget, *, patroni: bool = True, limit: float = DEFAULT_LIMIT
) -> collections.abc.AsyncIterator[Freeze]:
    """Inside the block ``target``'s processes and all their descendants are stopped (``SIGSTOP``), as a frozen VM.

    ``target`` is a :class:`PostgresNode` (its postmaster and every child), a Patroni member (its Patroni
    and its PostgreSQL; ``patroni=False``: its PostgreSQL only) or a kit service (PgBouncer, HAProxy). The
    kernel still accepts TCP connections on a frozen server's port, but nothing answers: queries and
    connects time out. On exit, after ``limit`` seconds at most, or by the kit's reaper if the process dies,
    every process is continued (``SIGCONT``) and the server answers again; the fault waits until each is
    stopped on entry and running on exit. Needs no privilege beyond signalling the kit's own processes.
    """
    fault = Freeze(target, patroni=patroni, limit=limit)
    await asyncio.to_thread(fault.begin)
    try:
        yield fault
    finally:
        await asyncio.to_thread(fault.end)
