"""The native relay engine's Python API: sockets in, results out; ``ffi`` stays in here.

Every C call's return code is checked and errors become ``OSError`` with the
errno, as the kernel reported it. Ownership is explicit: ``add`` takes both
sockets (detaching them from their Python objects) only when the engine accepted
them; when it declines, the caller still owns them and can relay in Python.
``listen`` lends the engine a listening socket: it then accepts and connects by
itself, following the routes of ``set_routes``, and the caller keeps the socket.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import sys
from collections.abc import Sequence
from typing import Any

from consulate.native import _relay  # type: ignore[attr-defined]
from consulate.native.model import (
    EngineRoute,
    EngineServiceCounters,
    EngineStats,
    RelayResult,
)

_ffi, _lib = _relay.ffi, _relay.lib

REASONS = ("done", "error", "idle", "stopped", "connect-failed", "unrouted", "no-endpoints",
           "accept-failed", "ejected", "returned", "limit-reached", "limit-cleared")
MAX_CANDIDATES = 8
BALANCERS = 5  # relay.c's LB_*: indices of proxy/balance.py's LB_NAMES
DEFAULT_PIPE_SIZE = 1 << 20  # 1 MiB pipes move ~45% more than 64 KiB ones here
DEFAULT_SPLICE_THRESHOLD = 4096  # below this a splice read drops back to copying
# Mode policies, in the order of relay.c's POLICY_* values (the index is passed).
# adaptive: copy, splice once a recv fills 16 KiB, copy again below the threshold;
# copy: never splice; splice: splice from the first read on, never drop back.
MODES = ("adaptive", "copy", "splice")


class SpliceEngine:
    """One epoll thread relaying socket pairs with splice(2), the GIL released."""

    def __init__(
        self,
        *,
        pipe_size: int = DEFAULT_PIPE_SIZE,
        splice_threshold: int = DEFAULT_SPLICE_THRESHOLD,
        idle_timeout: float = 0.0,
        connect_timeout: float = 2.0,
        mode: str = "adaptive",
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: expected one of {', '.join(MODES)}")
        handle = _lib.consulate_relay_new(pipe_size, splice_threshold, idle_timeout,
                                          connect_timeout, MODES.index(mode))
        if handle == _ffi.NULL:
            code = _ffi.errno
            raise OSError(code, f"cannot start the relay engine: {os.strerror(code)}")
        self._handle = handle
        self._results = _ffi.new("consulate_relay_result[]", 256)

    @property
    def notify_fd(self) -> int:
        """An eventfd that becomes readable when results are waiting for ``poll``."""
        return int(_lib.consulate_relay_notify_fd(self._handle))

    def add(self, conn_id: int, a: socket.socket, b: socket.socket) -> None:
        """Relay between ``a`` and ``b`` until both directions end; takes both sockets.

        Raises OSError (the sockets stay the caller's) when the engine declines.
        """
        self._check_open()
        rc = _lib.consulate_relay_add(self._handle, conn_id, a.fileno(), b.fileno())
        if rc != 0:
            raise OSError(-rc, f"relay engine declined the connection: {os.strerror(-rc)}")
        a.detach()
        b.detach()

    def listen(self, listener: socket.socket, *, mark: int = 0, attempts: int = 3,
               marked_network: str = "0.0.0.0/0", consecutive_failures: int = 5,
               base_ejection_time: float = 30.0, max_ejection_time: float = 300.0,
               max_ejection_percent: int = 50, max_connections: int = 65536,
               max_pending: int = 1024, steered: bool = False) -> None:
        """Accept on ``listener`` and route each connection by the table of ``set_routes``.

        The engine reads the original destination (SO_ORIGINAL_DST; or, when
        ``steered`` by BPF sk_lookup, the accepted socket's own address, which
        must be in ``marked_network``, the VIP range), picks up to ``attempts``
        endpoints of the VIP's service with the route's balancer and connects
        (upstream sockets to an address in ``marked_network`` carry ``mark``;
        ``steered``, they are refused: nothing would exempt them from steering),
        ejecting endpoints by the outlier policy given (proxy/outlier.py's
        OutlierPolicy fields), all without Python. Over ``max_connections``
        relayed at once, or ``max_pending`` of one service still connecting, an
        accepted connection is reset (proxy/limits.py says why). The caller keeps
        the socket and must call ``unlisten`` before closing it.
        """
        self._check_open()
        if not 1 <= attempts <= MAX_CANDIDATES:
            raise ValueError(f"attempts={attempts}: give 1 to {MAX_CANDIDATES}")
        if max_connections < 1 or max_pending < 1:
            raise ValueError(f"max_connections={max_connections}, max_pending={max_pending}: "
                             "give limits of 1 or more")
        network = ipaddress.IPv4Network(marked_network)
        rc = _lib.consulate_relay_listen(self._handle, listener.fileno(), mark, attempts,
                                         _ipv4(str(network.network_address)),
                                         _ipv4(str(network.netmask)), consecutive_failures,
                                         base_ejection_time, max_ejection_time,
                                         max_ejection_percent, max_connections, max_pending,
                                         int(steered))
        if rc != 0:
            raise OSError(-rc, f"relay engine cannot accept: {os.strerror(-rc)} (or an "
                               "outlier setting out of range)")

    def unlisten(self) -> None:
        """Stop accepting; the engine never touches the listener after this returns."""
        if self._handle is not None:
            _lib.consulate_relay_unlisten(self._handle)

    def set_routes(self, routes: Sequence[EngineRoute]) -> None:
        """Replace the engine's route table (VIP -> service id, endpoints) at once."""
        self._check_open()
        endpoints = [endpoint for route in routes for endpoint in route.endpoints]
        weights: list[int] = []
        table = _ffi.new("consulate_route[]", max(len(routes), 1))
        first = 0
        for i, route in enumerate(routes):
            if not 0 <= route.lb < BALANCERS:
                raise ValueError(f"route of service id {route.service}: lb={route.lb} is not "
                                 f"a balancer: give 0 to {BALANCERS - 1}")
            if route.weights and len(route.weights) != len(route.endpoints):
                raise ValueError(f"route of service id {route.service}: "
                                 f"{len(route.weights)} weights for {len(route.endpoints)} "
                                 "endpoints: give one per endpoint, or none")
            table[i].vip = _ipv4(route.vip)
            table[i].service = route.service
            table[i].first = first
            table[i].count = len(route.endpoints)
            table[i].lb = route.lb
            first += len(route.endpoints)
            weights += [max(min(w, 0xFFFFFFFF), 1) for w in route.weights] or \
                [1] * len(route.endpoints)
        addrs = _ffi.new("uint32_t[]", [_ipv4(a) for a, _ in endpoints] or [0])
        ports = _ffi.new("uint16_t[]", [socket.htons(p) for _, p in endpoints] or [0])
        weight_array = _ffi.new("uint32_t[]", weights or [0])
        rc = _lib.consulate_relay_set_routes(self._handle, table, len(routes), addrs, ports,
                                             weight_array, len(endpoints))
        if rc != 0:
            raise OSError(-rc, f"relay engine refused the route table: {os.strerror(-rc)} "
                               "(duplicate or zero VIP, or a service id above 2^20)")

    def service_counters(self, count: int) -> list[EngineServiceCounters]:
        """Counters of service ids 0 .. count-1 (fewer if the engine knows fewer)."""
        self._check_open()
        out = _ffi.new("consulate_service_counters[]", max(count, 1))
        got = _lib.consulate_relay_service_counters(self._handle, out, count)
        return [EngineServiceCounters(
            int(c.connections_total), int(c.connections_active), int(c.connect_failures),
            int(c.rejected), int(c.bytes_to_upstream), int(c.bytes_to_client),
            int(c.ejections), int(c.ejections_active), int(c.bytes_spliced_to_upstream),
            int(c.bytes_spliced_to_client), int(c.pending_active), int(c.pending_overflow),
        ) for c in (out[i] for i in range(got))]

    def poll(self) -> list[RelayResult]:
        """Results of connections that ended since the last poll."""
        if self._handle is None:
            return []
        count = _lib.consulate_relay_poll(self._handle, self._results, len(self._results))
        return [self._result(self._results[i]) for i in range(count)]

    def stats(self) -> EngineStats:
        self._check_open()
        out = _ffi.new("consulate_relay_stats *")
        _lib.consulate_relay_stats_get(self._handle, out)
        return EngineStats(int(out.active), int(out.pipes_pooled), int(out.pipes_open),
                           int(out.accepted), int(out.unrouted), int(out.overflow))

    def stop(self) -> list[RelayResult]:
        """End every connection (closed, reported as stopped) and the thread."""
        if self._handle is None:
            return []
        _lib.consulate_relay_stop(self._handle)
        results = []
        while batch := self.poll():
            results += batch
        return results

    def close(self) -> list[RelayResult]:
        """Stop, then free every resource; returns the last results."""
        results = self.stop()
        if self._handle is not None:
            _lib.consulate_relay_free(self._handle)
            self._handle = None
        return results

    def _check_open(self) -> None:
        if self._handle is None:
            raise OSError(errno.ESHUTDOWN, "the relay engine is closed")

    @staticmethod
    def _result(r: Any) -> RelayResult:  # r: a cdata consulate_relay_result
        return RelayResult(
            id=int(r.id), bytes_a_to_b=int(r.bytes[0]), bytes_b_to_a=int(r.bytes[1]),
            spliced_a_to_b=int(r.spliced[0]), spliced_b_to_a=int(r.spliced[1]),
            reason=REASONS[r.reason], error=int(r.error), failed_mask=int(r.failed_mask),
            service=int(r.service),
            client=_address(r.client_addr, r.client_port),
            destination=_address(r.dest_addr, r.dest_port),
            candidates=tuple(_address(r.candidate_addr[i], r.candidate_port[i])
                             for i in range(r.ncandidates)),
            failures=int(r.failures), ejections=int(r.ejections),
            ejection_time=int(r.ejection_ms) / 1000,
        )


def _ipv4(address: str) -> int:
    """An IPv4 address as the C side stores it (s_addr: network-order bytes in a uint32)."""
    return int.from_bytes(socket.inet_aton(address), sys.byteorder)


def _address(addr: int, port: int) -> tuple[str, int]:
    return socket.inet_ntoa(int(addr).to_bytes(4, sys.byteorder)), socket.ntohs(int(port))
