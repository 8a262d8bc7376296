"""PgBouncer in front of one PostgreSQL address (a node, HAProxy's primary listener, a proxy) for tests.

It runs as the kit's server account on a loopback port, with ``server_login_retry`` of 1 s rather than
PgBouncer's 15 s (which turns a 0.2 s server restart into 15 s stalls). :meth:`PgBouncer.retarget`
rewrites its ``[databases]`` entry and reloads it (``SIGHUP``), as a deployment does when the primary
moves.
"""

import pathlib
import signal
import typing

from db_retry.testing._binaries import PGBOUNCER, find_program
from db_retry.testing.cluster import DATABASE, HOST, SUPERUSER, KitService, _Account, free_port


__all__ = ["PgBouncer", "PoolMode"]

PoolMode = typing.Literal["session", "transaction", "statement"]
_POOL_MODES: typing.Final = typing.get_args(PoolMode)


class PgBouncer(KitService):
    """PgBouncer 1.18+ in front of ``target_host:target_port``; a context manager, or :meth:`start` / :meth:`stop`.

    Clients connect to :attr:`host` / :attr:`port` (``dsn(driver=...)``) as ``postgres`` with no password
    (``auth_type = trust``); every database name is passed through to the server.
    """

    def __init__(  # noqa: PLR0913 - every option is keyword-only and optional
        self,
        target_host: str,
        target_port: int,
        *,
        pool_mode: PoolMode = "transaction",
        pool_size: int = 20,
        server_login_retry: float = 1.0,
        run_as: str | None = None,
        name: str = "pgbouncer",
    ) -> None:
        if pool_mode not in _POOL_MODES:
            msg = f"pool_mode must be one of {', '.join(_POOL_MODES)}, got {pool_mode!r}"
            raise ValueError(msg)
        self.program = find_program(PGBOUNCER)
        self.account = _Account.resolve(run_as)
        self.target_host = target_host
        self.target_port = target_port
        self.pool_mode = pool_mode
        self.pool_size = pool_size
        self.server_login_retry = server_login_retry
        self.name = name
        self.host = HOST
        self.port = 0

    def __repr__(self) -> str:
        return (
            f"PgBouncer({self.name!r}, {self.host}:{self.port} -> {self.target_host}:{self.target_port}, "
            f"pool_mode={self.pool_mode})"
        )

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def dsn(self, *, driver: str | None = "asyncpg", database: str = DATABASE) -> str:
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        return f"{scheme}://{SUPERUSER}@{self.address}/{database}"

    @property
    def config_path(self) -> pathlib.Path:
        return self._started() / "pgbouncer.ini"

    def _write_config(self) -> None:
        directory = self.config_path.parent
        (directory / "userlist.txt").write_text(f'"{SUPERUSER}" ""\n')
        self.config_path.write_text(
            "\n".join(
                [
                    "[databases]",
                    f"* = host={self.target_host} port={self.target_port}",
                    "[pgbouncer]",
                    f"listen_addr = {self.host}",
                    f"listen_port = {self.port}",
                    "unix_socket_dir =",
                    "auth_type = trust",
                    f"auth_file = {directory / 'userlist.txt'}",
                    f"admin_users = {SUPERUSER}",
                    f"pool_mode = {self.pool_mode}",
                    "max_client_conn = 1000",
                    f"default_pool_size = {self.pool_size}",
                    f"server_login_retry = {self.server_login_retry}",
                    "server_connect_timeout = 2",
                    # asyncpg and psycopg may send it; PgBouncer refuses unknown startup parameters.
                    "ignore_startup_parameters = extra_float_digits",
                    f"pidfile = {directory / 'pgbouncer.pid'}",
                    "",
                ]
            )
        )
        self.account.own(directory)

    def _launch(self, directory: pathlib.Path, timeout: float) -> None:  # noqa: ARG002 - config_path is in it
        self.port = free_port()
        self._write_config()
        process = self._spawn([self.program, self.config_path], log_name="pgbouncer.log")
        process.wait_listening(self.host, self.port, timeout)

    def retarget(self, host: str, port: int) -> None:
        """Point every database at ``host:port`` and reload (``SIGHUP``); new server connections go there."""
        self.target_host, self.target_port = host, port
        self._write_config()
        if self.process is not None:  # pragma: no branch - _write_config raised if not started
            self.process.signal(signal.SIGHUP)
