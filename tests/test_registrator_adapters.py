"""Every registry adapter against its real store: consulate's Consul-compatible API (for
consul://, consulate:// and consulkv://; no Consul server runs here), etcd 3.4 (etcd://,
skydns2://) and ZooKeeper 3.8 (zookeeper://), each started by these fixtures."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aetcd
import pytest
from etcdproc import EtcdProcess
from kazoo.client import KazooClient
from registrator_support import Facade, ZooKeeperProcess, facade, loopback_address

from consulate.control.registrator.adapters import Adapter, AdapterError, open_adapter
from consulate.control.registrator.model import Origin, Service

HOST = "h1"


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdProcess]:
    with EtcdProcess(tmp_path_factory.mktemp("etcd"), loopback_address()) as running:
        yield running


@pytest.fixture(scope="module")
def zookeeper(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ZooKeeperProcess]:
    running = ZooKeeperProcess(tmp_path_factory.mktemp("zookeeper"), loopback_address()).start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Facade]:
    async with facade(tmp_path) as running:
        yield running


SCHEMES = ("consul", "consulate", "consulkv", "etcd", "skydns2", "zookeeper")


@pytest.fixture(params=SCHEMES)
async def adapter(request: pytest.FixtureRequest, store: Facade, etcd: EtcdProcess,
                  zookeeper: ZooKeeperProcess) -> AsyncIterator[Adapter]:
    """An adapter of each scheme at its running store, under a prefix of its own."""
    prefix = f"t{os.urandom(3).hex()}"
    uri = {
        "consul": f"consul://{store.address}",
        "consulate": f"consulate://{store.address}",
        "consulkv": f"consulkv://{store.address}/{prefix}",
        "etcd": f"etcd://{etcd.address}:2379/{prefix}",
        "skydns2": f"skydns2://{etcd.address}:2379/{prefix}.local",
        "zookeeper": f"zookeeper://{zookeeper.address}:{zookeeper.port}/{prefix}",
    }[request.param]
    opened = open_adapter(uri, HOST)
    await opened.ping()
    yield opened
    await opened.close()


def service(name: str, port: int, *, host: str = HOST, ttl: int = 0, **attrs: str) -> Service:
    origin = Origin(container_id="c0ffee0123456789", container_name=f"{name}.0",
                    container_hostname="c0ffee012345", exposed_port="80", port_type="tcp")
    return Service(id=f"{host}:{name}.0:80", name=name, ip="10.0.0.5", port=port,
                   origin=origin, tags=("a",), attrs=attrs, ttl=ttl)


async def test_register_list_and_deregister(adapter: Adapter) -> None:
    web, api = service("web", 8080, region="us2"), service("api", 9090)
    for each in (web, api, web):  # registering again changes nothing
        await adapter.register(each)
    assert await adapter.registered() == sorted([adapter.key(web), adapter.key(api)])
    await adapter.refresh(web)
    await adapter.deregister(web)
    assert await adapter.registered() == [adapter.key(api)]
    await adapter.deregister(web)  # already gone: not an error
    await adapter.remove(adapter.key(api))
    assert await adapter.registered() == []


async def test_other_hosts_entries_are_not_this_hosts(adapter: Adapter) -> None:
    other = open_adapter(adapter.uri, "h2")
    try:
        await other.ping()
        await other.register(service("web", 8081, host="h2"))
        await adapter.register(service("web", 8080))
        assert await adapter.registered() == [adapter.key(service("web", 8080))]
    finally:
        await other.close()


# -- what each store holds -------------------------------------------------------------


async def test_consul_catalog_entry(store: Facade) -> None:
    adapter = open_adapter(f"consul://{store.address}", HOST)
    await adapter.register(service("web", 8080, region="us2", check_ttl="30s"))
    [instance], _ = await store.registry.instances("web")
    assert (instance.id, instance.address, instance.port, instance.tags, instance.meta,
            instance.ttl) == ("h1:web.0:80", "10.0.0.5", 8080, ("a",), {"region": "us2"}, None)
    # SERVICE_CHECK_TTL is a health check the agent runs, critical until passed (Consul).
    assert [(c.id, c.kind, c.ttl, c.status) for c in instance.checks] == [
        ("service:h1:web.0:80", "ttl", 30.0, "critical")]
    await adapter.close()


async def test_consulate_ttl_is_a_lease_that_refresh_renews(store: Facade) -> None:
    adapter = open_adapter(f"consulate://{store.address}", HOST)
    renewed, lapsing = service("web", 8080, ttl=1), service("api", 9090, ttl=1)
    await adapter.register(renewed)
    await adapter.register(lapsing)
    for _ in range(4):
        await asyncio.sleep(0.4)
        await adapter.refresh(renewed)
    # Past the TTL the lapsing instance is critical (unrouted), then deregistered.
    assert [(i.id, i.status) for i in (await store.registry.instances())[0]] in (
        [(lapsing.id, "critical"), (renewed.id, "passing")], [(renewed.id, "passing")])
    for _ in range(40):
        if [i.id for i in (await store.registry.instances())[0]] == [renewed.id]:
            break
        await asyncio.sleep(0.1)
    assert [i.id for i in (await store.registry.instances())[0]] == [renewed.id]
    await adapter.close()


async def test_consulkv_layout(store: Facade) -> None:
    adapter = open_adapter(f"consulkv://{store.address}/services", HOST)
    await adapter.register(service("web", 8080))
    assert adapter.key(service("web", 8080)) == "services/web/h1:web.0:80"
    async with __import__("aiohttp").ClientSession() as http, http.get(
            f"http://{store.address}/v1/kv/services/web/h1:web.0:80?raw") as response:
        assert await response.text() == "10.0.0.5:8080"
    await adapter.close()


async def test_etcd_layout_and_lease(etcd: EtcdProcess) -> None:
    adapter = open_adapter(f"etcd://{etcd.address}:2379/services", HOST)
    renewed, lapsing = service("web", 8080, ttl=2), service("api", 9090, ttl=2)
    await adapter.register(renewed)
    await adapter.register(lapsing)
    client = aetcd.Client(host=etcd.address, port=2379)
    try:
        got = await client.get(b"/services/web/h1:web.0:80")
        assert got is not None and got.value == b"10.0.0.5:8080"
        for _ in range(7):
            await asyncio.sleep(0.5)
            await adapter.refresh(renewed)
        assert await client.get(b"/services/web/h1:web.0:80") is not None
        assert await client.get(b"/services/api/h1:api.0:80") is None  # its lease ran out
        await adapter.refresh(lapsing)  # written again, as registrator's etcd backend does
        assert await client.get(b"/services/api/h1:api.0:80") is not None
    finally:
        await client.close()
        await adapter.close()


async def test_skydns2_layout(etcd: EtcdProcess) -> None:
    adapter = open_adapter(f"skydns2://{etcd.address}:2379/cluster.local", HOST)
    await adapter.register(service("redis", 6379))
    client = aetcd.Client(host=etcd.address, port=2379)
    try:
        got = await client.get(b"/skydns/local/cluster/redis/h1:redis.0:80")
        assert got is not None
        assert json.loads(got.value) == {"host": "10.0.0.5", "port": 6379}
    finally:
        await client.close()
        await adapter.close()


def _zk(zookeeper: ZooKeeperProcess) -> KazooClient:
    client = KazooClient(hosts=f"{zookeeper.address}:{zookeeper.port}")
    client.start(timeout=10)
    return client


async def test_zookeeper_layout_is_an_ephemeral_json_node(zookeeper: ZooKeeperProcess) -> None:
    uri = f"zookeeper://{zookeeper.address}:{zookeeper.port}/basepath"
    adapter = open_adapter(uri, HOST)
    await adapter.ping()
    await adapter.register(service("www", 49153, region="us2"))
    reader = await asyncio.to_thread(_zk, zookeeper)
    try:
        body, stat = reader.get("/basepath/www/10.0.0.5:49153")
        assert json.loads(body) == {"Name": "www", "IP": "10.0.0.5", "PublicPort": 49153,
                                    "PrivatePort": 80, "ContainerID": "c0ffee012345",
                                    "Tags": ["a"], "Attrs": {"region": "us2"}}
        assert stat.ephemeralOwner != 0
        await adapter.close()  # the session ends: its nodes, and the empty name node, go
        assert reader.exists("/basepath/www/10.0.0.5:49153") is None
    finally:
        reader.stop()
        reader.close()


async def test_zookeeper_takes_over_a_node_of_an_earlier_session(
        zookeeper: ZooKeeperProcess) -> None:
    uri = f"zookeeper://{zookeeper.address}:{zookeeper.port}/takeover"
    before, after = open_adapter(uri, HOST), open_adapter(uri, HOST)
    await before.ping()
    await after.ping()
    await before.register(service("web", 8080))
    await after.register(service("web", 8080))  # a restarted registrator, same service
    assert await before.registered() == []
    await before.close()
    assert await after.registered() == ["/takeover/web/10.0.0.5:8080"]
    await after.close()


@pytest.mark.parametrize("uri", ["consul://127.0.0.1:1", "consulkv://127.0.0.1:1/p",
                                 "etcd://127.0.0.1:1/p", "skydns2://127.0.0.1:1/x.local"])
async def test_a_store_that_does_not_answer_is_named(uri: str) -> None:
    adapter = open_adapter(uri, HOST)
    with pytest.raises(AdapterError, match=r"127\.0\.0\.1:1 .*start it or fix the registry URI"):
        await adapter.ping()
    await adapter.close()
