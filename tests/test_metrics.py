"""``/metrics``: the families of one reading (pure), the route's formats, and a real
agent's counters after real connections and DNS queries, scraped with aiohttp.

The lab part runs once per relay (the ``agent`` fixture): the native engine and
the Python relay must count the same traffic the same way.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from conftest import Peers
from prometheus_client.parser import text_string_to_metric_families

from consulate.control import metrics
from consulate.control.lab import Lab
from consulate.control.labagent import LabAgent

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

_IDLE = {"services": 0, "waiters": 0, "streams": 0}


def _scrape(**changes: object) -> metrics.Scrape:
    base: dict[str, object] = {
        "proxy": {"unrouted": 2, "services": {"web": {
            "connections_total": 3, "connections_active": 1, "connect_failures": 4,
            "rejected": 5, "bytes_to_upstream": 10, "bytes_to_client": 20}}},
        "relay": "python", "endpoints": {"web": 2, "db": 1}, "route_version": 7,
        "dns_rcodes": [6, 0, 0, 2, 0, 1] + [0] * 9 + [3], "watch": {**_IDLE, "waiters": 4},
    }
    return metrics.Scrape(**{**base, **changes})


def _samples(text: str) -> Samples:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _render(scrape: metrics.Scrape) -> Samples:
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics.AgentCollector(lambda: scrape))
    return _samples(generate_latest(registry).decode())


def _cluster(name: str) -> tuple[tuple[str, str], ...]:
    return (("consulate_cluster", name),)


def test_one_reading_becomes_envoy_like_families() -> None:
    samples = _render(_scrape())
    web_, db = _cluster("web"), _cluster("db")
    expected: Samples = {
        ("consulate_downstream_cx_total", web_): 3, ("consulate_downstream_cx_total", db): 0,
        ("consulate_downstream_cx_active", web_): 1, ("consulate_downstream_cx_active", db): 0,
        ("consulate_upstream_cx_connect_fail_total", web_): 4,
        ("consulate_upstream_cx_connect_fail_total", db): 0,
        ("consulate_upstream_cx_none_healthy_total", web_): 5,
        ("consulate_upstream_cx_none_healthy_total", db): 0,
        ("consulate_upstream_cx_tx_bytes_total", web_): 10,
        ("consulate_upstream_cx_tx_bytes_total", db): 0,
        ("consulate_upstream_cx_rx_bytes_total", web_): 20,
        ("consulate_upstream_cx_rx_bytes_total", db): 0,
        ("consulate_downstream_cx_no_route_total", ()): 2,
        ("consulate_membership_endpoints", web_): 2, ("consulate_membership_endpoints", db): 1,
        ("consulate_route_table_version", ()): 7,
        ("consulate_watch_services", ()): 0, ("consulate_watch_blocking_queries", ()): 4,
        ("consulate_watch_streams", ()): 0,
    }
    for name in ("db", "web"):  # the Python relay copies every byte
        tx, rx = (10, 20) if name == "web" else (0, 0)
        for direction, total in (("tx", tx), ("rx", rx)):
            for method, value in (("splice", 0), ("copy", total)):
                labels = (("consulate_cluster", name), ("direction", direction),
                          ("method", method))
                expected["consulate_relay_bytes_total", labels] = value
    rcodes = {"NOERROR": 6, "FORMERR": 0, "SERVFAIL": 0, "NXDOMAIN": 2, "NOTIMP": 0,
              "REFUSED": 1, "YXDOMAIN": 0, "YXRRSET": 0, "NXRRSET": 0, "NOTAUTH": 0,
              "NOTZONE": 0, "15": 3}
    for rcode, count in rcodes.items():
        expected["consulate_dns_responses_total", (("rcode", rcode),)] = count
    assert samples == expected


def test_native_relay_splits_bytes_only_when_it_counts_splices() -> None:
    proxy = {"unrouted": 0, "services": {"web": {
        "connections_total": 1, "connections_active": 0, "connect_failures": 0,
        "rejected": 0, "bytes_to_upstream": 100, "bytes_to_client": 300}}}
    samples = _render(_scrape(relay="native", proxy=proxy, endpoints={"web": 1}))
    assert not [key for key in samples if key[0] == "consulate_relay_bytes_total"]
    web_counters = proxy["services"]["web"]  # type: ignore[index]
    web_counters.update(bytes_spliced_to_upstream=60, bytes_spliced_to_client=300)
    samples = _render(_scrape(relay="native", proxy=proxy, endpoints={"web": 1}))
    relay_bytes = {dict(labels)["direction"] + "/" + dict(labels)["method"]: value
                   for (name, labels), value in samples.items()
                   if name == "consulate_relay_bytes_total"}
    assert relay_bytes == {"tx/splice": 60, "tx/copy": 40, "rx/splice": 300, "rx/copy": 0}


def test_ejection_counters_appear_once_the_proxy_counts_them() -> None:
    names = {name for name, _ in _render(_scrape())}
    assert not {n for n in names if n.startswith("consulate_outlier_detection")}
    proxy = _scrape().proxy
    counted = {"unrouted": 0, "services": {
        "web": {**proxy["services"]["web"], "ejections": 2, "ejections_active": 1}}}
    samples = _render(_scrape(proxy=counted))
    assert samples[("consulate_outlier_detection_ejections_total", _cluster("web"))] == 2
    assert samples[("consulate_outlier_detection_ejections_active", _cluster("web"))] == 1
    assert samples[("consulate_outlier_detection_ejections_total", _cluster("db"))] == 0


@pytest.fixture
async def metrics_client() -> AsyncIterator[TestClient[web.Request, web.Application]]:
    app = web.Application()
    metrics.add_routes(app, _scrape)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        yield client


async def test_route_serves_text_or_openmetrics_as_asked(
    metrics_client: TestClient[web.Request, web.Application],
) -> None:
    response = await metrics_client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert _samples(await response.text()) == _render(_scrape())
    response = await metrics_client.get(
        "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert response.headers["Content-Type"].startswith("application/openmetrics-text")
    assert (await response.text()).endswith("# EOF\n")
    response = await metrics_client.get("/v1/agent/metrics?format=prometheus")
    assert _samples(await response.text()) == _render(_scrape())
    response = await metrics_client.get("/v1/agent/metrics")
    assert (response.status, await response.text()) == (
        400, "this agent serves its metrics in Prometheus format only: ask for "
             "?format=prometheus")


# -- a real agent in a lab host --------------------------------------------------------

_SCRAPER = """\
import asyncio, sys, aiohttp
async def main():
    async with aiohttp.ClientSession() as session:
        async with session.get("http://127.0.0.1:8500/metrics") as response:
            assert response.status == 200, response.status
            sys.stdout.write(await response.text())
asyncio.run(main())
"""


def scrape(lab: Lab) -> Samples:
    """Scrape the agent from inside its host (its API listens on h1's loopback)."""
    done = lab.exec("h1", [sys.executable, "-c", _SCRAPER], capture_output=True, text=True,
                    timeout=30)
    assert done.returncode == 0, done.stderr
    return _samples(done.stdout)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0) - before.get(key, 0)


def scrape_when_idle(lab: Lab, service: str) -> Samples:
    """The native engine adds a connection's bytes when it ends: wait for that."""
    deadline = time.monotonic() + 15
    while True:
        samples = scrape(lab)
        active = samples.get(("consulate_downstream_cx_active", _cluster(service)), 1)
        if active == 0 or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def dig(lab: Lab, name: str, *options: str) -> str:
    done = lab.exec("h1", ["dig", "@127.0.0.1", "-p", "8600", "+tries=1", "+time=5",
                           *options, name],
                    capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    return str(done.stdout)


@pytest.fixture(scope="module")
def metered(mesh_lab: Lab, agent: LabAgent, peers: Peers) -> Iterator[str]:
    """Service ``metered``: echo servers on c1 and c2, nothing listening on c3."""
    for j in (1, 2):
        peers.serve(f"h1c{j}", f"metered-{j}", 8181)
    for j in (1, 2, 3):
        agent.register("metered", f"metered-{j}", mesh_lab.container_ip(1, j), 8181)
    yield agent.api("GET", "/v1/agent/self")["Stats"]["routes"]["services"]["metered"]["vip"]
    for j in (1, 2, 3):
        agent.api("PUT", f"/v1/agent/service/deregister/metered-{j}")
    for j in (1, 2):
        peers.kill(f"metered-{j}")


@pytest.mark.lab
def test_connections_bytes_and_failures_are_counted_exactly(
    mesh_lab: Lab, agent: LabAgent, peers: Peers, metered: str
) -> None:
    before = scrape_when_idle(mesh_lab, "metered")
    size = 1000
    results = peers.connect("h1c4", metered, 80, count=6, size=size)
    assert [r["ok"] for r in results] == [True] * 6
    after = scrape_when_idle(mesh_lab, "metered")
    cluster = {"consulate_cluster": "metered"}
    # Round robin over three endpoints: the dead one is the first pick of two
    # connections out of six, each retried on the next endpoint.
    answer = len("metered-1\n") + size + len("sha256=") + 64 + len("\n")
    assert {name: delta(before, after, f"consulate_{name}", **cluster) for name in (
        "downstream_cx_total", "downstream_cx_active", "upstream_cx_connect_fail_total",
        "upstream_cx_none_healthy_total", "upstream_cx_tx_bytes_total",
        "upstream_cx_rx_bytes_total")} == {
        "downstream_cx_total": 6, "downstream_cx_active": 0,
        "upstream_cx_connect_fail_total": 2, "upstream_cx_none_healthy_total": 0,
        "upstream_cx_tx_bytes_total": 6 * size, "upstream_cx_rx_bytes_total": 6 * answer,
    }
    assert after[("consulate_membership_endpoints", _cluster("metered"))] == 3
    relay_bytes = {(labels["direction"], labels["method"]): delta(
        before, after, "consulate_relay_bytes_total", **cluster, **labels)
        for labels in ({"direction": d, "method": m} for d in ("tx", "rx")
                       for m in ("splice", "copy"))}
    if agent.api("GET", "/v1/agent/self")["Stats"]["relay"]["engine"] == "python" or any(
            name == "consulate_relay_bytes_total" for name, _ in after):
        # 1000-byte writes stay under the splice threshold: every byte is copied.
        assert relay_bytes == {("tx", "splice"): 0, ("tx", "copy"): 6 * size,
                               ("rx", "splice"): 0, ("rx", "copy"): 6 * answer}
    version = agent.api("GET", "/v1/agent/self")["Stats"]["routes"]["version"]
    assert after[("consulate_route_table_version", ())] == version


@pytest.mark.lab
def test_connection_to_no_vip_counts_as_no_route(
    mesh_lab: Lab, agent: LabAgent, peers: Peers, metered: str
) -> None:
    vips = {s["vip"] for s in
            agent.api("GET", "/v1/agent/self")["Stats"]["routes"]["services"].values()}
    unused = next(f"240.0.0.{i}" for i in range(1, 255) if f"240.0.0.{i}" not in vips)
    before = scrape(mesh_lab)
    [result] = peers.connect("h1c4", unused, 80)
    assert not result["ok"], result
    deadline = time.monotonic() + 15
    while (after := scrape(mesh_lab)) and time.monotonic() < deadline:
        if delta(before, after, "consulate_downstream_cx_no_route_total"):
            break
        time.sleep(0.05)
    assert delta(before, after, "consulate_downstream_cx_no_route_total") == 1


@pytest.mark.lab
def test_dns_replies_are_counted_by_rcode(mesh_lab: Lab, metered: str) -> None:
    before = scrape(mesh_lab)
    for _ in range(3):  # UDP, then one over TCP
        assert "status: NOERROR" in dig(mesh_lab, "metered.service.consul")
    for _ in range(2):
        assert "status: NXDOMAIN" in dig(mesh_lab, "absent.service.consul")
    assert "status: NOERROR" in dig(mesh_lab, "metered.service.consul", "+tcp")
    after = scrape(mesh_lab)
    counts = {rcode: delta(before, after, "consulate_dns_responses_total", rcode=rcode)
              for rcode in ("NOERROR", "NXDOMAIN", "SERVFAIL", "REFUSED", "FORMERR")}
    assert counts == {"NOERROR": 4, "NXDOMAIN": 2, "SERVFAIL": 0, "REFUSED": 0, "FORMERR": 0}


@pytest.mark.lab
def test_watch_gauges_follow_a_blocking_query(mesh_lab: Lab, metered: str) -> None:
    poll = mesh_lab.popen("h1", [sys.executable, "-c", (
        "import urllib.request as u\n"
        "u.urlopen('http://127.0.0.1:8500/v1/discover/services/metered/instances"
        "?index=999999&wait=60s', timeout=90).read()\n")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    gauges = ("consulate_watch_services", "consulate_watch_blocking_queries",
              "consulate_watch_streams")

    def watch_gauges() -> list[float]:
        samples = scrape(mesh_lab)
        return [samples[(name, ())] for name in gauges]

    try:
        deadline = time.monotonic() + 15
        while (seen := watch_gauges()) != [1, 1, 0] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert seen == [1, 1, 0]
    finally:
        poll.kill()
        poll.wait()
    deadline = time.monotonic() + 15
    while (seen := watch_gauges()) != [0, 0, 0] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert seen == [0, 0, 0]


@pytest.mark.lab
def test_outlier_ejection_is_counted(mesh_lab: Lab, agent: LabAgent, peers: Peers) -> None:
    """A dead endpoint among three: after 5 consecutive connect failures outlier
    detection ejects it (issue 7, point 5), and no connection fails meanwhile."""
    for j in (1, 2):
        peers.serve(f"h1c{j}", f"outlier-{j}", 8282)
    for j in (1, 2, 3):  # nothing listens on c3:8282
        agent.register("outlier", f"outlier-{j}", mesh_lab.container_ip(1, j), 8282)
    vip = agent.api("GET", "/v1/agent/self")["Stats"]["routes"]["services"]["outlier"]["vip"]
    try:
        before = scrape_when_idle(mesh_lab, "outlier")
        results = peers.connect("h1c4", vip, 80, count=18)
        assert [r["ok"] for r in results] == [True] * 18
        after = scrape_when_idle(mesh_lab, "outlier")
        cluster = {"consulate_cluster": "outlier"}
        assert {name: delta(before, after, f"consulate_{name}", **cluster) for name in (
            "upstream_cx_connect_fail_total", "outlier_detection_ejections_total",
            "outlier_detection_ejections_active")} == {
            "upstream_cx_connect_fail_total": 5, "outlier_detection_ejections_total": 1,
            "outlier_detection_ejections_active": 1}
    finally:
        for j in (1, 2, 3):
            agent.api("PUT", f"/v1/agent/service/deregister/outlier-{j}")
        for j in (1, 2):
            peers.kill(f"outlier-{j}")
