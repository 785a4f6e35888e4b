"""A node: one agent's host as the scheduler sees it, and how a host describes itself.

Attribute names follow Nomad's fingerprints (``kernel.name``, ``unique.hostname``,
``driver.docker``...), addressed in constraints as ``${attr.kernel.name}``;
``meta`` holds the node's labels (``${meta.rack}``). A node travels through the
registry as an instance of the service ``consulate-node`` whose meta carries the
node as JSON: liveness (its TTL and heartbeats) comes with the registry.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field

NODE_SERVICE = "consulate-node"
DEFAULT_PORT_RANGE = (20000, 32000)  # Nomad's dynamic port range


@dataclass(frozen=True)
class Node:
    """``cpu`` in MHz and ``memory`` in MB, as Nomad counts them."""

    name: str
    cpu: int
    memory: int
    address: str = ""
    datacenter: str = "dc1"
    attributes: Mapping[str, str] = field(default_factory=dict)
    meta: Mapping[str, str] = field(default_factory=dict)
    drivers: tuple[str, ...] = ("docker", "exec")
    reserved_ports: frozenset[int] = frozenset()

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "cpu": self.cpu, "memory": self.memory,
                "address": self.address, "datacenter": self.datacenter,
                "attributes": dict(self.attributes), "meta": dict(self.meta),
                "drivers": list(self.drivers), "reserved_ports": sorted(self.reserved_ports)}

    @staticmethod
    def from_json(data: Mapping[str, object]) -> Node:
        """The node another agent published; raises ValueError when it is malformed."""
        try:
            attributes, meta = data["attributes"], data["meta"]
            drivers, ports = data["drivers"], data["reserved_ports"]
            assert isinstance(attributes, dict) and isinstance(meta, dict)
            assert isinstance(drivers, list) and isinstance(ports, list)
            return Node(name=str(data["name"]), cpu=int(str(data["cpu"])),
                        memory=int(str(data["memory"])), address=str(data["address"]),
                        datacenter=str(data["datacenter"]),
                        attributes={str(k): str(v) for k, v in attributes.items()},
                        meta={str(k): str(v) for k, v in meta.items()},
                        drivers=tuple(str(d) for d in drivers),
                        reserved_ports=frozenset(int(p) for p in ports))
        except (KeyError, AssertionError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed node description: {exc!r}") from None

    def to_meta(self) -> dict[str, str]:
        """The registry instance meta that carries this node."""
        return {"node": json.dumps(self.to_json(), sort_keys=True)}

    @staticmethod
    def from_meta(meta: Mapping[str, str]) -> Node:
        try:
            return Node.from_json(json.loads(meta["node"]))
        except (KeyError, json.JSONDecodeError):
            raise ValueError("instance meta has no node description (key 'node')") from None


def fingerprint(name: str, address: str, *, datacenter: str = "dc1",
                meta: Mapping[str, str] | None = None, docker: bool = False,
                reserved_ports: frozenset[int] = frozenset()) -> Node:
    """This host as a node: CPU (1,000 MHz per core, a stable unit), memory from
    /proc/meminfo, kernel and OS from uname, the drivers that can run here, and the
    ports the agent itself listens on (no job may take them)."""
    uname = platform.uname()
    drivers = ("docker", "exec") if docker else ("exec",)
    attributes = {"kernel.name": uname.system.lower(), "kernel.version": uname.release,
                  "os.name": _os_name(), "cpu.arch": uname.machine,
                  "cpu.numcores": str(os.cpu_count() or 1),
                  "unique.hostname": socket.gethostname(),
                  "unique.network.ip-address": address}
    attributes.update({f"driver.{d}": "1" for d in drivers})
    if shutil.which("nsenter"):
        attributes["driver.exec.nsenter"] = "1"
    return Node(name=name, cpu=1000 * (os.cpu_count() or 1), memory=_memory_mb(),
                address=address, datacenter=datacenter, attributes=attributes,
                meta=dict(meta or {}), drivers=drivers, reserved_ports=reserved_ports)


def _memory_mb() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 0


def _os_name() -> str:
    try:
        with open("/etc/os-release") as release:
            for line in release:
                if line.startswith("ID="):
                    return line.removeprefix("ID=").strip().strip('"')
    except OSError:
        pass
    return platform.system().lower()
