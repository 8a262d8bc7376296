"""Commit markers on Patroni: a COMMIT whose answer is lost to a switchover or a leader kill never ends unknown.

One two-member Patroni cluster for the module. The engine reaches it through a multi-host DSN (asyncpg
through ``build_connection_factory``, psycopg through libpq), the leader behind the kit's proxy: the
proxy forwards COMMIT, cuts the answer away and refuses every new connection to the old leader, and at
that moment Patroni switches over (``POST /switchover``) or the leader's postmaster is killed
(``SIGKILL``). The lost COMMIT is then resolved by the member Patroni promotes, reached through the same
DSN: the call returns (the marker is in the surviving history)
or runs again (it is not), and the row is stored exactly once on the new leader. With
``resolve_commit=True`` instead, the same switchover leaves the outcome unknown: another timeline answers.
"""

import asyncio
import collections.abc
import typing
import uuid

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from db_retry import CommitOutcomeUnknownError, build_connection_factory, markers, postgres_retry
from db_retry.testing.patroni import PatroniCluster, PatroniMember
from db_retry.testing.proxy import FrontendMessage, ProxyMode, TcpProxy, query_starts_with
from db_retry.testing.topology_fixtures import skip_if_missing


pytestmark = pytest.mark.standby

DRIVERS: typing.Final = ("asyncpg", "psycopg")
BOUND: typing.Final = 90.0  # seconds: the longest a proof may take (a leader kill promotes in a few seconds)


@pytest.fixture(scope="module")
def patroni() -> collections.abc.Iterator[PatroniCluster]:
    with skip_if_missing():
        cluster = PatroniCluster(members=2)
    with cluster:
        yield cluster


async def _prepared(cluster: PatroniCluster) -> tuple[PatroniMember, PatroniMember]:
    """Both members streaming, the table and the marker table on the leader and replicated; (leader, replica)."""
    await cluster.wait_streaming()
    leader = await asyncio.to_thread(cluster.leader)
    replica = next(member for member in cluster.members if member is not leader)
    await leader.node.execute("CREATE TABLE IF NOT EXISTS paid (key uuid PRIMARY KEY)")
    engine = create_async_engine(leader.node.dsn(driver="asyncpg"))
    try:
        await markers.install(engine)
    finally:
        await engine.dispose()
    async with asyncio.timeout(30):
        while not await replica.node.fetchval(  # noqa: ASYNC110 - the server offers no event to wait on
            "SELECT to_regclass('db_retry.commit_markers') IS NOT NULL"
        ):
            await asyncio.sleep(0.05)
    return leader, replica


def _engine(driver: str, proxy: TcpProxy, replica: PatroniMember) -> AsyncEngine:
    node = replica.node
    hosts = f"host={proxy.host}:{proxy.port}&host={node.host}:{node.port}&target_session_attrs=read-write"
    url = sa.make_url(f"postgresql+{driver}://{node.user}@/{node.database}?{hosts}")
    if driver == "asyncpg":
        return create_async_engine(url, async_creator=build_connection_factory(url, timeout=2), pool_size=3)
    return create_async_engine(url, connect_args={"connect_timeout": 2}, pool_size=3)


async def _lose_commit_to(
    cluster: PatroniCluster, driver: str, fault: str, how: bool | str
) -> tuple[str, int, int, PatroniMember]:
    """One write whose COMMIT answer is cut while ``fault`` strikes; (outcome, runs, rows on the new leader, leader)."""
    leader, replica = await _prepared(cluster)
    key = uuid.uuid4()
    runs = 0
    async with TcpProxy(leader.node.host, leader.node.port) as proxy:
        engine = _engine(driver, proxy, replica)
        tasks: list[asyncio.Task[object]] = []
        is_commit = query_starts_with("COMMIT")

        def strike(message: FrontendMessage) -> bool:
            if not is_commit(message):
                return False
            fault_of = cluster.switchover if fault == "switchover" else cluster.failover
            tasks.append(asyncio.get_running_loop().create_task(fault_of()))
            # From now on the old leader is out of reach for new connections: whatever answers the lost
            # COMMIT's question is the member Patroni promotes.
            proxy._mode = ProxyMode.CUT
            return True

        @postgres_retry(resolve_commit=how)  # type: ignore[arg-type]
        async def pay() -> None:
            nonlocal runs
            runs += 1
            async with engine.begin() as connection:
                await connection.execute(sa.text("INSERT INTO paid VALUES (:key)"), {"key": key})
                if runs == 1:
                    proxy.cut_after(strike)

        try:
            async with asyncio.timeout(BOUND):
                try:
                    await pay()
                except CommitOutcomeUnknownError as exc:
                    outcome = "unknown: " + "; ".join(getattr(exc, "__notes__", []))
                else:
                    outcome = "ok"
                await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await engine.dispose()
    new_leader = await asyncio.to_thread(cluster.leader)
    stored = int(await new_leader.node.fetchval("SELECT count(*) FROM paid WHERE key = $1", key))
    return outcome, runs, stored, new_leader


@pytest.mark.parametrize("fault", ["switchover", "leader killed"])
@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_commit_lost_to_a_patroni_failover_is_resolved_by_its_marker(
    patroni: PatroniCluster, driver: str, fault: str
) -> None:
    old = await asyncio.to_thread(patroni.leader)
    outcome, runs, stored, new = await _lose_commit_to(patroni, driver, fault, "marker")
    print(f"{driver}, {fault}: {outcome} after {runs} run(s); leader {old.name} -> {new.name}")  # noqa: T201
    assert new is not old
    assert outcome == "ok"
    assert stored == 1  # on the new leader, exactly once: resolved as committed (1 run) or run again (2)
    assert runs in {1, 2}


async def test_by_transaction_id_the_same_switchover_is_an_unknown_outcome(patroni: PatroniCluster) -> None:
    outcome, runs, stored, _ = await _lose_commit_to(patroni, "asyncpg", "switchover", True)
    assert outcome.startswith("unknown"), outcome
    assert (runs, stored) == (1, 1)  # a switchover ships every commit: it was there all along
