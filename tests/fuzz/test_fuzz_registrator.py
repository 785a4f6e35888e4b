"""Fuzzing of registrator's input: a container's inspect data, with ``SERVICE_*``
keys as Docker labels and as environment variables, its exposed ports and their
bindings, under every combination of the flags that shape services.

The contract: derivation never raises, and each service it yields becomes a
registration body that the agent either accepts or refuses with a message
(InvalidDefinition, a 400), never an exception.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from fuzzing import FUZZ, corpus, digit_text
from hypothesis import given
from hypothesis import strategies as st

from consulate.control.registrator.checks import consul_registration
from consulate.control.registrator.derive import DeriveOptions, derive
from consulate.control.service_definition import InvalidDefinition, parse_registration

pytestmark = pytest.mark.fuzz

ATTRIBUTES = ["NAME", "ID", "TAGS", "IGNORE", "CHECK_HTTP", "CHECK_HTTPS", "CHECK_CMD",
              "CHECK_SCRIPT", "CHECK_TTL", "CHECK_TCP", "CHECK_INTERVAL", "CHECK_TIMEOUT",
              "CHECK_DEREGISTER_AFTER", "CHECK_INITIAL_STATUS", "REGION", "VERSION"]
ports = st.sampled_from(["80", "443", "53", "8080"]) | digit_text | st.text(max_size=5)
keys = st.tuples(st.just("SERVICE_"), st.sampled_from(["", "80_", "53_"])
                 | ports.map(lambda p: p + "_"),
                 st.sampled_from(ATTRIBUTES) | st.text(max_size=8)).map("".join) \
    | st.text(max_size=12)
label_values = st.sampled_from(["web", "/health", "5s", "1h30m", "true", "a,b\\,c", "passing",
                                "critical", "10.0.0.9/24", "", "0"]) \
    | digit_text | st.text(max_size=20)
bindings = st.none() | st.lists(st.fixed_dictionaries(
    {}, optional={"HostIp": st.sampled_from(["0.0.0.0", "127.0.0.1", "", "::"])
                  | st.text(max_size=8),
                  "HostPort": st.sampled_from(["8080", "", "0"]) | digit_text
                  | st.text(max_size=6)}), max_size=2)
port_keys = st.tuples(ports, st.sampled_from(["/tcp", "/udp", "", "/sctp", "/"])).map("".join)


@st.composite
def containers(draw: st.DrawFn) -> dict[str, Any]:
    labels = draw(st.dictionaries(keys, label_values, max_size=6))
    env = draw(st.lists(st.tuples(keys, st.sampled_from(["=", ""]), label_values).map(
        "".join), max_size=5))
    exposed: dict[str, dict[str, Any]] = draw(st.dictionaries(port_keys, st.just({}),
                                                               max_size=3))
    published = draw(st.dictionaries(st.sampled_from(sorted(exposed) or ["80/tcp"])
                                     | port_keys, bindings, max_size=3))
    return {"Id": draw(st.text(min_size=1, max_size=16)), "Name": "/" + draw(st.text(max_size=8)),
            "Config": {"Image": draw(st.sampled_from(["web:1", "a/b/c:2", "/", ""])
                                     | st.text(max_size=10)),
                       "Hostname": "h", "ExposedPorts": exposed, "Env": env, "Labels": labels},
            "NetworkSettings": {"IPAddress": draw(st.sampled_from(["172.17.0.2", ""])),
                                "Ports": published}}


options = st.builds(DeriveOptions, hostname=st.just("host1"),
                    host_ip=st.sampled_from(["", "192.0.2.10"]),
                    ip=st.sampled_from(["", "192.0.2.20"]), internal=st.booleans(),
                    explicit=st.booleans(),
                    use_ip_from_label=st.sampled_from(["", "com.example.ip", "SERVICE_NAME"]),
                    tags=st.sampled_from(["", "x,y", "a\\,b"]), ttl=st.sampled_from([0, 30]))


@FUZZ
@given(st.sampled_from(corpus("containers")) | containers(), options)
def test_containers(container: dict[str, Any], flags: DeriveOptions) -> None:
    before = copy.deepcopy(container)
    derivation = derive(container, flags)
    for service in derivation.services:
        try:
            instance = parse_registration(consul_registration(service), node="host1",
                                          default_address="192.0.2.10")
        except InvalidDefinition as exc:
            assert str(exc)
        else:
            assert (instance.id, instance.name) == (service.id, service.name)
    assert container == before
