"""DSN helpers: build_db_dsn, is_dsn_multihost, host parsing and clear, password-free errors."""

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from db_retry import DSNError, build_db_dsn, is_dsn_multihost
from db_retry.dsn import HostPort, dsn_hosts, mask_dsn, parse_url


MULTI = "postgresql://user:s3cret@/placeholder?host=h1:5432&host=h2:5433&sslmode=disable"


def test_build_db_dsn_replaces_database_and_driver_and_keeps_the_rest() -> None:
    url = build_db_dsn(MULTI, "orders", drivername="postgresql+asyncpg")
    assert isinstance(url, sa.URL)
    assert url.database == "orders"
    assert url.drivername == "postgresql+asyncpg"
    assert url.password == "s3cret"
    assert url.query["host"] == ("h1:5432", "h2:5433")
    assert url.query["sslmode"] == "disable"
    assert url.query["target_session_attrs"] == "read-write"


def test_build_db_dsn_for_replicas_prefers_standby_and_defaults_the_driver() -> None:
    url = build_db_dsn("postgresql://u@db:5432/x?target_session_attrs=any", "y", use_replica=True)
    assert url.query["target_session_attrs"] == "prefer-standby"
    assert url.drivername == "postgresql"
    assert (url.host, url.port, url.database) == ("db", 5432, "y")


@pytest.mark.parametrize(
    ("dsn", "written"),
    [
        ("postgresql://u@/x?host=h1&host=h2:7", ("h1:5432", "h2:7")),
        ("postgresql://u@/x?host=h1,h2&port=1,2", ("h1:1", "h2:2")),
        ("postgresql://u@h1,h2/x", ("h1:5432", "h2:5432")),
    ],
)
def test_build_db_dsn_writes_out_the_ports_sqlalchemy_requires(dsn: str, written: tuple[str, ...]) -> None:
    url = build_db_dsn(dsn, "db", drivername="postgresql+asyncpg")
    assert url.query["host"] == written
    assert "port" not in url.query
    engine = create_async_engine(url)  # SQLAlchemy parses the hosts here and needs every port
    assert engine.url.query["host"] == written


def test_build_db_dsn_leaves_single_hosts_and_ipv6_lists_alone() -> None:
    assert build_db_dsn("postgresql://u@/x?host=h1&port=9", "db").query["host"] == "h1"
    assert build_db_dsn("postgresql://u@/x?host=[::1]&host=::1", "db").query["host"] == ("[::1]", "::1")


@pytest.mark.parametrize(
    ("dsn", "hosts"),
    [
        ("postgresql://u:p@db:6000/x", [("db", 6000)]),
        ("postgresql://u:p@db/x", [("db", 5432)]),
        ("postgresql://u:p@/x", []),
        ("postgresql://u:p@/x?host=h1:1&host=h2:2", [("h1", 1), ("h2", 2)]),
        ("postgresql://u:p@/x?host=h1&host=h2", [("h1", 5432), ("h2", 5432)]),
        ("postgresql://u:p@/x?host=h1&host=h2:7", [("h1", 5432), ("h2", 7)]),
        ("postgresql://u:p@/x?host=h1,h2&port=1,2", [("h1", 1), ("h2", 2)]),
        ("postgresql://u:p@/x?host=h1,h2&port=9", [("h1", 9), ("h2", 9)]),
        ("postgresql://u:p@/x?host=h1&port=9", [("h1", 9)]),
        ("postgresql://u:p@/x?host=h1:3", [("h1", 3)]),
        ("postgresql://u:p@h1:1,h2:2/x?sslmode=disable", [("h1", 1), ("h2", 2)]),
        ("postgresql://h1,h2/x", [("h1", 5432), ("h2", 5432)]),
        ("postgresql://u:p@[::1]:5/x", [("::1", 5)]),
        ("postgresql://u:p@/x?host=[::1]:5&host=127.0.0.1:6", [("::1", 5), ("127.0.0.1", 6)]),
        ("postgresql://u:p@/x?host=[::1]&host=::1", [("::1", 5432), ("::1", 5432)]),
    ],
)
def test_hosts(dsn: str, hosts: list[tuple[str, int]]) -> None:
    assert dsn_hosts(dsn) == tuple(HostPort(host, port) for host, port in hosts)
    assert is_dsn_multihost(dsn) is (len(hosts) > 1)


def test_accepts_a_url_object() -> None:
    url = sa.make_url("postgresql://u@/x?host=a:1&host=b:2")
    assert parse_url(url) is url
    assert is_dsn_multihost(url)


def test_host_port_renders_ipv6_in_brackets() -> None:
    assert str(HostPort("::1", 5)) == "[::1]:5"
    assert str(HostPort("db", 5)) == "db:5"


@pytest.mark.parametrize(
    ("dsn", "message"),
    [
        ("postgresql://u:s3cret@db:abc/x", "malformed DSN"),
        ("not a dsn", "malformed DSN"),
        ("postgresql://u:s3cret@/x?host=h1:0&host=h2", "bad port '0'"),
        ("postgresql://u:s3cret@h1:99999/x", "bad port '99999'"),
        ("postgresql://u:s3cret@/x?host=h1:x1&host=h2", "bad port 'x1'"),
        ("postgresql://u:s3cret@/x?host=h1&host=h2&port=1,2,3", "2 hosts but 3 ports"),
        ("postgresql://u:s3cret@/x?host=h1:1&host=h2:2&port=1,3", "host 'h2:2' has port 2 but port= gives 3"),
        ("postgresql://u:s3cret@/x?host=[::1&host=h", "malformed host '[::1'"),
        ("postgresql://u:s3cret@/x?host=[::1]x&host=h", "malformed host"),
        ("postgresql://u:s3cret@/x?host=:5&host=h", "empty host"),
    ],
)
def test_malformed_input_names_the_bad_part_without_the_password(dsn: str, message: str) -> None:
    with pytest.raises(DSNError, match=message.replace("[", r"\[")) as caught:
        is_dsn_multihost(dsn)
    assert "s3cret" not in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_a_non_string_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="got int"):
        parse_url(42)  # type: ignore[arg-type]


def test_mask_dsn() -> None:
    assert mask_dsn("postgresql://u:s3cret@h/x") == "postgresql://u:***@h/x"
    assert mask_dsn("postgresql://u@h/x?password=s3cret&a=1") == "postgresql://u@h/x?password=***&a=1"
    assert "s3cret" not in mask_dsn(sa.make_url("postgresql://u:s3cret@h/x"))
    assert "s3cret" not in mask_dsn(sa.make_url("postgresql://u@h/x?password=s3cret"))


@pytest.mark.parametrize("password", ["pa/ss", "p?ss", "p#ss", "p@ss", "s3cret"])
def test_passwords_with_url_special_characters_never_leak(password: str) -> None:
    dsn = f"postgresql://u:{password}@h:notaport/db"
    with pytest.raises(DSNError) as caught:
        dsn_hosts(dsn)
    assert password not in str(caught.value)
    assert password.rsplit("@", maxsplit=1)[-1] not in mask_dsn(dsn)
