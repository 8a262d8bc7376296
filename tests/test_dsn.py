"""DSN helpers: build_db_dsn, is_dsn_multihost, host parsing and clear, password-free errors."""

import asyncio
import re
import urllib.parse

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from db_retry import DSNError, build_connection_factory, build_db_dsn, check_hosts, cli, is_dsn_multihost
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
        ("postgresql://u:s3cret@db:abc/x", "bad port 'abc'"),
        (
            "postgresql://u:s3cret@[::1:5432/x",
            "malformed host '[::1:5432' in the DSN: an IPv6 address goes in brackets",
        ),
        ("postgresql://u:s3cret@h1:1,h2:x/x", "bad port 'x'"),
        ("postgresql://u:p@[s3cret@h:5/x", "malformed host '***@h:5'"),
        ("not a dsn", "malformed DSN 'not a dsn' (no scheme such as postgresql://)"),
        ("postgresql://u:s3cret@/x?host=h1:0&host=h2", "bad port '0'"),
        ("postgresql://u:s3cret@h1:99999/x", "bad port '99999'"),
        ("postgresql://u:s3cret@/x?host=h1:x1&host=h2", "bad port 'x1'"),
        ("postgresql://u:s3cret@/x?host=h1&host=h2&port=1,2,3", "2 hosts (h1, h2) but 3 ports (1, 2, 3) in the DSN"),
        ("http://u:s3cret@h/x", "malformed DSN 'http://u:***@h/x': http:// is not PostgreSQL"),
        ("mysql://u@h/x", "mysql:// is not PostgreSQL; expected postgresql://"),
        ("", "empty DSN ''"),
        ("host=h port=1,2", "1 hosts (h) but 2 ports (1, 2)"),
        ("host=h port=abc password=s3cret", "bad port 'abc'"),
        ("host=h password=my s3cret", "expected key=value after password=..."),
        ("u:s3cret@h", "malformed DSN 'u:***@h' ('//' must follow u:)"),
        ("not a dsn x=1", "malformed connection string 'not a dsn x=1': expected key=value at the start"),
        ("not a dsn password=s3cret", "malformed connection string 'not a dsn password=***': expected key=value at"),
        ("postgresql:/u:s3cret@h/x", "malformed DSN 'postgresql:/u:***@h/x' ('//' must follow postgresql:)"),
        ("postgresql//u:s3cret@h/x", "malformed DSN 'postgresql//u:***@h/x' (':' must follow the scheme postgresql)"),
        ("postgresql://u:s3cret@h:1:2/x", "malformed DSN 'postgresql://u:***@h:1:2/x' (SQLAlchemy cannot read it)"),
        ("postgresql://u:p@s3cret@h/x", "malformed host '***@h' in the DSN: a password holding '@' must be"),
        (
            "host=h password='s3cret",
            "malformed connection string 'host=h password=***': the quoted value of password has no closing quote",
        ),
        (
            "host=h password='s3'cret",
            "malformed connection string 'host=h password=***': expected key=value after host",
        ),
        (
            "host=h hostaddr=127.0.0.1 password=s3cret",
            "connection string 'host=h hostaddr=127.0.0.1 password=***': hostaddr together with host is not supported",
        ),
        ("postgresql://u:s3cret@/x?host=h1:1&host=h2:2&port=1,3", "host 'h2:2' has port 2 but port= gives 3"),
        ("postgresql://u:s3cret@/x?host=[::1&host=h", "malformed host '[::1'"),
        ("postgresql://u:s3cret@/x?host=[::1]x&host=h", "malformed host"),
        ("postgresql://u:s3cret@/x?host=:5&host=h", "empty host"),
    ],
)
def test_malformed_input_names_the_bad_part_without_the_password(dsn: str, message: str) -> None:
    with pytest.raises(DSNError, match=re.escape(message)) as caught:
        is_dsn_multihost(dsn)
    assert "s3cret" not in str(caught.value)
    assert "cret" not in str(caught.value)  # nor a part of it (what follows a badly quoted one)
    assert "%3A" not in str(caught.value)  # nothing echoed percent-encoded
    assert isinstance(caught.value, ValueError)
    assert caught.value.__cause__ is None
    assert caught.value.__context__ is None  # SQLAlchemy's error (which may quote the input) is not chained


@pytest.mark.parametrize(
    ("dsn", "shown"),
    [
        ("not a dsn", "'not a dsn'"),
        ("user:s3cret@host", "'user:***@host'"),
        ("not a dsn password=s3cret", "'not a dsn password=***'"),
        ("host=db password='s3cret' port=5 'x'", repr("host=db password=*** port=5 'x'")),
        ("   ", "'   '"),
    ],
)
def test_build_db_dsn_shows_the_malformed_input_with_its_password_masked(dsn: str, shown: str) -> None:
    with pytest.raises(DSNError) as caught:
        build_db_dsn(dsn, "orders")
    assert shown in str(caught.value)
    assert "s3cret" not in str(caught.value)


def test_a_bare_word_is_shown_as_given_since_nothing_marks_it_as_a_password() -> None:
    # mask_dsn masks what a DSN marks as a password (user-info, password=, sslpassword=); a bare word cannot be
    # told from a typo such as "not a dsn", so a password given alone in place of a DSN is shown (README: DSNs).
    with pytest.raises(DSNError, match=re.escape("malformed DSN 'my s3cret' (no scheme such as postgresql://)")):
        build_db_dsn("my s3cret", "orders")


def test_a_non_string_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="got int"):
        parse_url(42)  # type: ignore[arg-type]


@pytest.mark.parametrize("password", ["pa/ss", "p?ss", "p#ss", "p@ss", "s3cret"])
def test_passwords_with_url_special_characters_never_leak(password: str) -> None:
    dsn = f"postgresql://u:{password}@h:notaport/db"
    with pytest.raises(DSNError) as caught:
        dsn_hosts(dsn)
    assert password not in str(caught.value)
    assert password.rsplit("@", maxsplit=1)[-1] not in mask_dsn(dsn)


@pytest.mark.parametrize(
    ("conninfo", "hosts", "url"),
    [
        ("host=db port=6000 dbname=app user=u password=p", [("db", 6000)], "postgresql://u:p@db:6000/app"),
        ("host=db", [("db", 5432)], "postgresql://db"),
        ("  dbname = app  host = db  ", [("db", 5432)], "postgresql://db/app"),
        ("host=::1 port=5", [("::1", 5)], "postgresql://[::1]:5"),
        ("hostaddr=127.0.0.1 port=7", [("127.0.0.1", 7)], "postgresql://127.0.0.1:7"),
        ("host=a,b port=1,2 user=u", [("a", 1), ("b", 2)], "postgresql://u@?host=a:1&host=b:2"),
        ("host=a,b port=9", [("a", 9), ("b", 9)], "postgresql://?host=a:9&host=b:9"),
        ("host=a,::1", [("a", 5432), ("::1", 5432)], "postgresql://?host=a&host=[::1]"),
        ("host=/run/postgresql dbname=x", [("/run/postgresql", 5432)], "postgresql:///x?host=/run/postgresql"),
        (
            r"user=u password='it\'s a b' sslmode=disable target_session_attrs=read-write",
            [],
            "postgresql://u:it's a b@?sslmode=disable&target_session_attrs=read-write",
        ),
        (r"user=u password=a\ b", [], "postgresql://u:a b@"),
        ("user=u user=v", [], "postgresql://v@"),  # a later duplicate wins, as in libpq
    ],
)
def test_libpq_connection_strings_are_read_as_urls(conninfo: str, hosts: list[tuple[str, int]], url: str) -> None:
    parsed = parse_url(conninfo)
    assert urllib.parse.unquote(parsed.render_as_string(hide_password=False)) == url
    assert dsn_hosts(conninfo) == tuple(HostPort(host, port) for host, port in hosts)


def test_build_db_dsn_takes_a_connection_string() -> None:
    url = build_db_dsn("host=h1,h2 port=5432,5433 user=app password=s3cret", "orders", drivername="postgresql+asyncpg")
    assert url.query["host"] == ("h1:5432", "h2:5433")
    assert (url.username, url.password, url.database) == ("app", "s3cret", "orders")
    assert url.query["target_session_attrs"] == "read-write"
    assert is_dsn_multihost("host=h1,h2")
    assert create_async_engine(url).url.query["host"] == ("h1:5432", "h2:5433")


@pytest.mark.parametrize("scheme", ["postgres", "postgres+asyncpg"])
def test_the_postgres_scheme_is_read_as_postgresql(scheme: str) -> None:
    assert parse_url(f"{scheme}://u@h/x").drivername == scheme.replace("postgres", "postgresql")
    assert parse_url(sa.make_url(f"{scheme}://u@h/x")).get_backend_name() == "postgresql"


def test_a_url_object_of_another_database_is_refused() -> None:
    with pytest.raises(DSNError, match="sqlite:// is not PostgreSQL"):
        parse_url(sa.make_url("sqlite:///x.db"))


# Every way a password reaches a DSN, well-formed or not: none of them may show it.
SECRET = "s3cr3t"
LEAKY = [
    f"postgresql://app:{SECRET}@db/x",
    f"postgresql://app:{SECRET}@db:abc/x",
    f"postgresql:/app:{SECRET}@db/x",  # a slash missing
    f"postgresql//app:{SECRET}@db/x",
    f"postgresql:app:{SECRET}@db/x",
    f"app:{SECRET}@db/x",
    f"postgresql://app:{SECRET}%40x@[::1:5432/x",  # percent-encoded
    f"postgresql://app:p@{SECRET}@[h/x",
    f"postgresql://app@db:abc/x?sslpassword={SECRET}",
    f"postgresql://app@db/x?password={SECRET}&sslpassword={SECRET}&port=nope",
    f"postgresql://app@db/x?pass%77ord={SECRET}&port=nope",
    f"postgresql://app@/x?host=a&host=b&port=1,2,3&password={SECRET}",
    f"mysql://app:{SECRET}@db/x",
    f"http://app:{SECRET}@db/x",
    f"host=db password={SECRET} port=abc",
    f"host=db sslpassword={SECRET} port=0",
    f"host=db password = '{SECRET} x' port=abc",
    f"host=db password={SECRET}\\ x port=abc",
    f"host=db password=my {SECRET}",
    f"host=db password='{SECRET}",
    f"host=db password={SECRET}&x port=abc",
    f"password={SECRET} host=a,b port=1,2,3",
]


@pytest.mark.parametrize("dsn", LEAKY)
def test_mask_dsn_hides_the_password_of_any_input(dsn: str) -> None:
    assert SECRET not in mask_dsn(dsn)
    assert "***" in mask_dsn(dsn)


@pytest.mark.parametrize("dsn", LEAKY[1:])
def test_no_entry_point_echoes_the_password_of_a_malformed_dsn(dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    for entry_point in (
        lambda: build_db_dsn(dsn, "db"),
        lambda: build_connection_factory(dsn, timeout=1),
        lambda: asyncio.run(check_hosts(dsn)),
        lambda: is_dsn_multihost(dsn),
    ):
        with pytest.raises(DSNError) as caught:
            entry_point()
        assert SECRET not in str(caught.value)
        assert caught.value.__context__ is None
    assert cli.main(["check", dsn]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("db-retry check: ")
    assert SECRET not in captured.err


def test_mask_dsn() -> None:
    assert mask_dsn("postgresql://u:s3cret@h/x") == "postgresql://u:***@h/x"
    assert mask_dsn("postgresql://u@h/x?password=s3cret&a=1") == "postgresql://u@h/x?password=***&a=1"
    assert mask_dsn("postgresql://u@h/x?sslpassword=s3cret&a=1") == "postgresql://u@h/x?sslpassword=***&a=1"
    assert mask_dsn("host=h password='s 3' sslpassword=x dbname=d") == "host=h password=*** sslpassword=*** dbname=d"
    assert mask_dsn("postgresql://u@h/x?passfile=/p") == "postgresql://u@h/x?passfile=/p"  # a path, not a secret
    assert mask_dsn("host=h user=u") == "host=h user=u"
    assert mask_dsn("host=h password='s3'cret x=1") == "host=h password=*** x=1"  # what touches the quote too
    assert "s3cret" not in mask_dsn(sa.make_url("postgresql://u:s3cret@h/x"))
    assert "s3cret" not in mask_dsn(sa.make_url("postgresql://u@h/x?password=s3cret"))
    assert "s3cret" not in mask_dsn(sa.make_url("postgresql://u@h/x?sslpassword=s3cret"))
