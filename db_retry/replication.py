"""Replay lag: how far a standby is behind its primary, measured one way for the whole library.

Routing's replica checks (:mod:`db_retry.routing`), ``db-retry check`` (:mod:`db_retry.health`) and the
test kit's ``PostgresCluster.wait_for_replay`` all read each server's WAL state with
:data:`WAL_STATUS_QUERY` (one round trip, the same query on a primary and on a standby) and compare a
standby with its primary through :func:`replay_lag`:

- **bytes**: the primary's current WAL write position (``pg_current_wal_lsn()``) minus the standby's
  replay position (``pg_last_wal_replay_lsn()``), clamped at 0. Measured against the primary, not
  against what the standby happened to receive, so a standby whose WAL receiver is cut or hung falls
  behind as soon as the primary writes; ``None`` without a primary to compare with.
- **seconds**: ``0`` when nothing the primary wrote is missing, else the age of the last transaction
  the standby replayed (``now() - pg_last_xact_replay_timestamp()``, on the standby's clock). That age
  is an upper bound: it also counts time the primary spent idle before the missing WAL. ``None`` when
  the bytes are unknown, or when the standby is behind and has replayed no commit since it started.

``architecture/routing.md`` says why it is defined so (no heartbeat table).
"""

import collections.abc
import dataclasses
import typing


__all__ = ["WAL_STATUS_QUERY", "ReplayLag", "WalStatus", "replay_lag"]

# Positions come back as byte offsets (``pg_lsn`` minus ``0/0``) so that Python can subtract them.
# Names are schema-qualified: a user's search_path cannot shadow them. No parameters, so the text runs
# as it is through asyncpg, psycopg and SQLAlchemy's ``text()``.
WAL_STATUS_QUERY: typing.Final = """
WITH s AS (SELECT pg_catalog.pg_is_in_recovery() AS standby)
SELECT s.standby,
       CASE WHEN NOT s.standby
           THEN pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), '0/0')::bigint END,
       pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_last_wal_replay_lsn(), '0/0')::bigint,
       pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_last_wal_receive_lsn(), '0/0')::bigint,
       EXISTS (SELECT FROM pg_catalog.pg_stat_wal_receiver),
       (SELECT r.status FROM pg_catalog.pg_stat_wal_receiver AS r),
       extract(epoch FROM pg_catalog.now() - pg_catalog.pg_last_xact_replay_timestamp())::float8
FROM s
"""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class WalStatus:
    """One server's answer to :data:`WAL_STATUS_QUERY`. Positions are byte offsets into the WAL.

    ``written``: a primary's current write position (``None`` on a standby). ``replayed`` /
    ``received``: a standby's replay and receive positions (``None`` on a primary; ``received`` also
    before a standby first streamed). ``receiver_running``: a WAL receiver process is connected upstream;
    ``receiver_state`` its ``pg_stat_wal_receiver.status`` (``"streaming"``, ``"catchup"`` ...), which
    PostgreSQL hides (``None``) from roles without ``pg_read_all_stats``. ``replay_age``: seconds since
    the last replayed commit was committed on the primary, or ``None``.
    """

    in_recovery: bool
    written: int | None = None
    replayed: int | None = None
    received: int | None = None
    receiver_running: bool = False
    receiver_state: str | None = None
    replay_age: float | None = None

    @classmethod
    def from_row(cls, row: collections.abc.Sequence[typing.Any]) -> "WalStatus":
        """From a row of :data:`WAL_STATUS_QUERY`, as asyncpg, psycopg or SQLAlchemy return it."""
        in_recovery, written, replayed, received, receiver_running, receiver_state, replay_age = row
        return cls(
            in_recovery=bool(in_recovery),
            written=written,
            replayed=replayed,
            received=received,
            receiver_running=bool(receiver_running),
            receiver_state=receiver_state,
            replay_age=replay_age,
        )

    @property
    def streaming(self) -> bool | None:
        """Whether WAL streams in from upstream now; ``None`` when a receiver runs but its state is hidden."""
        if not self.receiver_running:
            return False
        if self.receiver_state is None:
            return None
        return self.receiver_state == "streaming"

    @property
    def unreplayed_bytes(self) -> int | None:
        """WAL this standby has received but not replayed yet (known without a primary).

        ``None`` on a server not in recovery (a promoted one still reports its last positions) and on a
        standby that never streamed.
        """
        if not self.in_recovery or self.received is None or self.replayed is None:
            return None
        return max(0, self.received - self.replayed)


@dataclasses.dataclass(frozen=True, slots=True)
class ReplayLag:
    """How far a standby's replay is behind its primary (see the module docstring); ``None``: unknown."""

    bytes: int | None
    seconds: float | None


def replay_lag(primary_position: int | None, standby: WalStatus) -> ReplayLag:
    """The lag of ``standby`` behind a primary whose current WAL position is ``primary_position``.

    The primary's position is :attr:`WalStatus.written` of its own answer, read at about the same time
    (concurrently, or before, as ``wait_for_replay`` does). A server that is not in recovery, or no
    primary position, gives an unknown lag.
    """
    if primary_position is None or standby.replayed is None or not standby.in_recovery:
        return ReplayLag(None, None)
    behind = max(0, primary_position - standby.replayed)
    if behind == 0:
        return ReplayLag(0, 0.0)
    return ReplayLag(behind, None if standby.replay_age is None else max(0.0, standby.replay_age))
