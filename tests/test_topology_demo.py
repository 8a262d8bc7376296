"""``db-retry demo --topology X``: the demo's workload and invariant check on each deployment topology.

Short runs, one fault each for the Patroni topologies (the proofs in test_topology_*.py run longer and
assert no caller failed); every process is stopped by PID when the demo ends.
"""

import json

import pytest

from db_retry import cli
from db_retry.demo import TOPOLOGIES, DemoConfig
from db_retry.testing.demo_targets import TOPOLOGY_FAULTS, make_target


pytestmark = pytest.mark.standby


@pytest.mark.parametrize(
    ("topology", "faults", "servers"),
    [
        ("patroni", "switchover", "servers: Patroni members m1 127.0.0.1:"),
        ("haproxy", "failover", "servers: HAProxy 127.0.0.1:"),
        ("pgbouncer", "restart-fast,restart-immediate", "servers: PgBouncer 127.0.0.1:"),
        ("moving-endpoint", "move", "servers: one address 127.0.0.1:"),
    ],
)
def test_demo_topology_reports_that_the_invariant_holds(
    topology: str, faults: str, servers: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["demo", "--topology", topology, "--faults", faults, "--duration", "4", "--workers", "2", "--json"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["invariants"]["holds"] is True
    assert [fault["fault"] for fault in report["faults"]] == faults.split(",")
    assert all(fault["time_lost_s"] is not None for fault in report["faults"])  # commits resumed after each
    assert report["transfers"]["ok"] > 0
    assert servers in captured.err  # the header names what started


def test_each_topology_has_its_own_faults() -> None:
    assert TOPOLOGIES == ("kit", "patroni", "haproxy", "pgbouncer", "moving-endpoint")
    assert DemoConfig(topology="pgbouncer").faults == TOPOLOGY_FAULTS["pgbouncer"]
    assert DemoConfig(topology="patroni", faults=("failover",)).faults == ("failover",)
    with pytest.raises(
        ValueError, match=r"unknown fault\(s\) terminate \(moving-endpoint topology\); choose from move"
    ):
        DemoConfig(topology="moving-endpoint", faults=("terminate",))
    with pytest.raises(ValueError, match="unknown topology 'galera'; choose from kit, patroni"):
        DemoConfig(topology="galera")


@pytest.mark.parametrize("topology", TOPOLOGIES)
async def test_a_target_that_never_started_stops_cleanly(topology: str) -> None:
    target = make_target(topology)  # e.g. the demo failed before its servers came up
    await target.stop()
    assert target.topology == topology
