"""Side-by-side benchmarks of this package and db-retry 0.8.4 from PyPI, in one run.

Usage (from the repository root)::

    .venv/bin/python benchmarks/run.py [--quick] [--json PATH] [--only NAME ...]

This driver owns the PostgreSQL servers (throwaway clusters of the test kit, ``db_retry.testing``) and
injects the faults. Both packages import as ``db_retry``, so each runs in its own interpreter: ours is
the interpreter running this script, the reference lives in ``.bench-venvs/ref-0.8.4`` (created on first
use, with the same SQLAlchemy, asyncpg and greenlet versions as ours). The same scenario script,
``benchmarks/scenarios.py``, runs in both, back to back, from a directory outside the repository. Times
on both sides come from ``time.monotonic()``: CLOCK_MONOTONIC, one clock for every process of a Linux machine.

Correctness checks fail the run loudly (exit status 1): the counter equals the successful increments,
no successful write is missing, no connection attempt or task is left behind. Goals are reported, not
asserted: a missed goal is a finding.
"""

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import datetime as dt
import functools
import importlib.metadata
import itertools
import json
import math
import os
import pathlib
import platform
import selectors
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import typing

import asyncpg

import db_retry
from db_retry.testing import PostgresCluster, PostgresNode
from db_retry.testing.endpoint import MovingEndpoint
from db_retry.testing.haproxy import HAProxy
from db_retry.testing.patroni import PatroniCluster
from db_retry.testing.pgbouncer import PgBouncer


REPO: typing.Final = pathlib.Path(__file__).resolve().parent.parent
BENCHMARKS: typing.Final = REPO / "benchmarks"
SCENARIOS: typing.Final = BENCHMARKS / "scenarios.py"
RESULTS: typing.Final = BENCHMARKS / "results"
REFERENCE_VERSION: typing.Final = "0.8.4"
REFERENCE_VENV: typing.Final = REPO / ".bench-venvs" / f"ref-{REFERENCE_VERSION}"
SHARED_DEPENDENCIES: typing.Final = ("sqlalchemy", "asyncpg", "greenlet")
ALL_SCENARIOS: typing.Final = (
    "overhead",
    "connect",
    "contention",
    "disconnects",
    "restart",
    "failover",
    "topologies",
)

HOSTS: typing.Final = 4
HANGING: typing.Final = (0, 1, 3)
CONNECT_TIMEOUT: typing.Final = 1.0
ACCOUNTS: typing.Final = 1000
BALANCE: typing.Final = 1000


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Workload:
    """One contention scenario: ``processes`` scenario processes of one package, ``workers`` callers each."""

    key: str  # for --workloads and the JSON
    label: str
    workload: str  # scenarios.py's name: hot, spread, rare
    processes: int
    workers: int
    zero_failures: bool  # issue 10: no failed call with the default settings
    goals: bool = True  # issue 10's goals apply (not to the one-worker yardstick)


WORKLOADS: typing.Final = (
    Workload(
        key="hot1",
        label="hot row, 1 worker",
        workload="hot",
        processes=1,
        workers=1,
        zero_failures=False,
        goals=False,
    ),
    Workload(key="hot32", label="hot row, 32 workers", workload="hot", processes=1, workers=32, zero_failures=False),
    Workload(
        key="hot4x8",
        label="hot row, 4 processes x 8 workers",
        workload="hot",
        processes=4,
        workers=8,
        zero_failures=False,
    ),
    Workload(
        key="spread32",
        label="spread transfers, 32 workers",
        workload="spread",
        processes=1,
        workers=32,
        zero_failures=True,
    ),
    Workload(
        key="spread4x8",
        label="spread transfers, 4 processes x 8 workers",
        workload="spread",
        processes=4,
        workers=8,
        zero_failures=True,
    ),
    Workload(
        key="rare50",
        label="rare unrelated conflicts, 50 workers",
        workload="rare",
        processes=1,
        workers=50,
        zero_failures=True,
    ),
)
RARE_IO_S: typing.Final = 0.01
RARE_CONFLICT_SHARE: typing.Final = 0.02
CALLERS: typing.Final = 4
CALL_PAUSE: typing.Final = 0.01  # each looping caller pauses this long between calls
POLL: typing.Final = 0.002  # how often the driver probes a restarting server


class BenchmarkError(RuntimeError):
    """A correctness check failed or a scenario process misbehaved: the run is not valid."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    quick: bool
    overhead_iterations: int
    overhead_rounds: int
    connects: int
    duration: float
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
        workloads: typing.Sequence[Workload] = WORKLOADS,
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
                SCENARIOS,
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


# -- servers, hanging hosts, faults ----------------------------------------------------------------------
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


class HangingHosts:
    """Loopback listeners that accept TCP connections and never answer: a hung server, as a client sees it."""

    def __init__(self, count: int) -> None:
        self.listeners = [socket.create_server(("127.0.0.1", 0), backlog=128) for _ in range(count)]
        self.addresses = [f"127.0.0.1:{listener.getsockname()[1]}" for listener in self.listeners]
        self.selector = selectors.DefaultSelector()
        self.stopping = threading.Event()
        self.accepted = 0
        for listener in self.listeners:
            listener.setblocking(False)  # noqa: FBT003 - the socket API
            self.selector.register(listener, selectors.EVENT_READ, data="listener")
        self.thread = threading.Thread(target=self._serve, name="hanging-hosts", daemon=True)

    def __enter__(self) -> typing.Self:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)
        for key in list(self.selector.get_map().values()):
            typing.cast("socket.socket", key.fileobj).close()
        self.selector.close()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            for key, _ in self.selector.select(timeout=0.1):
                sock = typing.cast("socket.socket", key.fileobj)
                if key.data == "listener":
                    with contextlib.suppress(BlockingIOError):
                        connection, _ = sock.accept()
                        connection.setblocking(False)  # noqa: FBT003 - the socket API
                        self.selector.register(connection, selectors.EVENT_READ, data="client")
                        self.accepted += 1
                    continue
                try:
                    data = sock.recv(65536)  # the startup packet: read and never answered
                except OSError:
                    data = b""
                if not data:
                    self.selector.unregister(sock)
                    sock.close()


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


async def failover(cluster: PostgresCluster) -> dict[str, float]:
    """Stop the primary (fast), promote the standby; the times the stop began, ended and the standby took writes."""
    primary, standby = cluster.primary, cluster.standbys[0]
    fault = time.monotonic()
    await asyncio.to_thread(primary.stop, "fast")
    stopped = time.monotonic()
    watcher = await standby.connect()
    try:
        promoting = asyncio.ensure_future(asyncio.to_thread(standby.promote))
        while True:
            began = time.monotonic()
            if not await watcher.fetchval("SELECT pg_is_in_recovery()"):
                writable = began
                break
            await asyncio.sleep(POLL)
        await promoting
    finally:
        await watcher.close()
    cluster.nodes[:] = [standby, primary]
    return {"fault": fault, "stopped": stopped, "back": writable}


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


# -- statistics --------------------------------------------------------------------------------------
def percentile(values: typing.Sequence[float], q: float) -> float:
    """Nearest-rank percentile (p95 of 20 values is the 19th smallest)."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def ms(seconds: float) -> float:
    return seconds * 1000


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
async def bench_overhead(context: Context) -> list[Row]:
    """Nanoseconds per call of a decorated no-op coroutine over a bare ``await``; ABBA order over two processes each."""
    settings = context.settings
    order = context.packages() if settings.quick else (*context.packages(0), *context.packages(1))
    bare: dict[str, list[float]] = collections.defaultdict(list)
    extra: dict[str, list[float]] = collections.defaultdict(list)
    params = {"iterations": settings.overhead_iterations, "rounds": settings.overhead_rounds}
    for package in order:
        async with Scenario(context, package, "overhead", params) as scenario:
            result = await scenario.expect("RESULT", timeout=300)
        bare[package.name] += result["bare_ns"]
        extra[package.name] += [
            wrapped - plain for plain, wrapped in zip(result["bare_ns"], result["decorated_ns"], strict=True)
        ]
    data: dict[str, dict[str, typing.Any]] = {
        name: {
            "bare_ns": statistics.median(bare[name]),
            "extra_ns": statistics.median(extra[name]),
            "rounds": extra[name],
        }
        for name in bare
    }
    context.data["overhead"] = data
    rounds = len(extra["ours"])
    return [
        Row(
            "overhead",
            f"extra ns per call over a bare await (median of {rounds} rounds)",
            data["reference"]["extra_ns"],
            data["ours"]["extra_ns"],
        ),
        Row("overhead", "bare await, ns per call", data["reference"]["bare_ns"], data["ours"]["bare_ns"]),
    ]


async def bench_connect(context: Context) -> list[Row]:
    """Connect latency over 4 hosts with k hanging, fresh and reused factory; then leftover tasks and sessions."""
    settings = context.settings
    rows: list[Row] = []
    data: dict[str, typing.Any] = {}
    async with running_cluster(context, standbys=HOSTS - 1) as cluster:
        with HangingHosts(max(HANGING)) as hanging:
            for index, k in enumerate(HANGING):
                hosts = [node.address for node in cluster.nodes[: HOSTS - k]] + hanging.addresses[:k]
                params = {
                    "hosts": hosts,
                    "timeout": CONNECT_TIMEOUT,
                    "connects": settings.connects,
                    "baseline": cluster.primary.address,
                }
                results: dict[str, typing.Any] = {}
                for package in context.packages(index):
                    async with Scenario(context, package, "connect", params) as scenario:
                        result = await scenario.expect("RESULT", timeout=60 + 3 * settings.connects * (HOSTS + 1))
                        if result["leftover_tasks"]:
                            msg = f"connect k={k} ({package.name}): tasks left running: {result['leftover_tasks']}"
                            raise BenchmarkError(msg)
                        await assert_no_sessions(cluster.nodes, f"connect k={k} ({package.name})")
                    results[package.name] = result
                data[f"k={k}"] = results
                rows += connect_rows(k, results)
                data[f"k={k}"]["baseline_median_s"] = median_baseline(results)
            data["hanging_accepted"] = hanging.accepted
    context.data["connect"] = data
    return rows


def median_baseline(results: dict[str, typing.Any]) -> float:
    """Median of the plain asyncpg connects to one healthy host, both processes pooled."""
    samples: list[float] = results["reference"]["baseline_s"] + results["ours"]["baseline_s"]
    return statistics.median(samples)


def connect_rows(k: int, results: dict[str, typing.Any]) -> list[Row]:
    label = f"connect n={HOSTS} k={k} hanging"
    rows: list[Row] = []
    for mode in ("fresh", "reused"):
        samples = [results[name][f"{mode}_s"] for name in ("reference", "ours")]
        rows.append(Row(label, f"{mode} factory: median ms", *(ms(statistics.median(values)) for values in samples)))
        rows.append(Row(label, f"{mode} factory: p95 ms", *(ms(percentile(values, 95)) for values in samples)))
    rows += [
        Row(label, f"failed connects ({name})", None, json.dumps(results[name]["failures"]))
        for name in ("reference", "ours")
        if results[name]["failures"]
    ]
    baseline = ms(median_baseline(results))
    rows.append(Row(label, "one plain asyncpg connect to a healthy host: median ms", baseline, baseline))
    return rows


async def contention_run(
    context: Context, package: Package, primary: PostgresNode, workload: Workload, round_number: int
) -> dict[str, typing.Any]:
    """One round of a workload for one package: its processes start together; fails loudly on a wrong total."""
    duration = context.settings.duration
    await primary.execute("UPDATE bench_counter SET n = 0 WHERE id = 1")
    await primary.execute("UPDATE bench_accounts SET moves = 0")
    base = {
        "dsn": primary.dsn(driver="asyncpg"),
        "workers": workload.workers,
        "duration": duration,
        "workload": workload.workload,
        "accounts": ACCOUNTS,
        "io_s": RARE_IO_S,
        "conflict_share": RARE_CONFLICT_SHARE,
    }
    async with contextlib.AsyncExitStack() as stack:
        processes = [
            await stack.enter_async_context(
                Scenario(context, package, "contention", base | {"seed": 1000 * round_number + number})
            )
            for number in range(workload.processes)
        ]
        for process in processes:
            await process.expect("READY", timeout=60)
        start_at = time.monotonic() + 0.2
        for process in processes:
            process.send(f"go {start_at}")
        results = [await process.expect("RESULT", timeout=duration + 120) for process in processes]
    calls = [call for result in results for call in result["calls"]]
    succeeded = sum(1 for *_, ok in calls if ok)
    what = f"{workload.label} ({package.name})"
    if workload.workload == "hot":
        counter = await primary.fetchval("SELECT n FROM bench_counter WHERE id = 1")
        if counter != succeeded:
            msg = f"{what}: counter {counter}, successful calls {succeeded}"
            raise BenchmarkError(msg)
    if workload.workload == "spread":
        total, moves = await primary.fetchval("SELECT ARRAY[sum(balance), sum(moves)] FROM bench_accounts")
        if total != ACCOUNTS * BALANCE or moves != 2 * succeeded:
            expected = ACCOUNTS * BALANCE
            msg = f"{what}: balances sum to {total} (expected {expected}), {moves} moves for {succeeded} transfers"
            raise BenchmarkError(msg)
    window = statistics.median(result["deadline"] - result["start"] for result in results)
    latencies = [end - start for start, end, _ in calls]
    return {
        "calls": len(calls),
        "calls_per_s": sum(
            1 for result in results for _, end, ok in result["calls"] if ok and end <= result["deadline"]
        )
        / window,
        "failed": len(calls) - succeeded,
        "attempts_per_call": sum(result["attempts"] for result in results) / max(1, len(calls)),
        "errors": dict(sum((collections.Counter(result["errors"]) for result in results), collections.Counter())),
        "p50_ms": ms(percentile(latencies, 50)),
        "p99_ms": ms(percentile(latencies, 99)),
        "max_ms": ms(max(latencies, default=math.nan)),
    }


CONTENTION_METRICS: typing.Final = (
    ("calls_per_s", "successful calls/s"),
    ("p50_ms", "call latency p50 ms"),
    ("p99_ms", "call latency p99 ms"),
    ("failed", "calls failed after retries, per round"),
    ("attempts_per_call", "attempts per call"),
)


async def bench_contention(context: Context, cluster: PostgresCluster) -> list[Row]:
    """Each workload ``rounds`` times per package, alternating which goes first; ratios per round."""
    rounds = context.settings.rounds
    rows: list[Row] = []
    data: dict[str, typing.Any] = {}
    for index, workload in enumerate(context.workloads):
        print(f"  {workload.label} ...", flush=True)
        runs: dict[str, list[dict[str, typing.Any]]] = {"reference": [], "ours": []}
        for round_number in range(rounds):
            for package in context.packages(index + round_number):
                runs[package.name].append(
                    await contention_run(context, package, cluster.primary, workload, round_number)
                )
        data[workload.key] = {
            "label": workload.label,
            "runs": runs,
            "zero_failures": workload.zero_failures,
            "goals": workload.goals,
        }
        label = f"{workload.label} ({rounds} rounds of {context.settings.duration:g} s)"
        for key, metric in CONTENTION_METRICS:
            reference = [run[key] for run in runs["reference"]]
            ours = [run[key] for run in runs["ours"]]
            ratios = tuple(
                mine / theirs for mine, theirs in zip(ours, reference, strict=True) if theirs and not math.isnan(theirs)
            )
            rows.append(
                Row(
                    label,
                    metric + " (median of rounds)",
                    statistics.median(reference),
                    statistics.median(ours),
                    ratios if len(ratios) == len(ours) else (),
                )
            )
    context.data["contention"] = data
    return rows


async def check_writes(node: PostgresNode, succeeded: typing.Sequence[str], what: str) -> dict[str, int]:
    """Compare the rows written with the calls that reported success; a missing successful write fails the run."""
    connection = await node.connect()
    try:
        written = {
            row["call_id"]: row["count"]
            for row in await connection.fetch("SELECT call_id, count(*) FROM bench_events GROUP BY call_id")
        }
    finally:
        await connection.close()
    lost = [call_id for call_id in succeeded if call_id not in written]
    if lost:
        msg = f"{what}: {len(lost)} write(s) reported successful are missing, e.g. {lost[:5]}"
        raise BenchmarkError(msg)
    return {
        "rows": sum(written.values()),
        "applied_twice": sum(count - 1 for count in written.values()),
        "applied_but_reported_failed": len(set(written) - set(succeeded)),
    }


def caller_metrics(result: dict[str, typing.Any], marks: dict[str, float]) -> dict[str, typing.Any]:
    calls = result["calls"]
    failed = [error for _, _, _, error in calls if error is not None]
    first_success: dict[int, float] = {}
    for caller, _, end, error in calls:
        if error is None and end > marks["stopped"]:
            first_success[caller] = min(first_success.get(caller, math.inf), end)
    return {
        "calls": len(calls),
        "failed": len(failed),
        "errors": dict(collections.Counter(failed)),
        "server_down_s": marks["back"] - marks["fault"],
        "first_success_after_back_ms": ms(min(first_success.values()) - marks["back"]) if first_success else None,
        "first_success_after_stop_ms": ms(min(first_success.values()) - marks["stopped"]) if first_success else None,
        "all_callers_back_after_back_ms": ms(max(first_success.values()) - marks["back"])
        if len(first_success) == CALLERS
        else None,
        "marks": marks,
    }


async def run_callers(
    context: Context,
    package: Package,
    params: dict[str, typing.Any],
    fault: typing.Callable[[], typing.Awaitable[dict[str, float]]],
) -> tuple[dict[str, typing.Any], dict[str, float]]:
    settings = context.settings
    async with Scenario(context, package, "callers", params) as scenario:
        await scenario.expect("READY", timeout=60)
        await asyncio.sleep(settings.before_fault)
        marks = await fault()
        await asyncio.sleep(settings.after_fault)
        scenario.send("stop")
        result = await scenario.expect("RESULT", timeout=120)
    return result, marks


def caller_rows(label: str, metrics: dict[str, dict[str, typing.Any]], back: str) -> list[Row]:
    def pair(key: str) -> tuple[typing.Any, typing.Any]:
        return metrics["reference"][key], metrics["ours"][key]

    return [
        Row(
            label,
            "failed calls / total",
            *(f"{m['failed']} / {m['calls']}" for m in (metrics["reference"], metrics["ours"])),
        ),
        Row(label, f"first successful call after {back}, ms", *pair("first_success_after_back_ms")),
        Row(label, f"every caller succeeded again after {back}, ms", *pair("all_callers_back_after_back_ms")),
        Row(label, f"server unavailable (stop began → {back}), s", *pair("server_down_s")),
        Row(label, "writes applied twice", *pair("applied_twice")),
        Row(label, "writes applied but reported failed", *pair("applied_but_reported_failed")),
    ]


async def bench_restart(context: Context, cluster: PostgresCluster) -> list[Row]:
    """4 looping writers (pool_pre_ping=False) across a fast and an immediate restart of the primary."""
    primary = cluster.primary
    rows: list[Row] = []
    data: dict[str, typing.Any] = {}
    modes: tuple[typing.Literal["fast", "immediate"], ...] = ("fast", "immediate")
    for index, mode in enumerate(modes):
        metrics: dict[str, dict[str, typing.Any]] = {}
        for package in context.packages(index):
            await primary.execute("TRUNCATE bench_events")
            params = {"dsn": primary.dsn(driver="asyncpg"), "callers": CALLERS, "pause": CALL_PAUSE, "multihost": False}
            result, marks = await run_callers(context, package, params, functools.partial(restart, primary, mode))
            metrics[package.name] = caller_metrics(result, marks) | await check_writes(
                primary, result["succeeded"], f"{mode} restart ({package.name})"
            )
        data[mode] = metrics
        rows += caller_rows(f"{mode} restart of the primary, {CALLERS} callers", metrics, "the server accepts again")
    context.data["restart"] = data
    return rows


async def bench_failover(context: Context) -> list[Row]:
    """4 looping writers on a multi-host DSN (read-write) while the primary stops and the standby is promoted."""
    metrics: dict[str, dict[str, typing.Any]] = {}
    for package in context.packages():
        async with running_cluster(context, standbys=1) as cluster:
            await create_schema(cluster.primary)
            await cluster.wait_for_replay()
            params = {
                "dsn": cluster.multihost_dsn(),
                "callers": CALLERS,
                "pause": CALL_PAUSE,
                "multihost": True,
                "connect_timeout": CONNECT_TIMEOUT,
            }
            result, marks = await run_callers(context, package, params, functools.partial(failover, cluster))
            metrics[package.name] = caller_metrics(result, marks) | await check_writes(
                cluster.primary, result["succeeded"], f"failover ({package.name})"
            )
    context.data["failover"] = metrics
    return caller_rows(
        f"failover (stop primary, promote standby), {CALLERS} callers", metrics, "the new primary takes writes"
    )


def write_window_ms(result: dict[str, typing.Any], marks: dict[str, float]) -> float | None:
    """The longest stretch with no successful call at all, from the fault on: how long writes were unavailable."""
    ends = sorted(end for _, _, end, error in result["calls"] if error is None and end > marks["fault"])
    if not ends:
        return None
    points = [marks["fault"], *ends]
    return ms(max(later - earlier for earlier, later in itertools.pairwise(points)))


def topology_metrics(result: dict[str, typing.Any], marks: dict[str, float]) -> dict[str, typing.Any]:
    return caller_metrics(result, marks) | {"window_ms": write_window_ms(result, marks)}


def topology_rows(label: str, metrics: dict[str, dict[str, typing.Any]], manager: str) -> list[Row]:
    def pair(key: str) -> tuple[typing.Any, typing.Any]:
        return metrics["reference"][key], metrics["ours"][key]

    return [
        Row(
            label,
            "failed calls / total",
            *(f"{m['failed']} / {m['calls']}" for m in (metrics["reference"], metrics["ours"])),
        ),
        Row(label, "writes unavailable (longest stretch without a successful call), ms", *pair("window_ms")),
        Row(label, f"{manager}, s", *pair("server_down_s")),
        Row(label, "writes applied twice", *pair("applied_twice")),
        Row(label, "writes applied but reported failed", *pair("applied_but_reported_failed")),
    ]


def _topology_params(dsn: str, *, multihost: bool, pgbouncer: bool = False) -> dict[str, typing.Any]:
    return {
        "dsn": dsn,
        "callers": CALLERS,
        "pause": CALL_PAUSE,
        "multihost": multihost,
        "pgbouncer": pgbouncer,
        "connect_timeout": CONNECT_TIMEOUT,
    }


async def _patroni_fault(cluster: PatroniCluster, kind: str) -> dict[str, float]:
    """Switch over or kill the leader's postmaster; the times the fault began and the new leader took writes."""
    fault = time.monotonic()
    transition = await (cluster.switchover() if kind == "switchover" else cluster.failover())
    return {"fault": fault, "stopped": fault, "back": fault + transition.seconds}


async def _bench_patroni(context: Context, kind: str, *, via_haproxy: bool) -> list[Row]:
    metrics: dict[str, dict[str, typing.Any]] = {}
    for package in context.packages():
        with PatroniCluster(members=2, name="bench-patroni") as cluster:
            leader = cluster.leader().node
            await create_schema(leader)
            with contextlib.ExitStack() as stack:
                if via_haproxy:
                    balancer = stack.enter_context(HAProxy(cluster))
                    params = _topology_params(balancer.dsn(), multihost=False)
                else:
                    params = _topology_params(cluster.multihost_dsn(target_session_attrs=None), multihost=True)
                fault = functools.partial(_patroni_fault, cluster, kind)
                result, marks = await run_callers(context, package, params, fault)
            metrics[package.name] = topology_metrics(result, marks) | await check_writes(
                cluster.leader().node, result["succeeded"], f"patroni {kind} ({package.name})"
            )
    context.data.setdefault("topologies", {})[f"patroni-{kind}{'-haproxy' if via_haproxy else ''}"] = metrics
    what = "POST /switchover" if kind == "switchover" else "leader postmaster killed"
    where = "HAProxy (GET /primary checks)" if via_haproxy else "multi-host DSN"
    return topology_rows(
        f"Patroni, {what}, through a {where}, {CALLERS} callers", metrics, "Patroni: fault → new leader writable"
    )


async def _bench_pgbouncer(context: Context) -> list[Row]:
    metrics: dict[str, dict[str, typing.Any]] = {}
    for package in context.packages():
        async with running_cluster(context, standbys=0) as cluster:
            primary = cluster.primary
            await create_schema(primary)
            with PgBouncer(primary.host, primary.port, pool_mode="transaction") as bouncer:
                params = _topology_params(bouncer.dsn(), multihost=False, pgbouncer=True)
                result, marks = await run_callers(context, package, params, functools.partial(restart, primary, "fast"))
            metrics[package.name] = topology_metrics(result, marks) | await check_writes(
                primary, result["succeeded"], f"pgbouncer restart ({package.name})"
            )
    context.data.setdefault("topologies", {})["pgbouncer-restart"] = metrics
    return topology_rows(
        f"PgBouncer (transaction pooling), fast restart of its server, {CALLERS} callers",
        metrics,
        "server down (stop began → accepts again)",
    )


async def _move(endpoint: MovingEndpoint) -> dict[str, float]:
    fault = time.monotonic()
    await endpoint.move(hold=1.0)
    back = time.monotonic()
    return {"fault": fault, "stopped": fault, "back": back}


async def _bench_moving_endpoint(context: Context) -> list[Row]:
    metrics: dict[str, dict[str, typing.Any]] = {}
    for package in context.packages():
        async with running_cluster(context, standbys=1) as cluster:
            await create_schema(cluster.primary)
            await cluster.wait_for_replay()
            async with MovingEndpoint(cluster) as endpoint:
                params = _topology_params(endpoint.dsn(), multihost=False)
                result, marks = await run_callers(context, package, params, functools.partial(_move, endpoint))
            metrics[package.name] = topology_metrics(result, marks) | await check_writes(
                cluster.primary, result["succeeded"], f"moving endpoint ({package.name})"
            )
    context.data.setdefault("topologies", {})["moving-endpoint"] = metrics
    return topology_rows(
        f"moving endpoint (old primary read-only, standby promoted, address moved), {CALLERS} callers",
        metrics,
        "the whole move (1 s hold, old primary rebuilt)",
    )


async def bench_topologies(context: Context) -> list[Row]:
    """Issue 11: 4 looping writers on each deployment topology of the kit, ours and 0.8.4 side by side."""
    rows = await _bench_patroni(context, "switchover", via_haproxy=False)
    rows += await _bench_patroni(context, "failover", via_haproxy=False)
    rows += await _bench_patroni(context, "failover", via_haproxy=True)
    rows += await _bench_pgbouncer(context)
    rows += await _bench_moving_endpoint(context)
    return rows


async def bench_disconnects(context: Context, cluster: PostgresCluster) -> list[list[str]]:
    """Seed 003, ours only: pre-ping (pessimistic) vs retry on invalidation (optimistic)."""
    settings = context.settings
    primary = cluster.primary
    params = {
        "host": primary.host,
        "port": primary.port,
        "latency_transactions": settings.latency_transactions,
        "count_transactions": settings.count_transactions,
        "kill_bursts": settings.kill_bursts,
    }
    async with Scenario(context, context.ours, "disconnects", params) as scenario:
        result = await scenario.expect("RESULT", timeout=600)
    await assert_no_sessions([primary], "disconnects")
    context.data["disconnects"] = result
    trips, latency, killed = result["round_trips"], result["latency_s"], result["killed"]

    def per_transaction(mode: str, key: str) -> float:
        return float(trips[mode][key]) / float(trips[mode]["transactions"])

    def describe(mode: str) -> str:
        outcome = killed[mode]
        errors = sum(outcome["errors"].values())
        detail = ", ".join(f"{count}x {name}" for name, count in outcome["errors"].items())
        text = f"{errors} of {outcome['calls']} calls failed" + (f" ({detail})" if detail else "")
        retries = outcome["attempts"] - outcome["calls"]
        return text + (f"; {retries} retried" if retries else "")

    return [
        [
            "round trips per checkout (short read transaction)",
            fmt(per_transaction("pessimistic", "round_trips")),
            fmt(per_transaction("optimistic", "round_trips")),
        ],
        [
            "statements sent by the application per checkout",
            fmt(per_transaction("pessimistic", "statements")),
            fmt(per_transaction("optimistic", "statements")),
        ],
        [
            "latency per short transaction, median ms",
            fmt(ms(statistics.median(latency["pessimistic"]))),
            fmt(ms(statistics.median(latency["optimistic"]))),
        ],
        [
            "latency per short transaction, p95 ms",
            fmt(ms(percentile(latency["pessimistic"], 95))),
            fmt(ms(percentile(latency["optimistic"], 95))),
        ],
        [
            "after pg_terminate_backend of every pooled session, without postgres_retry",
            describe("pessimistic"),
            describe("optimistic"),
        ],
        ["the same, calls under @postgres_retry", "—", describe("optimistic+postgres_retry")],
        [
            "slowest call of the first burst after the kill, ms",
            fmt(ms(max(killed["pessimistic"]["burst_latency_s"][0]))),
            fmt(ms(max(killed["optimistic+postgres_retry"]["burst_latency_s"][0]))) + " (with postgres_retry)",
        ],
    ]


# -- goals ------------------------------------------------------------------------------------------------
def goals(data: dict[str, typing.Any]) -> list[dict[str, typing.Any]]:
    """Issue 5's goals against this run's numbers."""
    found: list[dict[str, typing.Any]] = []

    def goal(name: str, met: bool, detail: str) -> None:  # noqa: FBT001
        found.append({"goal": name, "met": met, "detail": detail})

    if "connect" in data:
        k3 = data["connect"][f"k={max(HANGING)}"]
        fresh_p95 = ms(percentile(k3["ours"]["fresh_s"], 95))
        reused_p95 = ms(percentile(k3["ours"]["reused_s"], 95))
        goal(
            f"connect, {HOSTS} hosts with {max(HANGING)} hanging, timeout 1 s: p95 ≤ 300 ms",
            fresh_p95 <= 300 and reused_p95 <= 300,
            f"fresh factory p95 {fresh_p95:.0f} ms, reused {reused_p95:.0f} ms "
            f"(reference {ms(percentile(k3['reference']['fresh_s'], 95)):.0f} ms)",
        )
        ratios = []
        for k in HANGING:
            entry = data["connect"][f"k={k}"]
            ratios.append((k, statistics.median(entry["ours"]["reused_s"]) / entry["baseline_median_s"]))
        worst = max(ratio for _, ratio in ratios)
        goal(
            "reused factory, remembered host up: about one healthy connect (median ≤ 1.5 x a plain asyncpg connect)",
            worst <= 1.5,
            ", ".join(f"k={k}: {ratio:.2f}x" for k, ratio in ratios),
        )
    if "contention" in data:
        for entry in data["contention"].values():
            if entry["goals"]:
                contention_goals(entry, goal)
    if "restart" in data:
        for mode, metrics in data["restart"].items():
            ours = metrics["ours"]
            first = ours["first_success_after_back_ms"]
            goal(
                f"{mode} restart, {CALLERS} callers: 0 failed calls",
                ours["failed"] == 0,
                f"{ours['failed']} of {ours['calls']}",
            )
            goal(
                f"{mode} restart: first success ≤ 100 ms after the server is back",
                first is not None and first <= 100,
                f"{first:.0f} ms (reference {fmt(metrics['reference']['first_success_after_back_ms'])} ms)"
                if first is not None
                else "no success after the restart",
            )
    if "overhead" in data:
        ours, ref = data["overhead"]["ours"]["extra_ns"], data["overhead"]["reference"]["extra_ns"]
        spread = {name: statistics.quantiles(data["overhead"][name]["rounds"], n=4) for name in ("ours", "reference")}
        goal(
            "decorator overhead ≤ reference's",
            ours <= ref,
            f"+{ours:.0f} ns vs +{ref:.0f} ns per call (middle half of the rounds: "
            f"{spread['ours'][0]:.0f} to {spread['ours'][2]:.0f} vs "
            f"{spread['reference'][0]:.0f} to {spread['reference'][2]:.0f})",
        )
    return found


def contention_goals(entry: dict[str, typing.Any], goal: typing.Callable[[str, bool, str], None]) -> None:
    """Issue 10's goals for one workload, each judged on the median of the per-round ratios."""
    runs = entry["runs"]

    def ratios(key: str) -> list[float]:
        return [ours[key] / ref[key] for ours, ref in zip(runs["ours"], runs["reference"], strict=True) if ref[key]]

    def spread(key: str) -> str:
        found = ratios(key)
        if not found:
            return "—"
        return f"{statistics.median(found):.2f} (rounds {min(found):.2f} to {max(found):.2f})"

    def median_ratio(key: str) -> float:
        found = ratios(key)
        return statistics.median(found) if found else math.nan

    label = entry["label"]
    goal(f"{label}: calls/s ≥ 1.0x", median_ratio("calls_per_s") >= 1.0, spread("calls_per_s"))
    goal(f"{label}: p50 ≤ 1.1x", median_ratio("p50_ms") <= 1.1, spread("p50_ms"))
    goal(f"{label}: p99 ≤ 0.2x", median_ratio("p99_ms") <= 0.2, spread("p99_ms"))
    ours_failed = [run["failed"] for run in runs["ours"]]
    ref_failed = [run["failed"] for run in runs["reference"]]
    met = sum(ours_failed) <= sum(ref_failed) and (not entry["zero_failures"] or sum(ours_failed) == 0)
    goal(
        f"{label}: failed calls ≤ reference's" + (", and 0" if entry["zero_failures"] else ""),
        met,
        f"{ours_failed} vs {ref_failed} per round",
    )


# -- main -----------------------------------------------------------------------------------------------------
def machine() -> dict[str, typing.Any]:
    meminfo = pathlib.Path("/proc/meminfo")
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    memory_kib = (
        next((int(line.split()[1]) for line in meminfo.read_text().splitlines() if line.startswith("MemTotal:")), 0)
        if meminfo.exists()
        else 0
    )
    model = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in cpuinfo.read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if cpuinfo.exists()
        else platform.processor()
    )
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "memory_gib": round(memory_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
    }


async def run(context: Context, only: set[str]) -> tuple[list[Row], list[list[str]] | None]:
    rows: list[Row] = []
    seed: list[list[str]] | None = None
    if "overhead" in only:
        print("overhead ...", flush=True)
        rows += await bench_overhead(context)
    if "connect" in only:
        print("connect latency with hanging hosts ...", flush=True)
        rows += await bench_connect(context)
    if only & {"contention", "disconnects", "restart"}:
        async with running_cluster(context, standbys=1) as cluster:
            await create_schema(cluster.primary)
            if "contention" in only:
                print("contention: hot row, spread transfers, rare conflicts ...", flush=True)
                rows += await bench_contention(context, cluster)
            if "disconnects" in only:
                print("pre-ping vs retry on invalidation (ours) ...", flush=True)
                seed = await bench_disconnects(context, cluster)
            if "restart" in only:
                print("restarts ...", flush=True)
                rows += await bench_restart(context, cluster)
    if "failover" in only:
        print("failover ...", flush=True)
        rows += await bench_failover(context)
    if "topologies" in only:
        print("topologies (Patroni, HAProxy, PgBouncer, a moving endpoint) ...", flush=True)
        rows += await bench_topologies(context)
    return rows, seed


def report(context: Context, rows: list[Row], seed: list[list[str]] | None, meta: dict[str, typing.Any]) -> str:
    reference, ours = context.reference.label, context.ours.label
    parts = [
        markdown_table(
            ["scenario", "metric", reference, ours, "ours / reference"],
            ([row.scenario, row.metric, fmt(row.reference), fmt(row.ours), row.ratio_text] for row in rows),
        )
    ]
    if seed is not None:
        parts.append(
            "Disconnect handling, ours only (seed 003):\n\n"
            + markdown_table(["metric", "pessimistic: pool_pre_ping=True", "optimistic: pool_pre_ping=False"], seed)
        )
    found = context.goals
    if found:
        parts.append(
            "Goals (issues 5 and 10):\n\n"
            + markdown_table(
                ["goal", "met", "measured"], ([g["goal"], "yes" if g["met"] else "**no**", g["detail"]] for g in found)
            )
        )
    parts.append(describe_run(meta))
    return "\n\n".join(parts)


def source_state() -> str:
    """The commit our package was measured at, and whether ``db_retry/`` had uncommitted changes."""

    def git(*args: str) -> str:
        completed = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False, timeout=30)
        return completed.stdout.strip() if completed.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown commit"
    dirty = git("status", "--porcelain", "--", "db_retry")
    return f"{commit} + uncommitted changes in db_retry/" if dirty else commit


def describe_run(meta: dict[str, typing.Any]) -> str:
    host = meta["machine"]
    versions = "; ".join(
        f"{side}: " + ", ".join(f"{name} {version}" for name, version in found.items())
        for side, found in meta["versions"].items()
    )
    return (
        f"{meta['date']} · {host['nproc']} CPUs ({host['cpu']}), {host['memory_gib']} GiB, Linux {host['kernel']}"
        f" · 1-minute load average {meta['load_average'][0]:.1f} to {meta['load_average'][1]:.1f}"
        f" · PostgreSQL {meta['server_version'] or '(no server started)'} · Python {meta['python']}"
        f" · ours at {meta['source']} · {versions}"
        f"\n`{meta['command']}`"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs: checks the harness, numbers are rough")
    parser.add_argument("--json", type=pathlib.Path, default=RESULTS / "latest.json", help="where to write the JSON")
    parser.add_argument("--only", nargs="+", choices=ALL_SCENARIOS, default=list(ALL_SCENARIOS), metavar="NAME")
    parser.add_argument(
        "--workloads",
        nargs="+",
        choices=[workload.key for workload in WORKLOADS],
        default=[workload.key for workload in WORKLOADS],
        metavar="KEY",
        help="contention workloads to run: " + ", ".join(workload.key for workload in WORKLOADS),
    )
    args = parser.parse_args()
    settings = Settings.make(quick=args.quick)
    started = time.monotonic()
    source = source_state()
    reference, ours = ensure_reference_venv(), our_package()
    RESULTS.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(RESULTS / "logs", ignore_errors=True)
    (RESULTS / "logs").mkdir()
    with tempfile.TemporaryDirectory(prefix="db-retry-bench-") as workdir:
        workloads = [workload for workload in WORKLOADS if workload.key in args.workloads]
        context = Context(settings, reference, ours, pathlib.Path(workdir), workloads)
        try:
            rows, seed = asyncio.run(run(context, set(args.only)))
        except BenchmarkError as exc:
            print(
                f"\nBENCHMARK FAILED: {exc}\n(scenario logs in {(RESULTS / 'logs').relative_to(REPO)})", file=sys.stderr
            )
            return 1
    command = shlex.join([os.path.relpath(sys.executable, REPO), "benchmarks/run.py", *sys.argv[1:]])
    meta = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "server_version": context.data.get("server_version"),
        "python": platform.python_version(),
        "versions": {side: hello["versions"] for side, hello in sorted(context.hello.items())},
        "command": command,
        "source": source,
        "load_average": [min(context.load, default=0), max(context.load, default=0)],
        "quick": settings.quick,
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    context.goals = goals(context.data)
    text = report(context, rows, seed, meta)
    print("\n" + text + f"\n\n(elapsed {meta['elapsed_s']} s)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "meta": meta,
        "rows": [dataclasses.asdict(row) | {"ratio": row.ratio} for row in rows],
        "seed003": seed,
        "goals": context.goals,
        "data": context.data,
    }
    args.json.write_text(json.dumps(payload, indent=1, default=str))
    print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
