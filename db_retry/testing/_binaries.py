"""Locate the PostgreSQL server binaries and the other programs the test kit runs."""

import dataclasses
import os
import pathlib
import shutil
import subprocess
import sys
import typing


BINDIR_ENV: typing.Final = "DB_RETRY_PG_BINDIR"
_REQUIRED: typing.Final = ("initdb", "pg_ctl", "postgres", "pg_basebackup")
_USUAL_PATTERNS: typing.Final = (
    "/usr/lib/postgresql/*/bin",
    "/usr/pgsql-*/bin",
    "/usr/local/pgsql/bin",
    "/opt/homebrew/opt/postgresql@*/bin",
    "/usr/local/opt/postgresql@*/bin",
    "/Applications/Postgres.app/Contents/Versions/*/bin",
)
INSTALL_HINT: typing.Final = (
    "Install the PostgreSQL server (Debian/Ubuntu: `apt-get install postgresql`; "
    "Fedora/RHEL: `dnf install postgresql-server`; macOS: `brew install postgresql@16`) "
    f"or point {BINDIR_ENV} at the directory holding initdb and pg_ctl."
)


class PostgresBinariesNotFoundError(RuntimeError):
    """No directory with the PostgreSQL server binaries (initdb, pg_ctl, postgres, pg_basebackup) was found."""

    def __init__(self, searched: typing.Sequence[str]) -> None:
        self.searched = tuple(searched)
        listing = "; ".join(self.searched) or "nothing"
        super().__init__(f"PostgreSQL server binaries not found (searched: {listing}). {INSTALL_HINT}")


def _has_server(directory: pathlib.Path) -> bool:
    return all((directory / name).is_file() and os.access(directory / name, os.X_OK) for name in _REQUIRED)


def _version_key(directory: pathlib.Path) -> tuple[int, ...]:
    """The numbers in a path, so that ``postgresql/15`` sorts after ``postgresql/9.6``."""
    digits = "".join(ch if ch.isdigit() else " " for ch in str(directory)).split()
    return tuple(int(part) for part in digits)


def _from_pg_config(searched: list[str]) -> pathlib.Path | None:
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        searched.append("pg_config --bindir (no pg_config on PATH)")
        return None
    try:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10)  # noqa: S603
    except (OSError, subprocess.SubprocessError):
        searched.append(f"{pg_config} --bindir (failed)")
        return None
    directory = pathlib.Path(out.stdout.strip())
    searched.append(f"{pg_config} --bindir ({directory})")
    return directory if _has_server(directory) else None


def _from_usual_locations(searched: list[str]) -> pathlib.Path | None:
    root = pathlib.Path("/")
    for pattern in _USUAL_PATTERNS:
        searched.append(pattern)
        for found in sorted(root.glob(pattern.lstrip("/")), key=_version_key, reverse=True):
            if _has_server(found):
                return found
    return None


def _from_path(searched: list[str]) -> pathlib.Path | None:
    on_path = shutil.which("postgres")
    searched.append(f"PATH ({on_path or 'no postgres on PATH'})")
    if on_path is None:
        return None
    # A `postgres` on PATH may be a lone symlink (e.g. /usr/local/bin/postgres): try where it points too.
    for directory in (pathlib.Path(on_path).parent, pathlib.Path(on_path).resolve().parent):
        if _has_server(directory):
            return directory
    return None


def find_postgres_bindir(explicit: str | os.PathLike[str] | None = None) -> pathlib.Path:
    """Return the directory of the PostgreSQL server binaries.

    Looked up in order: ``explicit``, the ``DB_RETRY_PG_BINDIR`` environment variable,
    ``pg_config --bindir``, the usual install locations (newest version first), then ``PATH``.
    """
    searched: list[str] = []
    candidates: list[tuple[str, pathlib.Path]] = []
    if explicit is not None:
        candidates.append(("argument", pathlib.Path(explicit)))
    env_value = os.environ.get(BINDIR_ENV)
    if env_value:
        candidates.append((BINDIR_ENV, pathlib.Path(env_value)))
    for label, directory in candidates:
        searched.append(f"{label}={directory}")
        if _has_server(directory):
            return directory
    if candidates:
        # An explicit choice that is wrong must not silently fall back to another server.
        raise PostgresBinariesNotFoundError(searched)
    for search in (_from_pg_config, _from_usual_locations, _from_path):
        found = search(searched)
        if found is not None:
            return found
    raise PostgresBinariesNotFoundError(searched)


# -- the other programs of the kit: etcd, Patroni, PgBouncer, HAProxy ----------------------------------
PATRONI_VENV: typing.Final = pathlib.Path("/opt/db-retry-patroni")
_SBIN_DIRS: typing.Final = ("/usr/sbin", "/usr/local/sbin", "/usr/bin", "/usr/local/bin")


@dataclasses.dataclass(frozen=True, slots=True)
class Component:
    """A program of the kit: how to find it and what to tell someone who does not have it."""

    program: str
    env: str
    install: str
    extra_places: tuple[pathlib.Path, ...] = ()


ETCD: typing.Final = Component(
    "etcd", "DB_RETRY_ETCD", "etcd 3.4 or later (Debian/Ubuntu: `apt-get install etcd-server`)"
)
PGBOUNCER: typing.Final = Component(
    "pgbouncer", "DB_RETRY_PGBOUNCER", "PgBouncer (Debian/Ubuntu: `apt-get install pgbouncer`)"
)
HAPROXY: typing.Final = Component("haproxy", "DB_RETRY_HAPROXY", "HAProxy (Debian/Ubuntu: `apt-get install haproxy`)")
IPTABLES: typing.Final = Component(
    "iptables", "DB_RETRY_IPTABLES", "iptables (Debian/Ubuntu: `apt-get install iptables`) and run as root"
)
PATRONI: typing.Final = Component(
    "patroni",
    "DB_RETRY_PATRONI",
    (
        f"Patroni in a virtualenv the server account can execute (`/usr/bin/python3 -m venv {PATRONI_VENV} && "
        f"{PATRONI_VENV}/bin/pip install 'patroni[etcd3,psycopg3]'`; a virtualenv under /root is not executable "
        "by the postgres account)"
    ),
    extra_places=(PATRONI_VENV / "bin" / "patroni",),
)


class MissingComponentError(RuntimeError):
    """A program the kit needs is not installed (or not executable); the message says what to install."""

    def __init__(self, component: Component, searched: typing.Sequence[str]) -> None:
        self.component = component
        self.searched = tuple(searched)
        super().__init__(
            f"{component.program} not found (searched: {'; '.join(self.searched)}). Install {component.install}, "
            f"or point {component.env} at the program."
        )


class NeedsRootError(MissingComponentError):
    """A fault of the kit needs root (``CAP_NET_ADMIN``), as a network partition does (iptables rules)."""

    def __init__(self, component: Component, what: str) -> None:
        self.component = component
        self.searched = ()
        RuntimeError.__init__(
            self,
            f"{what} needs root (CAP_NET_ADMIN) for {component.program}; running as uid {os.geteuid()}. Run as root "
            f"with {component.install.removesuffix(' and run as root')} installed.",
        )


def _is_program(path: pathlib.Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find_program(component: Component) -> pathlib.Path:
    """The path of ``component``'s program: its environment variable, the usual places, then ``PATH``."""
    env_value = os.environ.get(component.env)
    if env_value:
        if _is_program(pathlib.Path(env_value)):
            return pathlib.Path(env_value)
        # An explicit choice that is wrong must not silently fall back to another program.
        raise MissingComponentError(component, [f"{component.env}={env_value}"])
    searched: list[str] = []
    places = [*component.extra_places, pathlib.Path(sys.executable).parent / component.program]
    places += [pathlib.Path(directory, component.program) for directory in _SBIN_DIRS]
    for place in places:
        searched.append(str(place))
        if _is_program(place):
            return place
    on_path = shutil.which(component.program)
    searched.append(f"PATH ({on_path or f'no {component.program} on PATH'})")
    if on_path is not None:
        return pathlib.Path(on_path)
    raise MissingComponentError(component, searched)
