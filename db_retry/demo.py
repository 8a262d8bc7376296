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
import signal
import sys
import time
import typing
import uuid

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from db_retry import markers
from db_retry.retriable import ErrorKind, sqlstate_on_chain
from db_retry.retry import RetryEvent, postgres_retry
from db_retry.testing._binaries import MissingComponentError, PostgresBinariesNotFoundError
from db_retry.testing.cluster import ClusterError, PostgresCluster
from db_retry.testing.demo_targets import KIT_FAULTS, TOPOLOGY_FAULTS, DemoTarget, make_target
from db_retry.transaction import CommitOutcomeUnknownError, Transaction
from db_retry.validation import check_number


FAULTS: typing.Final = KIT_FAULTS  # the kit topology's; each topology has its own (TOPOLOGY_FAULTS)
TOPOLOGIES: typing.Final = tuple(TOPOLOGY_FAULTS)
INITIAL_BALANCE: typing.Final = 1_000
DEFAULT_DURATION: typing.Final = 30.0
INTERRUPTED: typing.Final = 130  # the shell's status for a command ended by SIGINT
DEFAULT_WORKERS: typing.Final = 8
# Each transfer is bounded as a request handler would bound it: attempts, waits and silent servers included.
CALL_DEADLINE: typing.Final = 25.0
# Which transfers write a commit marker (resolve_commit="marker"): every other worker ("both": side by side under
# the same faults), all of them, or none (0.8.4's behaviour: a lost COMMIT is outcome-unknown).
MARKER_MODES: typing.Final = ("both", "on", "off")
DEFAULT_ACCOUNTS: typing.Final = 5_000  # spread over many index pages: SSI locks btree pages, not rows
# What the retry counts are keyed by: the SQLSTATE of the error, or, when it carries none, the kind of failure.
RETRY_CAUSES: typing.Final[typing.Mapping[str, str]] = {
    "40001": "serialization failure",
    "40P01": "deadlock detected",
    "08000": "connection exception",
    "08001": "cannot connect",
    "08003": "connection does not exist",
    "08006": "connection failure",
    "25006": "read-only transaction (a write on a standby)",
    "53300": "too many connections",
    "57P01": "server terminated the session (admin shutdown)",
    "57P02": "server crashed (crash shutdown)",
    "57P03": "server cannot accept connections yet",
    ErrorKind.CONFLICT.value: "a kind: a conflict, no SQLSTATE",
    ErrorKind.OUTAGE.value: "a kind: connection lost, no SQLSTATE: reset, closed, invalidated",
    ErrorKind.UNAVAILABLE.value: "a kind: no server reachable, no SQLSTATE: refused, no host fits",
}
# Money moved per account, from one pass over the ledger (no per-account subqueries: linear in the ledger).
LEDGER_MISMATCHES: typing.Final = """
WITH moved AS (
    SELECT src AS id, -amount AS delta FROM ledger
    UNION ALL
    SELECT dst, amount FROM ledger
), net AS (
    SELECT id, sum(delta) AS delta FROM moved GROUP BY id
)
SELECT count(*) FROM accounts a LEFT JOIN net n ON n.id = a.id
WHERE a.balance <> :initial + coalesce(n.delta, 0)
"""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DemoConfig:
    duration: float = DEFAULT_DURATION
    workers: int = DEFAULT_WORKERS
    accounts: int = DEFAULT_ACCOUNTS
    faults: tuple[str, ...] = FAULTS  # for another topology, the default stands for all of that topology's
    progress_interval: float = 1.0
    topology: str = "kit"
    markers: str = "both"

    def __post_init__(self) -> None:
        if self.topology not in TOPOLOGY_FAULTS:
            msg = f"unknown topology {self.topology!r}; choose from {', '.join(TOPOLOGIES)}"
            raise ValueError(msg)
        allowed = TOPOLOGY_FAULTS[self.topology]
        if self.faults == FAULTS:
            object.__setattr__(self, "faults", allowed)  # frozen: the default, resolved once
        unknown = sorted(set(self.faults) - set(allowed))
        if unknown:
            msg = f"unknown fault(s) {', '.join(unknown)} ({self.topology} topology); choose from {', '.join(allowed)}"
            raise ValueError(msg)
        if self.markers not in MARKER_MODES:
            msg = f"unknown markers mode {self.markers!r}; choose from {', '.join(MARKER_MODES)}"
            raise ValueError(msg)
        check_number("duration", self.duration, unit="seconds")
        check_number("workers", self.workers, minimum=1, inclusive=True, integer=True)
        check_number("accounts", self.accounts, minimum=2, inclusive=True, integer=True)
        check_number("progress_interval", self.progress_interval, unit="seconds")


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
    marked: set[uuid.UUID] = dataclasses.field(default_factory=set)  # transfers made with a commit marker

    def unknown_by_group(self) -> dict[str, tuple[int, int]]:
        """Outcome-unknown and all transfers, with markers and without."""
        every = self.ok | set(self.failed) | self.unknown
        return {
            "with markers": (len(self.unknown & self.marked), len(every & self.marked)),
            "without markers": (len(self.unknown - self.marked), len(every - self.marked)),
        }


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
    interrupted: bool = False  # Ctrl-C ended the run early: the report covers the run so far

    def as_dict(self) -> dict[str, typing.Any]:
        return {
            "duration_s": round(self.duration, 3),
            "interrupted": self.interrupted,
            "transfers": {
                "ok": len(self.outcomes.ok),
                "failed": len(self.outcomes.failed),
                "outcome_unknown": len(self.outcomes.unknown),
                "outcome_unknown_by_group": {
                    group: {"unknown": unknown, "transfers": total}
                    for group, (unknown, total) in self.outcomes.unknown_by_group().items()
                },
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

    def __init__(
        self, engine: AsyncEngine, *, accounts: int, clock: typing.Callable[[], float], markers: str = "off"
    ) -> None:
        self.engine = engine
        self.accounts = accounts
        self.clock = clock
        self.markers = markers
        self.outcomes = Outcomes()
        self.transfer = postgres_retry(on_retry=self._count_retry, deadline=CALL_DEADLINE)(self._transfer)
        self.marked_transfer = postgres_retry(
            on_retry=self._count_retry, deadline=CALL_DEADLINE, resolve_commit="marker"
        )(self._transfer)

    def uses_markers(self, worker: int) -> bool:
        """Whether the worker numbered ``worker`` writes commit markers."""
        return self.markers == "on" or (self.markers == "both" and worker % 2 == 0)

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
        if self.markers != "off":
            await markers.install(self.engine)  # the documented setup call, once before the first marked transfer

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

    async def run_worker(self, stop: asyncio.Event, rng: random.Random, worker: int = 1) -> None:
        marked = self.uses_markers(worker)
        transfer = self.marked_transfer if marked else self.transfer
        while not stop.is_set():
            src, dst = rng.sample(range(1, self.accounts + 1), 2)
            transfer_id = uuid.UUID(int=rng.getrandbits(128), version=4)
            if marked:
                self.outcomes.marked.add(transfer_id)
            try:
                await transfer(transfer_id, src, dst, rng.randint(1, 50))
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
                sa.text(LEDGER_MISMATCHES),
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

    def __init__(self, target: DemoTarget, workload: TransferWorkload, names: tuple[str, ...]) -> None:
        self.target = target
        self.workload = workload
        self.names = names
        self.records: list[FaultRecord] = []
        self.current: str | None = None

    @staticmethod
    def schedule(names: tuple[str, ...], duration: float) -> list[tuple[float, str]]:
        """When each fault is due, seconds from the start (each waits for the one before to finish)."""
        gap = duration / (len(names) + 1)
        return [(gap * (index + 1), name) for index, name in enumerate(names)]

    async def run(self, duration: float) -> None:
        for due, name in self.schedule(self.names, duration):
            await asyncio.sleep(max(0.0, due - self.workload.clock()))
            record = FaultRecord(name=name, started=self.workload.clock())
            self.records.append(record)
            self.current = name
            await self._inject(name)
            self.current = None

    async def _inject(self, name: str) -> None:
        await self.target.inject(name)


def _retry_counts(retries: collections.Counter[str]) -> str:
    return ", ".join(f"{cause}={count}" for cause, count in sorted(retries.items())) or "none"


class _Progress:
    """One line per tick; the fault column names every fault that started since the last line."""

    def __init__(self, stream: typing.TextIO, workload: TransferWorkload, chaos: _Chaos) -> None:
        self.stream = stream
        self.workload = workload
        self.chaos = chaos
        self.shown = 0  # faults already named by an earlier line

    def faults_since_last_line(self) -> str:
        names = [record.name for record in self.chaos.records[self.shown :]]
        self.shown = len(self.chaos.records)
        current = self.chaos.current
        if current is not None:
            if names:
                names[-1] = f"{names[-1]} (running)"
            else:
                names.append(f"{current} (still running)")
        return ", ".join(names) or "-"

    def line(self) -> str:
        outcomes = self.workload.outcomes
        return (
            f"[{self.workload.clock():5.1f}s] ok={len(outcomes.ok)} failed={len(outcomes.failed)} "
            f"unknown={len(outcomes.unknown)} retries: {_retry_counts(outcomes.retries)} "
            f"| fault: {self.faults_since_last_line()}"
        )

    async def run(self, stop: asyncio.Event, interval: float) -> None:
        while not stop.is_set():
            print(self.line(), file=self.stream, flush=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)


def format_header(config: DemoConfig, target: PostgresCluster | DemoTarget) -> str:
    """What the demo starts, for how long and with which faults, and how to read its lines."""
    nodes = (DemoTarget(target) if isinstance(target, PostgresCluster) else target).describe()
    if config.faults:
        schedule = ", ".join(f"{name} at ~{due:.0f}s" for due, name in _Chaos.schedule(config.faults, config.duration))
    else:
        schedule = "none"
    return "\n".join(
        [
            (
                f"db-retry demo: {config.workers} workers transfer money between {config.accounts} accounts "
                f"for {config.duration:g}s"
            ),
            f"servers: {nodes} (throwaway, stopped at the end)",
            f"faults: {schedule}",
            "each line: transfers ok / failed / outcome unknown so far, retries, faults started since the last line",
            (
                "retries are counted by SQLSTATE (40001 serialization failure, 40P01 deadlock, 08xxx connection lost, "
                "57P01 session terminated, 57P02 crash) or, for errors without one, by kind (outage: connection "
                "lost; unavailable: no server reachable); the report names each"
            ),
            "Ctrl-C stops the faults and prints the report so far",
            "",
        ],
    )


async def run_demo(
    config: DemoConfig,
    *,
    stream: typing.TextIO = sys.stdout,
    cluster: PostgresCluster | None = None,
    interrupt: asyncio.Event | None = None,
) -> DemoReport:
    """Run the workload under faults on ``cluster`` (default: new servers of ``config.topology``) and check invariants.

    Setting ``interrupt`` ends the run early: the faults and transfers in flight are cancelled and
    the report covers the run so far (``interrupted=True``), invariant check included.
    """
    target = DemoTarget(cluster) if cluster is not None else make_target(config.topology)
    try:
        await target.start()
        return await _run(config, target, stream, interrupt or asyncio.Event())
    finally:
        await target.stop()


async def _until_done_or_interrupted(work: asyncio.Task[None], interrupt: asyncio.Event) -> bool:
    """Wait for ``work``; on ``interrupt`` cancel it instead. Whether the run was interrupted."""
    interrupted = asyncio.create_task(interrupt.wait())
    try:
        await asyncio.wait([work, interrupted], return_when=asyncio.FIRST_COMPLETED)
    finally:
        interrupted.cancel()
    if not work.done():
        work.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await work
    return interrupt.is_set()


async def _stop(stop: asyncio.Event, tasks: list[asyncio.Task[None]], *, cancel: bool) -> None:
    """Stop the workers and the reporter; after Ctrl-C without waiting for transfers in flight.

    A transfer in flight may be retrying through an outage for a while. A cancelled one is neither
    ok nor failed, and the invariants hold either way.
    """
    stop.set()
    if cancel:
        for task in tasks:
            task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _run(config: DemoConfig, target: DemoTarget, stream: typing.TextIO, interrupt: asyncio.Event) -> DemoReport:
    print(format_header(config, target), file=stream, flush=True)
    engine = target.engine(config.workers)
    started = time.monotonic()
    workload = TransferWorkload(
        engine, accounts=config.accounts, clock=lambda: time.monotonic() - started, markers=config.markers
    )
    try:
        await workload.setup()
        chaos = _Chaos(target, workload, config.faults)
        progress = _Progress(stream, workload, chaos)
        stop = asyncio.Event()
        rng = random.Random(0)  # noqa: S311 - a workload, not cryptography
        workers = [
            asyncio.create_task(workload.run_worker(stop, random.Random(rng.random()), worker))  # noqa: S311
            for worker in range(config.workers)
        ]
        reporter = asyncio.create_task(progress.run(stop, config.progress_interval))

        async def faults_then_the_rest() -> None:
            await chaos.run(config.duration)
            await asyncio.sleep(max(0.0, config.duration - workload.clock()))

        try:
            interrupted = await _until_done_or_interrupted(asyncio.create_task(faults_then_the_rest()), interrupt)
        finally:
            await _stop(stop, [*workers, reporter], cancel=interrupt.is_set())
        _measure_time_lost(chaos.records, workload.outcomes.commit_times, workload.clock())
        print(progress.line(), file=stream, flush=True)
        if interrupted:
            print(f"interrupted at {workload.clock():.1f}s: faults stopped, checking the invariant", file=stream)
        # Retried: Ctrl-C may have come while a fault had a server down.
        invariants = await postgres_retry(check_invariants)(engine, workload)
    finally:
        await engine.dispose()
    return DemoReport(
        outcomes=workload.outcomes,
        faults=chaos.records,
        invariants=invariants,
        duration=workload.clock(),
        interrupted=interrupted,
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
        ("run", f"{report.duration:.1f}s" + (", interrupted (Ctrl-C): the run so far" if report.interrupted else ""))
    ]
    rows += [
        ("transfers ok", str(len(outcomes.ok))),
        ("transfers failed", str(len(outcomes.failed))),
        ("transfers outcome-unknown", str(len(outcomes.unknown))),
    ]
    rows += [
        (f"  outcome-unknown {group}", f"{unknown} of {total}")
        for group, (unknown, total) in outcomes.unknown_by_group().items()
        if total
    ]
    rows += [
        (f"  failed with {cause}", str(count))
        for cause, count in sorted(collections.Counter(outcomes.failed.values()).items())
    ]
    rows += [
        (f"retries {cause}", f"{count}  ({RETRY_CAUSES.get(cause, 'other')})")
        for cause, count in sorted(outcomes.retries.items())
    ]
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


def run_demo_command(args: argparse.Namespace) -> int:
    """Run ``db-retry demo``: 0 when the invariant holds, 1 when it breaks, 2 on bad input, 130 on Ctrl-C."""
    try:
        config = DemoConfig(
            duration=args.duration,
            workers=args.workers,
            accounts=args.accounts,
            faults=tuple(name.strip() for name in args.faults.split(",") if name.strip()),
            topology=args.topology,
            markers=args.markers,
        )
    except ValueError as exc:
        print(f"db-retry demo: {exc}", file=sys.stderr)  # noqa: T201 - the command's output
        return 2
    try:
        report = asyncio.run(_run_until_ctrl_c(config, sys.stderr if args.json else sys.stdout))
    except (PostgresBinariesNotFoundError, MissingComponentError, ClusterError) as exc:
        print(f"db-retry demo: {exc}", file=sys.stderr)  # noqa: T201 - the command's output
        return 2
    except KeyboardInterrupt:  # pragma: no cover - a second Ctrl-C while wrapping up; the kit stops its servers
        print("db-retry demo: interrupted again; stopping", file=sys.stderr)  # noqa: T201 - the command's output
        return INTERRUPTED
    return print_report(report, as_json=args.json)


def print_report(report: DemoReport, *, as_json: bool = False) -> int:
    """Print the report (a table, or JSON) and return the exit status: 130 after Ctrl-C, else 0 or 1."""
    print(json.dumps(report.as_dict(), indent=2) if as_json else format_report(report))  # noqa: T201 - the command's output
    if report.interrupted:
        return INTERRUPTED
    return 0 if report.invariants.holds else 1


async def _run_until_ctrl_c(config: DemoConfig, stream: typing.TextIO) -> DemoReport:
    """:func:`run_demo` with SIGINT setting its ``interrupt`` (a second one raises ``KeyboardInterrupt``)."""
    loop = asyncio.get_running_loop()
    interrupt = asyncio.Event()

    def on_sigint() -> None:
        if interrupt.is_set():  # pragma: no cover - a second Ctrl-C during the wrap-up: timing, not behaviour
            loop.remove_signal_handler(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
        interrupt.set()

    loop.add_signal_handler(signal.SIGINT, on_sigint)
    try:
        return await run_demo(config, stream=stream, interrupt=interrupt)
    finally:
        loop.remove_signal_handler(signal.SIGINT)
