"""``build_connection_factory``: asyncpg connections to one of several PostgreSQL hosts.

Each host gets its own connect timeout (as in libpq). Hosts are tried concurrently with a short
stagger, remembered good host first and the rest in random order; the first connection that
satisfies ``target_session_attrs`` wins and every other attempt is cancelled or closed. So one
connect costs about one timeout however many hosts hang. ``architecture/connections.md`` has the
details.
"""

import asyncio
import contextlib
import dataclasses
import logging
import random
import typing

import asyncpg
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg

from db_retry.dsn import DSNError, HostPort, dsn_hosts, mask_dsn, parse_url
from db_retry.retriable import ErrorKind, classify
from db_retry.validation import check_number, describe_error


if typing.TYPE_CHECKING:
    ConnectionType: typing.TypeAlias = asyncpg.Connection[asyncpg.Record]
else:
    ConnectionType = asyncpg.Connection

logger = logging.getLogger("db_retry.connections")

TARGET_SESSION_ATTRS: typing.Final = ("any", "primary", "standby", "prefer-standby", "read-write", "read-only")
DEFAULT_STAGGER: typing.Final = 0.05
_TIMEOUT_KEYS: typing.Final = ("timeout", "connect_timeout")
_HOST_KEYS: typing.Final = ("host", "port")


class NoHostAvailableError(asyncpg.TargetServerAttributeNotMatched):  # type: ignore[misc] # asyncpg is untyped
    """No host gave a connection that satisfies ``target_session_attrs``; each host's reason is kept.

    Subclasses :class:`asyncpg.TargetServerAttributeNotMatched`, what db-retry 0.8.4 raised here.
    """

    def __init__(self, requirement: str, failures: typing.Sequence["HostFailure"]) -> None:
        self.requirement = requirement
        self.failures = tuple(failures)
        reasons = "; ".join(f"{failure.address}: {failure.reason}" for failure in self.failures)
        super().__init__(
            f"no host can serve target_session_attrs={requirement!r} ({len(self.failures)} tried): {reasons}",
        )

    @property
    def db_retry_kind(self) -> ErrorKind | None:
        """Unavailable (worth waiting for) unless some host refused us for a lasting reason (e.g. a password)."""
        if all(failure.transient for failure in self.failures):
            return ErrorKind.UNAVAILABLE
        return None


@dataclasses.dataclass(frozen=True, slots=True)
class HostFailure:
    address: HostPort
    reason: str
    transient: bool
    error: BaseException | None = dataclasses.field(default=None, repr=False, compare=False)


@dataclasses.dataclass(frozen=True, slots=True)
class _Role:
    hot_standby: bool
    read_only: bool

    def satisfies(self, requirement: str) -> bool:
        return {
            "any": True,
            "primary": not self.hot_standby,
            "standby": self.hot_standby,
            "prefer-standby": self.hot_standby,
            "read-write": not self.read_only,
            "read-only": self.read_only,
        }[requirement]

    def describe(self) -> str:
        if self.hot_standby:
            return "is a standby"
        return "is read-only" if self.read_only else "is a read-write primary"


async def session_role(connection: ConnectionType) -> _Role:
    """Role of a connected server, from the parameters it reports at startup when it does (PostgreSQL 14+)."""
    settings = connection.get_settings()
    in_hot_standby = getattr(settings, "in_hot_standby", None)
    if in_hot_standby is None:  # pragma: no cover - servers before PostgreSQL 14 (the suite runs 15)
        try:
            hot_standby = bool(await connection.fetchval("SELECT pg_catalog.pg_is_in_recovery()"))
        except BaseException:
            connection.terminate()
            raise
    else:
        hot_standby = in_hot_standby == "on"
    read_only = hot_standby or getattr(settings, "default_transaction_read_only", "off") == "on"
    return _Role(hot_standby=hot_standby, read_only=read_only)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionPlan:
    """Everything a connect needs, checked once when the factory is built."""

    connect_args: typing.Mapping[str, typing.Any]
    hosts: tuple[HostPort, ...]
    target_session_attrs: str
    timeout: float
    stagger: float

    @classmethod
    def from_url(cls, url: str | sa.URL, timeout: float, stagger: float) -> "ConnectionPlan":
        parsed = parse_url(url)
        hosts = dsn_hosts(parsed)
        query = dict(parsed.query)
        requirement = str(query.pop("target_session_attrs", None) or "any")
        if requirement not in TARGET_SESSION_ATTRS:
            msg = f"unknown target_session_attrs {requirement!r}; expected one of {', '.join(TARGET_SESSION_ATTRS)}"
            raise DSNError(msg)
        for key in _TIMEOUT_KEYS:
            if key in query:
                timeout = check_number(f"{key} in the DSN", query.pop(key), unit="seconds", from_text=True)
        for key in _HOST_KEYS:
            query.pop(key, None)
        # SQLAlchemy's asyncpg dialect turns the rest (user, password, database, ssl, ...) into connect args.
        bare = sa.URL.create(
            "postgresql+asyncpg",
            username=parsed.username,
            password=parsed.password,
            database=parsed.database,
            query=query,
        )
        connect_args = PGDialect_asyncpg().create_connect_args(bare)[1]  # type: ignore[no-untyped-call]
        return cls(
            connect_args=connect_args,
            hosts=hosts,
            target_session_attrs=requirement,
            timeout=check_number("timeout", timeout, unit="seconds"),
            stagger=check_number("stagger", stagger, inclusive=True, unit="seconds"),
        )


class _Connector:
    """The factory's state: the plan and the host that last gave a good connection."""

    def __init__(self, plan: ConnectionPlan) -> None:
        self.plan = plan
        self.last_good: HostPort | None = None

    def order(self) -> list[HostPort]:
        hosts = random.sample(self.plan.hosts, len(self.plan.hosts))
        if self.last_good in hosts:
            hosts.remove(self.last_good)
            hosts.insert(0, self.last_good)
        return hosts

    async def __call__(self) -> ConnectionType:
        if len(self.plan.hosts) <= 1:
            return await self._connect_single()
        return await self._connect_any()

    async def _connect_single(self) -> ConnectionType:
        address = {"host": self.plan.hosts[0].host, "port": self.plan.hosts[0].port} if self.plan.hosts else {}
        connection: ConnectionType = await asyncpg.connect(
            **self.plan.connect_args,
            **address,
            timeout=self.plan.timeout,
            target_session_attrs=self.plan.target_session_attrs,
        )
        return connection

    async def _attempt(self, address: HostPort) -> tuple[ConnectionType, _Role]:
        connection: ConnectionType = await asyncpg.connect(
            **self.plan.connect_args,
            host=address.host,
            port=address.port,
            timeout=self.plan.timeout,
            target_session_attrs="any",
        )
        return connection, await session_role(connection)

    async def _connect_any(self) -> ConnectionType:
        requirement = self.plan.target_session_attrs
        loop = asyncio.get_running_loop()
        queue = self.order()
        running: dict[asyncio.Task[tuple[ConnectionType, _Role]], HostPort] = {}
        failures: list[HostFailure] = []
        fallback: tuple[ConnectionType, HostPort] | None = None  # prefer-standby: a non-standby we may use
        chosen: tuple[ConnectionType, HostPort] | None = None
        next_start = loop.time()
        try:
            while chosen is None and (queue or running):
                if queue and (not running or loop.time() >= next_start):
                    address = queue.pop(0)
                    running[asyncio.ensure_future(self._attempt(address))] = address
                    next_start = loop.time() + self.plan.stagger
                    continue
                done, _ = await asyncio.wait(
                    running,
                    timeout=max(0.0, next_start - loop.time()) if queue else None,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                for task in done:
                    address = running.pop(task)
                    error = task.exception()
                    if error is not None:
                        failures.append(
                            HostFailure(
                                address,
                                describe_error(
                                    error,
                                    timeout=self.plan.timeout,
                                    password=self.plan.connect_args.get("password"),
                                ),
                                transient=isinstance(error, (OSError, TimeoutError)) or classify(error) is not None,
                                error=error,
                            ),
                        )
                        next_start = loop.time()  # a failed host frees its slot: start the next one now
                        continue
                    connection, role = task.result()
                    if chosen is None and role.satisfies(requirement):
                        chosen = connection, address
                    elif chosen is None and requirement == "prefer-standby" and fallback is None:
                        fallback = connection, address
                    else:
                        failures.append(HostFailure(address, role.describe(), transient=True))
                        connection.terminate()
            if chosen is None and fallback is not None:
                chosen, fallback = fallback, None
        finally:
            await self._abandon(running)
            if fallback is not None:
                fallback[0].terminate()
        if chosen is None:
            raise NoHostAvailableError(requirement, failures)
        connection, self.last_good = chosen
        return connection

    @staticmethod
    async def _abandon(running: typing.Mapping[asyncio.Task[tuple[ConnectionType, _Role]], HostPort]) -> None:
        """Cancel the attempts still running and close any connection one of them made meanwhile."""
        for task in running:
            task.cancel()
        for task in running:
            with contextlib.suppress(BaseException):
                connection, _ = await task
                # Only if the attempt finished connecting in the very step it was cancelled.
                connection.terminate()  # pragma: no cover


def build_connection_factory(
    url: str | sa.URL,
    timeout: float,
    *,
    stagger: float = DEFAULT_STAGGER,
) -> typing.Callable[[], typing.Awaitable[ConnectionType]]:
    """A zero-argument coroutine function returning an :class:`asyncpg.Connection`, for ``async_creator``.

    ``timeout`` is the connect timeout of each host in seconds (a ``timeout`` or ``connect_timeout``
    entry in the DSN takes precedence). With several hosts, attempts start ``stagger`` seconds apart
    (sooner when one fails) and the first host satisfying ``target_session_attrs`` wins;
    ``prefer-standby`` takes a standby if any is up, else any host. If none fits,
    :class:`NoHostAvailableError` lists every host's reason.
    """
    plan = ConnectionPlan.from_url(url, timeout, stagger)
    logger.debug("connection factory for %s", mask_dsn(url))
    return _Connector(plan)
