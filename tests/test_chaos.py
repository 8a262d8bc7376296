"""The chaos test (issue 4): transfers through the library while real servers are broken under them.

Bounded: about 30 seconds of workload on a throwaway primary + standby, four faults (backend
termination, fast restart, immediate restart, failover to the standby and rebuild of the old
primary), every server stopped at the end.
"""

import asyncio
import io
import json
import pathlib
import random
import typing
import uuid

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from db_retry import cli
from db_retry import demo as demo_module
from db_retry.demo import (
    FAULTS,
    DemoConfig,
    InvariantReport,
    TransferWorkload,
    check_invariants,
    format_report,
    run_demo,
)
from db_retry.testing import PostgresCluster
from db_retry.testing.proxy import TcpProxy


pytestmark = pytest.mark.standby


async def test_transfers_survive_every_fault_without_losing_or_doubling_a_write(
    fresh_cluster: typing.Callable[..., PostgresCluster],
) -> None:
    cluster = fresh_cluster(standbys=1)
    first_primary = cluster.primary
    progress = io.StringIO()
    report = await run_demo(DemoConfig(duration=30, workers=8), stream=progress, cluster=cluster)

    outcomes = report.outcomes
    assert report.invariants.holds, format_report(report)
    assert report.invariants.total_before == report.invariants.total_after
    assert report.invariants.ledger_mismatches == 0
    assert report.invariants.missing == 0  # every success the caller saw is in the ledger (at most once: its key)
    assert report.invariants.failed_but_applied == 0
    # With the default budget no caller sees a plain failure from a restart, a termination or the failover.
    assert outcomes.failed == {}, format_report(report)
    assert len(outcomes.ok) > 1000
    assert [record.name for record in report.faults] == list(FAULTS)
    assert all(record.time_lost is not None for record in report.faults), format_report(report)
    # The faults really happened: sessions were cut and the servers went away.
    assert outcomes.retries, format_report(report)
    assert cluster.primary is not first_primary  # the failover promoted the standby
    assert await cluster.primary.role() == "primary"
    assert await cluster.standbys[0].role() == "standby"  # the old primary, rebuilt
    assert "fault: failover" in progress.getvalue()


async def test_the_invariant_check_catches_a_lost_and_a_doubled_write(pg_dsn: str) -> None:
    engine = create_async_engine(pg_dsn)
    workload = TransferWorkload(engine, accounts=10, clock=lambda: 0.0)
    try:
        await workload.setup()
        await workload.transfer(uuid.uuid4(), 1, 2, 5)
        assert (await check_invariants(engine, workload)).holds
        workload.outcomes.ok.add(uuid.uuid4())  # a success the database never saw
        failed = uuid.uuid4()
        workload.outcomes.failed[failed] = "40001"
        async with engine.begin() as connection:  # ... and a "failed" one that was applied anyway
            await connection.execute(sa.text("INSERT INTO ledger VALUES (:id, 1, 2, 7)"), {"id": failed})
        report = await check_invariants(engine, workload)
    finally:
        await engine.dispose()
    assert not report.holds
    assert report.missing == 1
    assert report.failed_but_applied == 1
    assert report.ledger_mismatches == 2  # accounts 1 and 2 no longer match the ledger


def test_demo_command_runs_and_reports_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["demo", "--duration", "3", "--workers", "2", "--faults", "terminate", "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["invariants"]["holds"] is True
    assert report["transfers"]["ok"] > 0
    assert report["faults"][0]["fault"] == "terminate"
    assert "ok=" in captured.err  # live progress goes to stderr with --json


def test_demo_command_prints_a_table_without_faults(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["demo", "--duration", "1.5", "--workers", "1", "--faults", ""]) == 0
    output = capsys.readouterr().out
    assert "transfers ok" in output
    assert "invariant                             HOLDS" in output


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--faults", "meteor"], "unknown fault(s) meteor"),
        (["--workers", "0"], "need duration > 0, workers >= 1"),
    ],
)
def test_demo_command_rejects_bad_options(
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    assert cli.main(["demo", *argv]) == 2
    assert message in capsys.readouterr().err


def test_demo_command_explains_missing_postgresql(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: pathlib.Path,
) -> None:
    monkeypatch.setenv("DB_RETRY_PG_BINDIR", str(tmp_path))
    assert cli.main(["demo", "--duration", "1"]) == 2
    error = capsys.readouterr().err
    assert "PostgreSQL server binaries not found" in error
    assert "apt-get install postgresql" in error


def test_demo_command_fails_when_the_invariant_breaks(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A broken invariant would be a bug in the library, which no server produces on demand:
    # the report is replaced here to prove the exit status follows it.
    broken = InvariantReport(
        total_before=10,
        total_after=9,
        ledger_mismatches=0,
        missing=0,
        failed_but_applied=0,
        unknown_applied=0,
    )

    async def fake_run_demo(_config: DemoConfig, **_: object) -> demo_module.DemoReport:
        return demo_module.DemoReport(outcomes=demo_module.Outcomes(), faults=[], invariants=broken, duration=0.0)

    monkeypatch.setattr(demo_module, "run_demo", fake_run_demo)
    assert cli.main(["demo", "--duration", "1"]) == 1
    assert "BROKEN" in capsys.readouterr().out


async def _one_outcome(workload: TransferWorkload) -> None:
    """Run one worker until it has seen one outcome of any kind."""
    stop = asyncio.Event()
    outcomes = workload.outcomes

    async def stop_after_first() -> None:
        while not (outcomes.ok or outcomes.failed or outcomes.unknown):  # noqa: ASYNC110 - plain counters
            await asyncio.sleep(0.001)
        stop.set()

    await asyncio.wait_for(asyncio.gather(workload.run_worker(stop, random.Random(1)), stop_after_first()), 30)


async def test_workers_record_failures_and_unknown_outcomes(pg_cluster: PostgresCluster) -> None:
    async with TcpProxy(pg_cluster.primary.host, pg_cluster.primary.port) as proxy:
        url = sa.make_url(pg_cluster.primary.dsn(driver="asyncpg")).set(host=proxy.host, port=proxy.port)
        engine = create_async_engine(url)
        try:
            workload = TransferWorkload(engine, accounts=10, clock=lambda: 0.0)
            await workload.setup()
            proxy.cut_after_query("COMMIT")  # the server commits, the caller never hears back
            await _one_outcome(workload)
            assert len(workload.outcomes.unknown) == 1
            assert (await check_invariants(engine, workload)).unknown_applied == 1

            async with engine.begin() as connection:
                await connection.execute(sa.text("DROP TABLE ledger"))
            await _one_outcome(workload)
            assert list(workload.outcomes.failed.values()) == ["42P01"]  # undefined table: not transient
        finally:
            await engine.dispose()


def test_time_lost_and_report_rows_for_every_case() -> None:
    records = [
        demo_module.FaultRecord(name="terminate", started=1.0),
        demo_module.FaultRecord(name="failover", started=5.0),
    ]
    demo_module._measure_time_lost(records, commit_times=[0.5, 1.2, 1.25, 4.0], end=9.0)
    assert records[0].time_lost == pytest.approx(2.75)  # 1.25 -> 4.0 is the longest stretch without a commit
    assert records[1].time_lost is None  # no commit after the failover before the end

    outcomes = demo_module.Outcomes(failed={uuid.uuid4(): "40001", uuid.uuid4(): "40001"})
    invariants = InvariantReport(
        total_before=1, total_after=1, ledger_mismatches=0, missing=0, failed_but_applied=0, unknown_applied=0
    )
    text = format_report(demo_module.DemoReport(outcomes=outcomes, faults=records, invariants=invariants, duration=9))
    assert "failed with 40001" in text
    assert "time lost 2750 ms" in text
    assert "time lost no commit since" in text
