"""The plugin's ``proxied_cluster`` fixture: a fresh cluster behind one proxy per node."""

import pytest
import sqlalchemy as sa

from db_retry import build_connection_factory
from db_retry.testing import ProxiedCluster


pytestmark = pytest.mark.standby


async def test_proxied_cluster_routes_through_its_proxies_and_breaks_on_demand(proxied_cluster: ProxiedCluster) -> None:
    cluster = proxied_cluster.cluster
    dsn = sa.make_url(proxied_cluster.multihost_dsn(target_session_attrs="read-write"))
    factory = build_connection_factory(dsn, timeout=1)
    connection = await factory()
    try:
        assert await connection.fetchval("SELECT inet_server_port()") == cluster.primary.port
    finally:
        await connection.close()
    assert proxied_cluster.primary.connections_accepted >= 1

    proxied_cluster.primary.cut()  # the primary's network is gone: nothing read-write is reachable
    with pytest.raises(Exception, match="target_session_attrs='read-write'"):
        await build_connection_factory(dsn, timeout=0.5)()
    proxied_cluster.pass_through()
    connection = await build_connection_factory(dsn, timeout=1)()
    await connection.close()
