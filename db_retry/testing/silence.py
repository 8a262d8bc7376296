"""Silent nodes: a network partition (iptables ``DROP`` on a loopback port) and a frozen node (``SIGSTOP``).

Neither refuses nor resets anything, as a dead VM or a cut cable does not:

- :class:`Partition` drops, in the ``INPUT`` chain of the loopback interface, every packet to a port
  (``-d HOST --dport PORT``) and every packet from it (``-s HOST --sport PORT``). A query on an
  established connection is never acknowledged (the client's TCP retransmits), a new connection's
  SYN gets no SYN-ACK, and the server's own packets never arrive either. Dropping in ``INPUT``,
  not ``OUTPUT``, keeps the sender from learning anything: a packet dropped on its way out makes
  ``send``/``connect`` fail with ``EPERM`` at once. Needs root (``CAP_NET_ADMIN``) and iptables.
- :class:`Freeze` sends ``SIGSTOP`` to processes and to all their descendants (found by PID through
  ``/proc/*/stat``, never by name) and ``SIGCONT`` when it ends. The kernel still completes TCP
  handshakes on a frozen server's listening socket, but nothing reads or answers.

Each begins with ``begin()`` and ends with ``end()``, which :func:`db_retry.testing.faults.partition`
and :func:`~db_retry.testing.faults.freeze` call around their block. A fault ends when the block does,
also on failure; after ``limit`` seconds at most, even if the block is still running (a guard against a
stuck test); and, if the process dies meanwhile, in the kit's reaper: every rule carries the comment
``db-retry-kit-<pid>``, so only this process's rules are ever deleted, and every stopped process is
continued if it still has the start time it had.
"""

import collections.abc
import contextlib
import ipaddress
import logging
import os
import pathlib
import signal
import subprocess
import threading
import time
import typing

from db_retry.testing._binaries import IPTABLES, NeedsRootError, find_program
from db_retry.testing.cluster import (
    HOST,
    ClusterError,
    KitService,
    PostgresNode,
    _start_time,
    kit_reaper,
)
from db_retry.testing.patroni import PatroniMember
from db_retry.validation import check_number


__all__ = ["RULE_COMMENT_PREFIX", "Freeze", "FreezeTarget", "Partition", "PartitionTarget", "process_state"]

logger = logging.getLogger(__name__)

RULE_COMMENT_PREFIX: typing.Final = "db-retry-kit-"
DEFAULT_LIMIT: typing.Final = 60.0
_HIGHEST_KIT_PORT: typing.Final = 32767  # the kernel's ephemeral ports start above: those are clients' ports
_PROC: typing.Final = pathlib.Path("/proc")
_POLL: typing.Final = 0.01


class _Listening(typing.Protocol):
    """Something that listens on a loopback address: a :class:`PostgresNode`, a PgBouncer, a TcpProxy."""

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...


PartitionTarget: typing.TypeAlias = _Listening | int
FreezeTarget: typing.TypeAlias = PostgresNode | PatroniMember | KitService


class _SilentFault:
    """What both faults share: begin, end at most once (by the block, the time limit or a failed begin)."""

    def __init__(self, description: str, limit: float) -> None:
        self.description = description
        self.limit = float(check_number("limit", limit, unit="seconds"))
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self.active = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description}, active={self.active})"

    def begin(self) -> typing.Self:
        """Start the fault; if that fails half-way, undo what was done and raise."""
        with self._lock:
            try:
                self._begin()
            except BaseException:
                self._end()
                raise
            self.active = True
            self._timer = threading.Timer(self.limit, self._expire)
            self._timer.daemon = True
            self._timer.start()
        return self

    def end(self) -> None:
        """End the fault (nothing to do when it has ended already)."""
        if self._timer is not None:
            self._timer.cancel()
        with self._lock:
            self._end()
            self.active = False

    def _expire(self) -> None:
        logger.warning("%r: ending it after its limit of %ss", self, self.limit)
        self.end()

    def _begin(self) -> None:
        raise NotImplementedError

    def _end(self) -> None:
        raise NotImplementedError


# -- partition --------------------------------------------------------------------------------------
def _address(target: PartitionTarget) -> tuple[str, int]:
    host, port = (HOST, target) if isinstance(target, int) else (target.host, target.port)
    address = ipaddress.ip_address(host)
    if not (isinstance(address, ipaddress.IPv4Address) and address.is_loopback):
        msg = f"a partition drops packets on IPv4 loopback only (127.0.0.0/8), got host {host!r}"
        raise ValueError(msg)
    if not 0 < port <= _HIGHEST_KIT_PORT:
        msg = f"a partition drops packets of a server's port, 1 to {_HIGHEST_KIT_PORT}, got {port!r}"
        raise ValueError(msg)
    return host, port


class Partition(_SilentFault):
    """``with Partition(node, bouncer, 25432):`` packets to and from those loopback ports are dropped.

    A target is anything with a loopback ``host`` and a ``port`` (a :class:`PostgresNode`, a PgBouncer,
    a TcpProxy) or a port number on 127.0.0.1; for a Patroni member, name its PostgreSQL and its REST API:
    ``Partition(member.node, member.rest_port)`` (its Patroni still reaches etcd: the kit cannot tell
    one member's connections to etcd from another's). Raises :class:`NeedsRootError` when not root and
    :class:`MissingComponentError` when iptables is not installed.
    """

    def __init__(self, *targets: PartitionTarget, limit: float = DEFAULT_LIMIT) -> None:
        if not targets:
            msg = "a partition needs at least one node or port"
            raise ValueError(msg)
        self.addresses = list(dict.fromkeys(_address(target) for target in targets))
        super().__init__(", ".join(f"{host}:{port}" for host, port in self.addresses), limit)
        if os.geteuid() != 0:
            raise NeedsRootError(IPTABLES, "a network partition")
        self.program = find_program(IPTABLES)
        self.comment = f"{RULE_COMMENT_PREFIX}{os.getpid()}"
        self.rules = [
            ["INPUT", "-i", "lo", "-p", "tcp", *match, "-m", "comment", "--comment", self.comment, "-j", "DROP"]
            for host, port in self.addresses
            for match in (["-d", host, "--dport", str(port)], ["-s", host, "--sport", str(port)])
        ]
        self._added: list[list[str]] = []

    def _iptables(self, *args: str) -> None:
        completed = subprocess.run(  # noqa: S603 - the located iptables, with arguments the kit builds
            [self.program, "-w", "10", *args], capture_output=True, text=True, check=False, timeout=60
        )
        if completed.returncode != 0:
            msg = f"{self.program.name} {' '.join(args)} exited with {completed.returncode}: {completed.stderr.strip()}"
            raise ClusterError(msg)

    def _begin(self) -> None:
        kit_reaper().delete_rules_at_end(self.program, self.comment)
        for rule in self.rules:
            self._iptables("-I", *rule)
            self._added.append(rule)
        logger.info("partition of %s: %d iptables rules (%s)", self.description, len(self._added), self.comment)

    def _end(self) -> None:
        while self._added:
            rule = self._added.pop()
            try:
                self._iptables("-D", *rule)
            except ClusterError as exc:  # someone flushed the chain: the rule is gone either way
                logger.warning("%r: %s", self, exc)


# -- freeze -----------------------------------------------------------------------------------------
def process_state(pid: int) -> str | None:
    """The state letter of ``pid`` from ``/proc/PID/stat`` (``T`` when stopped), ``None`` when it is gone."""
    try:
        return (_PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None


def _parents() -> dict[int, int]:
    """Every process's parent PID (a process gone while the directory is read is left out)."""
    parents: dict[int, int] = {}
    for entry in _PROC.iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
    return parents


def _tree(roots: collections.abc.Iterable[int]) -> list[int]:
    """``roots`` and all their descendants, each parent before its children."""
    children: dict[int, list[int]] = {}
    for pid, parent in _parents().items():
        children.setdefault(parent, []).append(pid)
    found = list(dict.fromkeys(roots))
    for pid in found:  # the list grows while it is walked
        found.extend(child for child in sorted(children.get(pid, ())) if child not in found)
    return found


def _roots(target: FreezeTarget, *, patroni: bool) -> list[int | None]:
    if isinstance(target, PostgresNode):
        return [target.pid]
    if isinstance(target, PatroniMember):
        return [target.process.pid if patroni else None, target.node.pid]
    return list(target.pids())


class Freeze(_SilentFault):
    """``with Freeze(node):`` the node's processes and all their descendants are stopped (``SIGSTOP``).

    A :class:`PostgresNode` is its postmaster (from ``postmaster.pid``) and every backend and auxiliary
    process; a Patroni member is a frozen VM: its Patroni and its PostgreSQL (``patroni=False``: its
    PostgreSQL only, while its Patroni goes on talking to etcd); a kit service (PgBouncer, HAProxy) is
    its :meth:`~db_retry.testing.cluster.KitService.pids`. The postmaster is stopped before its children,
    so it cannot start new ones meanwhile; the walk repeats until no new process shows up. On exit every
    process still running with the start time it had is continued (``SIGCONT``).
    """

    def __init__(self, target: FreezeTarget, *, patroni: bool = True, limit: float = DEFAULT_LIMIT) -> None:
        self.roots = [pid for pid in _roots(target, patroni=patroni) if pid is not None]
        super().__init__(target.name, limit)
        if not self.roots:
            msg = f"{self.description} runs no process to freeze"
            raise ClusterError(msg)
        self.stopped: dict[int, str | None] = {}
        self.timeout = 30.0

    def _begin(self) -> None:
        reaper = kit_reaper()
        while new := [pid for pid in _tree(self.roots) if pid not in self.stopped]:
            for pid in new:
                self.stopped[pid] = started = _start_time(pid)  # None: gone since the walk
                reaper.continue_at_end(pid, started)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
        self._wait(stopped=True)
        logger.info("froze %s: %d processes", self.description, len(self.stopped))

    def _end(self) -> None:
        # Children first, the postmaster last; a PID the system gave to another process since is left alone.
        same = [pid for pid, started in reversed(self.stopped.items()) if _start_time(pid) == started]
        for pid in same:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self._wait(stopped=False)
        self.stopped.clear()

    def _wait(self, *, stopped: bool) -> None:
        """Wait until every process is stopped (``T``), or none is, or it is gone: a signal takes effect later."""
        deadline = time.monotonic() + self.timeout
        while pending := self._pending(stopped=stopped):
            if time.monotonic() > deadline:  # pragma: no cover - SIGSTOP and SIGCONT cannot be ignored
                msg = f"{self!r}: processes {pending} not {'stopped' if stopped else 'continued'} in {self.timeout}s"
                raise ClusterError(msg)
            time.sleep(_POLL)  # pragma: no cover - timing: a signal mostly takes effect before /proc is read

    def _pending(self, *, stopped: bool) -> list[int]:
        states = {pid: process_state(pid) for pid in self.stopped}
        # A zombie ("Z": it exited as the freeze began, and its stopped parent cannot reap it) is as good as gone.
        return [pid for pid, state in states.items() if state not in {None, "Z"} and (state == "T") is not stopped]
