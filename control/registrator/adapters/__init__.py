"""Registry adapters, chosen by the registry URI's scheme (registrator's backends).

Each adapter module is imported only when its scheme is used, so that running
against Consul never loads gRPC (etcd) or kazoo (ZooKeeper). The Consul-API
schemes speak https with registrator's ``consul-tls://`` or Consul's
CONSUL_HTTP_SSL=true, and take the rest of Consul's TLS variables
(:mod:`consul_tls`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from consulate.control.registrator.adapters.base import Adapter, AdapterError

if TYPE_CHECKING:
    from consulate.control.registrator.adapters.consul_tls import HttpsSettings


class RegistryUriError(ValueError):
    """The registry URI names no adapter, or one that cannot use it (usage: exit 2)."""


@dataclass(frozen=True)
class RegistryUri:
    scheme: str
    host: str
    port: int
    path: str


def _https(where: RegistryUri) -> HttpsSettings | None:
    """https for ``consul-tls://`` or with CONSUL_HTTP_SSL=true (Consul's variables)."""
    from consulate.control.registrator.adapters.consul_tls import https_from_environment

    return https_from_environment(where.scheme.endswith("-tls"), os.environ)


def _consulate(uri: str, hostname: str, where: RegistryUri) -> Adapter:
    from consulate.control.registrator.adapters.consul import ConsulateAdapter

    return ConsulateAdapter(uri, hostname, where.host, where.port, _https(where))


def _consul(uri: str, hostname: str, where: RegistryUri) -> Adapter:
    from consulate.control.registrator.adapters.consul import ConsulAdapter

    return ConsulAdapter(uri, hostname, where.host, where.port, _https(where))


def _consulkv(uri: str, hostname: str, where: RegistryUri) -> Adapter:
    from consulate.control.registrator.adapters.consulkv import ConsulKvAdapter

    return ConsulKvAdapter(uri, hostname, where.host, where.port, where.path, _https(where))


def _etcd(uri: str, hostname: str, where: RegistryUri) -> Adapter:
    from consulate.control.registrator.adapters.etcd import EtcdAdapter

    return EtcdAdapter(uri, hostname, where.host, where.port, where.path)


def _skydns2(uri: str, hostname: str, where: RegistryUri) -> Adapter:
    if not where.path.strip("/"):
        raise RegistryUriError(f"skydns2 needs a DNS domain as the URI's path, as in "
                               f"skydns2://127.0.0.1:2379/cluster.local; got {uri}")
    from consulate.control.registrator.adapters.etcd import Skydns2Adapter

    return Skydns2Adapter(uri, hostname, where.host, where.port, where.path)


def _zookeeper(uri: str, hostname: str, where: RegistryUri) -> Adapter:
    from consulate.control.registrator.adapters.zookeeper import ZookeeperAdapter

    return ZookeeperAdapter(uri, hostname, where.host, where.port, where.path)


# scheme -> (default port, factory); the default host is 127.0.0.1, as registrator's.
_SCHEMES: dict[str, tuple[int, Callable[[str, str, RegistryUri], Adapter]]] = {
    "consulate": (8500, _consulate),
    "consul": (8500, _consul),
    "consul-tls": (8500, _consul),  # registrator's name for Consul over https
    "consulkv": (8500, _consulkv),
    "etcd": (2379, _etcd),
    "skydns2": (2379, _skydns2),
    "zookeeper": (2181, _zookeeper),
}
SCHEMES = tuple(_SCHEMES)


def parse_registry_uri(uri: str) -> RegistryUri:
    """``<scheme>://[host[:port]][/path]``, with the scheme's default address."""
    parts = urlsplit(uri)
    if parts.scheme not in _SCHEMES:
        raise RegistryUriError(f"unrecognized adapter: {uri}")
    default_port = _SCHEMES[parts.scheme][0]
    try:
        port = parts.port or default_port
    except ValueError:
        raise RegistryUriError(f"bad adapter uri: {uri}: the port must be a number "
                               "from 1 to 65535") from None
    return RegistryUri(parts.scheme, parts.hostname or "127.0.0.1", port, parts.path)


def open_adapter(uri: str, hostname: str) -> Adapter:
    """The adapter for ``uri``; ``hostname`` is the one this host's service IDs carry."""
    where = parse_registry_uri(uri)
    return _SCHEMES[where.scheme][1](uri, hostname, where)


__all__ = ["SCHEMES", "Adapter", "AdapterError", "RegistryUriError", "open_adapter",
           "parse_registry_uri"]
