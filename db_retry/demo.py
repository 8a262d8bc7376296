"""``db-retry demo``: bank transfers through the library while the test kit breaks the servers.

Workers move money between accounts, one SERIALIZABLE transaction per transfer (two balance
updates and a ledger row keyed by a client-chosen transfer id), through ``postgres_retry``,
``Transaction`` and a multi-host read-write connection factory. Meanwhile the kit terminates
backends, restarts the primary (fast and immediate) and fails over to the standby. At the end the
invariants are checked: money is conserved, the ledger explains every balance, every transfer a
caller saw succeed is in the ledger exactly once, and none it saw fail is there (unless it was
reported as outcome-unknown). The chaos test in the suite runs the same code.
"""

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import itertools
import json
import random
import sys
import time
import typing
import uuid

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from db_retry.connections import build_connection_factory
from db_retry.retriable import sqlstate_on_chain
from db_retry.retry import RetryEvent, postgres_retry
from db_retry.testing import faults
from db_retry.testing._binaries import PostgresBinariesNotFoundError
from db_retry.testing.cluster import ClusterError, PostgresCluster
from db_retry.transaction import CommitOutcomeUnknownError, Transaction


if typing.TYPE_CHECKING:
    from db_retry.cli import SubParsers


FAULTS: typing.Final = ("terminate", "restart-fast", "restart-immediate", "failover")
INITIAL_BALANCE: typing.Final = 1_000
DEFAULT_DURATION: typing.Final = 30.0
DEFAULT_WORKERS: typing.Final = 8
DEFAULT_ACCOUNTS: typing.Final = 5_000  # spread over many index pages: SSI locks btree pages, not rows


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DemoConfig:
    duration: float = DEFAULT_DURATION
    workers: int = DEFAULT_WORKERS
    accounts: int = DEFAULT_ACCOUNTS
    faults: tuple[str, ...] = FAULTS
    progress_interval: float = 1.0

    def __post_init__(self) -> None:
        unknown = sorted(set(self.faults) - set(FAULTS))
        if unknown:
            msg = f"unknown fault(s) {', '.join(unknown)}; choose from {', '.join(FAULTS)}"
            raise ValueError(msg)
        if self.duration <= 0 or self.workers < 1 or self.accounts < 2:  # noqa: PLR2004
            msg = (
                f"need duration > 0, workers >= 1, accounts >= 2; got {self.duration}, {self.workers}, {self.accounts}"
            )
            raise ValueError(msg)


@dataclasses.dataclass(slots=True)
class FaultRecord:
    name: str
    started: float
    time_lost: float | None = None  # the longest stretch without a commit, from the fault on; None: none since


@dataclasses.dataclass(slots=True)
class Outcomes:
    ok: set[uuid.UUID] = dataclasses.field(default_factory=set)
    failed: dict[uuid.UUID, str] = dataclasses.field(default_factory=dict)
    unknown: set[uuid.UUID] = dataclasses.field(default_factory=set)
    retries: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    commit_times: list[float] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class InvariantReport:
    total_before: int
    total_after: int
    ledger_mismatches: int  # accounts whose balance the ledger does not explain
    missing: int  # transfers the caller saw succeed, absent from the ledger
    failed_but_applied: int  # transfers the caller saw fail (not outcome-unknown), present in the ledger
    unknown_applied: int  # outcome-unknown transfers that turned out committed (informative)

    @property
    def holds(self) -> bool:
        return (
            self.total_before == self.total_after
            and self.ledger_mismatches == 0
            and self.missing == 0
            and self.failed_but_applied == 0
        )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DemoReport:
    outcomes: Outcomes
    faults: list[FaultRecord]
    invariants: InvariantReport
    duration: float

    def as_dict(self) -> dict[str, typing.Any]:
        return {
            "duration_s": round(self.duration, 3),
            "transfers": {
                "ok": len(self.outcomes.ok),
                "failed": len(self.outcomes.failed),
                "outcome_unknown": len(self.outcomes.unknown),
            },
            "failures": collections.Counter(self.outcomes.failed.values()),
            "retries": dict(self.outcomes.retries),
            "faults": [
                {"fault": record.name, "at_s": round(record.started, 3), "time_lost_s": _rounded(record.time_lost)}
                for record in self.faults
            ],
            "invariants": {**dataclasses.asdict(self.invariants), "holds": self.invariants.holds},
        }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


class TransferWorkload:
    """Concurrent transfers between ``accounts`` accounts; every outcome the callers saw is recorded."""

    def __init__(self, engine: AsyncEngine, *, accounts: int, clock: typing.Callable[[], float]) -> None:
        self.engine = engine
        self.accounts = accounts
        self.clock = clock
        self.outcomes = Outcomes()
        self.transfer = postgres_retry(on_retry=self._count_retry)(self._transfer)

    async def setup(self) -> None:
        async with self.engine.begin() as connection:
            await connection.execute(sa.text("DROP TABLE IF EXISTS ledger, accounts"))
            await connection.execute(sa.text("CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL)"))
            await connection.execute(
                sa.text(
                    "CREATE TABLE ledger (transfer_id uuid PRIMARY KEY, src int NOT NULL, dst int NOT NULL, "
                    "amount bigint NOT NULL)",
                ),
            )
            await connection.execute(
                sa.text("INSERT INTO accounts SELECT g, :balance FROM generate_series(1, :n) AS g"),
                {"balance": INITIAL_BALANCE, "n": self.accounts},
            )

    def _count_retry(self, event: RetryEvent) -> None:
        self.outcomes.retries[event.sqlstate or event.kind.value] += 1

    async def _transfer(self, transfer_id: uuid.UUID, src: int, dst: int, amount: int) -> None:
        async with Transaction(session=AsyncSession(self.engine), isolation_level="SERIALIZABLE") as transaction:
            session = transaction.session
            await session.execute(
                sa.text("UPDATE accounts SET balance = balance - :amount WHERE id = :id"),
                {"amount": amount, "id": src},
            )
            await session.execute(
                sa.text("UPDATE accounts SET balance = balance + :amount WHERE id = :id"),
                {"amount": amount, "id": dst},
            )
            await session.execute(
                sa.text("INSERT INTO ledger VALUES (:id, :src, :dst, :amount)"),
                {"id": transfer_id, "src": src, "dst": dst, "amount": amount},
            )
            await transaction.commit()

    async def run_worker(self, stop: asyncio.Event, rng: random.Random) -> None:
        while not stop.is_set():
            src, dst = rng.sample(range(1, self.accounts + 1), 2)
            transfer_id = uuid.UUID(int=rng.getrandbits(128), version=4)
            try:
                await self.transfer(transfer_id, src, dst, rng.randint(1, 50))
            except CommitOutcomeUnknownError:
                self.outcomes.unknown.add(transfer_id)
            except Exception as exc:  # noqa: BLE001 - every failure a caller would see is the point
                self.outcomes.failed[transfer_id] = sqlstate_on_chain(exc) or type(exc).__name__
            else:
                self.outcomes.ok.add(transfer_id)
                self.outcomes.commit_times.append(self.clock())


async def check_invariants(engine: AsyncEngine, workload: TransferWorkload) -> InvariantReport:
    """Compare what the callers were told with what the database holds."""
    async with engine.connect() as connection:
        total = int((await connection.execute(sa.text("SELECT sum(balance) FROM accounts"))).scalar_one())
        mismatches = (
            await connection.execute(
                sa.text(
                    """
                    SELECT count(*) FROM accounts a
                    WHERE a.balance <> :initial
                        - coalesce((SELECT sum(amount) FROM ledger WHERE src = a.id), 0)
                        + coalesce((SELECT sum(amount) FROM ledger WHERE dst = a.id), 0)
                    """,
                ),
                {"initial": INITIAL_BALANCE},
            )
        ).scalar_one()
        applied = set((await connection.execute(sa.text("SELECT transfer_id FROM ledger"))).scalars())
    outcomes = workload.outcomes
    return InvariantReport(
        total_before=INITIAL_BALANCE * workload.accounts,
        total_after=total,
        ledger_mismatches=int(mismatches),
        missing=len(outcomes.ok - applied),
        failed_but_applied=len(set(outcomes.failed) & applied),
        unknown_applied=len(outcomes.unknown & applied),
    )


class _Chaos:
    """Injects the configured faults one after another, spread over the run."""

    def __init__(self, cluster: PostgresCluster, workload: TransferWorkload, names: tuple[str, ...]) -> None:
        self.cluster = cluster
        self.workload = workload
        self.names = names
        self.records: list[FaultRecord] = []
        self.current = "none"

    async def run(self, duration: float) -> None:
        if not self.names:
            return
        gap = duration / (len(self.names) + 1)
        for name in self.names:
            await asyncio.sleep(gap)
            record = FaultRecord(name=name, started=self.workload.clock())
            self.records.append(record)
            self.current = name
            await self._inject(name)
            self.current = "none"

    async def _inject(self, name: str) -> None:
        primary = self.cluster.primary
        if name == "terminate":
            await faults.terminate_backends(primary)
        elif name == "restart-fast":
            await faults.restart(primary, "fast")
        elif name == "restart-immediate":
            await faults.restart(primary, "immediate")
        else:
            await faults.failover(self.cluster)
            await faults.rebuild_as_standby(self.cluster, primary)


class _Progress:
    def __init__(self, stream: typing.TextIO, workload: TransferWorkload, chaos: _Chaos) -> None:
        self.stream = stream
        self.workload = workload
        self.chaos = chaos

    def line(self) -> str:
        outcomes = self.workload.outcomes
        retries = ", ".join(f"{cause}={count}" for cause, count in sorted(outcomes.retries.items())) or "none"
        return (
            f"[{self.workload.clock():5.1f}s] ok={len(outcomes.ok)} failed={len(outcomes.failed)} "
            f"unknown={len(outcomes.unknown)} retries: {retries} | fault: {self.chaos.current}"
        )

    async def run(self, stop: asyncio.Event, interval: float) -> None:
        while not stop.is_set():
            print(self.line(), file=self.stream, flush=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)


async def run_demo(
    config: DemoConfig,
    *,
    stream: typing.TextIO = sys.stdout,
    cluster: PostgresCluster | None = None,
) -> DemoReport:
    """Run the workload under faults on ``cluster`` (default: a new primary + standby) and check invariants."""
    own = cluster is None
    if cluster is None:
        cluster = await asyncio.to_thread(PostgresCluster(standbys=1, name="demo").start)
    try:
        return await _run(config, cluster, stream)
    finally:
        if own:
            await asyncio.to_thread(cluster.stop)


async def _run(config: DemoConfig, cluster: PostgresCluster, stream: typing.TextIO) -> DemoReport:
    url = sa.make_url(cluster.multihost_dsn(target_session_attrs="read-write"))
    engine = create_async_engine(
        url,
        async_creator=build_connection_factory(url, timeout=2.0),
        pool_size=config.workers,
        max_overflow=0,
    )
    started = time.monotonic()
    workload = TransferWorkload(engine, accounts=config.accounts, clock=lambda: time.monotonic() - started)
    try:
        await workload.setup()
        chaos = _Chaos(cluster, workload, config.faults)
        progress = _Progress(stream, workload, chaos)
        stop = asyncio.Event()
        rng = random.Random(0)  # noqa: S311 - a workload, not cryptography
        workers = [
            asyncio.create_task(workload.run_worker(stop, random.Random(rng.random())))  # noqa: S311
            for _ in range(config.workers)
        ]
        reporter = asyncio.create_task(progress.run(stop, config.progress_interval))
        try:
            await chaos.run(config.duration)
            await asyncio.sleep(max(0.0, config.duration - workload.clock()))
        finally:
            stop.set()
            await asyncio.gather(*workers, reporter)
        _measure_time_lost(chaos.records, workload.outcomes.commit_times, workload.clock())
        print(progress.line(), file=stream, flush=True)
        invariants = await check_invariants(engine, workload)
    finally:
        await engine.dispose()
    return DemoReport(
        outcomes=workload.outcomes, faults=chaos.records, invariants=invariants, duration=workload.clock()
    )


def _measure_time_lost(records: list[FaultRecord], commit_times: list[float], end: float) -> None:
    """Per fault: the longest stretch without any commit between its start and the next fault (or the end)."""
    commits = sorted(commit_times)
    for index, record in enumerate(records):
        window_end = records[index + 1].started if index + 1 < len(records) else end
        inside = [moment for moment in commits if record.started < moment <= window_end]
        if not inside:
            continue
        points = [record.started, *inside]
        record.time_lost = max(later - earlier for earlier, later in itertools.pairwise(points))


def format_report(report: DemoReport) -> str:
    outcomes = report.outcomes
    rows = [
        ("transfers ok", str(len(outcomes.ok))),
        ("transfers failed", str(len(outcomes.failed))),
        ("transfers outcome-unknown", str(len(outcomes.unknown))),
    ]
    rows += [
        (f"  failed with {cause}", str(count))
        for cause, count in sorted(collections.Counter(outcomes.failed.values()).items())
    ]
    rows += [(f"retries {cause}", str(count)) for cause, count in sorted(outcomes.retries.items())]
    for record in report.faults:
        lost = "no commit since" if record.time_lost is None else f"{record.time_lost * 1000:.0f} ms"
        rows.append((f"fault {record.name} at {record.started:.1f}s", f"time lost {lost}"))
    invariants = report.invariants
    rows += [
        ("money before / after", f"{invariants.total_before} / {invariants.total_after}"),
        ("balances the ledger does not explain", str(invariants.ledger_mismatches)),
        ("successes missing from the ledger", str(invariants.missing)),
        ("failures found in the ledger", str(invariants.failed_but_applied)),
        ("outcome-unknown found committed", str(invariants.unknown_applied)),
        ("invariant", "HOLDS" if invariants.holds else "BROKEN"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)


def add_demo_command(subparsers: "SubParsers") -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run transfers through the library on a throwaway cluster while injecting faults",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    parser.add_argument("--duration", type=float, default=DEFAULT_DURATION, help="seconds (default: %(default)s)")
    parser.add_argument(
        "--workers", type=int, default=DEFAULT_WORKERS, help="concurrent callers (default: %(default)s)"
    )
    parser.add_argument("--accounts", type=int, default=DEFAULT_ACCOUNTS, help="accounts (default: %(default)s)")
    parser.add_argument(
        "--faults",
        default=",".join(FAULTS),
        help="comma-separated, in order, from: %(default)s; empty for none",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(handler=run_demo_command)


def run_demo_command(args: argparse.Namespace) -> int:
    try:
        config = DemoConfig(
            duration=args.duration,
            workers=args.workers,
            accounts=args.accounts,
            faults=tuple(name for name in args.faults.split(",") if name),
        )
    except ValueError as exc:
        print(f"db-retry demo: {exc}", file=sys.stderr)  # noqa: T201 - the command's output
        return 2
    try:
        report = asyncio.run(run_demo(config, stream=sys.stderr if args.json else sys.stdout))
    except (PostgresBinariesNotFoundError, ClusterError) as exc:
        print(f"db-retry demo: {exc}", file=sys.stderr)  # noqa: T201 - the command's output
        return 2
    print(json.dumps(report.as_dict(), indent=2) if args.json else format_report(report))  # noqa: T201 - the command's output
    return 0 if report.invariants.holds else 1
