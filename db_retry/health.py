"""Health check: probe every host of a DSN and report what a connection factory would find there.

:func:`check_hosts` connects to each host concurrently, each with its own timeout, and reports
whether it answered, how long the connect took, its role, server version and, for standbys, how far
replay lags behind. It also says which host each ``target_session_attrs`` value would pick.
:func:`run_check` is the ``db-retry check`` command (its options are in :mod:`db_retry.cli`).
``architecture/health.md`` has the details.
"""

import argparse
import asyncio
import dataclasses
import json
import sys
import types
import typing
import urllib.parse

import asyncpg
import sqlalchemy as sa

from db_retry.connections import TARGET_SESSION_ATTRS, ConnectionPlan, ConnectionType, session_role
from db_retry.dsn import DSNError, HostPort, mask_dsn, parse_url
from db_retry.validation import describe_error


__all__ = ["HealthReport", "HostStatus", "check_hosts", "format_report", "run_check"]

DEFAULT_TIMEOUT: typing.Final = 2.0
Role = typing.Literal["primary", "standby"]

# One round trip. WAL positions come back as byte offsets (``pg_lsn`` minus ``0/0``) so Python can
# subtract them. Names are schema-qualified: a user's search_path cannot shadow them.
_STATUS_QUERY: typing.Final = """
WITH s AS (
    SELECT pg_catalog.pg_is_in_recovery() AS standby,
           pg_catalog.pg_last_wal_receive_lsn() AS received,
           pg_catalog.pg_last_wal_replay_lsn() AS replayed,
           pg_catalog.pg_last_xact_replay_timestamp() AS replayed_at
)
SELECT
    pg_catalog.pg_wal_lsn_diff(
        CASE WHEN standby THEN replayed ELSE pg_catalog.pg_current_wal_lsn() END, '0/0'
    )::bigint AS position,
    CASE WHEN standby AND received IS NOT NULL
        THEN greatest(0, pg_catalog.pg_wal_lsn_diff(received, replayed))::bigint END AS unreplayed,
    CASE WHEN NOT standby THEN NULL
         WHEN received = replayed THEN 0
         WHEN replayed_at IS NULL THEN NULL
         ELSE greatest(0, extract(epoch FROM pg_catalog.now() - replayed_at))
    END::float8 AS lag_seconds
FROM s
"""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class HostStatus:
    """What one host answered. Fields a host could not tell are ``None``.

    ``replay_lag_bytes``: for a standby, WAL the primary has written that this standby has not yet
    replayed (the most advanced reachable primary's current position minus this standby's replay
    position); ``None`` when no primary answered. ``unreplayed_bytes``: WAL this standby received
    but has not replayed yet. ``replay_lag_seconds``: ``0`` when everything received is replayed,
    else the age of the last replayed commit, which also counts time the primary spent idle.
    """

    address: HostPort
    reachable: bool
    latency: float | None = None
    error: str | None = None
    role: Role | None = None
    server_version: str | None = None
    read_only: bool | None = None
    replay_lag_bytes: int | None = None
    unreplayed_bytes: int | None = None
    replay_lag_seconds: float | None = None

    def as_dict(self) -> dict[str, typing.Any]:
        """JSON-ready: ``latency_ms`` in milliseconds (``latency``, in seconds, is kept for older scripts)."""
        fields = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        fields["address"] = str(self.address)
        latency = self.latency
        fields["latency"] = None if latency is None else round(latency, 6)
        fields["replay_lag_seconds"] = None if self.replay_lag_seconds is None else round(self.replay_lag_seconds, 3)
        latency_ms = None if latency is None else round(latency * 1000, 2)
        return {"host": self.address.host, "port": self.address.port, "latency_ms": latency_ms, **fields}


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class HealthReport:
    """Every host's :class:`HostStatus`, in DSN order, and which host each ``target_session_attrs`` picks.

    ``chosen`` maps all six ``target_session_attrs`` values to the first host in DSN order that
    satisfies it (``prefer-standby``: a standby, else any host), or ``None``. A connection factory
    may pick any host that satisfies the value; ``chosen`` names one. ``dsn`` has the password masked.
    """

    dsn: str
    target_session_attrs: str
    hosts: tuple[HostStatus, ...]
    chosen: typing.Mapping[str, HostPort | None]

    @property
    def ok(self) -> bool:
        """Whether some host satisfies the DSN's ``target_session_attrs``."""
        return self.chosen[self.target_session_attrs] is not None

    def as_dict(self) -> dict[str, typing.Any]:
        return {
            "dsn": self.dsn,
            "target_session_attrs": self.target_session_attrs,
            "ok": self.ok,
            "hosts": [host.as_dict() for host in self.hosts],
            "chosen": {attrs: None if host is None else str(host) for attrs, host in self.chosen.items()},
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)


@dataclasses.dataclass(frozen=True, slots=True)
class _Probe:
    status: HostStatus
    satisfies: frozenset[str] = frozenset()  # the target_session_attrs values this host meets
    position: int | None = None  # a primary's current WAL position, a standby's replay position


async def _identify(connection: ConnectionType, address: HostPort, latency: float) -> _Probe:
    """Role, read-only state and version from what the server reported at startup (no round trip on 14+)."""
    role = await session_role(connection)
    return _Probe(
        HostStatus(
            address=address,
            reachable=True,
            latency=latency,
            role="standby" if role.hot_standby else "primary",
            server_version=str(connection.get_settings().server_version).split(" ", 1)[0],
            read_only=role.read_only,
        ),
        satisfies=frozenset(attrs for attrs in TARGET_SESSION_ATTRS if role.satisfies(attrs)),
    )


async def _probe(address: HostPort, plan: ConnectionPlan) -> _Probe:
    """Connect to one host and read its status, all within ``plan.timeout``; every failure becomes a report."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    connection: ConnectionType | None = None
    latency: float | None = None
    identity: _Probe | None = None
    try:
        async with asyncio.timeout(plan.timeout):
            connection = await asyncpg.connect(
                **plan.connect_args,
                host=address.host,
                port=address.port,
                timeout=plan.timeout,
                target_session_attrs="any",
            )
            latency = loop.time() - started
            identity = await _identify(connection, address, latency)
            row = await connection.fetchrow(_STATUS_QUERY)
            await connection.close()
    except asyncio.CancelledError:
        if connection is not None:  # the caller gave up on the check: leave no session behind
            connection.terminate()
        raise
    except Exception as exc:  # noqa: BLE001 - every failure of a host is a line in the report
        if connection is not None:
            connection.terminate()
        reason = describe_error(exc, timeout=plan.timeout, password=plan.connect_args.get("password"))
        if identity is None:
            return _Probe(HostStatus(address=address, reachable=latency is not None, latency=latency, error=reason))
        return dataclasses.replace(identity, status=dataclasses.replace(identity.status, error=reason))
    status = dataclasses.replace(
        identity.status,
        unreplayed_bytes=row["unreplayed"],
        replay_lag_seconds=row["lag_seconds"],
    )
    return dataclasses.replace(identity, status=status, position=row["position"])


def _pick(probes: typing.Sequence[_Probe], attrs: str) -> HostPort | None:
    for probe in probes:
        if attrs in probe.satisfies:
            return probe.status.address
    if attrs == "prefer-standby":
        return _pick(probes, "any")
    return None


async def check_hosts(dsn: str | sa.URL, timeout: float = DEFAULT_TIMEOUT) -> HealthReport:
    """Probe every host of ``dsn`` concurrently, each within ``timeout`` seconds, and report on them.

    The DSN's user, password, database, ssl and other connect arguments are used as a connection
    factory would use them; a ``timeout`` / ``connect_timeout`` entry in the DSN overrides
    ``timeout``. A malformed DSN raises :class:`~db_retry.dsn.DSNError` and a timeout that is not
    > 0 raises :class:`ValueError`. Host failures never raise: they are reported.
    """
    url = parse_url(dsn)
    plan = ConnectionPlan.from_url(url, timeout, 0)
    masked = urllib.parse.unquote(mask_dsn(url))  # every password masked, then decoded for reading
    if not plan.hosts:
        msg = f"DSN {masked!r} names no host; the check needs host:port"
        raise DSNError(msg)
    probes = await asyncio.gather(*(_probe(address, plan) for address in plan.hosts))
    primaries = [probe.position for probe in probes if probe.status.role == "primary" and probe.position is not None]
    primary_position = max(primaries, default=None)
    hosts = tuple(
        dataclasses.replace(probe.status, replay_lag_bytes=max(0, primary_position - probe.position))
        if probe.status.role == "standby" and probe.position is not None and primary_position is not None
        else probe.status
        for probe in probes
    )
    return HealthReport(
        dsn=masked,
        target_session_attrs=plan.target_session_attrs,
        hosts=hosts,
        chosen=types.MappingProxyType({attrs: _pick(probes, attrs) for attrs in TARGET_SESSION_ATTRS}),
    )


# -- the `db-retry check` command ------------------------------------------------------------


def _cell(value: object, spec: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return format(value, spec)


def _table(rows: typing.Sequence[typing.Sequence[str]]) -> list[str]:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]


def format_report(report: HealthReport) -> str:
    """The report as the table ``db-retry check`` prints."""
    hosts = [
        ("HOST", "UP", "LATENCY MS", "ROLE", "VERSION", "READ-ONLY", "LAG BYTES", "UNREPLAYED", "LAG S", "ERROR"),
        *(
            (
                str(host.address),
                _cell(host.reachable),
                _cell(None if host.latency is None else host.latency * 1000, ".1f"),
                _cell(host.role),
                _cell(host.server_version),
                _cell(host.read_only),
                _cell(host.replay_lag_bytes),
                _cell(host.unreplayed_bytes),
                _cell(host.replay_lag_seconds, ".3f"),
                _cell(host.error),
            )
            for host in report.hosts
        ),
    ]
    picks = [
        ("TARGET_SESSION_ATTRS", "PICKS"),
        *(
            (f"{attrs} (DSN)" if attrs == report.target_session_attrs else attrs, _cell(host and str(host)))
            for attrs, host in report.chosen.items()
        ),
    ]
    chosen = report.chosen[report.target_session_attrs]
    verdict = (
        f"OK: {chosen} satisfies target_session_attrs={report.target_session_attrs}"
        if chosen is not None
        else f"FAIL: no host satisfies target_session_attrs={report.target_session_attrs}"
    )
    return "\n".join([f"DSN {report.dsn}", "", *_table(hosts), "", *_table(picks), "", verdict])


def run_check(args: argparse.Namespace) -> int:
    """Run ``db-retry check``: print the report (a table, or JSON with ``--json``) and return the exit status."""
    try:
        report = asyncio.run(check_hosts(args.dsn, args.timeout))
    except ValueError as exc:  # DSNError, or a bad timeout entry in the DSN; neither message holds a password
        print(f"db-retry check: {exc}", file=sys.stderr)  # noqa: T201 - the command's output
        return 2
    print(report.to_json() if args.json else format_report(report))  # noqa: T201 - the command's output
    return 0 if report.ok else 1
