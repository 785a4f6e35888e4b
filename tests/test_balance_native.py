"""relay.c's balancers give the same orders as proxy/balance.py's, pick for pick.

The engine picks only for connections that an iptables REDIRECT sent it, so
here a small C driver includes relay.c itself, publishes a route table through
the real consulate_relay_set_routes, and calls the engine's pick() as its
accept path does; each scenario runs the same steps through the Python
balancer and compares every order. (p2c draws from a different generator in C,
so only its rules are compared.) End to end: tests/test_balance_mesh.py.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from consulate.proxy.balance import LB_NAMES, Key, PickContext, new_balancer
from consulate.proxy.outlier import OutlierDetector

NATIVE = Path(__file__).resolve().parent.parent / "native"

# Commands on stdin, one per line; "pick" prints the chosen indices.
#   route LB N W1..WN   publish one route (VIP 240.0.0.1) of endpoints 10.0.0.1..N:80
#   pick CLIENT WANT    CLIENT an IPv4 address as an integer
#   active I N          endpoint I has N open connections
#   eject I / return I  take endpoint I out of the pool / put it back
#   fail I              a connect to endpoint I failed: prints its ejected flag,
#                       ejections and the ejection time (ms) reported, or 0
DRIVER = r"""
#include "relay.c"
#include <stdio.h>

int main(void)
{
    consulate_relay_engine *e = consulate_relay_new(65536, 4096, 0, 1, 0);
    char cmd[16];
    if (e == NULL)
        return 2;
    while (scanf("%15s", cmd) == 1) {
        if (strcmp(cmd, "route") == 0) {
            consulate_route r = {0};
            uint32_t addrs[64], weights[64], lb, n, i;
            uint16_t ports[64];
            if (scanf("%u %u", &lb, &n) != 2 || n > 64)
                return 3;
            for (i = 0; i < n; i++) {
                if (scanf("%u", &weights[i]) != 1)
                    return 3;
                addrs[i] = htonl(0x0a000001u + i);
                ports[i] = htons(80);
            }
            r.vip = htonl(0xf0000001u);
            r.count = n;
            r.lb = lb;
            if (consulate_relay_set_routes(e, &r, 1, addrs, ports, weights, n) != 0)
                return 4;
        } else {
            uint32_t a, b, out[MAX_CANDIDATES], got, k;
            struct route *r;
            struct upstream **ups;
            if (scanf("%u %u", &a, &b) != 2 && strcmp(cmd, "pick") == 0)
                return 3;
            pthread_mutex_lock(&e->lock);
            r = route_find(e->routes, htonl(0xf0000001u));
            ups = e->routes->upstreams + r->first;
            if (strcmp(cmd, "pick") == 0) {
                got = pick(e, r, a, b, out);
                for (k = 0; k < got; k++)
                    printf("%s%u", k ? " " : "", out[k]);
                printf("\n");
            } else if (strcmp(cmd, "active") == 0) {
                ups[a]->active = b;
            } else if (strcmp(cmd, "eject") == 0) {
                ups[a]->ejected_until = 1e18;
            } else if (strcmp(cmd, "return") == 0) {
                ups[a]->ejected_until = 0;
            } else if (strcmp(cmd, "fail") == 0) {
                struct conn c;
                size_t before = e->results_len;
                memset(&c, 0, sizeof(c));
                c.dest.sin_addr.s_addr = htonl(0xf0000001u);
                outlier_failed(e, &c, ups[a]);
                printf("%d %u %u\n", ejected(ups[a]), ups[a]->ejections,
                       e->results_len > before ? e->results[before].ejection_ms : 0);
            }
            pthread_mutex_unlock(&e->lock);
        }
    }
    consulate_relay_free(e);
    return 0;
}
"""


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    cc = shutil.which("cc")
    assert cc is not None, "a C compiler is needed (build-essential, in APT_PACKAGES)"
    work = tmp_path_factory.mktemp("relay-driver")
    (work / "driver.c").write_text(DRIVER)
    binary = work / "driver"
    subprocess.run([cc, "-O1", "-Wall", "-I", str(NATIVE), str(work / "driver.c"), "-o",
                    str(binary), "-lpthread"], check=True, capture_output=True)
    yield binary


@dataclass(frozen=True)
class Ep:
    address: str
    port: int = 80
    weight: int = 1


class Scenario:
    """Runs the same steps through the C engine (batched) and a Python balancer."""

    def __init__(self, lb: str, weights: list[int]) -> None:
        self.endpoints = [Ep(f"10.0.0.{i + 1}", weight=w) for i, w in enumerate(weights)]
        self.balancer = new_balancer(lb)
        self.commands = [f"route {LB_NAMES.index(lb)} {len(weights)} "
                         + " ".join(map(str, weights))]
        self.expected: list[list[int]] = []
        self.active: dict[Key, int] = {}
        self.ejected: set[Key] = set()

    def pick(self, client: str, want: int) -> None:
        address = int(ipaddress.IPv4Address(client))
        self.commands.append(f"pick {address} {want}")
        context = PickContext(client=address, active=dict(self.active),
                              ejected=frozenset(self.ejected))
        chosen = self.balancer.candidates(self.endpoints, want, context)
        self.expected.append([self.endpoints.index(e) for e in chosen])

    def set_active(self, index: int, count: int) -> None:
        self.commands.append(f"active {index} {count}")
        self.active[(self.endpoints[index].address, 80)] = count

    def eject(self, index: int, out: bool = True) -> None:
        self.commands.append(f"{'eject' if out else 'return'} {index} 0")
        (self.ejected.add if out else self.ejected.discard)((self.endpoints[index].address, 80))

    def fail(self, index: int, detector: OutlierDetector[int]) -> None:
        """A failed connect to endpoint ``index``, counted by ``detector`` too."""
        self.commands.append(f"fail {index} 0")
        ejection = detector.failed(index, range(len(self.endpoints)))
        out = index in detector.ejected
        self.expected.append([int(out), ejection.ejections if ejection else int(out),
                              int(ejection.seconds * 1000) if ejection else 0])

    def run(self, driver: Path) -> list[list[int]]:
        done = subprocess.run([str(driver)], input="\n".join(self.commands) + "\n",
                              capture_output=True, text=True, timeout=30, check=True)
        return [[int(i) for i in line.split()] for line in done.stdout.splitlines()]


def test_round_robin_matches(driver: Path) -> None:
    s = Scenario("round_robin", [1, 1, 1, 1])
    for _ in range(5):
        s.pick("10.1.0.1", 3)
    s.eject(1)
    for _ in range(4):
        s.pick("10.1.0.1", 3)
    for i in range(4):
        s.eject(i)
    s.pick("10.1.0.1", 2)  # all ejected: all used
    assert s.run(driver) == s.expected
    assert s.expected[:2] == [[0, 1, 2], [1, 2, 3]]


def test_least_conn_matches(driver: Path) -> None:
    s = Scenario("least_conn", [1, 1, 1])
    for _ in range(3):
        s.pick("10.1.0.1", 3)
    s.set_active(0, 4)
    s.set_active(2, 1)
    s.pick("10.1.0.1", 3)
    s.eject(1)
    s.pick("10.1.0.1", 3)
    assert s.run(driver) == s.expected
    assert s.expected[3:] == [[1, 2, 0], [2, 0]]


def test_hash_matches_for_many_clients(driver: Path) -> None:
    s = Scenario("hash", [1] * 7)
    for n in range(200):
        s.pick(f"10.100.{n // 50}.{n % 50 + 1}", 3)
    s.eject(3)
    for n in range(50):
        s.pick(f"10.100.0.{n + 1}", 3)
    assert s.run(driver) == s.expected


def test_weighted_matches(driver: Path) -> None:
    s = Scenario("weighted", [5, 1, 1, 3])
    for _ in range(20):
        s.pick("10.1.0.1", 2)
    s.eject(0)
    for _ in range(6):
        s.pick("10.1.0.1", 2)
    assert s.run(driver) == s.expected


def test_p2c_follows_the_same_rules(driver: Path) -> None:
    """Drawn at random in C too: the busiest never wins, retries are distinct."""
    s = Scenario("p2c", [1, 1, 1])
    s.set_active(2, 50)
    for _ in range(60):
        s.pick("10.1.0.1", 3)
    s.eject(0)
    s.eject(1)  # 2 of 3 out: beyond what outlier detection allows, but pick must cope
    s.pick("10.1.0.1", 3)
    orders = s.run(driver)
    assert all(sorted(o) == [0, 1, 2] and o[0] != 2 for o in orders[:60]), orders
    assert {o[0] for o in orders[:60]} == {0, 1}
    assert orders[60] == [2]


def test_ejection_rules_match(driver: Path) -> None:
    """Ejected at the 5th failure in a row, for 30 s, at most half of the pool."""
    s = Scenario("round_robin", [1, 1, 1, 1, 1])
    detector = OutlierDetector[int]()
    for index in (0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2):
        s.fail(index, detector)
    assert s.run(driver) == s.expected
    assert s.expected[4] == [1, 1, 30000]  # a's 5th failure
    assert s.expected[10] == [1, 1, 30000]  # b: 2 of 5 out
    assert s.expected[-1] == [0, 0, 0]  # c would make 3 of 5: stays
