"""Store URIs, as the command line gives them, checked and opened.

    file://PATH                              a JSON file (relative or absolute path)
    consulate://HOST:PORT/PREFIX             a consulate agent's KV, key PREFIX/config
    consul://HOST:PORT/PREFIX                a Consul agent's KV, the same way
    etcd://HOST:PORT[,HOST:PORT...]/PREFIX   etcd v3, key /PREFIX/config
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from urllib.parse import urlsplit

from consulate.control.configurator.stores import FileStore, Store

USAGE = ("file://PATH, consulate://HOST:PORT/PREFIX, consul://HOST:PORT/PREFIX or "
         "etcd://HOST:PORT[,HOST:PORT...]/PREFIX")


class BadStoreUri(ValueError):
    """The store URI cannot be used; the message says which part and how to fix it."""


def _endpoints(text: str, netloc: str, several: bool) -> list[tuple[str, int]]:
    members = netloc.split(",")
    if len(members) > 1 and not several:
        raise BadStoreUri(f"store {text!r}: one HOST:PORT only (for example 127.0.0.1:8500)")
    found = []
    for member in members:
        host, sep, port = member.rpartition(":")
        if not sep or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
            raise BadStoreUri(f"store {text!r}: {member!r} is not HOST:PORT")
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise BadStoreUri(f"store {text!r}: {host!r} is not an IPv4 address") from None
        found.append((host, int(port)))
    return found


def open_store(text: str) -> Store:
    if text.startswith("file://"):
        path = Path(text.removeprefix("file://"))
        if "\x00" in text:
            raise BadStoreUri(f"store {text!r}: a file name cannot hold a NUL character")
        if not text.removeprefix("file://") or path.is_dir():
            raise BadStoreUri(f"store {text!r}: name a JSON file, such as file://nginx.json")
        if not path.absolute().parent.is_dir():
            raise BadStoreUri(f"store {text!r}: the directory {str(path.absolute().parent)!r} "
                              "does not exist: create it first")
        return FileStore(path)
    try:
        parts = urlsplit(text)
    except ValueError as exc:  # an unclosed [ of an IPv6 address
        raise BadStoreUri(f"store {text!r}: {exc}; use {USAGE}") from None
    prefix = parts.path.strip("/")
    if parts.scheme not in ("consulate", "consul", "etcd") or not parts.netloc:
        raise BadStoreUri(f"store {text!r} is unknown: use {USAGE}")
    if not prefix:
        raise BadStoreUri(f"store {text!r}: add a key prefix, such as "
                          f"{parts.scheme}://{parts.netloc}/nginx")
    if parts.scheme == "etcd":
        from consulate.control.configurator.store_etcd import EtcdStore

        return EtcdStore(_endpoints(text, parts.netloc, True), prefix)
    from consulate.control.configurator.store_consul import ConsulKVStore

    (host, port), = _endpoints(text, parts.netloc, False)
    return ConsulKVStore(parts.scheme, host, port, prefix)
