"""HAProxy in front of a :class:`~db_retry.testing.patroni.PatroniCluster`, checking Patroni's REST API.

Two TCP listeners: ``primary`` sends connections to the member whose ``GET /primary`` answers 200,
``replicas`` to those whose ``GET /replica`` does. HAProxy counts a server as UP until its first check
fails, so :meth:`HAProxy.start` waits, through HAProxy's stats socket, until every server has been
checked and the primary listener has a server UP. With ``shutdown_sessions`` (the default) HAProxy
cuts a server's sessions when it marks it down (``on-marked-down shutdown-sessions``); without it,
sessions to an old primary stay open, as behind a moving DNS name.
"""

import csv
import io
import pathlib
import socket
import time
import typing

from db_retry.testing._binaries import HAPROXY, find_program
from db_retry.testing.cluster import DATABASE, HOST, SUPERUSER, ClusterError, KitService, free_port


if typing.TYPE_CHECKING:
    from db_retry.testing.patroni import PatroniCluster


__all__ = ["HAProxy", "Listener"]

Listener = typing.Literal["primary", "replicas"]
_CHECKS: typing.Final[dict[str, str]] = {"primary": "/primary", "replicas": "/replica"}


class HAProxy(KitService):
    """HAProxy 2.6+ with a ``primary`` and a ``replicas`` listener over ``cluster``'s members."""

    def __init__(
        self,
        cluster: "PatroniCluster",
        *,
        shutdown_sessions: bool = True,
        check_interval: float = 0.5,
        name: str = "haproxy",
    ) -> None:
        if check_interval <= 0:
            msg = f"check_interval must be > 0 seconds, got {check_interval!r}"
            raise ValueError(msg)
        self.program = find_program(HAPROXY)
        self.cluster = cluster
        self.account = cluster.account
        self.shutdown_sessions = shutdown_sessions
        self.check_interval = check_interval
        self.name = name
        self.host = HOST
        self.ports: dict[str, int] = {}

    def __repr__(self) -> str:
        listeners = ", ".join(f"{name}@{self.host}:{port}" for name, port in self.ports.items())
        return f"HAProxy({self.name!r}, [{listeners}])"

    def address(self, listener: Listener = "primary") -> str:
        return f"{self.host}:{self.ports[listener]}"

    def dsn(self, listener: Listener = "primary", *, driver: str | None = "asyncpg", database: str = DATABASE) -> str:
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        return f"{scheme}://{SUPERUSER}@{self.address(listener)}/{database}"

    @property
    def socket_path(self) -> pathlib.Path:
        return self._started() / "stats.sock"

    def _config(self) -> str:
        interval = f"{round(self.check_interval * 1000)}ms"
        server_options = f"check port {{rest}} inter {interval} fall 1 rise 1"
        if self.shutdown_sessions:
            server_options += " on-marked-down shutdown-sessions"
        lines = [
            "global",
            "    maxconn 1000",
            f"    stats socket {self.socket_path} mode 600 level admin",
            "defaults",
            "    mode tcp",
            "    timeout connect 1s",
            "    timeout client 30m",
            "    timeout server 30m",
            "    timeout check 1s",
        ]
        for listener, check in _CHECKS.items():
            lines += [
                f"listen {listener}",
                f"    bind {self.host}:{self.ports[listener]}",
                f"    option httpchk GET {check}",
                "    http-check expect status 200",
                "    balance roundrobin",
            ]
            lines += [
                f"    server {member.name} {member.node.address} {server_options.format(rest=member.rest_port)}"
                for member in self.cluster.members
            ]
        return "\n".join([*lines, ""])

    def _launch(self, directory: pathlib.Path, timeout: float) -> None:
        self.ports = {listener: free_port() for listener in _CHECKS}
        config_path = directory / "haproxy.cfg"
        config_path.write_text(self._config())
        self.account.own(directory)
        # -db: stay in the foreground, so the kit holds the process and its PID.
        process = self._spawn([self.program, "-db", "-f", config_path], log_name="haproxy.log")
        process.wait_listening(self.host, self.ports["primary"], timeout)
        self.wait_checked(timeout=timeout)

    # -- stats -----------------------------------------------------------------
    def command(self, line: str) -> str:
        """Send one command to HAProxy's stats socket (``show stat``, ...) and return the answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(self.socket_path))
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    def server_states(self) -> dict[tuple[str, str], tuple[str, str]]:
        """``(listener, member) -> (status, last check)`` from ``show stat``, e.g. ``("DOWN", "L7STS")``."""
        text = self.command("show stat").lstrip("# ")
        states: dict[tuple[str, str], tuple[str, str]] = {}
        for row in csv.DictReader(io.StringIO(text)):
            if row["pxname"] in _CHECKS and row["svname"] not in {"FRONTEND", "BACKEND"}:
                states[row["pxname"], row["svname"]] = (row["status"], row["check_status"])
        return states

    def up(self, listener: Listener = "primary") -> list[str]:
        """The members HAProxy sends ``listener``'s connections to now."""
        return sorted(
            member
            for (name, member), (status, _) in self.server_states().items()
            if name == listener and status == "UP"
        )

    def wait_checked(self, *, timeout: float = 30.0) -> None:
        """Wait until every server has a settled check result (UP after a pass, or DOWN) and one primary is UP."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                states = self.server_states()
            except OSError:  # the stats socket is not there yet
                states = {("starting", "-"): ("INI", "INI")}
            settled = all(
                (status == "UP" and check.startswith("L7OK")) or status == "DOWN" for status, check in states.values()
            )
            if settled and self.up("primary"):
                return
            if time.monotonic() > deadline:
                msg = f"{self!r}: checks not settled within {timeout}s: {states}"
                raise ClusterError(msg)
            time.sleep(0.05)
