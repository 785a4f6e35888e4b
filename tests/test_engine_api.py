"""The native engine's accepting API, apart from the lab: route tables, listening, refusals.

Routing a connection needs the original destination that only an iptables
REDIRECT gives, so the routed path is tested end to end in tests/test_mesh.py;
here the engine gets connections that were never redirected, on loopback.
"""

from __future__ import annotations

import errno
import select
import socket
from collections.abc import Iterator

import pytest

from consulate.native import capabilities
from consulate.native.engine import BALANCERS, SpliceEngine
from consulate.native.model import EngineRoute, EngineServiceCounters
from consulate.proxy.balance import LB_NAMES


@pytest.fixture
def engine() -> Iterator[SpliceEngine]:
    assert capabilities().extension, "native engine not built"
    running = SpliceEngine()
    yield running
    running.close()


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.create_server(("127.0.0.1", 0))
    sock.setblocking(False)
    yield sock
    sock.close()


@pytest.mark.parametrize("routes", [
    [EngineRoute(0, "240.0.0.5", []), EngineRoute(1, "240.0.0.5", [])],  # one VIP twice
    [EngineRoute(0, "0.0.0.0", [("127.0.0.1", 80)])],  # not an address a VIP can have
    [EngineRoute(1 << 20, "240.0.0.5", [])],  # ids index an array: keep them small
])
def test_a_bad_route_table_is_refused_whole(engine: SpliceEngine,
                                            routes: list[EngineRoute]) -> None:
    engine.set_routes([EngineRoute(0, "240.0.0.9", [("127.0.0.1", 80)])])
    with pytest.raises(OSError, match="refused the route table") as caught:
        engine.set_routes(routes)
    assert caught.value.errno == errno.EINVAL
    assert len(engine.service_counters(8)) == 1  # the previous table stands


def test_the_engine_knows_every_balancer() -> None:
    assert len(LB_NAMES) == BALANCERS  # relay.c's LB_* follow LB_NAMES


@pytest.mark.parametrize(("route", "message"), [
    (EngineRoute(3, "240.0.0.5", [("127.0.0.1", 80)], lb=5), "service id 3: lb=5 is not a "
     "balancer: give 0 to 4"),
    (EngineRoute(3, "240.0.0.5", [("127.0.0.1", 80)], weights=[1, 2]), "service id 3: 2 "
     "weights for 1 endpoints: give one per endpoint, or none"),
])
def test_a_route_with_a_bad_balancer_or_weights_is_refused_with_the_fix(
        engine: SpliceEngine, route: EngineRoute, message: str) -> None:
    engine.set_routes([EngineRoute(0, "240.0.0.9", [("127.0.0.1", 80)])])
    with pytest.raises(ValueError, match=message):
        engine.set_routes([route])
    assert len(engine.service_counters(8)) == 1  # the previous table stands


def test_counters_exist_for_every_published_service(engine: SpliceEngine) -> None:
    engine.set_routes([EngineRoute(0, "240.0.0.1", [("127.0.0.1", 1)]),
                       EngineRoute(2, "240.0.0.3", [])])
    zero = EngineServiceCounters(0, 0, 0, 0, 0, 0, 0, 0)
    assert engine.service_counters(8) == [zero] * 3  # ids 0..2, 1 never used
    assert engine.service_counters(1) == [zero]
    engine.set_routes([])  # services that leave keep their counters
    assert len(engine.service_counters(8)) == 3


def test_listen_checks_its_arguments(engine: SpliceEngine, listener: socket.socket) -> None:
    with pytest.raises(ValueError, match="attempts=0"):
        engine.listen(listener, attempts=0)
    engine.listen(listener)
    with pytest.raises(OSError) as caught:
        engine.listen(listener)
    assert caught.value.errno == errno.EBUSY
    engine.unlisten()
    engine.listen(listener)  # unlisten made room


def test_a_connection_that_was_not_redirected_is_reset_and_reported(
    engine: SpliceEngine, listener: socket.socket
) -> None:
    engine.set_routes([EngineRoute(0, "240.0.0.1", [("127.0.0.1", 1)])])
    engine.listen(listener)
    client = socket.create_connection(listener.getsockname())
    with client:
        assert select.select([engine.notify_fd], [], [], 5)[0], "no report within 5 s"
        [report] = engine.poll()
        # No REDIRECT: either no original destination at all, or (when conntrack
        # runs here) the listener's own address, which is no VIP.
        assert (report.reason, report.client) == ("unrouted", client.getsockname())
        with pytest.raises(ConnectionResetError):
            client.recv(1)
    assert (engine.stats().accepted, engine.stats().unrouted) == (1, 1)
    assert engine.service_counters(1) == [EngineServiceCounters(0, 0, 0, 0, 0, 0, 0, 0)]


def test_a_closed_engine_says_so(listener: socket.socket) -> None:
    closed = SpliceEngine()
    closed.close()
    with pytest.raises(OSError) as caught:
        closed.listen(listener)
    assert caught.value.errno == errno.ESHUTDOWN
    closed.unlisten()  # harmless, as close() is


def test_accepted_sockets_inherit_nodelay_from_the_listener(
    engine: SpliceEngine, listener: socket.socket
) -> None:
    """The engine sets TCP_NODELAY once on the listener instead of on every accepted
    client (a syscall per connection less); the kernel copies it to each accept."""
    assert listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
    engine.listen(listener)
    engine.unlisten()  # accept here, to look at what the engine's accepts would get
    assert listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    listener.setblocking(True)
    with socket.create_connection(listener.getsockname()) as client:
        accepted, _ = listener.accept()
        with accepted:
            assert accepted.getsockname() == client.getpeername()
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
