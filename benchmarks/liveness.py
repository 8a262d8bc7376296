"""Liveness and deadlines: how fast a silent server is noticed, and what the defences cost when nothing fails.

    .venv/bin/python benchmarks/liveness.py [--rounds 3] [--bound 20] [--only detection deadline happy]

Three measurements, printed as markdown tables (about 3 to 4 minutes in all):

1. **Detection time per silent fault.** One throwaway primary per fault (the kit's ``PostgresCluster``),
   one worker process per driver x configuration x fault (the settings are environment variables, read
   when a connection is made and when the watchdog is created), each with a warm ``QueuePool`` of one
   connection. Every worker starts ``SELECT pg_sleep(60)`` at the same moment; ``LEAD`` seconds later the
   three faults strike, each on its own server: ``TcpProxy.hang()`` (the kernel still acknowledges),
   ``faults.freeze(node)`` (SIGSTOP) and ``faults.partition(node)`` (iptables DROP). A worker reports the
   moment its call fails and whether the watchdog cut it (its log record came first) or the kernel did
   (keepalives, ``TCP_USER_TIMEOUT``); the detection time is that moment minus the moment the fault was in
   place (``time.monotonic()``: one clock for every process). A call still waiting ``--bound`` seconds
   after the fault counts as ``> bound``. Then every fault ends, the sleeping backends are terminated and
   the next round begins.
2. **Cost of the server-side limits per attempt.** A one-INSERT ``engine.begin()`` transaction under
   ``@postgres_retry`` and under ``@postgres_retry(deadline=10)``, warm pool: round trips counted through a
   ``TcpProxy`` (each simple ``Query`` or extended-protocol ``Sync``), time per transaction on a direct
   connection, rounds in ABBA order; the ratio is the median of the per-round ratios.
3. **Happy-path cost of the listeners.** Three worker processes per driver, the same program: one never
   imports ``db_retry``, one imports it with liveness off (``DB_RETRY_PROBE_AFTER=0``,
   ``DB_RETRY_KEEPALIVE_IDLE=0``: its other listeners only), one imports it with the defaults (plus
   keepalives at connect and the watchdog's bookkeeping per statement, COMMIT and ROLLBACK). They run in
   turn (ABC CBA), 0.6 s per unit and round: ``SELECT 1`` per checkout (checkout, BEGIN, SELECT 1,
   ROLLBACK on return) and ``SELECT 1`` x 100 on one held connection. Each reports statements per second
   (wall clock) and its own CPU time per statement (``time.process_time()``: much less disturbed by other
   work on the machine than the wall clock); ratios are per round.

Not a test: nothing is asserted. Every fault is ended by the kit's context managers (and by its reaper if
this process dies), every worker is stopped by its PID.
"""

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import statistics
import sys
import tempfile
import time
import typing
import uuid

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine


if typing.TYPE_CHECKING:
    from db_retry.testing import PostgresNode
    from db_retry.testing.proxy import FrontendMessage

# This file is also the workers' program, and the workers of measurement 3 must run without db_retry:
# nothing at module level imports it.

REPO: typing.Final = pathlib.Path(__file__).resolve().parent.parent
DRIVERS: typing.Final = ("asyncpg", "psycopg")
FAULTS: typing.Final = ("hang", "freeze", "partition")
MEASUREMENTS: typing.Final = ["detection", "deadline", "happy"]
LEAD: typing.Final = 1.0  # seconds the query has been running when the fault strikes
SLEEP: typing.Final = "SELECT pg_sleep(60)"
CONFIGS: typing.Final[dict[str, dict[str, str]]] = {
    "defaults": {},
    "tuned": {
        "DB_RETRY_PROBE_AFTER": "1",
        "DB_RETRY_PROBE_TIMEOUT": "0.5",
        "DB_RETRY_KEEPALIVE_IDLE": "1",
        "DB_RETRY_KEEPALIVE_INTERVAL": "1",
        "DB_RETRY_KEEPALIVE_COUNT": "2",
        "DB_RETRY_TCP_USER_TIMEOUT": "3",
    },
    "without": {"DB_RETRY_PROBE_AFTER": "0", "DB_RETRY_KEEPALIVE_IDLE": "0"},
}
INSERT: typing.Final = sa.text("INSERT INTO bench_liveness (key) VALUES (:key)")
SELECT_1: typing.Final = sa.text("SELECT 1")


def emit(tag: str, payload: object = None) -> None:
    sys.stdout.write(f"@{tag} {json.dumps(payload)}\n")
    sys.stdout.flush()


def spread(values: list[float], digits: int = 2) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def error_name(exc: BaseException) -> str:
    """The error class, and the class of the driver error under a SQLAlchemy wrapper."""
    orig = getattr(exc, "orig", None)
    cause = getattr(orig, "__cause__", None) or orig
    return f"{type(exc).__name__}({type(cause).__name__})" if cause is not None else type(exc).__name__


async def stdin_lines() -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


def check_origin() -> None:
    """Stop if ``db_retry`` is not this checkout's (the venv may hold another one, installed editable)."""
    module = sys.modules["db_retry"]
    if not pathlib.Path(str(module.__file__)).resolve().is_relative_to(REPO):
        sys.exit(f"db_retry imported from {module.__file__}, not from {REPO}: set PYTHONPATH={REPO}")


# -- workers (child processes) ------------------------------------------------------------------------


class WatchdogCuts(logging.Handler):
    """Remembers when the watchdog said it cut connections (its one warning)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.times: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "did not answer a probe" in record.getMessage():
            self.times.append(time.monotonic())


async def sleeping_call(engine: AsyncEngine, cuts: WatchdogCuts) -> None:
    async with engine.connect() as connection:
        emit("STARTED", time.monotonic())
        try:
            await connection.execute(sa.text(SLEEP))
        except Exception as exc:  # noqa: BLE001 - every failure is reported, none is expected but a lost connection
            failed = time.monotonic()
            emit("FAILED", {"at": failed, "error": error_name(exc), "watchdog": any(t <= failed for t in cuts.times)})
        else:
            emit("FINISHED", time.monotonic())


async def detect_worker(url: str) -> None:
    """Measurement 1: on ``go`` a warm pool runs the sleeping query; ``stop`` ends it; ``exit``."""
    import db_retry  # noqa: F401, PLC0415 - installs the listeners (see the note at the top)

    check_origin()
    cuts = WatchdogCuts()
    logging.getLogger("db_retry.liveness").addHandler(cuts)
    commands = await stdin_lines()
    emit("READY", os.getpid())
    engine: AsyncEngine | None = None
    task: asyncio.Task[None] | None = None
    while command := (await commands.readline()).decode().strip():
        if command == "go":
            engine = create_async_engine(url, pool_size=1, max_overflow=0)
            async with engine.connect() as connection:  # the pool's one connection, established now
                await connection.execute(SELECT_1)
            cuts.times.clear()
            task = asyncio.create_task(sleeping_call(engine, cuts))
        elif command == "stop":
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(task, 10)
            if engine is not None:
                await engine.dispose()
            emit("STOPPED")
        elif command == "exit":
            break


async def rate_worker(url: str, *, with_db_retry: bool) -> None:
    """Measurement 3: on ``run SECONDS UNIT`` report statements per second; ``exit``."""
    if with_db_retry:
        import db_retry  # noqa: F401, PLC0415 - installs the listeners (see the note at the top)

        check_origin()
    engine = create_async_engine(url, pool_size=1, max_overflow=0)
    for _ in range(200):  # warm: the connection, prepared statements, the listeners' first-use work
        async with engine.connect() as connection:
            await connection.execute(SELECT_1)
    emit("READY", {"pid": os.getpid(), "db_retry": "db_retry" in sys.modules})
    commands = await stdin_lines()
    while command := (await commands.readline()).decode().split():
        if command[0] == "exit":
            break
        seconds, unit = float(command[1]), command[2]
        statements = 0
        cpu = time.process_time()
        start = time.perf_counter()
        end = start + seconds
        if unit == "checkout":
            while time.perf_counter() < end:
                async with engine.connect() as connection:
                    await connection.execute(SELECT_1)
                statements += 1
        else:
            while time.perf_counter() < end:
                async with engine.connect() as connection:
                    for _ in range(100):
                        await connection.execute(SELECT_1)
                statements += 100
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        emit("RATE", {"per_s": statements / wall, "cpu_us": cpu / statements * 1e6})
    await engine.dispose()


# -- the driver's side of a worker --------------------------------------------------------------------


@dataclasses.dataclass
class Worker:
    """A worker process: commands on its stdin, ``@TAG json`` lines on its stdout, stderr in a log file."""

    name: str
    args: list[str]
    env: dict[str, str]
    log: pathlib.Path
    process: asyncio.subprocess.Process | None = None
    reader: asyncio.Task[None] | None = None
    inbox: asyncio.Queue[tuple[str, typing.Any]] = dataclasses.field(default_factory=asyncio.Queue)

    async def start(self) -> None:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("DB_RETRY_", "DB_UTILS_", "PG", "PYTHON"))}
        with self.log.open("w") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                __file__,
                *self.args,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                env={**base, "PYTHONPATH": str(REPO), **self.env},
                cwd=REPO,
            )
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        assert self.process is not None  # noqa: S101 - started
        assert self.process.stdout is not None  # noqa: S101 - a pipe
        async for raw in self.process.stdout:
            line = raw.decode()
            if line.startswith("@"):
                tag, _, payload = line[1:].partition(" ")
                await self.inbox.put((tag, json.loads(payload)))
        await self.inbox.put(("EXITED", None))

    def send(self, command: str) -> None:
        assert self.process is not None  # noqa: S101 - started
        assert self.process.stdin is not None  # noqa: S101 - a pipe
        self.process.stdin.write(command.encode() + b"\n")

    async def expect(self, tag: str, timeout: float) -> typing.Any:  # noqa: ANN401 - the worker's JSON
        """The payload of the next ``@tag`` line (other lines are dropped); ``TimeoutError`` if none comes."""
        async with asyncio.timeout(timeout):
            while True:
                got, payload = await self.inbox.get()
                if got == tag:
                    return payload
                if got == "EXITED":
                    msg = f"worker {self.name} exited (log: {self.log})"
                    raise RuntimeError(msg)

    async def stop(self) -> None:
        """Ask it to exit; after 10 s, kill it (by its PID, through the process handle)."""
        if self.process is None or self.process.returncode is not None:
            return
        with contextlib.suppress(Exception):
            self.send("exit")
        try:
            await asyncio.wait_for(self.process.wait(), 10)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()


@contextlib.asynccontextmanager
async def workers(specs: list[Worker]) -> typing.AsyncIterator[list[Worker]]:
    try:
        await asyncio.gather(*(worker.start() for worker in specs))
        yield specs
    finally:
        await asyncio.gather(*(worker.stop() for worker in specs))


# -- 1. detection time ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Detection:
    seconds: float | None  # None: not within the bound
    watchdog: bool
    error: str


async def terminate_sleepers(node: "PostgresNode") -> None:
    await node.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query = $1 AND pid <> pg_backend_pid()", SLEEP
    )


async def wait_failed(worker: Worker, fault_at: float, bound: float) -> Detection:
    try:
        failed = await worker.expect("FAILED", max(0.0, fault_at + bound - time.monotonic()))
    except TimeoutError:
        return Detection(None, watchdog=False, error="")
    seconds = failed["at"] - fault_at
    return Detection(seconds if seconds <= bound else None, watchdog=failed["watchdog"], error=failed["error"])


async def detection(rounds: int, bound: float, logs: pathlib.Path) -> dict[str, list[Detection]]:
    from db_retry.testing import PostgresCluster, faults  # noqa: PLC0415 - see the note at the top
    from db_retry.testing.proxy import TcpProxy  # noqa: PLC0415

    results: dict[str, list[Detection]] = {}
    with contextlib.ExitStack() as clusters:
        nodes = {fault: clusters.enter_context(PostgresCluster(name=f"bench-live-{fault}")).primary for fault in FAULTS}
        async with TcpProxy(nodes["hang"].host, nodes["hang"].port, name="bench-hang") as proxy:
            addresses = {"hang": (proxy.host, proxy.port)} | {f: (nodes[f].host, nodes[f].port) for f in FAULTS[1:]}
            specs = []
            for fault in FAULTS:
                host, port = addresses[fault]
                for driver in DRIVERS:
                    dsn = nodes[fault].dsn(driver=driver)
                    url = sa.make_url(dsn).set(host=host, port=port).render_as_string(hide_password=False)
                    for config, env in CONFIGS.items():
                        name = f"{fault}/{driver}/{config}"
                        log = logs / f"detect-{fault}-{driver}-{config}.log"
                        specs.append(Worker(name, ["detect", url], env, log))
            async with workers(specs) as running:
                await asyncio.gather(*(worker.expect("READY", 60) for worker in running))
                for index in range(rounds):
                    for worker in running:
                        worker.send("go")
                    started = await asyncio.gather(*(worker.expect("STARTED", 30) for worker in running))
                    await asyncio.sleep(max(0.0, max(started) + LEAD - time.monotonic()))
                    fault_at: dict[str, float] = {}
                    async with contextlib.AsyncExitStack() as fault_stack:
                        proxy.hang()
                        fault_stack.callback(proxy.pass_through)
                        fault_at["hang"] = time.monotonic()
                        await fault_stack.enter_async_context(faults.freeze(nodes["freeze"], limit=bound + 15))
                        fault_at["freeze"] = time.monotonic()
                        await fault_stack.enter_async_context(faults.partition(nodes["partition"], limit=bound + 15))
                        fault_at["partition"] = time.monotonic()
                        found = await asyncio.gather(
                            *(wait_failed(w, fault_at[w.name.split("/")[0]], bound) for w in running)
                        )
                    for node in nodes.values():
                        await terminate_sleepers(node)
                    for worker in running:
                        worker.send("stop")
                    await asyncio.gather(*(worker.expect("STOPPED", 30) for worker in running))
                    for worker, result in zip(running, found, strict=True):
                        results.setdefault(worker.name, []).append(result)
                    print(f"  detection round {index + 1}/{rounds} done", file=sys.stderr)
    return results


def detection_cell(found: list[Detection], bound: float) -> str:
    """``median (min-max) paths``, a call not failed within the bound counting as infinitely late."""
    values = [d.seconds if d.seconds is not None else float("inf") for d in found]
    if all(value == float("inf") for value in values):
        return f"> {bound:g} s"

    def show(value: float) -> str:
        return f"> {bound:g}" if value == float("inf") else f"{value:.1f}"

    paths = "".join(sorted({"w" if d.watchdog else "k" for d in found if d.seconds is not None}))
    return f"{show(statistics.median(values))} ({show(min(values))}-{show(max(values))}) {paths}"


def detection_table(results: dict[str, list[Detection]], bound: float) -> str:
    lines = [
        f"| fault | driver | defaults | tuned | without (bound {bound:g} s) | AWS wrapper EFM defaults |",
        "|---|---|---|---|---|---|",
    ]
    labels = {
        "hang": "proxy hang (kernel ACKs)",
        "freeze": "freeze (SIGSTOP)",
        "partition": "partition (iptables DROP)",
    }
    for fault in FAULTS:
        for driver in DRIVERS:
            cells = [detection_cell(results[f"{fault}/{driver}/{config}"], bound) for config in CONFIGS]
            lines.append(f"| {labels[fault]} | {driver} | {' | '.join(cells)} | ~45 s (documented, not measured) |")
    return "\n".join(lines)


# -- 2. cost of the server-side limits -----------------------------------------------------------------


class RequestCounter:
    """A ``cut_after`` predicate that never matches: it only counts the client's requests."""

    def __init__(self) -> None:
        self.requests = 0

    def __call__(self, message: "FrontendMessage") -> bool:
        if message.kind in {b"Q", b"S"}:
            self.requests += 1
        return False


def writer(engine: AsyncEngine, *, deadline: bool) -> typing.Callable[[], typing.Awaitable[None]]:
    from db_retry import postgres_retry  # noqa: PLC0415 - see the note at the top

    async def write() -> None:
        async with engine.begin() as connection:
            await connection.execute(INSERT, {"key": uuid.uuid4()})

    return postgres_retry(deadline=10)(write) if deadline else postgres_retry(write)


async def timed_round(engine: AsyncEngine, transactions: int, *, deadline: bool) -> float:
    write = writer(engine, deadline=deadline)
    for _ in range(50):
        await write()
    start = time.perf_counter()
    for _ in range(transactions):
        await write()
    return (time.perf_counter() - start) / transactions * 1000


async def count_round_trips(engine: AsyncEngine, counter: RequestCounter, *, deadline: bool) -> float:
    write = writer(engine, deadline=deadline)
    for _ in range(10):
        await write()
    before = counter.requests
    for _ in range(100):
        await write()
    return (counter.requests - before) / 100


async def deadline_cost(node: "PostgresNode", rounds: int, transactions: int) -> dict[str, typing.Any]:
    from db_retry.testing.proxy import TcpProxy  # noqa: PLC0415 - see the note at the top

    await node.execute("CREATE TABLE IF NOT EXISTS bench_liveness (key uuid NOT NULL)")
    results: dict[str, typing.Any] = {}
    async with TcpProxy(node.host, node.port, name="bench-count") as proxy:
        counter = RequestCounter()
        proxy.cut_after(counter, once=False)
        for driver in DRIVERS:
            url = sa.make_url(node.dsn(driver=driver))
            direct = create_async_engine(url, pool_size=2)
            proxied = create_async_engine(url.set(host=proxy.host, port=proxy.port), pool_size=2)
            runs: dict[str, typing.Any] = {"off": {"ms": []}, "on": {"ms": []}}
            try:
                for mode in ("off", "on"):
                    runs[mode]["round_trips"] = await count_round_trips(proxied, counter, deadline=mode == "on")
                for index in range(rounds):
                    for mode in ("off", "on") if index % 2 == 0 else ("on", "off"):
                        ms = await timed_round(direct, transactions, deadline=mode == "on")
                        runs[mode]["ms"].append(ms)
            finally:
                await direct.dispose()
                await proxied.dispose()
            runs["ratios"] = [on / off for on, off in zip(runs["on"]["ms"], runs["off"]["ms"], strict=True)]
            results[driver] = runs
    return results


def deadline_table(results: dict[str, typing.Any]) -> str:
    lines = [
        (
            "| driver | round trips per transaction, `@postgres_retry` → `deadline=10` "
            "| ms per transaction, without: median (min-max) | with deadline | ratio: median (min-max) |"
        ),
        "|---|---|---|---|---|",
    ]
    for driver, runs in results.items():
        lines.append(
            f"| {driver} | {runs['off']['round_trips']:g} → {runs['on']['round_trips']:g} "
            f"| {spread(runs['off']['ms'], 3)} | {spread(runs['on']['ms'], 3)} | {spread(runs['ratios'])}x |"
        )
    return "\n".join(lines)


# -- 3. happy-path cost of the listeners ---------------------------------------------------------------


VARIANTS: typing.Final[dict[str, dict[str, str]]] = {
    "without": {},  # db_retry never imported
    "off": CONFIGS["without"],  # imported, liveness turned off (no keepalives, no watchdog: no wire to track)
    "with": {},  # imported, defaults
}


async def happy_path(node: "PostgresNode", rounds: int, seconds: float, logs: pathlib.Path) -> dict[str, typing.Any]:
    results: dict[str, typing.Any] = {}
    for driver in DRIVERS:
        url = node.dsn(driver=driver)
        specs = [
            Worker(f"rate/{driver}/{variant}", ["rate", url, variant], env, logs / f"rate-{driver}-{variant}.log")
            for variant, env in VARIANTS.items()
        ]
        async with workers(specs) as running:
            ready = await asyncio.gather(*(worker.expect("READY", 60) for worker in running))
            if [r["db_retry"] for r in ready] != [False, True, True]:
                sys.exit(f"{driver}: db_retry imported {ready}: expected not, then twice")
            for unit in ("checkout", "held"):
                runs: dict[str, dict[str, list[float]]] = {"per_s": {}, "cpu_us": {}}
                for index in range(rounds):
                    for worker in running if index % 2 == 0 else running[::-1]:
                        worker.send(f"run {seconds} {unit}")
                        rate = await worker.expect("RATE", seconds + 30)
                        for measure, value in rate.items():
                            runs[measure].setdefault(worker.name.rsplit("/", 1)[1], []).append(value)
                ratios = {
                    f"{measure}: {a}/{b}": [x / y for x, y in zip(values[a], values[b], strict=True)]
                    for measure, values in runs.items()
                    for a, b in (("with", "without"), ("off", "without"), ("with", "off"))
                }
                results[f"{driver}/{unit}"] = {**runs, "ratios": ratios}
    return results


def happy_path_table(results: dict[str, typing.Any]) -> str:
    units = {"checkout": "`SELECT 1` per checkout", "held": "`SELECT 1` x 100 per checkout"}
    lines = [
        (
            "| driver | unit | statements/s (wall): without db_retry / liveness off / defaults "
            "| defaults / without | client CPU µs per statement: without / liveness off / defaults "
            "| defaults / without | liveness off / without | defaults / liveness off |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, runs in results.items():
        driver, unit = key.split("/")
        rates = " / ".join(f"{statistics.median(runs['per_s'][v]):.0f}" for v in VARIANTS)
        cpu = " / ".join(f"{statistics.median(runs['cpu_us'][v]):.0f}" for v in VARIANTS)
        ratios = runs["ratios"]
        lines.append(
            f"| {driver} | {units[unit]} | {rates} | {spread(ratios['per_s: with/without'], 3)} | {cpu} | "
            + " | ".join(spread(ratios[f"cpu_us: {pair}"], 3) for pair in ("with/without", "off/without", "with/off"))
            + " |"
        )
    return "\n".join(lines)


# -- main ------------------------------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> None:
    for name in [name for name in os.environ if name.startswith("DB_RETRY_")]:
        del os.environ[name]  # this process measures the defaults (measurement 2)
    import db_retry  # noqa: F401, PLC0415 - see the note at the top
    from db_retry.testing import PostgresCluster  # noqa: PLC0415

    check_origin()
    logs = pathlib.Path(tempfile.mkdtemp(prefix="bench-liveness-"))
    began = time.monotonic()
    load = os.getloadavg()
    report: dict[str, typing.Any] = {"load_before": load}
    print(f"worker logs in {logs}; load average {load[0]:.2f}", file=sys.stderr)
    if "detection" in args.only:
        found = await detection(args.rounds, args.bound, logs)
        report["detection"] = {name: [dataclasses.asdict(d) for d in values] for name, values in found.items()}
        errors = sorted({d.error for values in found.values() for d in values if d.error})
        print(f"\n### Detection: seconds from the fault to the failed call ({args.rounds} rounds: median (min-max))\n")
        print(detection_table(found, args.bound))
        print(
            "\nw: the watchdog cut it; k: the kernel did (keepalive / TCP_USER_TIMEOUT). Errors: " + ", ".join(errors)
        )
    with PostgresCluster(name="bench-live-cost") as cluster:
        if "deadline" in args.only:
            report["deadline"] = costs = await deadline_cost(cluster.primary, args.cost_rounds, args.transactions)
            print(f"\n### Server-side limits: {args.cost_rounds} rounds x {args.transactions} transactions, ABBA\n")
            print(deadline_table(costs))
        if "happy" in args.only:
            report["happy_path"] = rates = await happy_path(cluster.primary, args.rate_rounds, args.seconds, logs)
            print(f"\n### Happy path: {args.rate_rounds} rounds x {args.seconds:g} s per process and unit, ABC CBA\n")
            print(happy_path_table(rates))
    report["load_after"] = os.getloadavg()
    took = time.monotonic() - began
    print(f"\n{took:.0f} s; load average before {load[0]:.2f}, after {report['load_after'][0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the detection measurement")
    parser.add_argument("--bound", type=float, default=20.0, help="seconds a call may wait after a fault")
    parser.add_argument("--cost-rounds", type=int, default=8, help="rounds of measurement 2")
    parser.add_argument("--rate-rounds", type=int, default=10, help="rounds of measurement 3")
    parser.add_argument("--transactions", type=int, default=1000, help="transactions per round (2)")
    parser.add_argument("--seconds", type=float, default=0.6, help="seconds per process, unit and round (3)")
    parser.add_argument("--only", nargs="+", choices=MEASUREMENTS, default=MEASUREMENTS)
    parser.add_argument("--json", type=pathlib.Path)
    return parser.parse_args()


if __name__ == "__main__":
    if sys.argv[1:2] == ["detect"]:
        asyncio.run(detect_worker(sys.argv[2]))
    elif sys.argv[1:2] == ["rate"]:
        asyncio.run(rate_worker(sys.argv[2], with_db_retry=sys.argv[3] != "without"))
    else:
        asyncio.run(main(parse()))
