"""DSN helpers: set the database, driver and ``target_session_attrs``; find the hosts a DSN names.

Parsing is SQLAlchemy's (:func:`sqlalchemy.make_url`); this module only adds what it lacks for
PostgreSQL multi-host DSNs: hosts without ports, IPv6 hosts in ``host=`` entries and libpq's
``h1:p1,h2:p2`` netloc form.
"""

import dataclasses
import re
import typing

import sqlalchemy as sa
from sqlalchemy.exc import ArgumentError


DEFAULT_PORT: typing.Final = 5432
# SQLAlchemy lets a password hold anything up to the last "@" ("/", "?" and "#" included): mask that much.
_PASSWORD_IN_NETLOC: typing.Final = re.compile(r"(?P<head>://[^:/@]*:).*(?P<tail>@)", re.DOTALL)
_PASSWORD_IN_QUERY: typing.Final = re.compile(r"(?P<head>[?&]password=)[^&#]*", re.IGNORECASE)
_NETLOC: typing.Final = re.compile(r"^(?P<scheme>[^:/?#]+://)(?P<netloc>[^/?#]*)(?P<rest>.*)$", re.DOTALL)


class DSNError(ArgumentError, ValueError):
    """A DSN that cannot be used; the message names the bad part, never the password."""


@dataclasses.dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def mask_dsn(dsn: str | sa.URL) -> str:
    """``dsn`` as text with its password replaced by ``***`` (in the netloc and in a ``password=`` entry)."""
    text = dsn.render_as_string(hide_password=True) if isinstance(dsn, sa.URL) else dsn
    masked = _PASSWORD_IN_NETLOC.sub(r"\g<head>***\g<tail>", text)
    return _PASSWORD_IN_QUERY.sub(r"\g<head>***", masked)


def _netloc_hosts_to_query(dsn: str) -> str:
    """Rewrite libpq's ``scheme://user@h1:p1,h2:p2/db`` as ``scheme://user@/db?host=h1:p1&host=h2:p2``."""
    match = _NETLOC.match(dsn)
    if match is None or "," not in match["netloc"]:
        return dsn
    userinfo, _, hosts = match["netloc"].rpartition("@")
    rest = match["rest"]
    path, sep, query = rest.partition("?")
    entries = "&".join(f"host={host}" for host in hosts.split(","))
    query = f"{entries}&{query}" if sep and query else entries
    return f"{match['scheme']}{userinfo}{'@' if userinfo else ''}{path or '/'}?{query}"


def parse_url(dsn: str | sa.URL) -> sa.URL:
    """Parse ``dsn`` with SQLAlchemy; a malformed one raises :class:`DSNError` with the password masked."""
    given: object = dsn  # untyped callers pass anything
    if isinstance(given, sa.URL):
        return given
    if not isinstance(given, str):
        msg = f"a DSN must be a str or sqlalchemy.URL, got {type(given).__name__}"
        raise TypeError(msg)
    try:
        return sa.make_url(_netloc_hosts_to_query(given))
    except (ArgumentError, ValueError) as exc:
        detail = str(exc).replace(given, mask_dsn(given))
        msg = f"malformed DSN {mask_dsn(given)!r}: {detail}"
        raise DSNError(msg) from None


def _split_host_port(entry: str, *, dsn: sa.URL) -> tuple[str, int | None]:
    if entry.startswith("["):  # [v6] or [v6]:port
        host, bracket, after = entry[1:].partition("]")
        if not bracket or (after and not after.startswith(":")):
            msg = f"malformed host {entry!r} in DSN {mask_dsn(dsn)!r}"
            raise DSNError(msg)
        port_text = after[1:]
    elif entry.count(":") > 1:  # a bare IPv6 address has no port
        host, port_text = entry, ""
    else:
        host, _, port_text = entry.partition(":")
    if not host:
        msg = f"empty host in {entry!r} in DSN {mask_dsn(dsn)!r}"
        raise DSNError(msg)
    return host, _port(port_text, dsn=dsn) if port_text else None


def _port(text: str, *, dsn: sa.URL) -> int:
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 0 < port < 65536:  # noqa: PLR2004
        msg = f"bad port {text!r} in DSN {mask_dsn(dsn)!r}"
        raise DSNError(msg)
    return port


def _query_list(url: sa.URL, key: str) -> list[str]:
    value = url.query.get(key)
    if value is None:
        return []
    values = [value] if isinstance(value, str) else list(value)
    return [part.strip() for item in values for part in item.split(",")]


def dsn_hosts(dsn: str | sa.URL) -> tuple[HostPort, ...]:
    """Every ``host:port`` a DSN names, in order: the netloc host, or the ``host=`` entries (with ``port=``).

    A host without a port gets the ``port=`` entry at its position, a single ``port=`` for all, the
    netloc port, or 5432. Returns ``()`` when the DSN names no host (a Unix socket default).
    """
    url = parse_url(dsn)
    entries = _query_list(url, "host")
    ports = [_port(text, dsn=url) for text in _query_list(url, "port")]
    if not entries:
        if url.host is None:
            return ()
        netloc_port = _port(str(url.port), dsn=url) if url.port is not None else None
        return (HostPort(url.host, netloc_port or (ports[0] if len(ports) == 1 else DEFAULT_PORT)),)
    if len(ports) > 1 and len(ports) != len(entries):
        msg = f"{len(entries)} hosts but {len(ports)} ports in DSN {mask_dsn(url)!r}"
        raise DSNError(msg)
    hosts: list[HostPort] = []
    for index, entry in enumerate(entries):
        host, port = _split_host_port(entry, dsn=url)
        if port is None:
            port = ports[index] if len(ports) > 1 else (ports[0] if ports else url.port or DEFAULT_PORT)
        elif len(ports) > 1 and ports[index] != port:
            msg = f"host {entry!r} has port {port} but port= gives {ports[index]} in DSN {mask_dsn(url)!r}"
            raise DSNError(msg)
        hosts.append(HostPort(host, port))
    return tuple(hosts)


def build_db_dsn(
    db_dsn: str,
    database_name: str,
    use_replica: bool = False,  # noqa: FBT001, FBT002 - the 0.8.4 signature
    drivername: str = "postgresql",
) -> sa.URL:
    """``db_dsn`` with the database and driver replaced and ``target_session_attrs`` set.

    ``target_session_attrs`` becomes ``prefer-standby`` when ``use_replica`` else ``read-write``;
    every other query entry (all ``host=`` entries too) is kept. Several ``host=`` entries without
    ports get the port they imply (5432 or ``port=``), written out, because SQLAlchemy's asyncpg
    dialect refuses a multi-host URL with a missing port when ``create_async_engine`` parses it.
    """
    url = parse_url(db_dsn)
    query = dict(url.query)
    query["target_session_attrs"] = "prefer-standby" if use_replica else "read-write"
    hosts = dsn_hosts(url)
    if len(hosts) > 1 and "host" in query and not any(":" in host.host for host in hosts):
        query["host"] = tuple(str(host) for host in hosts)
        query.pop("port", None)
    return url.set(database=database_name, drivername=drivername, query=query)


def is_dsn_multihost(db_dsn: str | sa.URL) -> bool:
    """Whether the DSN names more than one host."""
    return len(dsn_hosts(db_dsn)) > 1
