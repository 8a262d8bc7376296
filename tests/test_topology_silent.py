"""A Patroni leader frozen whole (Patroni and PostgreSQL, as a frozen VM) mid-write: the call ends on the new leader.

With the library's defaults: keepalives, ``TCP_USER_TIMEOUT`` and the watchdog find the frozen leader's
sockets silent; the retry waits for a writable server; Patroni promotes the replica once the frozen
leader's key expires (about its TTL, 20 s, the lowest Patroni accepts). One Patroni cluster carries the
module: the old leader rejoins as a replica when its freeze ends, and the next proof freezes the other.

- through a multi-host DSN over the members (asyncpg through ``build_connection_factory``, psycopg
  through libpq's own multi-host connect with ``target_session_attrs=read-write``);
- through HAProxy's primary listener, with ``on-marked-down shutdown-sessions`` (HAProxy cuts the
  frozen server's sessions once its check of Patroni's REST API fails) and without it (the sessions
  stay open: the watchdog's probe, which goes through HAProxy, is what finds them silent).

Each proof also issues a second write right after the promotion, while the old leader is still frozen:
it ends on the new leader, so no call waits for the freeze to end. Figures go to the captured output.
"""

import asyncio
import collections.abc
import contextlib
import dataclasses
import logging
import typing
import uuid

import pytest
import sqlalchemy as sa
import tenacity
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from db_retry import build_connection_factory, postgres_retry
from db_retry.liveness import probe
from db_retry.testing import faults
from db_retry.testing.patroni import PatroniCluster, PatroniMember
from db_retry.testing.topology_fixtures import HAProxyFactory, skip_if_missing


pytestmark = pytest.mark.standby

POOL_SIZE: typing.Final = 3
# Longer than any call of a proof (the promotion takes about Patroni's TTL): the freeze ends after them.
FREEZE_LIMIT: typing.Final = 90.0
SAFETY_NET: typing.Final = 75.0  # seconds; without the defences a call waits for as long as TCP lets it


@pytest.fixture(scope="module")
def patroni() -> collections.abc.Iterator[PatroniCluster]:
    """One two-member Patroni cluster for the module (each proof ends with both members streaming again)."""
    with skip_if_missing():
        cluster = PatroniCluster(members=2)
    with cluster:
        yield cluster


@contextlib.asynccontextmanager
async def _engine(asyncpg_url: str, psycopg_url: str, driver: str) -> collections.abc.AsyncIterator[AsyncEngine]:
    """A warm default QueuePool engine, as a service builds it (asyncpg through the connection factory)."""
    if driver == "asyncpg":
        url = sa.make_url(asyncpg_url)
        engine = create_async_engine(url, async_creator=build_connection_factory(url, timeout=2), pool_size=POOL_SIZE)
    else:
        engine = create_async_engine(psycopg_url, connect_args={"connect_timeout": 2}, pool_size=POOL_SIZE)
    try:
        barrier = asyncio.Barrier(POOL_SIZE)

        async def hold() -> None:
            async with engine.connect() as connection:
                await connection.execute(sa.text("SELECT 1"))
                await barrier.wait()

        await asyncio.gather(*(hold() for _ in range(POOL_SIZE)))
        yield engine
    finally:
        await engine.dispose()


@dataclasses.dataclass
class Call:
    """One ``@postgres_retry`` write: where it ended (the server's port), when (loop time), or how it failed."""

    key: uuid.UUID = dataclasses.field(default_factory=uuid.uuid4)
    port: int | None = None
    ended: float | None = None
    error: Exception | None = None
    runs: int = 0


class GaveUpBeforePromotionError(Exception):
    """A mid-statement call with the default settings gave up before Patroni promoted the replica (see below)."""


# Found by these proofs: with the former default DB_RETRY_OUTAGE_TIMEOUT (15 s, counted from the call's first
# failure) the call gave up before Patroni promoted anyone (a silent leader is replaced once its key expires:
# its TTL, 20 s here, 30 s by Patroni's default). The default is 40 s now: the proofs hold with the defaults.


def _writer(
    engine: AsyncEngine, table: str, *, marker: str | None, patient: bool = False
) -> collections.abc.Callable[[Call], collections.abc.Awaitable[None]]:
    """A retried write; with ``marker``, its first run then sleeps on the server, tagged with it (a victim).

    ``patient``: retried for as long as the proof lasts (``stop=``) instead of the default budget, to see the
    rest of the chain (detection, reconnection to the new leader, exactly once) whatever that budget does.
    """
    retry = postgres_retry(stop=tenacity.stop_after_delay(SAFETY_NET)) if patient else postgres_retry

    @retry
    async def write(call: Call) -> None:
        call.runs += 1
        async with engine.begin() as connection:
            port = (await connection.execute(sa.text("SELECT inet_server_port()"))).scalar_one()
            await connection.execute(
                sa.text(f"INSERT INTO {table} VALUES (:key, :port)"), {"key": call.key, "port": port}
            )
            if marker is not None and call.runs == 1:
                await connection.execute(sa.text(f"SELECT pg_sleep(20) /* {marker} */"))  # the freeze strikes here
        call.port = int(port)

    async def timed(call: Call) -> None:
        try:
            await write(call)
        except Exception as exc:  # reported and asserted on once every call has ended
            call.error = exc
        finally:
            call.ended = asyncio.get_running_loop().time()

    return timed


@dataclasses.dataclass
class Failover:
    """What one frozen leader took: who led before and after, when the freeze began, when the successor took writes."""

    old: PatroniMember
    new: PatroniMember
    frozen_at: float
    promoted_at: float
    calls: dict[tuple[str, str], Call]  # (engine, kind of call) -> the call
    frozen_throughout: bool  # the freeze was still on when every call had ended


async def _accepts_writes(member: PatroniMember) -> bool:
    return not await member.node.fetchval("SELECT pg_is_in_recovery()")


async def _until(condition: collections.abc.Callable[[], collections.abc.Awaitable[bool]], poll: float = 0.05) -> None:
    """Poll ``condition`` until it holds (the caller's ``asyncio.timeout`` bounds the wait)."""
    while True:
        if await condition():
            return
        await asyncio.sleep(poll)


async def _freeze_leader_mid_write(
    cluster: PatroniCluster,
    engines: dict[str, AsyncEngine],
    table: str,
    *,
    during: collections.abc.Callable[[], collections.abc.Awaitable[None]] | None = None,
) -> Failover:
    """Freeze the leader (Patroni and PostgreSQL) while writes sleep on it; once the replica is promoted, write again.

    Per engine: a victim with the default settings, a patient victim, and a write issued right after the
    promotion. ``during``: run inside the freeze before the promotion (observations of the fault).
    """
    loop = asyncio.get_running_loop()
    old = await asyncio.to_thread(cluster.leader)
    new = next(member for member in cluster.members if member is not old)
    calls: dict[tuple[str, str], Call] = {}
    victims: list[asyncio.Future[None]] = []
    markers: list[str] = []
    for label, engine in engines.items():
        for kind, patient in (("defaults", False), ("patient", True)):
            markers.append(marker := f"frozen-victim-{uuid.uuid4().hex}")
            call = calls[label, f"mid-statement, {kind}"] = Call()
            victims.append(asyncio.ensure_future(_writer(engine, table, marker=marker, patient=patient)(call)))
    monitor = await old.node.connect()
    try:
        async with asyncio.timeout(SAFETY_NET):
            patterns = [f"%{marker}%" for marker in markers]

            async def sleeping() -> bool:
                active = await monitor.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE ANY($1::text[])",
                    patterns,
                )
                return bool(active == len(markers))

            await _until(sleeping, 0.02)  # every victim's statement runs on the leader
            async with faults.freeze(old, limit=FREEZE_LIMIT) as freeze:
                frozen_at = loop.time()
                if during is not None:
                    await during()
                await _until(lambda: _accepts_writes(new))
                promoted_at = loop.time()
                after = {label: Call() for label in engines}
                calls.update({(label, "after promotion"): call for label, call in after.items()})
                await asyncio.gather(
                    *(_writer(engines[label], table, marker=None)(call) for label, call in after.items())
                )
                await asyncio.gather(*victims)
                frozen_throughout = freeze.active
    finally:
        # Only now: a backend exiting as the freeze strikes stays a zombie under its stopped postmaster, and the
        # kit's freeze then waits for it to stop, in vain.
        monitor.terminate()
        for task in victims:
            task.cancel()
        await asyncio.gather(*victims, return_exceptions=True)
    return Failover(old, new, frozen_at, promoted_at, calls, frozen_throughout)


async def _assert_ended_on_the_new_leader(failover: Failover, table: str, title: str) -> None:
    """Report the figures; assert every call ended on the new leader, stored once, while the old one was frozen."""
    promotion = failover.promoted_at - failover.frozen_at
    lines = [f"{title}: {failover.old.name} frozen, {failover.new.name} promoted {promotion:.2f} s into the freeze"]
    for (label, kind), call in failover.calls.items():
        outcome = "ok" if call.error is None else f"{type(call.error).__name__}: {str(call.error)[:160]}"
        ended = "-" if call.ended is None else f"{call.ended - failover.promoted_at:+.2f} s"
        lines.append(f"  {label:<24} {kind:<28} {ended:>9}  {call.runs:>3} runs  {outcome}")
    print("\n".join(lines))  # noqa: T201 - the figures the proof reports (pytest -s, or the output of a failure)
    assert failover.frozen_throughout  # no call waited for the freeze to end
    gave_up = []
    for (label, kind), call in failover.calls.items():
        stored = await failover.new.node.fetchval(f"SELECT count(*) FROM {table} WHERE key = $1", call.key)
        if kind == "mid-statement, defaults" and call.error is not None:
            assert stored == 0  # a call that failed wrote nothing
            assert call.ended is not None
            assert call.ended < failover.promoted_at  # it gave up before there was a leader to write to
            gave_up.append(f"{label}: {call.error!r}")
            continue
        assert call.error is None, f"{label}, {kind}: {call.error!r}"
        assert call.port == failover.new.node.port
        assert stored == 1
    if gave_up:
        raise GaveUpBeforePromotionError("; ".join(gave_up))


async def _prepare(cluster: PatroniCluster, table: str) -> None:
    """Both members streaming (after an earlier proof's freeze), and the table replicated to the replica."""
    await cluster.wait_streaming()
    leader = await asyncio.to_thread(cluster.leader)
    await leader.node.execute(f"CREATE TABLE {table} (key uuid PRIMARY KEY, port int NOT NULL)")
    async with asyncio.timeout(60):  # a member that never gets it fails here, not at the suite's timeout
        for member in cluster.members:

            async def replicated(member: PatroniMember = member) -> bool:
                return bool(await member.node.fetchval("SELECT to_regclass($1) IS NOT NULL", table))

            await _until(replicated)


async def test_a_frozen_patroni_leader_mid_write_is_left_for_the_promoted_replica(patroni: PatroniCluster) -> None:
    table = "frozen_multihost"
    await _prepare(patroni, table)
    async with (
        _engine(patroni.multihost_dsn(), patroni.multihost_dsn(driver="psycopg"), "asyncpg") as asyncpg_engine,
        _engine(patroni.multihost_dsn(), patroni.multihost_dsn(driver="psycopg"), "psycopg") as psycopg_engine,
    ):
        failover = await _freeze_leader_mid_write(
            patroni, {"asyncpg": asyncpg_engine, "psycopg": psycopg_engine}, table
        )
    await _assert_ended_on_the_new_leader(failover, table, "multi-host DSN")


async def test_a_frozen_patroni_leader_behind_haproxy_is_left_for_the_promoted_replica(
    patroni: PatroniCluster, haproxy: HAProxyFactory, caplog: pytest.LogCaptureFixture
) -> None:
    table = "frozen_haproxy"
    await _prepare(patroni, table)
    balancers = {"cut": haproxy(patroni), "kept": haproxy(patroni, shutdown_sessions=False)}
    probes: dict[str, bool] = {}

    async def observe() -> None:
        """Once HAProxy marked the frozen leader down, whether the watchdog's probe through HAProxy gets an answer."""

        async def marked_down() -> bool:
            return not any(balancer.up("primary") for balancer in balancers.values())

        await _until(marked_down)
        for sessions, balancer in balancers.items():
            probes[sessions] = await probe((balancer.host, balancer.ports["primary"]), 2.0)

    async with contextlib.AsyncExitStack() as stack:
        engines = {
            f"{driver}, sessions {sessions}": await stack.enter_async_context(
                _engine(balancer.dsn(), balancer.dsn(driver="psycopg"), driver)
            )
            for sessions, balancer in balancers.items()
            for driver in ("asyncpg", "psycopg")
        }
        with caplog.at_level(logging.WARNING, logger="db_retry.liveness"):
            failover = await _freeze_leader_mid_write(patroni, engines, table, during=observe)
    cut = [record.getMessage() for record in caplog.records if record.name == "db_retry.liveness"]
    print(f"probes through HAProxy once it marked the leader down (answered?): {probes}; watchdog: {cut}")  # noqa: T201
    assert probes == {"cut": False, "kept": False}  # with no server UP, HAProxy closes the probe's connection
    kept = balancers["kept"]  # its sessions to the frozen leader stay open: the watchdog cuts them
    assert any(f"{kept.host}:{kept.ports['primary']} did not answer a probe" in message for message in cut)
    await _assert_ended_on_the_new_leader(failover, table, "HAProxy primary listener")
