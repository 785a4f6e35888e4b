"""Stable virtual IPs: one address per service name, kept across restarts.

The first choice for a name is a hash of it inside the VIP range, so agents on
different hosts agree on a service's VIP without talking to each other; only a
hash collision (rare in 2^28 addresses) makes the choice depend on arrival order.
Every assignment is persisted so a restarted agent hands out the same VIPs.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
from pathlib import Path


class VipRangeExhausted(Exception):
    """Every usable address of the VIP range is taken."""


class VipAllocator:
    """Maps service names to addresses of one IPv4 range, persistently."""

    def __init__(self, cidr: str, state_file: Path | None = None) -> None:
        self.network = ipaddress.IPv4Network(cidr)
        if self.network.num_addresses < 4:
            raise ValueError(f"VIP range {cidr} is too small: use a /30 or larger")
        self._state_file = state_file
        self._by_name: dict[str, ipaddress.IPv4Address] = {}
        self._by_address: dict[ipaddress.IPv4Address, str] = {}
        if state_file is not None and state_file.exists():
            for name, address in json.loads(state_file.read_text()).items():
                vip = ipaddress.IPv4Address(address)
                if vip in self.network:  # a changed --vip-cidr drops the old ones
                    self._assign(name, vip)

    def vip_for(self, name: str) -> ipaddress.IPv4Address:
        """The name's VIP, assigning (and persisting) one on first use."""
        found = self._by_name.get(name)
        if found is not None:
            return found
        usable = self.network.num_addresses - 2  # neither network nor broadcast
        start = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") % usable
        base = int(self.network.network_address) + 1
        for probe in range(usable):
            candidate = ipaddress.IPv4Address(base + (start + probe) % usable)
            if candidate not in self._by_address:
                self._assign(name, candidate)
                self._persist()
                return candidate
        raise VipRangeExhausted(f"no free address left in VIP range {self.network}")

    def name_for(self, address: ipaddress.IPv4Address) -> str | None:
        return self._by_address.get(address)

    def __contains__(self, address: ipaddress.IPv4Address) -> bool:
        return address in self.network

    def _assign(self, name: str, vip: ipaddress.IPv4Address) -> None:
        self._by_name[name] = vip
        self._by_address[vip] = name

    def _persist(self) -> None:
        if self._state_file is None:
            return
        self._state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({n: str(a) for n, a in sorted(self._by_name.items())}))
        os.replace(tmp, self._state_file)
