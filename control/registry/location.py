"""Where the registry lives, as ``--registry`` names it, and opening it there.

``embedded`` (the default) keeps it in this agent's data directory;
``etcd://HOST:PORT[,HOST:PORT...][/PREFIX]`` puts it on an etcd v3 cluster, the
way to share one registry between the agents of many hosts;
``consul://HOST:PORT`` uses a Consul agent's catalog and KV, for sites that run
Consul already; ``http://HOST:PORT`` the same API of another consulate agent and
its embedded registry (``consulate agent --join HOST:PORT``), ``https://HOST:PORT``
that API over TLS (``--join https://HOST:PORT``, with ``--ca-file`` and
``--client-cert/--client-key``).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from consulate.control.registry.embedded import EmbeddedRegistry

if TYPE_CHECKING:
    from consulate.control.registry.consul_agent import ConsulRegistry
    from consulate.control.registry.etcd import EtcdRegistry

USAGE = ("embedded, etcd://HOST:PORT[,HOST:PORT...][/PREFIX], consul://HOST:PORT, "
         "http://HOST:PORT or https://HOST:PORT (another agent)")


class BadLocation(ValueError):
    """``--registry`` names no registry this agent can use; the message says why."""


@dataclass(frozen=True)
class RegistryLocation:
    kind: str  # "embedded" | "etcd" | "consul"
    endpoints: tuple[tuple[str, int], ...] = ()
    prefix: str = ""
    https: bool = False  # a Consul-style agent reached over TLS


def parse_location(text: str) -> RegistryLocation:
    """``--registry``'s value, checked part by part."""
    if text == "embedded":
        return RegistryLocation("embedded")
    try:
        parts = urlsplit(text)
    except ValueError as exc:  # an unclosed [ of an IPv6 address
        raise BadLocation(f"--registry {text!r}: {exc}; use {USAGE}") from None
    if parts.scheme not in ("etcd", "consul", "http", "https") or not parts.netloc:
        raise BadLocation(f"--registry {text!r}: use {USAGE}")
    if parts.scheme in ("consul", "http", "https") and ("," in parts.netloc
                                                       or parts.path.strip("/")):
        raise BadLocation(f"--registry {text!r}: a Consul agent is one HOST:PORT, "
                          "with no path (for example consul://127.0.0.1:8500)")
    endpoints = []
    for member in parts.netloc.split(","):
        host, sep, port = member.rpartition(":")
        if not sep or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
            raise BadLocation(f"--registry {text!r}: {member!r} is not HOST:PORT "
                              "(for example 127.0.0.1:2379)")
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise BadLocation(f"--registry {text!r}: {host!r} is not an IPv4 address") from None
        endpoints.append((host, int(port)))
    if parts.scheme in ("consul", "http", "https"):  # an agent of either: Consul's API
        return RegistryLocation("consul", tuple(endpoints), https=parts.scheme == "https")
    prefix = parts.path.rstrip("/") or "/consulate"
    return RegistryLocation("etcd", tuple(endpoints), prefix)


def open_registry(location: RegistryLocation, data_dir: Path, *, token: str = "",
                  tls_files: tuple[str, str, str] = ("", "", "")
                  ) -> EmbeddedRegistry | EtcdRegistry | ConsulRegistry:
    """The backend at ``location``; remote clients are imported only when asked for.
    ``token`` goes with every call to a Consul-style agent (its writes need it);
    ``tls_files`` (CA, client certificate, its key) are for one reached by https."""
    if location.kind == "embedded":
        return EmbeddedRegistry(data_dir / "registry.db")
    if location.kind == "consul":
        from consulate.control.registry.consul_agent import ConsulRegistry

        ca_file, client_cert, client_key = tls_files
        return ConsulRegistry(*location.endpoints[0], token=token, https=location.https,
                              ca_file=ca_file, client_cert=client_cert, client_key=client_key)
    from consulate.control.registry.etcd import EtcdRegistry

    return EtcdRegistry(location.endpoints, location.prefix)
