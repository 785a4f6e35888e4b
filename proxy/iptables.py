"""iptables rules that send TCP for the VIP range to the proxy.

The agent owns two nat chains and one jump into each from the built-in chains.
Planning is pure (iptables-save text in, iptables-restore text out, tested
without a kernel); applying is one ``iptables-restore --noflush`` transaction, so
the rules appear or change all at once and other tools' rules are left alone.

Ordering matters in OUTPUT: our own upstream connections carry ``mark`` and
RETURN first, so the proxy never redirects itself even if an endpoint's address
falls inside the VIP range.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from dataclasses import dataclass

log = logging.getLogger("consulate.iptables")

PREROUTING_CHAIN = "CONSULATE-PREROUTING"
OUTPUT_CHAIN = "CONSULATE-OUTPUT"
_JUMPS = {"PREROUTING": PREROUTING_CHAIN, "OUTPUT": OUTPUT_CHAIN}
_COMMENT = '-m comment --comment "consulate: VIP traffic to the proxy"'


class IptablesError(Exception):
    """iptables is missing, not permitted, or rejected our transaction."""


@dataclass(frozen=True)
class RedirectRules:
    """What to intercept: TCP to ``vip_cidr`` goes to ``proxy_port`` unless marked ``mark``."""

    vip_cidr: str
    proxy_port: int
    mark: int


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
    lines = [
        "*nat",
        f":{PREROUTING_CHAIN} - [0:0]",
        f":{OUTPUT_CHAIN} - [0:0]",
        f"-A {PREROUTING_CHAIN} {redirect}",
        f"-A {OUTPUT_CHAIN} -m mark --mark {rules.mark:#x} -j RETURN",
        f"-A {OUTPUT_CHAIN} {redirect}",
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
    for chain in sorted(set(_JUMPS.values()) & _chains(save_text)):
        lines += [f"-F {chain}", f"-X {chain}"]
    if len(lines) == 1:
        return None
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def install_rules(rules: RedirectRules) -> None:
    """Install (or replace) our rules in the current network namespace."""
    _restore(install_script(rules, _save()))
    log.info("event=iptables-installed vip_cidr=%s proxy_port=%d mark=%#x",
             rules.vip_cidr, rules.proxy_port, rules.mark)


def remove_rules() -> bool:
    """Remove our chains and jumps; True when there was something to remove."""
    script = remove_script(_save())
    if script is None:
        return False
    _restore(script)
    log.info("event=iptables-removed chains=%s,%s", PREROUTING_CHAIN, OUTPUT_CHAIN)
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
