"""The local route that keeps VIP traffic on this host.

``ip route add local <vip-cidr> dev lo`` makes every VIP a local address: traffic
to a VIP is delivered here (redirected to the proxy, or refused at once when the
rules are missing) and never leaves by a default route.
"""

from __future__ import annotations

import subprocess


class LocalRouteError(Exception):
    """The route could not be changed (missing iproute2 or CAP_NET_ADMIN)."""


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise LocalRouteError("`ip` not found: install iproute2") from exc


def add(cidr: str) -> None:
    done = _ip("route", "replace", "local", cidr, "dev", "lo", "table", "local")
    if done.returncode != 0:
        raise LocalRouteError(
            f"ip route replace local {cidr} dev lo failed: {done.stderr.strip()} "
            "(the agent needs CAP_NET_ADMIN: run it as root)"
        )


def remove(cidr: str) -> bool:
    """Remove the route; True when it was there."""
    done = _ip("route", "del", "local", cidr, "dev", "lo", "table", "local")
    return done.returncode == 0
