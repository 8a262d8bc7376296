"""Throwaway PostgreSQL clusters (a primary and streaming standbys) for tests and demos.

Everything listens on 127.0.0.1 only. Server processes are started and stopped through
``pg_ctl`` and, when a cluster is abandoned, stopped by the PID in ``postmaster.pid``;
nothing is ever stopped by name.
"""

import asyncio
import atexit
import contextlib
import dataclasses
import logging
import os
import pathlib
import pwd
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import typing

import asyncpg

from db_retry.replication import WAL_STATUS_QUERY, WalStatus, replay_lag
from db_retry.testing._binaries import find_postgres_bindir


logger = logging.getLogger(__name__)

RUN_AS_ENV: typing.Final = "DB_RETRY_PG_USER"
DEFAULT_RUN_AS: typing.Final = "postgres"
HOST: typing.Final = "127.0.0.1"
SUPERUSER: typing.Final = "postgres"
DATABASE: typing.Final = "postgres"
StopMode = typing.Literal["smart", "fast", "immediate"]

# Settings for speed and for the faults the kit injects; durability is not a goal of a throwaway cluster.
_SERVER_SETTINGS: typing.Final = {
    "listen_addresses": f"'{HOST}'",
    "unix_socket_directories": "''",
    "max_connections": "100",
    "shared_buffers": "32MB",
    "fsync": "off",
    # Left on (the default): a base backup taken from a standby (a cascading standby) refuses WAL written
    # without full-page images, and so does pg_rewind. wal_log_hints lets pg_rewind rejoin a failed primary.
    "full_page_writes": "on",
    "wal_log_hints": "on",
    "wal_level": "replica",
    "max_wal_senders": "10",
    "wal_keep_size": "128MB",
    "hot_standby": "on",
    "hot_standby_feedback": "on",
    "wal_receiver_status_interval": "1s",
    "wal_retrieve_retry_interval": "200ms",
    "checkpoint_timeout": "30min",
    "max_prepared_transactions": "10",
    "log_min_messages": "warning",
    "log_line_prefix": "'%m [%p] %e %q%u@%d '",
    "deadlock_timeout": "100ms",
}


class ClusterError(RuntimeError):
    """A server of the test kit failed to start, stop or answer; the message carries its log tail."""


@dataclasses.dataclass(frozen=True, slots=True)
class _Account:
    """Who runs the server processes: the current user, or an unprivileged account when we are root."""

    uid: int
    gid: int
    name: str

    @classmethod
    def resolve(cls, run_as: str | None) -> "_Account":
        if os.geteuid() != 0:
            uid = os.geteuid()
            try:
                name = pwd.getpwuid(uid).pw_name
            except KeyError:  # an arbitrary uid with no passwd entry, as some container platforms run
                name = str(uid)
            return cls(uid=uid, gid=os.getegid(), name=name)
        name = run_as or os.environ.get(RUN_AS_ENV) or DEFAULT_RUN_AS
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            msg = (
                f"PostgreSQL refuses to run as root and the account {name!r} does not exist: "
                f"create it (`useradd --system --user-group {name}`) or set {RUN_AS_ENV} to an existing "
                "unprivileged account"
            )
            raise ClusterError(msg) from None
        if entry.pw_uid == 0:
            given = f"run_as={name!r}" if run_as else f"{RUN_AS_ENV}={name!r}"  # blame what was used
            msg = f"{given} is root; PostgreSQL needs an unprivileged account"
            raise ClusterError(msg)
        return cls(uid=entry.pw_uid, gid=entry.pw_gid, name=name)

    @property
    def is_current(self) -> bool:
        return self.uid == os.geteuid()

    @property
    def switch(self) -> dict[str, typing.Any]:
        """The ``subprocess`` arguments that run a program as this account (none when it is the current one)."""
        if self.is_current:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}

    def run(self, args: typing.Sequence[str | os.PathLike[str]], *, cwd: pathlib.Path) -> str:
        """Run a PostgreSQL program as this account and return its output; raise with that output on failure."""
        kwargs = self.switch
        env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PGHOST": HOST}
        env.pop("PGDATA", None)
        completed = subprocess.run(  # noqa: S603 - the programs come from the located PostgreSQL bindir
            [os.fspath(arg) for arg in args],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
            **kwargs,
        )
        output: str = completed.stdout + completed.stderr
        if completed.returncode != 0:
            msg = f"{pathlib.Path(args[0]).name} exited with {completed.returncode}: {output.strip()}"
            raise ClusterError(msg)
        return output

    def own(self, path: pathlib.Path) -> None:
        if self.is_current:
            return
        os.chown(path, self.uid, self.gid)
        for root, dirs, files in os.walk(path):
            for name in (*dirs, *files):
                os.chown(pathlib.Path(root, name), self.uid, self.gid, follow_symlinks=False)


_PROCFS: typing.Final = pathlib.Path("/proc")


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie waiting to be reaped by init counts as gone)."""
    if not _PROCFS.exists():  # pragma: no cover - macOS and BSDs: signal 0 (a zombie still counts as alive)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    try:
        stat = (_PROCFS / str(pid) / "stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _read_from(path: pathlib.Path, offset: int) -> str:
    """What was appended to ``path`` after its first ``offset`` bytes (``""`` if there is no such file)."""
    try:
        with path.open("rb") as file:
            file.seek(offset)
            return file.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


# Ports the kit hands out: below the kernel's ephemeral range (32768-60999 on Linux), where an outgoing
# connection's local port can take a listener's port between our check and the server's bind.
PORT_RANGE: typing.Final = range(20000, 32000)
_handed_out: set[int] = set()
_PORT_LOCK = threading.Lock()


def free_port() -> int:
    """A TCP port on 127.0.0.1 below the ephemeral range that nothing listens on now, not handed out before."""
    with _PORT_LOCK:
        if len(_handed_out) > len(PORT_RANGE) // 2:  # a very long run: ports handed out long ago are free again
            _handed_out.clear()
        while True:
            port = random.choice(PORT_RANGE)  # noqa: S311 - spreading ports, not cryptography
            if port not in _handed_out and port_is_free(port):
                _handed_out.add(port)
                return port


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


@dataclasses.dataclass(kw_only=True, eq=False)
class PostgresNode:
    """One PostgreSQL server of a :class:`PostgresCluster`."""

    name: str
    port: int
    data_dir: pathlib.Path
    log_path: pathlib.Path
    bindir: pathlib.Path
    account: _Account = dataclasses.field(repr=False)
    host: str = HOST
    user: str = SUPERUSER
    database: str = DATABASE

    def __post_init__(self) -> None:
        self._ctl_lock = threading.Lock()

    # -- addresses ---------------------------------------------------------
    def dsn(self, *, driver: str | None = "asyncpg", database: str | None = None) -> str:
        """A URL DSN: ``postgresql+asyncpg://...`` by default, like :meth:`PostgresCluster.multihost_dsn`.

        ``driver=None`` gives ``postgresql://...``, what asyncpg, psycopg and libpq take themselves.
        """
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        return f"{scheme}://{self.user}@{self.host}:{self.port}/{database or self.database}"

    def conninfo(self, *, database: str | None = None) -> str:
        """A libpq key/value connection string, as psycopg takes it."""
        return f"host={self.host} port={self.port} user={self.user} dbname={database or self.database}"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    # -- process control -----------------------------------------------------
    @property
    def pid(self) -> int | None:
        """The postmaster's PID while the server runs, else ``None``."""
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        except FileNotFoundError:
            return None
        except ValueError:  # the postmaster created the file and has not written its PID yet
            return None
        return pid if _alive(pid) else None

    @property
    def is_running(self) -> bool:
        return self.pid is not None

    def _ctl(self, *args: str) -> str:
        with self._ctl_lock:
            try:
                return self.account.run([self.bindir / "pg_ctl", "-D", self.data_dir, *args], cwd=self.data_dir.parent)
            except ClusterError as exc:
                msg = f"{self.name} ({self.address}): {exc}\n--- server log ---\n{self.log_tail()}"
                raise ClusterError(msg) from exc

    def start(self, *, wait: bool = True) -> None:
        """Start the server and, by default, wait until it accepts connections."""
        args = ["-l", os.fspath(self.log_path), "-t", "60", "-w" if wait else "-W", "start"]
        self._ctl(*args)

    def stop(self, mode: StopMode = "fast") -> None:
        """Stop the server: ``fast`` (roll back, disconnect), ``smart`` or ``immediate`` (a crash)."""
        if self.is_running:
            self._ctl("-m", mode, "-t", "60", "-w", "stop")

    def restart(self, mode: StopMode = "fast") -> None:
        """Stop with ``mode`` and start again, waiting until the server accepts connections."""
        self.stop(mode)
        self.start()

    def promote(self) -> None:
        """Promote this standby to a primary and wait until it accepts writes."""
        self._ctl("-t", "60", "-w", "promote")

    def kill(self) -> None:
        """Stop the server as a crash would, by its PID (``SIGQUIT`` to the postmaster, through ``pg_ctl kill``)."""
        pid = self.pid
        if pid is not None:
            self._ctl("kill", "QUIT", str(pid))
            self._wait_gone(pid)

    def _wait_gone(self, pid: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            time.sleep(0.02)
        msg = f"{self.name}: postmaster {pid} still alive {timeout}s after SIGQUIT"
        raise ClusterError(msg)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log yet)"
        return "\n".join(text.splitlines()[-lines:])

    # -- queries -------------------------------------------------------------
    async def connect(self, **kwargs: object) -> "asyncpg.Connection[asyncpg.Record]":
        """A plain asyncpg connection to this node (as the superuser)."""
        kwargs.setdefault("timeout", 10)
        connection: asyncpg.Connection[asyncpg.Record] = await asyncpg.connect(self.dsn(driver=None), **kwargs)
        return connection

    async def fetchval(self, query: str, *args: object) -> typing.Any:  # noqa: ANN401 - the query decides the type
        connection = await self.connect()
        try:
            return await connection.fetchval(query, *args)
        finally:
            await connection.close()

    async def execute(self, query: str, *args: object) -> str:
        connection = await self.connect()
        try:
            status: str = await connection.execute(query, *args)
            return status
        finally:
            await connection.close()

    async def wal_status(self) -> WalStatus:
        """The server's WAL positions and WAL receiver state (see :mod:`db_retry.replication`)."""
        connection = await self.connect()
        try:
            return WalStatus.from_row(await connection.fetchrow(WAL_STATUS_QUERY))
        finally:
            await connection.close()

    async def is_in_recovery(self) -> bool:
        return bool(await self.fetchval("SELECT pg_is_in_recovery()"))

    async def role(self) -> typing.Literal["primary", "standby"]:
        return "standby" if await self.is_in_recovery() else "primary"


class _Template:
    """One ``initdb`` per bindir and account for the whole process; clusters copy it."""

    _lock = threading.Lock()
    _made: typing.ClassVar[dict[tuple[pathlib.Path, int], pathlib.Path]] = {}

    @classmethod
    def get(cls, bindir: pathlib.Path, account: _Account, root: pathlib.Path) -> pathlib.Path:
        key = (bindir, account.uid)
        with cls._lock:
            if key not in cls._made or not cls._made[key].exists():
                template = pathlib.Path(tempfile.mkdtemp(prefix="template-", dir=root))
                account.own(template)
                account.run(
                    [
                        bindir / "initdb",
                        "-D",
                        template,
                        "-U",
                        SUPERUSER,
                        "-A",
                        "trust",
                        "-E",
                        "UTF8",
                        "--locale=C",
                        "--no-sync",
                        "--no-instructions",
                    ],
                    cwd=root,
                )
                settings = "".join(f"{key} = {value}\n" for key, value in _SERVER_SETTINGS.items())
                with (template / "postgresql.conf").open("a") as conf:
                    conf.write("\n# db-retry test kit\n" + settings)
                cls._made[key] = template
            return cls._made[key]


# The reaper's program. It reads "cont", "rules", "proc", "node" and "root" lines until end of file, which comes
# when the process that started the kit ends, however it ends: also on SIGKILL, or SIGTERM with its default
# action, where no atexit hook runs. Then it continues (SIGCONT) every process a freeze stopped that still runs
# with the start time it had, deletes every iptables rule of a partition (found by the comment naming this
# process, in `iptables -S`), kills (SIGKILL) every process of the kit it was told about (etcd,
# Patroni, PgBouncer, HAProxy) that still runs with the start time it had, so a reused PID is left alone;
# then it stops every server of that process still running, through pg_ctl by the PID in postmaster.pid,
# as the account that runs it, and removes the kit's directories.
_REAPER_PROGRAM: typing.Final = """# db-retry test kit reaper: stops the servers of a process that ended
import os, shlex, shutil, signal, subprocess, sys
procs, nodes, conts, rules, roots = [], [], [], [], []
for line in sys.stdin:
    kind, *fields = line.rstrip("\\n").split("\\t")
    {"proc": procs, "node": nodes, "cont": conts, "rules": rules}.get(kind, roots).append(fields)
def same(pid, started):
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[19] == started
    except OSError:
        return False
def send(pid, signum):
    try:
        os.kill(int(pid), signum)
    except OSError:
        pass
for pid, started in conts:
    if same(pid, started):
        send(pid, signal.SIGCONT)
for program, comment in sorted(set(map(tuple, rules))):
    try:
        listed = subprocess.run([program, "-w", "10", "-S"], capture_output=True, text=True, check=False).stdout
    except OSError:
        listed = ""
    for rule in listed.splitlines():
        if rule.startswith("-A ") and f" --comment {comment} " in f"{rule} ":
            delete = [program, "-w", "10", "-D", *shlex.split(rule)[1:]]
            subprocess.run(delete, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
for pid, started in procs:
    if same(pid, started):
        send(pid, signal.SIGKILL)
for uid, gid, pg_ctl, data_dir in nodes:
    if os.path.exists(os.path.join(data_dir, "postmaster.pid")):
        switch = {} if int(uid) == os.geteuid() else {"user": int(uid), "group": int(gid), "extra_groups": []}
        stop = [pg_ctl, "-D", data_dir, "-m", "immediate", "-t", "60", "-w", "stop"]
        subprocess.run(stop, cwd="/", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False, **switch)
for (root,) in roots:
    shutil.rmtree(root, ignore_errors=True)
"""


def _start_time(pid: int) -> str | None:
    """The start time of ``pid`` (field 22 of ``/proc/PID/stat``): it tells a process from a later one with its PID."""
    try:
        return (_PROCFS / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[19]
    except (FileNotFoundError, IndexError):
        return None


class _Reaper:
    """A small process that outlives this one and stops the kit's servers if this one dies without doing so.

    It runs in a session of its own, so a signal sent to this process's group does not reach it.
    """

    def __init__(self) -> None:
        self._process: subprocess.Popen[str] | None
        try:
            self._process = subprocess.Popen(  # noqa: S603 - this interpreter, running the fixed program above
                [sys.executable, "-I", "-c", _REAPER_PROGRAM],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                text=True,
            )
        except OSError as exc:  # e.g. an interpreter this (unprivileged) user may not execute
            logger.warning("no reaper process (%s): servers will outlive this process if it is killed", exc)
            self._process = None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def _send(self, *fields: object) -> None:
        if self._process is None:
            return
        stdin = typing.cast("typing.IO[str]", self._process.stdin)
        try:
            stdin.write("\t".join(map(str, fields)) + "\n")
            stdin.flush()
        except OSError as exc:
            logger.warning("the reaper process is gone (%s): servers will outlive this process if it is killed", exc)
            self.close()

    def watch(self, node: "PostgresNode") -> None:
        """Stop ``node`` if this process ends while it runs."""
        self._send("node", node.account.uid, node.account.gid, node.bindir / "pg_ctl", node.data_dir)

    def watch_process(self, pid: int) -> None:
        """Kill process ``pid`` (if it is still the same process) if this process ends while it runs."""
        started = _start_time(pid)
        if started is not None:
            self._send("proc", pid, started)

    def continue_at_end(self, pid: int, started: str | None) -> None:
        """Continue (``SIGCONT``) the stopped process ``pid``, if it is still the one started at ``started``.

        ``None`` (a process already gone) matches no process.
        """
        self._send("cont", pid, started)

    def delete_rules_at_end(self, program: pathlib.Path, comment: str) -> None:
        """Delete the rules ``program -S`` (iptables) lists with ``-m comment --comment COMMENT``."""
        self._send("rules", program, comment)

    def remove_at_end(self, directory: pathlib.Path) -> None:
        self._send("root", directory)

    def close(self) -> None:
        """Let the reaper do its work now (there is none left after a clean stop) and wait for it."""
        if self._process is not None:
            process, self._process = self._process, None
            with contextlib.suppress(OSError):  # a reaper that died leaves a broken pipe
                typing.cast("typing.IO[str]", process.stdin).close()
            process.wait(timeout=120)


_ROOT_LOCK = threading.Lock()
_root: pathlib.Path | None = None
_reaper: _Reaper | None = None
_live: "set[PostgresCluster]" = set()


def kit_reaper() -> _Reaper:
    """The kit's reaper process, started on first use."""
    global _reaper  # noqa: PLW0603
    with _ROOT_LOCK:
        if _reaper is None:
            _reaper = _Reaper()
        return _reaper


def _kit_root(account: _Account) -> tuple[pathlib.Path, _Reaper]:
    """A per-process directory, owned by the server account, holding the template and every cluster."""
    global _root  # noqa: PLW0603
    reaper = kit_reaper()
    with _ROOT_LOCK:
        if _root is None or not _root.exists():
            _root = pathlib.Path(tempfile.mkdtemp(prefix="db-retry-pg-"))
            os.chmod(_root, 0o755)  # noqa: PTH101, S103 - the server account must traverse it
            account.own(_root)
            reaper.remove_at_end(_root)
        return _root, reaper


class KitProcess:
    """A long-running program of the kit (etcd, Patroni, PgBouncer, HAProxy) run as the server account.

    It runs in a session of its own with its output in ``log_path``; the reaper kills it by PID if this
    process dies first. :meth:`stop` sends ``SIGTERM`` and, after ``timeout``, ``SIGKILL``.
    """

    def __init__(
        self,
        name: str,
        args: typing.Sequence[str | os.PathLike[str]],
        *,
        account: _Account,
        cwd: pathlib.Path,
        log_path: pathlib.Path,
    ) -> None:
        self.name = name
        self.args = [os.fspath(arg) for arg in args]
        self.account = account
        self.cwd = cwd
        self.log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"KitProcess({self.name!r}, pid={self.pid})"

    @property
    def pid(self) -> int | None:
        """The PID while the program runs, else ``None``."""
        if self._process is None or self._process.poll() is not None:
            return None
        return self._process.pid

    def start(self) -> None:
        if self.pid is not None:
            msg = f"{self!r} is already running"
            raise ClusterError(msg)
        _, reaper = _kit_root(self.account)
        env = {**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
        with self.log_path.open("ab") as log:
            self.account.own(self.log_path)
            self._process = subprocess.Popen(  # noqa: S603 - the programs come from located binaries
                self.args,
                cwd=self.cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **self.account.switch,
            )
        reaper.watch_process(self._process.pid)

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the program, if it runs."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signum)

    def stop(self, timeout: float = 30.0) -> None:
        """``SIGTERM``, then ``SIGKILL`` if the program is still running ``timeout`` seconds later."""
        if self._process is None:
            return
        self.signal(signal.SIGTERM)
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.warning("%r did not stop within %ss of SIGTERM: killing it", self, timeout)
            self.kill()

    def kill(self) -> None:
        """``SIGKILL``, and wait until the program is gone."""
        if self._process is not None:
            self.signal(signal.SIGKILL)
            self._process.wait(30)

    def wait_listening(self, host: str, port: int, timeout: float = 30.0) -> None:
        """Wait until ``host:port`` accepts TCP connections; a :class:`ClusterError` if the program ends first."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection((host, port), timeout=1):
                    return
            except OSError:
                if self.pid is None or time.monotonic() > deadline:
                    msg = f"{self.name} does not listen on {host}:{port}\n{self.log_tail()}"
                    raise ClusterError(msg) from None
                time.sleep(0.02)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log yet)"
        return "\n".join(text.splitlines()[-lines:])


class KitService:
    """What the kit's services (PgBouncer, HAProxy, a Patroni cluster) share: their lifecycle.

    :meth:`start` makes a directory of the service's own under the kit's root, launches its programs there
    and, when that fails half-way, stops what it started; :meth:`stop` may be called any time, twice too;
    ``with service:`` does both. A subclass sets :attr:`name` and :attr:`account` and implements
    :meth:`_launch`; one that runs one program starts it with :meth:`_spawn`, one that runs more overrides
    :meth:`_halt` and :meth:`pids`.
    """

    name: str
    account: _Account
    directory: pathlib.Path | None = None
    process: KitProcess | None = None

    def start(self, timeout: float = 30.0) -> typing.Self:
        if self.directory is not None:
            msg = f"{self!r} is already started"
            raise ClusterError(msg)
        self.directory = kit_directory(self.account, self.name)
        try:
            self._launch(self.directory, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the service's programs (by PID) and remove its directory."""
        self._halt()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def __enter__(self) -> typing.Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def pids(self) -> list[int]:
        """The PIDs of the service's programs that run now (their children not included)."""
        pid = None if self.process is None else self.process.pid
        return [] if pid is None else [pid]

    def log_tail(self, lines: int = 40) -> str:
        return "(not started)" if self.process is None else self.process.log_tail(lines)

    def _started(self) -> pathlib.Path:
        """The service's directory; a :class:`ClusterError` when it is not started."""
        if self.directory is None:
            msg = f"{self!r} is not started"
            raise ClusterError(msg)
        return self.directory

    def _launch(self, directory: pathlib.Path, timeout: float) -> None:
        """Start the service's programs in ``directory`` and wait up to ``timeout`` until they serve."""
        raise NotImplementedError

    def _spawn(self, args: typing.Sequence[str | os.PathLike[str]], *, log_name: str) -> KitProcess:
        """Start the service's one program, as :attr:`account`, with its output in ``log_name`` in its directory."""
        directory = self._started()
        self.process = KitProcess(self.name, args, account=self.account, cwd=directory, log_path=directory / log_name)
        self.process.start()
        return self.process

    def _halt(self) -> None:
        """Stop what :meth:`_launch` started (also after a failed start)."""
        if self.process is not None:
            self.process.stop()
            self.process = None


def kit_directory(account: _Account, prefix: str) -> pathlib.Path:
    """A new directory under the kit's per-process root, owned by ``account`` and removed with the root."""
    root, _ = _kit_root(account)
    directory = pathlib.Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir=root))
    os.chmod(directory, 0o755)  # noqa: PTH101, S103 - the server account must traverse it
    account.own(directory)
    return directory


def multihost_url(
    addresses: typing.Sequence[str],
    *,
    driver: str | None = "asyncpg",
    target_session_attrs: str | None = None,
    database: str = DATABASE,
) -> str:
    """A multi-host DSN in SQLAlchemy's form over ``host:port`` addresses: ``postgresql+asyncpg://postgres@/db?host=...``."""
    if not addresses:
        msg = "multihost_dsn needs at least one host"
        raise ValueError(msg)
    scheme = f"postgresql+{driver}" if driver else "postgresql"
    query = "&".join(f"host={address}" for address in addresses)
    if target_session_attrs is not None:
        query += f"&target_session_attrs={target_session_attrs}"
    return f"{scheme}://{SUPERUSER}@/{database}?{query}"


class ClusterFactory(typing.Protocol):
    """What the ``fresh_cluster`` fixture gives a test: call it to start a new cluster, stopped after the test."""

    def __call__(self, standbys: int = 0) -> "PostgresCluster": ...


class PostgresCluster:
    """A primary and ``standbys`` streaming standbys on free loopback ports, made from a cached template.

    Use as a context manager (sync) or call :meth:`start` / :meth:`stop`. Servers left running are
    stopped at interpreter exit.
    """

    def __init__(
        self,
        *,
        standbys: int = 0,
        bindir: str | os.PathLike[str] | None = None,
        run_as: str | None = None,
        name: str = "pg",
    ) -> None:
        if standbys < 0:
            msg = f"standbys must be >= 0, got {standbys}"
            raise ValueError(msg)
        self.standby_count = standbys
        self.bindir = find_postgres_bindir(bindir)
        self.account = _Account.resolve(run_as)
        self.name = name
        self.nodes: list[PostgresNode] = []
        self.directory: pathlib.Path | None = None
        self._counter = 0
        self._reaper: _Reaper | None = None

    def __repr__(self) -> str:
        nodes = ", ".join(f"{node.name}@{node.address}" for node in self.nodes)
        return f"PostgresCluster({self.name!r}, [{nodes}])"

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> typing.Self:
        if self.directory is not None:
            msg = f"{self!r} is already started"
            raise ClusterError(msg)
        root, self._reaper = _kit_root(self.account)
        template = _Template.get(self.bindir, self.account, root)
        self.directory = pathlib.Path(tempfile.mkdtemp(prefix=f"{self.name}-", dir=root))
        os.chmod(self.directory, 0o755)  # noqa: PTH101, S103 - the server account must traverse it
        self.account.own(self.directory)
        _live.add(self)
        try:
            primary = self._new_node("primary")
            shutil.copytree(template, primary.data_dir, symlinks=True)
            self.account.own(primary.data_dir)
            self._start_on_free_port(primary)
            self.nodes.append(primary)
            for _ in range(self.standby_count):
                self.add_standby()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every server (fast, then immediate if need be) and remove the data directories."""
        for node in reversed(self.nodes):
            try:
                node.stop("fast")
            except ClusterError:  # pragma: no cover - a wedged server; crash it instead
                node.kill()
        self.nodes.clear()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None
        _live.discard(self)

    def __enter__(self) -> typing.Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _new_node(self, role: str) -> PostgresNode:
        if self.directory is None or self._reaper is None:
            msg = f"{self!r} is not started"
            raise ClusterError(msg)
        if role == "standby":
            self._counter += 1
            role = f"standby{self._counter}"
        name = role
        node = PostgresNode(
            name=name,
            port=0,
            data_dir=self.directory / name,
            log_path=self.directory / f"{name}.log",
            bindir=self.bindir,
            account=self.account,
        )
        self._reaper.watch(node)
        return node

    def _start_on_free_port(self, node: PostgresNode, attempts: int = 5) -> None:
        """Start ``node`` on a free port; if another process takes the port before the server binds it, try another."""
        attempt = 1
        while True:
            node.port = free_port()
            with (node.data_dir / "postgresql.conf").open("a") as conf:
                conf.write(f"port = {node.port}\n")
            log_offset = node.log_path.stat().st_size if node.log_path.exists() else 0
            try:
                node.start()
            except ClusterError:
                if attempt >= attempts or "could not bind" not in _read_from(node.log_path, log_offset):
                    raise
                attempt += 1
            else:
                return

    def clone(self, source: PostgresNode, data_dir: pathlib.Path) -> None:
        """Copy ``source`` into the empty or missing ``data_dir`` as a streaming standby (``pg_basebackup -R``)."""
        self.account.run(
            [
                self.bindir / "pg_basebackup",
                "-h",
                source.host,
                "-p",
                str(source.port),
                "-U",
                SUPERUSER,
                "-D",
                data_dir,
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
                "--no-sync",
            ],
            cwd=data_dir.parent,
        )

    def add_standby(self, *, upstream: PostgresNode | None = None) -> PostgresNode:
        """Clone ``upstream`` (default: the primary) with ``pg_basebackup -R`` and start it as a streaming standby."""
        node = self._new_node("standby")
        self.clone(upstream or self.primary, node.data_dir)
        self._start_on_free_port(node)
        self.nodes.append(node)
        return node

    # -- accessors -------------------------------------------------------------
    @property
    def primary(self) -> PostgresNode:
        if not self.nodes:
            msg = f"{self!r} is not started"
            raise ClusterError(msg)
        return self.nodes[0]

    @property
    def standbys(self) -> list[PostgresNode]:
        return self.nodes[1:]

    def multihost_dsn(
        self,
        nodes: typing.Iterable[PostgresNode] | None = None,
        *,
        driver: str | None = "asyncpg",
        target_session_attrs: str | None = None,
        database: str = DATABASE,
        extra_hosts: typing.Iterable[str] = (),
    ) -> str:
        """A multi-host DSN in SQLAlchemy's form: ``postgresql+asyncpg://postgres@/db?host=h:p&host=h:p``.

        ``extra_hosts`` adds ``host:port`` entries that are not nodes (a hanging listener, a refused port).
        """
        chosen = list(self.nodes if nodes is None else nodes)
        addresses = [node.address for node in chosen] + list(extra_hosts)
        return multihost_url(addresses, driver=driver, target_session_attrs=target_session_attrs, database=database)

    async def wait_for_replay(self, standby: PostgresNode | None = None, *, timeout: float = 30.0) -> None:
        """Wait until ``standby`` (default: all) has replayed everything the primary has written so far.

        That is, until its replay lag in bytes (:func:`db_retry.replication.replay_lag`) behind the
        primary's WAL write position read now is 0.
        """
        targets = [standby] if standby is not None else self.standbys
        # The write position, not the insert position: an insert position at the start of a WAL page points
        # past the page header, which a standby never reports as replayed until more WAL arrives.
        target = (await self.primary.wal_status()).written
        deadline = asyncio.get_running_loop().time() + timeout
        for node in targets:
            connection = await node.connect()
            try:
                while replay_lag(target, WalStatus.from_row(await connection.fetchrow(WAL_STATUS_QUERY))).bytes != 0:
                    if asyncio.get_running_loop().time() > deadline:
                        msg = f"{node.name} did not replay up to WAL byte {target} within {timeout}s\n{node.log_tail()}"
                        raise ClusterError(msg)
                    await asyncio.sleep(0.01)
            finally:
                await connection.close()


@atexit.register
def _stop_all_at_exit() -> None:
    for cluster in list(_live):
        logger.warning("stopping %r left running at exit", cluster)
        cluster.stop()
    if _root is not None:
        shutil.rmtree(_root, ignore_errors=True)
    if _reaper is not None:
        _reaper.close()
