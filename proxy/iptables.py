"""iptables rules that send TCP for the VIP range to the proxy, UDP to its flow router.

The agent owns its nat chains (``CONSULATE-PREROUTING``, ``-OUTPUT``, ``-POSTROUTING``
and ``-UDP``) and one jump into each of the first three from the built-in chains.
Planning is pure (iptables-save text in, iptables-restore text out, tested
without a kernel); applying is one ``iptables-restore --noflush`` transaction, so
the rules appear or change all at once and other tools' rules are left alone.

Ordering matters in OUTPUT: our own upstream connections carry ``mark`` and
RETURN first, so the proxy never redirects itself even if an endpoint's address
falls inside the VIP range. When BPF sk_lookup brings TCP to the proxy
(proxy/sklookup.py), ``tcp`` is False and the TCP rules are left out: only UDP
(and the ambassador's REDIRECT) use the nat table then.

UDP to a VIP goes to ``CONSULATE-UDP`` (see proxy/udp.py). nat chains only see the
first packet of a conntrack flow; there an unmarked datagram is queued (NFQUEUE) to
the agent, which marks it with an endpoint's slot and repeats the hook, and the
slot's DNAT rule sends it (and, through conntrack, the rest of its flow) to that
endpoint. ``--queue-bypass``: while no agent listens, datagrams to a VIP are
refused (port unreachable from the local route) instead of waiting in a queue.
POSTROUTING masquerades those flows so that the replies come back through this
host, where conntrack gives them the VIP as source.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

log = logging.getLogger("consulate.iptables")

PREROUTING_CHAIN = "CONSULATE-PREROUTING"
OUTPUT_CHAIN = "CONSULATE-OUTPUT"
POSTROUTING_CHAIN = "CONSULATE-POSTROUTING"
UDP_CHAIN = "CONSULATE-UDP"
_JUMPS = {"PREROUTING": PREROUTING_CHAIN, "OUTPUT": OUTPUT_CHAIN,
          "POSTROUTING": POSTROUTING_CHAIN}
DEFAULT_UDP_QUEUE = 10000
# The packet-mark bits that carry a UDP endpoint's slot (1..65535): the TCP proxy's
# mark (--mark) is matched exactly, and only on TCP, so the two never meet.
UDP_SLOT_SHIFT = 16
UDP_MARK_MASK = 0xFFFF << UDP_SLOT_SHIFT
MAX_UDP_SLOT = 0xFFFF
_COMMENT = '-m comment --comment "consulate: VIP traffic to the proxy"'


class IptablesError(Exception):
    """iptables is missing, not permitted, or rejected our transaction."""


@dataclass(frozen=True)
class RedirectRules:
    """What to intercept: TCP to ``vip_cidr`` goes to ``proxy_port`` unless marked ``mark``;
    the first datagram of a UDP flow to ``vip_cidr`` goes to NFQUEUE ``udp_queue``."""

    vip_cidr: str
    proxy_port: int
    mark: int
    udp_queue: int = DEFAULT_UDP_QUEUE
    ambassador: AmbassadorRedirect | None = None
    tcp: bool = True  # False: sk_lookup steers TCP, no REDIRECT for it


@dataclass(frozen=True)
class AmbassadorRedirect:
    """Ambassador omni mode: containers' TCP to the bridge address ``bridge_ip``, on any
    port but ``keep_ports`` (the agent's own listeners there), goes to the ambassador's
    ``port``, which reads the port asked for with SO_ORIGINAL_DST (proxy/ambassador.py).
    PREROUTING only: the host's own connections to the bridge address are left alone."""

    bridge_ip: str
    port: int
    keep_ports: tuple[int, ...]

    def rule(self) -> str:
        keep = ",".join(str(p) for p in sorted(set(self.keep_ports)))
        return (f"-A {PREROUTING_CHAIN} -d {self.bridge_ip}/32 -p tcp -m multiport ! --dports "
                f"{keep} -j REDIRECT --to-ports {self.port}")


class UdpTarget(NamedTuple):
    """A UDP endpoint as the DNAT rules know it: packets marked with ``slot`` go there."""

    slot: int
    address: str
    port: int


def udp_mark(slot: int) -> int:
    """The packet mark that sends a flow's first datagram to the endpoint of ``slot``."""
    if not 1 <= slot <= MAX_UDP_SLOT:
        raise ValueError(f"UDP endpoint slot {slot} is out of range 1..{MAX_UDP_SLOT}")
    return slot << UDP_SLOT_SHIFT


def udp_chain_rules(rules: RedirectRules, targets: Iterable[UdpTarget]) -> list[str]:
    """The whole content of ``CONSULATE-UDP``: one DNAT per endpoint, then the queue."""
    lines = [f"-A {UDP_CHAIN} -p udp -m mark --mark {udp_mark(t.slot):#x}/{UDP_MARK_MASK:#x}"
             f" -j DNAT --to-destination {t.address}:{t.port}" for t in targets]
    lines.append(f"-A {UDP_CHAIN} -m mark --mark 0x0/{UDP_MARK_MASK:#x}"
                 f" -j NFQUEUE --queue-num {rules.udp_queue} --queue-bypass")
    return lines


def _jump_rules(save_text: str) -> list[str]:
    """The rules of the nat table that jump into our chains, as iptables-save prints them."""
    found = []
    table = None
    for line in save_text.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif table == "nat" and line.startswith("-A "):
            chain, _, spec = line[3:].partition(" ")
            if chain in _JUMPS and f"-j {_JUMPS[chain]}" in f"{spec} ":
                found.append(line)
    return found


def _chains(save_text: str) -> set[str]:
    chains, table = set(), None
    for line in save_text.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif table == "nat" and line.startswith(":"):
            chains.add(line[1:].split(" ", 1)[0])
    return chains


def install_script(rules: RedirectRules, save_text: str) -> str:
    """The restore transaction that makes our rules exactly ``rules``.

    Declaring a chain in ``--noflush`` mode flushes it, so re-running replaces our
    rules in place; jumps are added only where iptables-save shows none yet.
    """
    redirect = f"-d {rules.vip_cidr} -p tcp -j REDIRECT --to-ports {rules.proxy_port}"
    to_udp = f"-d {rules.vip_cidr} -p udp -j {UDP_CHAIN}"
    lines = [
        "*nat",
        f":{PREROUTING_CHAIN} - [0:0]",
        f":{OUTPUT_CHAIN} - [0:0]",
        f":{POSTROUTING_CHAIN} - [0:0]",
        f":{UDP_CHAIN} - [0:0]",
        *([f"-A {PREROUTING_CHAIN} {redirect}"] if rules.tcp else []),
        f"-A {PREROUTING_CHAIN} {to_udp}",
        *([rules.ambassador.rule()] if rules.ambassador is not None else []),
        *([f"-A {OUTPUT_CHAIN} -m mark --mark {rules.mark:#x} -j RETURN",
           f"-A {OUTPUT_CHAIN} {redirect}"] if rules.tcp else []),
        f"-A {OUTPUT_CHAIN} {to_udp}",
        f"-A {POSTROUTING_CHAIN} -p udp -m conntrack --ctstate DNAT --ctorigdst"
        f" {rules.vip_cidr} -j MASQUERADE",
        *udp_chain_rules(rules, ()),
    ]
    present = {line.split(" ", 2)[1] for line in _jump_rules(save_text)}
    for builtin, chain in _JUMPS.items():
        if builtin not in present:
            lines.append(f"-I {builtin} 1 {_COMMENT} -j {chain}")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def remove_script(save_text: str) -> str | None:
    """The restore transaction that removes every jump and chain of ours, or None."""
    lines = ["*nat"]
    lines += ["-D " + rule[3:] for rule in _jump_rules(save_text)]
    ours = sorted({*_JUMPS.values(), UDP_CHAIN} & _chains(save_text))
    lines += [f"-F {chain}" for chain in ours]  # no jump into a chain left when deleting it
    lines += [f"-X {chain}" for chain in ours]
    if len(lines) == 1:
        return None
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def install_rules(rules: RedirectRules) -> None:
    """Install (or replace) our rules in the current network namespace."""
    _restore(install_script(rules, _save()))
    log.info("event=iptables-installed vip_cidr=%s proxy_port=%d mark=%#x tcp=%s",
             rules.vip_cidr, rules.proxy_port, rules.mark,
             "redirect" if rules.tcp else "sk-lookup")


def replace_udp_targets(rules: RedirectRules, targets: Iterable[UdpTarget]) -> None:
    """Make ``CONSULATE-UDP`` route exactly ``targets`` (declaring it flushes it: one
    transaction, so no datagram ever sees a half-written chain)."""
    _restore("\n".join(["*nat", f":{UDP_CHAIN} - [0:0]", *udp_chain_rules(rules, targets),
                        "COMMIT"]) + "\n")


def remove_rules() -> bool:
    """Remove our chains and jumps; True when there was something to remove."""
    script = remove_script(_save())
    if script is None:
        return False
    _restore(script)
    log.info("event=iptables-removed chains=%s,%s,%s,%s", PREROUTING_CHAIN, OUTPUT_CHAIN,
             POSTROUTING_CHAIN, UDP_CHAIN)
    return True


def _run(argv: list[str], stdin: str | None = None) -> str:
    if shutil.which(argv[0]) is None:
        raise IptablesError(
            f"{argv[0]} not found: install iptables (apt-get install iptables) "
            "or run the agent with --no-iptables"
        )
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        err = done.stderr.strip()
        if "Permission denied" in err or "Operation not permitted" in err:
            raise IptablesError(
                f"{argv[0]} was refused ({err}): the agent needs CAP_NET_ADMIN, run it as root"
            )
        raise IptablesError(f"{' '.join(argv)} failed with exit {done.returncode}: {err}")
    return done.stdout


def _save() -> str:
    return _run(["iptables-save", "-t", "nat"])


def _restore(script: str) -> None:
    _run(["iptables-restore", "--noflush"], stdin=script)
