"""--registry values: what each one opens, and the message for each bad one."""

from __future__ import annotations

import pytest

from consulate.control.registry.location import BadLocation, RegistryLocation, parse_location


@pytest.mark.parametrize(("text", "expected"), [
    ("embedded", RegistryLocation("embedded")),
    ("etcd://127.0.0.1:2379", RegistryLocation("etcd", (("127.0.0.1", 2379),), "/consulate")),
    ("etcd://10.99.0.10:2379,10.99.0.11:2379/mesh/",
     RegistryLocation("etcd", (("10.99.0.10", 2379), ("10.99.0.11", 2379)), "/mesh")),
    ("consul://127.0.0.1:8500", RegistryLocation("consul", (("127.0.0.1", 8500),))),
    ("http://10.99.0.1:8500", RegistryLocation("consul", (("10.99.0.1", 8500),))),  # --join
])
def test_good_locations(text: str, expected: RegistryLocation) -> None:
    assert parse_location(text) == expected


@pytest.mark.parametrize(("text", "message"), [
    ("zookeeper://127.0.0.1:2181", "use embedded, etcd://HOST:PORT"),
    ("etcd://", "use embedded, etcd://HOST:PORT"),
    ("consul://127.0.0.1:8500,127.0.0.2:8500", "a Consul agent is one HOST:PORT"),
    ("consul://127.0.0.1:8500/x", "a Consul agent is one HOST:PORT"),
    ("http://127.0.0.1:8500,127.0.0.2:8500", "a Consul agent is one HOST:PORT"),
    ("etcd://127.0.0.1", "'127.0.0.1' is not HOST:PORT"),
    ("etcd://127.0.0.1:0", "'127.0.0.1:0' is not HOST:PORT"),
    ("etcd://etcd.local:2379", "'etcd.local' is not an IPv4 address"),
])
def test_bad_locations_say_what_to_write(text: str, message: str) -> None:
    with pytest.raises(BadLocation, match=message):
        parse_location(text)


# -- found by make fuzz -----------------------------------------------------------------


@pytest.mark.parametrize(("text", "message"), [
    ("consul://[", "--registry 'consul://[': Invalid IPv6 URL; use embedded, etcd://HOST:PORT"
     "[,HOST:PORT...][/PREFIX], consul://HOST:PORT, http://HOST:PORT or https://HOST:PORT "
     "(another agent)"),
    ("etcd://127.0.0.1:²", "--registry 'etcd://127.0.0.1:²': '127.0.0.1:²' is not HOST:PORT "
     "(for example 127.0.0.1:2379)"),
])
def test_locations_that_crashed_are_refused(text: str, message: str) -> None:
    with pytest.raises(BadLocation) as caught:
        parse_location(text)
    assert str(caught.value) == message
