"""UDP services behind VIPs: NFQUEUE decides each new flow, conntrack carries the rest.

How (issue 11). nat chains see only the first packet of a conntrack flow. There,
``CONSULATE-UDP`` (proxy/iptables.py) queues an unmarked datagram to a VIP to this
module; we pick an endpoint (proxy/udp_flows.py: the service's ``udp``-tagged
endpoints, round robin), put that endpoint's slot in the packet mark and give the
verdict *repeat*: the nat hook runs again, the slot's DNAT rule matches, and
conntrack now rewrites every later datagram of the flow, both ways, in the kernel:

* per-flow affinity: the conntrack entry is keyed by the 5-tuple;
* replies come from the VIP: conntrack undoes the DNAT on the way back (the flow is
  also masqueraded, so the replies always come back through this host, even from
  an endpoint on the client's own bridge or on another host);
* idle timeout: the kernel's UDP conntrack timeouts of the host's namespace,
  ``net.netfilter.nf_conntrack_udp_timeout`` (30 s; a flow with one exchange) and
  ``nf_conntrack_udp_timeout_stream`` (120 s; a flow that keeps talking). After
  that the next datagram is a new flow and is balanced again.

When an endpoint leaves the table (deregistered, its agent gone, or critical once
the table excludes those), its DNAT rule goes and its conntrack entries are
deleted (``conntrack -D``), so the next datagram of each of its flows is queued
again and goes to a live endpoint. A datagram to a VIP without UDP endpoints is
accepted unmarked: it reaches the local VIP route and the client gets "port
unreachable" at once (as TCP gets a reset); when endpoints appear those refused
flows are deleted too, so that they do not stay refused until they time out. In
the moment between an endpoint entering the table and its DNAT rule being written,
a new flow's datagram is dropped instead (no conntrack entry, the client's retry
goes through).

Why not rewrite every datagram in userspace (NFQUEUE + scapy both ways, the design
card's first idea)? Each datagram would cross into Python twice (request and
reply). bench/udp.py measures that cost as ``vip+nfqueue-*``: the VIP path with
every datagram also queued to a Python program both ways (a lower bound of such a
design), in the same run as this design (``vip``) and the ``direct`` path
(``make bench-udp``, bench/results/udp.md, 2 busy cores, medians of 5):

=====================  ===================  ==================  ====================
variant                datagrams/s          RTT p50, µs         first datagram of a
                       (vs direct)          (added)             new flow p50, µs
=====================  ===================  ==================  ====================
direct                 86,336 (1x)          60.4                70.5
vip (this module)      113,887 (1.32x)      62.1 (+1.7)         108.6 (+38.0)
vip+nfqueue-accept     28,924 (0.34x)       74.7 (+14.3)        127.5 (+56.9)
vip+nfqueue-scapy      218 (0.0025x)        913.2 (+852.8)      1,415.8 (+1,345.2)
=====================  ===================  ==================  ====================

So a flow costs one trip through Python, on its first datagram (+38 µs), and
nothing measurable after that: the RTT is direct's within 2 µs, and datagrams/s
are within the machine's noise of direct (1.32x in this run, 0.93x in an earlier
one; both paths are kernel-only). Queueing every datagram caps the rate at a third
of direct's even with a callback that does nothing, and scapy's parse-and-rebuild
(about 0.5 ms a packet here) at a quarter of a percent. The price of the flow
design: the idle timeout is the host namespace's conntrack UDP timeout, not a
per-service setting, and flows need ``conntrack`` to be deleted when their
endpoint leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field

from netfilterqueue import NetfilterQueue, Packet

from consulate.proxy import iptables
from consulate.proxy.table import RouteTable
from consulate.proxy.udp_flows import (
    EndpointKey,
    FlowRouter,
    MalformedPacket,
    SlotsExhausted,
    SlotTable,
    parse_datagram,
    wanted_endpoints,
)

log = logging.getLogger("consulate.udp")

# The headers are all a decision needs: an IPv4 header with options (60) + UDP (8).
_COPY_RANGE = 68
_QUEUE_LENGTH = 4096
# VIPs remembered for un-refusing their flows at the next sync: a scan of the VIP range
# must not grow it without bound (the others' refusals then last their conntrack timeout).
_MAX_REFUSED_VIPS = 4096


class UdpQueueError(OSError):
    """The NFQUEUE could not be bound (taken by another process, or no CAP_NET_ADMIN)."""


@dataclass
class UdpStats:
    """New flows routed and refused, per service; datagrams we could not route at all.
    The snapshot adds how many endpoints the DNAT chain routes now."""

    flows: dict[str, int] = field(default_factory=dict)
    refused: dict[str, int] = field(default_factory=dict)
    unrouted: int = 0
    malformed: int = 0
    flows_moved: int = 0  # conntrack entries deleted because their endpoint left

    def snapshot(self, endpoints: int) -> dict[str, object]:
        return {"endpoints": endpoints, "flows": dict(self.flows), "refused": dict(self.refused),
                "unrouted": self.unrouted, "malformed": self.malformed,
                "flows_moved": self.flows_moved}


class UdpProxy:
    """Routes new UDP flows to VIPs; keeps ``CONSULATE-UDP`` in step with the table."""

    def __init__(self, table: RouteTable, rules: iptables.RedirectRules) -> None:
        self.table = table
        self.stats = UdpStats()
        self._rules = rules
        self._router = FlowRouter(table)
        self._slots = SlotTable()
        self._queue: NetfilterQueue | None = None
        self._changed = asyncio.Event()
        self._syncer: asyncio.Task[None] | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._conntrack = shutil.which("conntrack")
        self._refused_vips: set[str] = set()  # VIPs whose flows were refused since a sync
        self._gone: set[EndpointKey] = set()  # endpoints whose flows are still to forget

    async def start(self) -> None:
        """Route what the table holds now, then start deciding flows."""
        if self._conntrack is None:
            log.warning("event=udp-degraded reason=conntrack-missing hint=\"install conntrack "
                        "(apt-get install conntrack): without it flows stay on endpoints that "
                        "left until they go idle\"")
        await self._sync()
        queue = NetfilterQueue()
        try:
            queue.bind(self._rules.udp_queue, self._on_packet, max_len=_QUEUE_LENGTH,
                       range=_COPY_RANGE)
        except OSError as exc:
            raise UdpQueueError(
                f"cannot bind NFQUEUE {self._rules.udp_queue} ({exc}): another agent may run "
                "in this network namespace, or this one lacks CAP_NET_ADMIN (run it as root)"
            ) from None
        self._queue = queue
        asyncio.get_running_loop().add_reader(queue.get_fd(), self._drain)
        self._unsubscribe = self.table.subscribe(lambda _version: self._changed.set())
        self._syncer = asyncio.get_running_loop().create_task(self._follow())
        log.info("event=listen component=udp queue=%d endpoints=%d", self._rules.udp_queue,
                 len(self._router.installed))

    async def close(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._syncer is not None:
            self._syncer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._syncer
            self._syncer = None
        if self._queue is not None:
            asyncio.get_running_loop().remove_reader(self._queue.get_fd())
            self._queue.unbind()  # queued datagrams now bypass: refused, not stuck
            self._queue = None

    def stats_snapshot(self) -> dict[str, object]:
        return self.stats.snapshot(len(self._router.installed))

    # -- the first datagram of each flow ---------------------------------------

    def _drain(self) -> None:
        """Decide every queued datagram waiting now (the loop calls this when readable)."""
        assert self._queue is not None
        try:
            self._queue.run(False)
        except OSError as exc:  # ENOBUFS: the kernel dropped datagrams of a burst
            log.warning("event=udp-queue-error error=%r", str(exc))

    def _on_packet(self, packet: Packet) -> None:
        """Give every queued packet a verdict, whatever happens (an unanswered one
        would hold its flow in the queue)."""
        try:
            self._route(packet)
        except Exception:
            log.exception("event=udp-error")
            packet.accept()

    def _route(self, packet: Packet) -> None:
        try:
            datagram = parse_datagram(packet.get_payload())
        except MalformedPacket as exc:
            self.stats.malformed += 1
            log.warning("event=udp-reject reason=malformed error=%r", str(exc))
            packet.accept()
            return
        decision = self._router.decide(datagram)
        client = f"{datagram.source}:{datagram.source_port}"
        destination = f"{datagram.destination}:{datagram.destination_port}"
        if decision.reason == "not-installed":
            packet.drop()  # no conntrack entry: the client's retry finds the rule written
            return
        if decision.endpoint is None:
            if len(self._refused_vips) < _MAX_REFUSED_VIPS:
                self._refused_vips.add(datagram.destination)
            if decision.service is None:
                self.stats.unrouted += 1
                log.warning("event=udp-reject client=%s destination=%s reason=%s", client,
                            destination, decision.reason)
            else:
                refused = self.stats.refused
                refused[decision.service] = refused.get(decision.service, 0) + 1
                log.warning("event=udp-reject client=%s service=%s vip=%s reason=%s", client,
                            decision.service, destination, decision.reason)
            packet.accept()  # unmarked: the local VIP route answers "port unreachable"
            return
        flows = self.stats.flows
        flows[decision.endpoint.service] = flows.get(decision.endpoint.service, 0) + 1
        log.debug("event=udp-flow client=%s service=%s endpoint=%s address=%s:%d", client,
                  decision.endpoint.service, decision.endpoint.id, decision.endpoint.address,
                  decision.endpoint.port)
        packet.set_mark((packet.get_mark() & ~iptables.UDP_MARK_MASK)
                        | iptables.udp_mark(decision.slot))
        packet.repeat()  # the nat hook again: the slot's DNAT rule takes the flow

    # -- keeping the DNAT rules and conntrack in step with the table -------------

    async def _follow(self) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            try:
                await self._sync()
            except (iptables.IptablesError, SlotsExhausted, OSError) as exc:
                log.error("event=udp-sync-failed error=%r", str(exc))

    async def _sync(self) -> None:
        """Rules for new endpoints first, then forget the flows of the ones that left."""
        wanted, unroutable = wanted_endpoints(self.table)
        for endpoint in unroutable:
            log.warning("event=udp-endpoint-skipped service=%s endpoint=%s address=%s "
                        "reason=not-an-ipv4-address", endpoint.service, endpoint.id,
                        endpoint.address)
        targets, gone = self._slots.update(wanted)
        self._gone |= gone  # kept until forgotten, even if this sync fails
        await asyncio.to_thread(iptables.replace_udp_targets, self._rules, targets)
        self._router.installed = {(t.address, t.port): t.slot for t in targets}
        gone, self._gone = self._gone - wanted, set()
        for key in sorted(gone):
            self.stats.flows_moved += await self._forget_flows(key)
        refused, self._refused_vips = self._refused_vips, set()
        for vip in sorted(refused):  # refused flows wait in conntrack: let them retry
            # (a VIP without a service yet too: the change may be its arrival)
            await self._delete_conntrack("--orig-dst", vip, "--reply-src", vip)
        log.info("event=udp-routes endpoints=%d removed=%d", len(targets), len(gone))

    async def _forget_flows(self, key: EndpointKey) -> int:
        address, port = key
        deleted = await self._delete_conntrack("--orig-dst", self._rules.vip_cidr,
                                               "--reply-src", address,
                                               "--reply-port-src", str(port))
        if deleted:
            log.info("event=udp-flows-moved address=%s:%d flows=%d", address, port, deleted)
        return deleted

    async def _delete_conntrack(self, *match: str) -> int:
        """Delete the UDP conntrack entries matching ``match``; how many were deleted."""
        if self._conntrack is None:
            return 0
        process = await asyncio.create_subprocess_exec(
            self._conntrack, "-D", "-p", "udp", *match, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE)
        _, stderr = await process.communicate()
        text = stderr.decode(errors="replace").strip()
        # conntrack -D exits 1 when nothing matched; its last line counts the deletions.
        words = text.splitlines()[-1].split() if text else []
        if "flow" in words and words[words.index("flow") - 1].isdigit():
            return int(words[words.index("flow") - 1])
        log.warning("event=udp-conntrack-failed exit=%s error=%r", process.returncode, text)
        return 0
