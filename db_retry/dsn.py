"""DSN helpers: parse a DSN, set its database, driver and ``target_session_attrs``, find its hosts.

A DSN is a URL (``postgresql://user:password@host:5432/db``, SQLAlchemy's or libpq's forms) or a
libpq connection string of ``key=value`` pairs (``host=a,b port=5432,5433 dbname=db user=app``,
what psycopg users have). :func:`parse_url` is the one place that turns either into a
:class:`sqlalchemy.URL`: parsing is SQLAlchemy's (:func:`sqlalchemy.make_url`); this module only
adds what it lacks for PostgreSQL: ``key=value`` strings, hosts without ports, IPv6 hosts in
``host=`` entries, libpq's ``h1:p1,h2:p2`` netloc form, the ``postgres://`` scheme, and errors
that name the bad part. :func:`mask_dsn` hides every password in any text, parsed or not.
"""

import contextlib
import dataclasses
import re
import typing
import urllib.parse

import sqlalchemy as sa
from sqlalchemy.exc import ArgumentError


DEFAULT_PORT: typing.Final = 5432
EXPECTED: typing.Final = (
    "expected a URL such as postgresql://user:password@host:5432/database or libpq key=value pairs "
    "such as 'host=db port=5432 dbname=app user=app'"
)
_SCHEME: typing.Final = re.compile(r"^[A-Za-z][\w+.-]*:")
_SCHEME_AND_SLASHES: typing.Final = re.compile(r"^\s*[A-Za-z][\w+.-]*:/+")
# SQLAlchemy's own split of a URL: user, ":" password up to an "@", then host[:port] up to "/" or "?".
_AUTHORITY: typing.Final = re.compile(
    r"^(?P<scheme>[\w+]+://)(?P<userinfo>[^:/]*(?::[^@]*)?@)?(?P<hosts>[^/?]*)(?P<rest>.*)$", re.DOTALL
)
# A key=value entry that starts the text or follows whitespace (libpq) and one that follows ?, & or ; (a
# URL query). Keys may be percent-encoded; a libpq value may be quoted (an unterminated quote runs on, and
# what touches a closing quote, as in 'a'b, is taken as part of the value); words without "=" after a
# value are taken as part of it (a password with an unquoted space).
_CONNINFO_ENTRY: typing.Final = re.compile(
    r"(?P<head>(?:^|(?<=\s))(?P<key>[\w%.-]+)\s*=\s*)"
    r"(?P<value>(?:'(?:[^'\\]|\\.)*'?|\\.|\S)*(?:\s+[^\s=]+(?=\s|$)(?!\s*=))*)",
    re.DOTALL,
)
# One pair of a libpq connection string: key = value, the value bare or single-quoted, with \ escapes.
_CONNINFO_PAIR: typing.Final = re.compile(
    r"\s*(?P<key>[^\s=']+)\s*=\s*(?:'(?P<quoted>(?:[^'\\]|\\.)*)'|(?P<plain>(?:[^\s'\\]|\\.)*))", re.DOTALL
)
_QUERY_ENTRY: typing.Final = re.compile(r"(?P<head>(?<=[?&;])(?P<key>[\w%.+-]+)=)(?P<value>[^&#]*)")
_POSTGRESQL_SCHEMES: typing.Final = "postgresql://, postgresql+asyncpg:// or postgresql+psycopg://"


class DSNError(ArgumentError, ValueError):
    """A DSN that cannot be used; the message names the bad part, never the password."""


@dataclasses.dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _mask_entry(match: re.Match[str]) -> str:
    if urllib.parse.unquote(match["key"]).lower().endswith("password"):  # password, sslpassword
        return f"{match['head']}***"
    return match[0]


def _mask_userinfo(text: str) -> str:
    """Mask from the first ``:`` of the user part to the last ``@``: a password may hold anything, even ``@``."""
    at = text.rfind("@")
    if at < 0:
        return text
    scheme = _SCHEME_AND_SLASHES.match(text, 0, at)
    colon = text.find(":", scheme.end() if scheme else 0, at)
    return text if colon < 0 else f"{text[: colon + 1]}***{text[at:]}"


def mask_dsn(dsn: str | sa.URL) -> str:
    """``dsn`` as text with every password replaced by ``***``, whether or not it parses.

    Masks the user-info password of a URL (with or without ``//``), ``password=`` and
    ``sslpassword=`` entries of a URL query or a libpq ``key=value`` string (quoted or not,
    percent-encoded keys too). What cannot be told apart from a password is masked as well.
    """
    text = dsn.render_as_string(hide_password=True) if isinstance(dsn, sa.URL) else str(dsn)
    text = _CONNINFO_ENTRY.sub(_mask_entry, text)
    text = _QUERY_ENTRY.sub(_mask_entry, text)
    return _mask_userinfo(text)


def _not_a_url(text: str) -> DSNError:
    """What is wrong with text SQLAlchemy cannot parse, shown masked (SQLAlchemy's own error shows the password)."""
    scheme = re.match(r"\s*(?P<name>[A-Za-z][\w+.-]*)(?P<colon>:/*)?", text)
    if scheme is not None and scheme["colon"]:
        detail = f"'//' must follow {scheme['name']}:" if scheme["colon"] != "://" else "SQLAlchemy cannot read it"
    elif scheme is not None and text[scheme.end() :].startswith("//"):
        detail = f"':' must follow the scheme {scheme['name']}"
    else:
        detail = "no scheme such as postgresql://"
    return DSNError(f"malformed DSN {mask_dsn(text)!r} ({detail}): {EXPECTED}")


# -- libpq key=value connection strings ----------------------------------------------------------


def _conninfo_pairs(text: str) -> list[tuple[str, str]]:
    r"""The ``key = value`` pairs of a libpq string; a value may be single-quoted, ``\`` escapes a character."""
    pairs: list[tuple[str, str]] = []
    position = 0
    while text[position:].strip():
        match = _CONNINFO_PAIR.match(text, position)
        position = match.end() if match else position
        if match is None or (position < len(text) and not text[position].isspace()):
            # The text is shown masked as a whole: from the key on, a badly quoted password is all masked.
            shown = f"malformed connection string {mask_dsn(text)!r}"
            if match is not None and text[position] == "'":
                msg = f"{shown}: the quoted value of {match['key']} has no closing quote"
            else:
                after = f"after {pairs[-1][0]}=..." if pairs else "at the start"
                msg = f"{shown}: expected key=value {after} (quote a value with spaces: key='a b')"
            raise DSNError(msg)
        value = match["quoted"] if match["quoted"] is not None else match["plain"]
        pairs.append((match["key"], re.sub(r"\\(.)", r"\1", value, flags=re.DOTALL)))
    return pairs


def _split_list(value: str | None) -> list[str]:
    return [part.strip() for part in value.split(",")] if value else []


def _conninfo_to_url(text: str) -> sa.URL:
    """A libpq connection string as the equivalent URL (several hosts become ``host=h:p`` entries)."""
    entries = dict(_conninfo_pairs(text))  # a later duplicate wins, as in libpq
    if "host" not in entries and "hostaddr" in entries:
        entries["host"] = entries.pop("hostaddr")
    elif "hostaddr" in entries:
        msg = (
            f"connection string {mask_dsn(text)!r}: "
            "hostaddr together with host is not supported; give the address as host"
        )
        raise DSNError(msg)
    hosts = _split_list(entries.pop("host", None))
    ports = _split_list(entries.pop("port", None))
    for port in ports:
        _port(port)
    if len(ports) > 1 and len(ports) != len(hosts):
        raise _count_mismatch(hosts, ports)
    username, password, database = entries.pop("user", None), entries.pop("password", None), entries.pop("dbname", None)
    if len(hosts) == 1 and not hosts[0].startswith("/"):  # one TCP host: the URL's netloc
        return sa.URL.create(
            "postgresql",
            username=username,
            password=password,
            host=hosts[0],
            port=int(ports[0]) if ports else None,
            database=database,
            query=entries,
        )
    query: dict[str, str | tuple[str, ...]] = dict(entries)
    if hosts:
        paired = ports if len(ports) > 1 else [ports[0] if ports else ""] * len(hosts)
        query["host"] = tuple(
            f"{host if ':' not in host else f'[{host}]'}{f':{port}' if port else ''}"
            for host, port in zip(hosts, paired, strict=True)
        )
    return sa.URL.create("postgresql", username=username, password=password, database=database, query=query)


# -- URLs ----------------------------------------------------------------------------------------


def _netloc_hosts_to_query(dsn: str) -> str:
    """Check the netloc's ``host:port``; rewrite libpq's ``scheme://user@h1:p1,h2:p2/db`` as ``?host=`` entries."""
    match = _AUTHORITY.match(dsn)
    if match is None or not match["hosts"]:
        return dsn
    entries = match["hosts"].split(",")
    for entry in entries:
        _split_host_port(entry)
    if len(entries) == 1:
        return dsn
    path, sep, query = match["rest"].partition("?")
    hosts = "&".join(f"host={host}" for host in entries)
    query = f"{hosts}&{query}" if sep and query else hosts
    return f"{match['scheme']}{match['userinfo'] or ''}{path or '/'}?{query}"


def _postgresql_only(url: sa.URL) -> sa.URL:
    backend = url.get_backend_name()
    if backend == "postgres":  # libpq's other scheme; SQLAlchemy knows only postgresql
        return url.set(drivername="postgresql" + url.drivername[len(backend) :])
    if backend != "postgresql":
        msg = f"malformed DSN {mask_dsn(url)!r}: {url.drivername}:// is not PostgreSQL; expected {_POSTGRESQL_SCHEMES}"
        raise DSNError(msg)
    return url


def parse_url(dsn: str | sa.URL) -> sa.URL:
    """Parse a URL or a libpq ``key=value`` string; a malformed one raises :class:`DSNError` naming the bad part.

    Only PostgreSQL URLs are accepted (``postgres://`` is read as ``postgresql://``). No message
    ever holds a password.
    """
    given: object = dsn  # untyped callers pass anything
    if isinstance(given, sa.URL):
        return _postgresql_only(given)
    if not isinstance(given, str):
        msg = f"a DSN must be a str or sqlalchemy.URL, got {type(given).__name__}"
        raise TypeError(msg)
    text = given.strip()
    if not text:
        msg = f"empty DSN {given!r}: {EXPECTED}"
        raise DSNError(msg)
    if "=" in text and not _SCHEME.match(text):
        return _conninfo_to_url(text)
    rewritten = _netloc_hosts_to_query(text)
    url: sa.URL | None = None
    with contextlib.suppress(ArgumentError, ValueError):
        url = sa.make_url(rewritten)
    if url is None:  # raised outside the handler: SQLAlchemy's error (which may quote the input) is not chained
        raise _not_a_url(text)
    return _postgresql_only(url)


def _split_host_port(entry: str) -> tuple[str, int | None]:
    shown = _mask_userinfo(f":{entry}")[1:] if "@" in entry else entry  # a password holding "@" ends up here
    if entry.startswith("["):  # [v6] or [v6]:port
        host, bracket, after = entry[1:].partition("]")
        if not bracket or (after and not after.startswith(":")):
            msg = f"malformed host {shown!r} in the DSN: an IPv6 address goes in brackets, as in [::1]:5432"
            raise DSNError(msg)
        port_text = after[1:]
    elif entry.count(":") > 1:  # a bare IPv6 address has no port
        host, port_text = entry, ""
    else:
        host, _, port_text = entry.partition(":")
    if not host:
        msg = f"empty host in {shown!r} in the DSN"
        raise DSNError(msg)
    if "@" in host:
        msg = f"malformed host {shown!r} in the DSN: a password holding '@' must be percent-encoded (%40)"
        raise DSNError(msg)
    return host, _port(port_text) if port_text else None


def _port(text: str) -> int:
    port = int(text) if text.isdigit() else 0
    if not 0 < port < 65536:  # noqa: PLR2004
        msg = f"bad port {text!r} in the DSN: a port is a number from 1 to 65535"
        raise DSNError(msg)
    return port


def _count_mismatch(hosts: typing.Sequence[object], ports: typing.Sequence[object]) -> DSNError:
    return DSNError(
        f"{len(hosts)} hosts ({', '.join(map(str, hosts))}) but {len(ports)} ports ({', '.join(map(str, ports))}) "
        "in the DSN: give one port, or one per host",
    )


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
    ports = [_port(text) for text in _query_list(url, "port")]
    if not entries:
        if url.host is None:
            return ()
        netloc_port = _port(str(url.port)) if url.port is not None else None
        return (HostPort(url.host, netloc_port or (ports[0] if len(ports) == 1 else DEFAULT_PORT)),)
    if len(ports) > 1 and len(ports) != len(entries):
        raise _count_mismatch(entries, ports)
    hosts: list[HostPort] = []
    for index, entry in enumerate(entries):
        host, port = _split_host_port(entry)
        if port is None:
            port = ports[index] if len(ports) > 1 else (ports[0] if ports else url.port or DEFAULT_PORT)
        elif len(ports) > 1 and ports[index] != port:
            msg = f"host {entry!r} has port {port} but port= gives {ports[index]} in the DSN"
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
