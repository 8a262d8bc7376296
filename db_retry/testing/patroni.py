"""A Patroni-managed PostgreSQL cluster for tests: one etcd and N members, all on loopback.

Every program (etcd, each member's Patroni and, through Patroni, PostgreSQL) runs as the kit's server
account in a session of its own; the kit's reaper kills them by PID if the test process dies. The
leader is found through Patroni's REST API (``GET /primary`` answers 200 on the leader only). Faults:
:meth:`PatroniCluster.switchover` (``POST /switchover``), :meth:`PatroniCluster.failover` (``SIGKILL``
to the leader's postmaster; ``primary_start_timeout: 0`` makes Patroni promote a replica rather than
restart it) and :meth:`PatroniCluster.lose_node` (Patroni and its postmaster killed: the leader key
expires after the TTL).
"""

import asyncio
import contextlib
import dataclasses
import json
import os
import pathlib
import signal
import time
import typing
import urllib.error
import urllib.request

import asyncpg

from db_retry.testing._binaries import ETCD, PATRONI, MissingComponentError, find_postgres_bindir, find_program
from db_retry.testing.cluster import (
    DATABASE,
    HOST,
    ClusterError,
    KitProcess,
    KitService,
    PostgresNode,
    _Account,
    _alive,
    _kit_root,
    free_port,
    multihost_url,
)


__all__ = ["Etcd", "PatroniCluster", "PatroniMember", "Transition"]

# The lowest TTL Patroni accepts; loop_wait + 2 * retry_timeout must stay within it.
DEFAULT_TTL: typing.Final = 20
_LOOP_WAIT: typing.Final = 1
_RETRY_TIMEOUT: typing.Final = 5
_HTTP_TIMEOUT: typing.Final = 2.0
_POLL: typing.Final = 0.05
# Speed over durability, as for the kit's own clusters (cluster._SERVER_SETTINGS).
_PARAMETERS: typing.Final = {
    "unix_socket_directories": "",
    "max_connections": 100,
    "shared_buffers": "32MB",
    "fsync": "off",
    "full_page_writes": "on",
    "wal_log_hints": "on",
    "wal_level": "replica",
    "max_wal_senders": 10,
    "max_replication_slots": 10,
    "wal_keep_size": "128MB",
    "hot_standby": "on",
    "hot_standby_feedback": "on",
    "wal_receiver_status_interval": "1s",
    "wal_retrieve_retry_interval": "200ms",
    "max_prepared_transactions": 10,
    "log_min_messages": "warning",
    "log_line_prefix": "%m [%p] %e %q%u@%d ",
    "deadlock_timeout": "100ms",
}


def _http(method: str, url: str, body: object = None, *, timeout: float = _HTTP_TIMEOUT) -> tuple[int, str]:
    """``(status, text)`` of one HTTP request to a loopback REST API; ``(0, reason)`` when nothing answers."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})  # noqa: S310 - loopback http URLs the kit builds
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            return int(response.status), response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except (OSError, TimeoutError) as exc:  # refused, reset, timed out
        return 0, repr(exc)


class Etcd:
    """One etcd member on loopback (client and peer ports from :func:`free_port`), data in ``directory``."""

    def __init__(self, directory: pathlib.Path, *, account: _Account) -> None:
        self.program = find_program(ETCD)
        self.directory = directory
        self.account = account
        self.client_port = free_port()
        self.peer_port = free_port()
        peer = f"http://{HOST}:{self.peer_port}"
        client = f"http://{HOST}:{self.client_port}"
        self.process = KitProcess(
            "etcd",
            [
                self.program,
                "--name=etcd",
                f"--data-dir={directory / 'etcd'}",
                f"--listen-client-urls={client}",
                f"--advertise-client-urls={client}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=etcd={peer}",
                "--initial-cluster-state=new",
                "--log-level=warn",
            ],
            account=account,
            cwd=directory,
            log_path=directory / "etcd.log",
        )

    @property
    def address(self) -> str:
        return f"{HOST}:{self.client_port}"

    def start(self, timeout: float = 30.0) -> None:
        self.process.start()
        deadline = time.monotonic() + timeout
        while _http("GET", f"http://{self.address}/health") != (200, '{"health":"true"}'):
            if self.process.pid is None or time.monotonic() > deadline:
                msg = f"etcd at {self.address} did not become healthy\n{self.process.log_tail()}"
                raise ClusterError(msg)
            time.sleep(_POLL)

    def stop(self) -> None:
        self.process.stop()


@dataclasses.dataclass(eq=False)
class PatroniMember:
    """One member: its Patroni process (REST API on :attr:`rest_port`) and the PostgreSQL it manages (:attr:`node`)."""

    name: str
    rest_port: int
    node: PostgresNode
    process: KitProcess = dataclasses.field(repr=False)

    @property
    def rest_url(self) -> str:
        return f"http://{HOST}:{self.rest_port}"

    def rest(self, method: str, path: str, body: object = None, *, timeout: float = _HTTP_TIMEOUT) -> tuple[int, str]:
        """One request to this member's REST API: ``(status, text)``, ``(0, reason)`` if it does not answer."""
        return _http(method, self.rest_url + path, body, timeout=timeout)

    @property
    def is_leader(self) -> bool:
        """``GET /primary`` answers 200: Patroni runs this member as the leader."""
        return self.rest("GET", "/primary")[0] == 200  # noqa: PLR2004 - HTTP OK


@dataclasses.dataclass(frozen=True, slots=True)
class Transition:
    """A change of leader the kit caused: who led before and after, and how long until the new one took writes."""

    fault: str
    old: PatroniMember
    new: PatroniMember
    seconds: float  # from the fault (request or kill) to the first write the new leader accepted


class PatroniCluster(KitService):
    """An etcd and ``members`` Patroni members of PostgreSQL, started as a context manager or by :meth:`start`.

    ``synchronous_mode=True`` makes Patroni keep a synchronous standby and promote only it, so an unplanned
    failover loses no acknowledged commit; with the default (asynchronous replication) commits acknowledged
    just before the leader dies may never reach the new one.
    """

    def __init__(  # noqa: PLR0913 - every option is keyword-only and optional
        self,
        *,
        members: int = 2,
        synchronous_mode: bool = False,
        ttl: int = DEFAULT_TTL,
        bindir: str | os.PathLike[str] | None = None,
        run_as: str | None = None,
        name: str = "patroni",
    ) -> None:
        if members < 1:
            msg = f"members must be >= 1, got {members}"
            raise ValueError(msg)
        if ttl < DEFAULT_TTL:
            msg = f"ttl must be >= {DEFAULT_TTL} (Patroni's minimum), got {ttl}"
            raise ValueError(msg)
        self.member_count = members
        self.synchronous_mode = synchronous_mode
        self.ttl = ttl
        self.bindir = find_postgres_bindir(bindir)
        self.account = _Account.resolve(run_as)
        self.patroni = find_program(PATRONI)
        self._check_executable()
        find_program(ETCD)  # fail before starting anything
        self.name = name
        self.members: list[PatroniMember] = []
        self.etcd: Etcd | None = None

    def __repr__(self) -> str:
        members = ", ".join(f"{member.name}@{member.node.address}" for member in self.members)
        return f"PatroniCluster({self.name!r}, [{members}])"

    def _check_executable(self) -> None:
        """The server account must be able to run Patroni's interpreter (a virtualenv under /root is not)."""
        try:
            self.account.run([self.patroni, "--version"], cwd=pathlib.Path("/"))
        except (OSError, ClusterError) as exc:
            raise MissingComponentError(PATRONI, [f"{self.patroni} as {self.account.name}: {exc}"]) from exc

    # -- lifecycle -------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> typing.Self:
        return super().start(timeout)

    def _launch(self, directory: pathlib.Path, timeout: float) -> None:
        self.etcd = Etcd(directory, account=self.account)
        self.etcd.start()
        for index in range(1, self.member_count + 1):
            self.members.append(self._new_member(f"m{index}"))
        self.members[0].process.start()  # the first one bootstraps: no race for the initialize key
        deadline = time.monotonic() + timeout
        self._wait(lambda: self.members[0].is_leader, "a leader", deadline)
        for member in self.members[1:]:
            member.process.start()
        self._wait(self._all_streaming, "every replica streaming", deadline)

    def _halt(self) -> None:
        """Stop every Patroni (replicas first, so nothing fails over), any postmaster left, then etcd."""
        leaders = [member for member in self.members if member.node.is_running and member.is_leader]
        for member in [member for member in self.members if member not in leaders] + leaders:
            member.process.stop()
            pid = member.node.pid
            if pid is not None:  # a postmaster outlives a killed Patroni
                _kill(pid)
        self.members.clear()
        if self.etcd is not None:
            self.etcd.stop()
            self.etcd = None

    def pids(self) -> list[int]:
        """etcd's, every member's Patroni's and postmaster's PIDs that run now."""
        processes = [member.process for member in self.members] + ([] if self.etcd is None else [self.etcd.process])
        pids = [process.pid for process in processes] + [member.node.pid for member in self.members]
        return [pid for pid in pids if pid is not None]

    def _new_member(self, name: str) -> PatroniMember:
        if self.directory is None or self.etcd is None:  # pragma: no cover - only called from start()
            raise ClusterError(f"{self!r} is not started")  # noqa: EM102, TRY003
        directory = self.directory / name
        directory.mkdir(mode=0o700)
        self.account.own(directory)
        log_path = self.directory / f"{name}.log"
        node = PostgresNode(
            name=name,
            port=free_port(),
            data_dir=directory / "data",
            log_path=log_path,
            bindir=self.bindir,
            account=self.account,
        )
        rest_port = free_port()
        config_path = directory / "patroni.yml"
        config_path.write_text(json.dumps(self._config(name, node, rest_port, directory), indent=2))  # JSON is YAML
        self.account.own(config_path)
        _, reaper = _kit_root(self.account)
        reaper.watch(node)
        process = KitProcess(
            f"patroni-{name}", [self.patroni, config_path], account=self.account, cwd=directory, log_path=log_path
        )
        return PatroniMember(name=name, rest_port=rest_port, node=node, process=process)

    def _config(self, name: str, node: PostgresNode, rest_port: int, directory: pathlib.Path) -> dict[str, object]:
        if self.etcd is None:  # pragma: no cover - only called from start()
            raise ClusterError(f"{self!r} is not started")  # noqa: EM102, TRY003
        superuser = {"username": node.user}
        return {
            "scope": f"{self.name}-{self.etcd.client_port}",
            "name": name,
            "log": {"level": "INFO"},
            "restapi": {"listen": f"{HOST}:{rest_port}", "connect_address": f"{HOST}:{rest_port}"},
            "etcd3": {"hosts": [self.etcd.address]},
            "bootstrap": {
                "dcs": {
                    "ttl": self.ttl,
                    "loop_wait": _LOOP_WAIT,
                    "retry_timeout": _RETRY_TIMEOUT,
                    # A dead postmaster is not restarted in place: a replica is promoted at once.
                    "primary_start_timeout": 0,
                    "synchronous_mode": self.synchronous_mode,
                    "postgresql": {"use_pg_rewind": True, "use_slots": True, "parameters": _PARAMETERS},
                },
                "initdb": [{"encoding": "UTF8"}, {"locale": "C"}, "no-sync"],
            },
            "postgresql": {
                "listen": node.address,
                "connect_address": node.address,
                "data_dir": os.fspath(node.data_dir),
                "bin_dir": os.fspath(self.bindir),
                "pgpass": os.fspath(directory / "pgpass"),
                "authentication": {"superuser": superuser, "replication": superuser, "rewind": superuser},
                "pg_hba": [f"host all all {HOST}/32 trust", f"host replication all {HOST}/32 trust"],
                "basebackup": [{"checkpoint": "fast"}],
                "parameters": {"unix_socket_directories": ""},
            },
        }

    def _wait(self, condition: typing.Callable[[], bool], what: str, deadline: float) -> None:
        while not condition():
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {member.name} ---\n{member.process.log_tail()}" for member in self.members)
                msg = f"{self!r}: no {what} in time\n{logs}"
                raise ClusterError(msg)
            time.sleep(_POLL)

    def _all_streaming(self) -> bool:
        """One running member leads and every other streams from it.

        Exactly one: a leader thawed after a freeze still answers ``GET /primary`` until its Patroni notices
        the lost leader key and demotes it, and with two "leaders" there is no replica to wait for. A table
        created on it then was discarded by its rewind (a proof waited for that table until its timeout).
        """
        running = [member for member in self.members if member.process.pid is not None]
        leaders = [member for member in running if member.is_leader]
        states = self.member_states()
        return len(leaders) == 1 and all(
            states.get(member.name) == "streaming" for member in running if member not in leaders
        )

    # -- discovery -------------------------------------------------------------
    def member_states(self, field: str = "state") -> dict[str, str]:
        """Each member's ``state`` (``streaming``, ...) or ``role`` (``sync_standby``, ...) from ``GET /cluster``.

        ``{}`` when no member answers.
        """
        for member in self.members:
            status, text = member.rest("GET", "/cluster")
            if status == 200:  # noqa: PLR2004 - HTTP OK
                return {entry["name"]: entry.get(field, "") for entry in json.loads(text)["members"]}
        return {}

    def leader(self) -> PatroniMember:
        """The member whose REST API answers ``GET /primary`` with 200; a :class:`ClusterError` if none does."""
        for member in self.members:
            if member.is_leader:
                return member
        msg = f"{self!r} has no leader now"
        raise ClusterError(msg)

    @property
    def replicas(self) -> list[PatroniMember]:
        """The members whose REST API answers ``GET /replica`` with 200."""
        return [member for member in self.members if member.rest("GET", "/replica")[0] == 200]  # noqa: PLR2004

    def member(self, name: str) -> PatroniMember:
        for member in self.members:
            if member.name == name:
                return member
        msg = f"{self!r} has no member {name!r}"
        raise KeyError(msg)

    def multihost_dsn(
        self,
        *,
        driver: str | None = "asyncpg",
        target_session_attrs: str | None = "read-write",
        database: str = DATABASE,
    ) -> str:
        """A multi-host DSN over every member's PostgreSQL (by default the read-write one is wanted)."""
        addresses = [member.node.address for member in self.members]
        return multihost_url(addresses, driver=driver, target_session_attrs=target_session_attrs, database=database)

    # -- faults ----------------------------------------------------------------
    async def switchover(self, candidate: PatroniMember | None = None, *, timeout: float = 60.0) -> Transition:
        """``POST /switchover`` to the leader; wait until another member accepts writes."""
        old = await asyncio.to_thread(self.leader)
        body: dict[str, str] = {"leader": old.name}
        if candidate is not None:
            body["candidate"] = candidate.name
        started = time.monotonic()
        # Patroni answers once the switchover is done (or has failed).
        status, text = await asyncio.to_thread(old.rest, "POST", "/switchover", body, timeout=timeout)
        if status != 200:  # noqa: PLR2004 - HTTP OK
            msg = f"{self!r}: POST /switchover {body} answered {status}: {text}"
            raise ClusterError(msg)
        return await self._transition("switchover", old, started, timeout)

    async def failover(self, *, timeout: float = 60.0) -> Transition:
        """``SIGKILL`` the leader's postmaster (by ``postmaster.pid``); wait until another member accepts writes."""
        old = await asyncio.to_thread(self.leader)
        pid = old.node.pid
        if pid is None:  # pragma: no cover - the leader answered /primary, so its postmaster runs
            raise ClusterError(f"{old.name} has no postmaster")  # noqa: EM102, TRY003
        started = time.monotonic()
        await asyncio.to_thread(_kill, pid)
        return await self._transition("failover", old, started, timeout)

    async def lose_node(self, member: PatroniMember | None = None, *, timeout: float = 90.0) -> Transition | None:
        """Kill ``member``'s Patroni and then its postmaster, by PID (default: the leader's).

        When it was the leader, wait until another member accepts writes: about the TTL, the time the
        leader key takes to expire. Bring it back with :meth:`start_member`.
        """
        lost = member if member is not None else await asyncio.to_thread(self.leader)
        was_leader = await asyncio.to_thread(lambda: lost.is_leader)
        started = time.monotonic()
        await asyncio.to_thread(lost.process.kill)
        pid = lost.node.pid
        if pid is not None:
            await asyncio.to_thread(_kill, pid)
        if not was_leader:
            return None
        return await self._transition("lose_node", lost, started, timeout)

    def start_member(self, member: PatroniMember) -> None:
        """Start ``member``'s Patroni again (after :meth:`lose_node`); it rejoins as a replica."""
        member.process.start()

    async def wait_streaming(self, *, timeout: float = 60.0) -> None:
        """Wait until every member whose Patroni runs is the leader or a streaming replica."""
        deadline = time.monotonic() + timeout
        await asyncio.to_thread(self._wait, self._all_streaming, "every replica streaming", deadline)

    async def wait_synchronous(self, *, timeout: float = 60.0) -> None:
        """Wait until a replica is the synchronous standby (``synchronous_mode=True``): commits wait for it."""
        deadline = time.monotonic() + timeout
        condition = lambda: "sync_standby" in self.member_states("role").values()  # noqa: E731
        await asyncio.to_thread(self._wait, condition, "synchronous standby", deadline)

    async def _transition(self, fault: str, old: PatroniMember, started: float, timeout: float) -> Transition:
        deadline = started + timeout
        others = [member for member in self.members if member is not old]
        while True:
            for member in others:
                if await _accepts_writes(member.node):
                    return Transition(fault=fault, old=old, new=member, seconds=time.monotonic() - started)
            if time.monotonic() > deadline:
                msg = f"{self!r}: no other member took writes within {timeout}s of the {fault}"
                raise ClusterError(msg)
            await asyncio.sleep(_POLL)


def _kill(pid: int) -> None:
    """``SIGKILL`` ``pid`` and wait until it is gone (a postmaster is no child of ours: poll ``/proc``)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while _alive(pid):
        if time.monotonic() > deadline:  # pragma: no cover - SIGKILL cannot be ignored
            raise ClusterError(f"process {pid} outlived SIGKILL")  # noqa: EM102, TRY003
        time.sleep(0.01)


async def _accepts_writes(node: PostgresNode) -> bool:
    """Whether ``node`` answers now as a primary (one short connection; any failure is a no)."""
    try:
        connection = await asyncpg.connect(node.dsn(driver=None), timeout=0.5)
        try:
            return not await connection.fetchval("SELECT pg_is_in_recovery()")
        finally:
            connection.terminate()
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
        return False
