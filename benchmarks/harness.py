"""What the driver's scenario modules share: settings, both packages, scenario processes, servers, statistics, tables.

Driver side only: it imports the test kit (``db_retry.testing``), which db-retry 0.8.4 does not have, so the
scenario modules import it inside their driver functions, never at the top (their child side runs under 0.8.4).
"""

import asyncio
import contextlib
import dataclasses
import importlib.metadata
import json
import math
import os
import pathlib
import statistics
import subprocess
import sys
import time
import typing

import asyncpg

import db_retry
from db_retry.testing import PostgresCluster, PostgresNode


if typing.TYPE_CHECKING:
    from contention import Workload


REPO: typing.Final = pathlib.Path(__file__).resolve().parent.parent
BENCHMARKS: typing.Final = REPO / "benchmarks"
SCENARIO_SCRIPT: typing.Final = BENCHMARKS / "scenarios.py"
RESULTS: typing.Final = BENCHMARKS / "results"
REFERENCE_VERSION: typing.Final = "0.8.4"
REFERENCE_VENV: typing.Final = REPO / ".bench-venvs" / f"ref-{REFERENCE_VERSION}"
SHARED_DEPENDENCIES: typing.Final = ("sqlalchemy", "asyncpg", "greenlet")

CONNECT_TIMEOUT: typing.Final = 1.0
ACCOUNTS: typing.Final = 1000
BALANCE: typing.Final = 1000
POLL: typing.Final = 0.002  # how often the driver probes a restarting server


class BenchmarkError(RuntimeError):
    """A correctness check failed or a scenario process misbehaved: the run is not valid."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    quick: bool
    overhead_iterations: int
    overhead_rounds: int
    connects: int
    duration: float  # seconds per contention round
    loaded_duration: float  # seconds per round of a workload run under the CPU hog
    before_fault: float
    after_fault: float
    latency_transactions: int
    count_transactions: int
    kill_bursts: int
    rounds: int  # runs per package of each contention workload, in alternating order

    @classmethod
    def make(cls, *, quick: bool) -> "Settings":
        if quick:
            return cls(
                quick=True,
                overhead_iterations=50_000,
                overhead_rounds=5,
                connects=5,
                duration=2.0,
                loaded_duration=2.0,
                before_fault=0.5,
                after_fault=3.0,
                latency_transactions=200,
                count_transactions=50,
                kill_bursts=2,
                rounds=3,
            )
        return cls(
            quick=False,
            overhead_iterations=200_000,
            overhead_rounds=9,
            connects=20,
            duration=8.0,
            loaded_duration=6.0,
            before_fault=1.5,
            after_fault=5.0,
            latency_transactions=2000,
            count_transactions=500,
            kill_bursts=3,
            rounds=3,
        )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Package:
    """One side of the comparison: an interpreter with its own ``db_retry``."""

    name: str  # "reference" or "ours"
    label: str
    python: pathlib.Path
    version: str
    root: pathlib.Path  # where its db_retry must be imported from


# -- the reference virtualenv ------------------------------------------------------------------------
def installed_versions(python: pathlib.Path, packages: typing.Iterable[str]) -> dict[str, str | None]:
    code = (
        "import importlib.metadata as m, json, sys\n"
        "def v(p):\n"
        "    try:\n"
        "        return m.version(p)\n"
        "    except m.PackageNotFoundError:\n"
        "        return None\n"
        "print(json.dumps({p: v(p) for p in sys.argv[1:]}))\n"
    )
    completed = subprocess.run(
        [python, "-I", "-c", code, *packages], capture_output=True, text=True, check=False, timeout=60
    )
    if completed.returncode != 0:
        return dict.fromkeys(packages)
    versions: dict[str, str | None] = json.loads(completed.stdout)
    return versions


def ensure_reference_venv() -> Package:
    """``.bench-venvs/ref-0.8.4`` with db-retry 0.8.4 and our SQLAlchemy/asyncpg/greenlet versions; reused if right."""
    wanted = {"db-retry": REFERENCE_VERSION, **{name: importlib.metadata.version(name) for name in SHARED_DEPENDENCIES}}
    python = REFERENCE_VENV / "bin" / "python"
    if not python.exists() or installed_versions(python, wanted) != wanted:
        if not python.exists():
            print(f"creating {REFERENCE_VENV.relative_to(REPO)}", flush=True)
            subprocess.run([sys.executable, "-m", "venv", "--clear", REFERENCE_VENV], check=True, timeout=300)
        pins = [f"{name}=={version}" for name, version in wanted.items()]
        print(f"installing {' '.join(pins)} into {REFERENCE_VENV.relative_to(REPO)}", flush=True)
        completed = subprocess.run(
            [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", *pins],
            capture_output=True,
            text=True,
            check=False,
            timeout=600,
        )
        if completed.returncode != 0:
            msg = f"pip could not install {pins}:\n{completed.stdout}{completed.stderr}"
            raise BenchmarkError(msg)
        found = installed_versions(python, wanted)
        if found != wanted:
            msg = f"{REFERENCE_VENV} has {found}, expected {wanted}"
            raise BenchmarkError(msg)
    return Package(
        name="reference",
        label=f"db-retry {REFERENCE_VERSION}",
        python=python,
        version=REFERENCE_VERSION,
        root=REFERENCE_VENV,
    )


def our_package() -> Package:
    return Package(
        name="ours",
        label=f"ours {importlib.metadata.version('db-retry')}",
        python=pathlib.Path(sys.executable),
        version=importlib.metadata.version("db-retry"),
        root=pathlib.Path(db_retry.__file__).resolve().parent,
    )


def child_environment() -> dict[str, str]:
    """Our environment without anything that changes either package's defaults or where Python imports from."""
    dropped = ("DB_RETRY_", "DB_UTILS_", "PG", "PYTHON")
    return {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(dropped) and key not in {"VIRTUAL_ENV", "DB_DSN"}
    }


# -- scenario processes --------------------------------------------------------------------------------
class Context:
    """What every benchmark step shares: settings, both packages, where logs go, the results so far."""

    def __init__(
        self,
        settings: Settings,
        reference: Package,
        ours: Package,
        workdir: pathlib.Path,
        workloads: typing.Sequence["Workload"],
    ) -> None:
        self.settings = settings
        self.workloads = workloads
        self.reference = reference
        self.ours = ours
        self.workdir = workdir
        self.logs = RESULTS / "logs"
        self.runs = 0
        self.hello: dict[str, typing.Any] = {}
        self.data: dict[str, typing.Any] = {}
        self.goals: list[dict[str, typing.Any]] = []
        self.load: list[float] = []  # 1-minute load average as each scenario process started

    def packages(self, index: int = 0) -> tuple[Package, Package]:
        """Both packages, the reference first on even ``index`` and ours first on odd: alternating order."""
        return (self.reference, self.ours) if index % 2 == 0 else (self.ours, self.reference)


class Scenario:
    """One run of ``scenarios.py NAME`` in ``package``'s interpreter; killed on exit if still running."""

    def __init__(self, context: Context, package: Package, name: str, params: dict[str, typing.Any]) -> None:
        self.context = context
        self.package = package
        self.name = name
        self.params = params
        context.runs += 1
        self.log_path = context.logs / f"{context.runs:02d}-{name}-{package.name}.log"
        self.process: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> typing.Self:
        with await asyncio.to_thread(self.log_path.open, "wb") as log:
            self.process = await asyncio.create_subprocess_exec(
                self.package.python,
                "-I",  # no script directory, no PYTHON* variables, no user site: only the installed db_retry
                SCENARIO_SCRIPT,
                self.name,
                json.dumps(self.params),
                cwd=self.context.workdir,
                env=child_environment(),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                limit=1 << 26,
            )
        self.context.load.append(os.getloadavg()[0])
        hello = await self.expect("HELLO", timeout=60)
        self.check_origin(hello)
        self.context.hello[self.package.name] = hello
        return self

    def check_origin(self, hello: dict[str, typing.Any]) -> None:
        """Fail unless the process imported the intended ``db_retry`` (both packages have that name)."""
        origin = pathlib.Path(hello["file"]).resolve()
        version = hello["versions"]["db-retry"]
        if version != self.package.version or not origin.is_relative_to(self.package.root):
            msg = f"{self.package.name}: imported db-retry {version} from {origin}"
            raise BenchmarkError(msg)

    async def __aexit__(self, *exc_info: object) -> None:
        process = self.process
        if process is None:
            return
        if process.returncode is None and process.stdin is not None and not process.stdin.is_closing():
            process.stdin.close()
        try:
            await asyncio.wait_for(process.wait(), timeout=15)
        except TimeoutError:
            process.kill()
            await process.wait()
        if process.returncode != 0 and exc_info[0] is None:
            msg = f"{self.name} ({self.package.name}) exited with {process.returncode}\n{self.log_tail()}"
            raise BenchmarkError(msg)

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    async def expect(self, tag: str, *, timeout: float) -> typing.Any:  # noqa: ANN401 - JSON
        """The JSON payload of the next ``@TAG`` line on the process's stdout."""
        if self.process is None or self.process.stdout is None:  # pragma: no cover - only after __aenter__
            raise BenchmarkError(self.name)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                line = await asyncio.wait_for(self.process.stdout.readline(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                msg = f"{self.name} ({self.package.name}): no @{tag} within {timeout:g}s\n{self.log_tail()}"
                raise BenchmarkError(msg) from None
            if not line:
                await self.process.wait()
                msg = (
                    f"{self.name} ({self.package.name}) exited with {self.process.returncode} before @{tag}\n"
                    f"{self.log_tail()}"
                )
                raise BenchmarkError(msg)
            head, _, payload = line.decode().partition(" ")
            if head == f"@{tag}":
                return json.loads(payload)

    def send(self, command: str) -> None:
        if self.process is not None and self.process.stdin is not None:
            self.process.stdin.write(f"{command}\n".encode())


# -- servers, faults, load -------------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def running_cluster(context: Context, standbys: int) -> typing.AsyncIterator[PostgresCluster]:
    """A throwaway cluster of the test kit: a primary and ``standbys`` streaming standbys, stopped on exit."""
    cluster = PostgresCluster(standbys=standbys, name="bench")
    try:
        await asyncio.to_thread(cluster.start)
        context.data.setdefault("server_version", await cluster.primary.fetchval("SHOW server_version"))
        yield cluster
    finally:
        await asyncio.to_thread(cluster.stop)


async def client_sessions(node: PostgresNode) -> int:
    sessions: int = await node.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
    )
    return sessions


async def assert_no_sessions(nodes: typing.Iterable[PostgresNode], what: str, *, timeout: float = 5.0) -> None:
    """Fail loudly if a client session is still open on any node ``timeout`` seconds after ``what`` closed all."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    for node in nodes:
        while (count := await client_sessions(node)) > 0:
            if loop.time() >= deadline:
                msg = f"{what}: {count} client session(s) left open on {node.name} ({node.address})"
                raise BenchmarkError(msg)
            await asyncio.sleep(0.05)


async def wait_accepting(node: PostgresNode, *, timeout: float = 60.0) -> float:
    """Poll ``node`` until a connection succeeds; return when the first successful attempt started."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        began = time.monotonic()
        try:
            connection = await asyncpg.connect(node.dsn(driver=None), timeout=1.0)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            if loop.time() >= deadline:
                msg = f"{node.name} not accepting connections {timeout:g}s after a restart: {exc!r}"
                raise BenchmarkError(msg) from exc
            await asyncio.sleep(POLL)
        else:
            await connection.close()
            return began


async def restart(node: PostgresNode, mode: typing.Literal["fast", "immediate"]) -> dict[str, float]:
    """Stop ``node`` with ``mode``, start it again; the times the stop began, ended and the server accepted again."""
    fault = time.monotonic()
    await asyncio.to_thread(node.stop, mode)
    stopped = time.monotonic()
    await asyncio.to_thread(node.start, wait=False)
    back = await wait_accepting(node)
    return {"fault": fault, "stopped": stopped, "back": back}


SCHEMA: typing.Final = (
    "CREATE TABLE bench_counter (id int PRIMARY KEY, n bigint NOT NULL)",
    "INSERT INTO bench_counter VALUES (1, 0)",
    "CREATE TABLE bench_events (call_id text NOT NULL)",
    "CREATE TABLE bench_accounts (id int PRIMARY KEY, balance bigint NOT NULL, moves bigint NOT NULL DEFAULT 0)",
    f"INSERT INTO bench_accounts (id, balance) SELECT g, {BALANCE} FROM generate_series(1, {ACCOUNTS}) g",  # noqa: S608 - constants
)


async def create_schema(node: PostgresNode) -> None:
    for statement in SCHEMA:
        await node.execute(statement)


# The driver's PID is written in, not read at start-up: a driver killed before a hog's first line would leave
# it spinning under its new parent.
HOG: typing.Final = (
    "import os, time\n"
    "end = time.monotonic() + {limit}\n"
    "while os.getppid() == {parent} and time.monotonic() < end:\n"
    "    for _ in range(200_000):\n"
    "        pass\n"
)


@contextlib.contextmanager
def cpu_hog(limit_s: float) -> typing.Iterator[list[int]]:
    """One process per core spinning at full speed while the block runs; each killed by its PID and waited for.

    A hog also ends on its own after ``limit_s`` seconds or as soon as this driver is gone (its parent changes),
    so a driver killed with SIGKILL leaves nothing spinning on a shared machine.
    """
    hogs: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(os.cpu_count() or 1):
            hogs.append(  # noqa: PERF401 - each one started (and so killed in `finally`) even if a later one fails
                subprocess.Popen(
                    [sys.executable, "-I", "-S", "-c", HOG.format(parent=os.getpid(), limit=limit_s)],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        yield [hog.pid for hog in hogs]
    finally:
        for hog in hogs:
            hog.kill()  # by PID (Popen polls first, so never a recycled PID)
        for hog in hogs:
            hog.wait()


# -- statistics --------------------------------------------------------------------------------------
def percentile(values: typing.Sequence[float], q: float) -> float:
    """Nearest-rank percentile (p95 of 20 values is the 19th smallest)."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def ms(seconds: float) -> float:
    return seconds * 1000


def ratio_summary(ratios: typing.Sequence[float]) -> str:
    """The median of per-round ratios with their range: ``0.12 (rounds 0.11 to 0.12)``."""
    if not ratios:
        return "—"
    return f"{statistics.median(ratios):.2f} (rounds {min(ratios):.2f} to {max(ratios):.2f})"


# A goal as a scenario module reports it: its text, whether it was met, the measured figures.
GoalSink: typing.TypeAlias = typing.Callable[[str, bool, str], None]


# -- results -------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, slots=True)
class Row:
    scenario: str
    metric: str
    reference: float | str | None
    ours: float | str | None
    rounds: tuple[float, ...] = ()  # ours / reference in each round, when the row pools several

    @property
    def ratio(self) -> float | None:
        if self.rounds:
            return statistics.median(self.rounds)
        if isinstance(self.reference, (int, float)) and isinstance(self.ours, (int, float)) and self.reference:
            return self.ours / self.reference
        return None

    @property
    def ratio_text(self) -> str:
        text = fmt_ratio(self.ratio)
        if len(self.rounds) > 1:
            text += f" ({min(self.rounds):.2f} to {max(self.rounds):.2f})"
        return text


def fmt(value: float | str | None) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    if isinstance(value, int) or float(value).is_integer():
        return f"{int(value)}"
    if math.isnan(value):
        return "—"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def fmt_ratio(ratio: float | None) -> str:
    return "—" if ratio is None else f"{ratio:.2f}"


def markdown_table(headers: typing.Sequence[str], rows: typing.Iterable[typing.Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# -- the benchmarks ----------------------------------------------------------------------------------------
