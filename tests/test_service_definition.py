"""Consul service definitions -> registry instances (control/service_definition.py)."""

from __future__ import annotations

from typing import Any

import pytest

from consulate.control.registry.model import HealthCheck, Instance
from consulate.control.service_definition import (
    META_MAX_PAIRS,
    InvalidDefinition,
    catalog_entry,
    parse_duration,
    parse_registration,
)

NODE = "node-a"
AGENT_ADDRESS = "192.0.2.10"


def parse(body: object) -> Instance:
    return parse_registration(body, node=NODE, default_address=AGENT_ADDRESS)


def rejection(body: object) -> str:
    with pytest.raises(InvalidDefinition) as caught:
        parse(body)
    return str(caught.value)


# -- accepted bodies --------------------------------------------------------------


def test_consul_style_body_gives_every_field() -> None:
    instance = parse({
        "ID": "web-1", "Name": "web", "Address": "10.0.0.5", "Port": 8080,
        "Tags": ["v1", "primary"], "Meta": {"version": "1.2", "zone_a": "x"},
        "Check": {"TTL": "15s", "Name": "alive"},
    })
    assert instance == Instance(
        id="web-1", name="web", address="10.0.0.5", port=8080, tags=("v1", "primary"),
        meta={"version": "1.2", "zone_a": "x"}, ttl=None, node=NODE,
        checks=(HealthCheck(id="service:web-1", kind="ttl", name="alive", interval=0.0,
                            ttl=15.0, status="critical"),),
        create_index=0, modify_index=0,
    )
    assert instance.status == "critical"  # a TTL check is critical until its first pass


def test_py_consul_lowercase_body() -> None:
    # What consul.Consul().agent.service.register(..., check=Check.ttl("10s")) sends.
    instance = parse({
        "name": "db", "id": "db-2", "address": "10.0.0.7", "port": 5432,
        "tags": ["primary"], "meta": {"k": "v"}, "checks": [{"ttl": "10s"}],
        "enabletagoverride": True,
    })
    assert instance == Instance(
        id="db-2", name="db", address="10.0.0.7", port=5432, tags=("primary",),
        meta={"k": "v"}, node=NODE,
        checks=(HealthCheck(id="service:db-2", kind="ttl", name="Service 'db' check",
                            interval=0.0, ttl=10.0),),
    )


def test_snake_case_fields_are_accepted() -> None:
    instance = parse({"name": "web", "port": 80, "enable_tag_override": True,
                      "tagged_addresses": {"lan": "10.0.0.1"}})
    assert (instance.name, instance.port, instance.ttl) == ("web", 80, None)


def test_id_defaults_to_name_and_address_to_the_agents() -> None:
    instance = parse({"Name": "web", "Port": 80})
    assert instance == Instance(id="web", name="web", address=AGENT_ADDRESS, port=80,
                                tags=(), meta={}, ttl=None, node=NODE)


def test_empty_id_and_address_fall_back_to_defaults() -> None:
    instance = parse({"Name": "web", "ID": "", "Address": "", "Port": 80})
    assert (instance.id, instance.address) == ("web", AGENT_ADDRESS)


def test_check_and_checks_are_numbered_as_consul_numbers_them() -> None:
    instance = parse({
        "ID": "web-1", "Name": "web", "Port": 80,
        "Check": {"TTL": "30s", "Status": "passing"},
        "Checks": [{"HTTP": "https://10.0.0.5/health", "Interval": "500ms", "Method": "head",
                    "Header": {"X-A": ["1", "2"]}, "TLSSkipVerify": True, "Timeout": "2s"},
                   {"TCP": "10.0.0.5:80", "Interval": "5s",
                    "DeregisterCriticalServiceAfter": "1m", "CheckID": "tcp"},
                   {"ScriptArgs": ["/bin/check", "-q"], "Interval": "1m", "Notes": "n"}],
    })
    assert instance.checks == (
        HealthCheck(id="service:web-1:1", kind="ttl", name="Service 'web' check",
                    interval=0.0, ttl=30.0, status="passing"),
        HealthCheck(id="service:web-1:2", kind="http", name="Service 'web' check",
                    target="https://10.0.0.5/health", method="HEAD",
                    header=(("X-A", "1"), ("X-A", "2")), tls_skip_verify=True,
                    interval=1.0, timeout=2.0),  # raised to Consul's 1 s minimum
        HealthCheck(id="tcp", kind="tcp", name="Service 'web' check", target="10.0.0.5:80",
                    interval=5.0, deregister_after=60.0),
        HealthCheck(id="service:web-1:4", kind="script", name="Service 'web' check",
                    args=("/bin/check", "-q"), interval=60.0, notes="n"),
    )
    assert (instance.ttl, instance.status) == (None, "critical")


def test_one_check_in_checks_is_not_numbered() -> None:
    instance = parse({"Name": "web", "Port": 80,
                      "Checks": [{"HTTP": "http://10.0.0.5/health", "Interval": "10s"}]})
    assert [c.id for c in instance.checks] == ["service:web"]
    assert instance.ttl is None


def test_service_name_limits() -> None:
    assert parse({"Name": "a", "Port": 1}).name == "a"
    assert parse({"Name": "my_svc-2", "Port": 65535}).port == 65535
    assert parse({"Name": "x" * 63, "Port": 80}).name == "x" * 63


# -- parse_duration ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("10s", 10.0), ("1m30s", 90.0), ("500ms", 0.5), ("1h", 3600.0), ("1.5s", 1.5),
     ("2h1m", 7260.0), ("0s", 0.0), ("250us", 0.00025)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "10", "ten", "5x", "10s ", " 10s", "s", "1m30", "-1s"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(InvalidDefinition) as caught:
        parse_duration(text)
    assert str(caught.value) == f"duration {text!r} is not a string like '10s' or '1m30s'"


def test_parse_duration_rejects_non_strings() -> None:
    with pytest.raises(InvalidDefinition, match="is not a string like '10s'"):
        parse_duration(10)  # type: ignore[arg-type]


# -- rejections -------------------------------------------------------------------


def test_missing_name_message() -> None:
    assert rejection({"Port": 80}) == 'Missing service name: set "Name" to the service\'s name'


def test_empty_name_is_missing() -> None:
    assert rejection({"Name": "", "Port": 80}).startswith("Missing service name")


def test_port_zero_message() -> None:
    assert rejection({"Name": "web", "Port": 0}) == (
        "Port 0 is invalid: give a number from 1 to 65535"
    )


def test_unknown_field_message_lists_them() -> None:
    assert rejection({"Name": "web", "Port": 80, "Colour": "red", "Bogus": 1}) == (
        "Request decode failed: unknown field(s) Bogus, Colour; "
        "known fields are ID, Name, Tags, Address, Port, Meta, Weights, Check, Checks"
    )


@pytest.mark.parametrize("name", ["web.api", "web api", "-web", "web-", "x" * 64, "wéb"])
def test_name_unusable_in_dns(name: str) -> None:
    message = rejection({"Name": name, "Port": 80})
    assert message == (
        f"Name {name!r} cannot be used in DNS: use 1 to 63 letters, digits, '-' or '_', "
        "starting and ending with a letter or digit"
    )


def test_name_not_a_string() -> None:
    assert rejection({"Name": 5, "Port": 80}).startswith("Missing service name")


@pytest.mark.parametrize(
    ("port", "shown"),
    [(70000, "70000"), (65536, "65536"), (-1, "-1"), ("80", "'80'"), (True, "True"),
     (80.0, "80.0"), (None, "None")],
)
def test_bad_ports(port: Any, shown: str) -> None:
    assert rejection({"Name": "web", "Port": port}) == (
        f"Port {shown} is invalid: give a number from 1 to 65535"
    )


def test_missing_port() -> None:
    assert rejection({"Name": "web"}) == "Port None is invalid: give a number from 1 to 65535"


@pytest.mark.parametrize(
    ("body", "kind"), [([], "list"), ("web", "str"), (None, "NoneType"), (7, "int")]
)
def test_body_must_be_an_object(body: object, kind: str) -> None:
    assert rejection(body) == (
        'Request body must be a JSON object like {"Name": "web", "Port": 80}, '
        f"got {kind}"
    )


@pytest.mark.parametrize("address", ["web.local", "::1", "10.0.0.256", "10.0.0"])
def test_bad_address(address: str) -> None:
    assert rejection({"Name": "web", "Port": 80, "Address": address}) == (
        f"Address {address!r} is not an IPv4 address: the mesh routes to IPv4 endpoints, "
        "give the instance's IP (or leave Address out to use the agent's)"
    )


@pytest.mark.parametrize("address", [5, True, 167772165])
def test_non_string_address_is_rejected(address: object) -> None:
    # Consul rejects a JSON number for Address ("cannot unmarshal number"). Storing it
    # would put an address like '5' or 'True' into the route table.
    message = rejection({"Name": "web", "Port": 80, "Address": address})
    assert message.startswith(f"Address {address!r} ")


@pytest.mark.parametrize("instance_id", ["a/b", 5])
def test_bad_id(instance_id: object) -> None:
    assert rejection({"Name": "web", "ID": instance_id, "Port": 80}) == (
        f"ID {instance_id!r} must be a string without '/'"
    )


@pytest.mark.parametrize("tags", ["v1", ["v1", 2], {"v1": True}])
def test_tags_must_be_a_list_of_strings(tags: object) -> None:
    assert rejection({"Name": "web", "Port": 80, "Tags": tags}) == (
        f"Tags must be a list of strings, got {tags!r}"
    )


def test_meta_bad_key() -> None:
    assert rejection({"Name": "web", "Port": 80, "Meta": {"bad key": "v"}}) == (
        "Meta key 'bad key' is invalid: use up to 128 letters, digits, '-' or '_'"
    )


def test_meta_key_too_long() -> None:
    key = "k" * 129
    assert rejection({"Name": "web", "Port": 80, "Meta": {key: "v"}}).startswith(
        f"Meta key {key!r} is invalid"
    )


@pytest.mark.parametrize("value", [1, None, ["a"], "v" * 513])
def test_meta_bad_value(value: object) -> None:
    assert rejection({"Name": "web", "Port": 80, "Meta": {"k": value}}) == (
        "Meta value of 'k' must be a string of at most 512 characters"
    )


def test_meta_pair_limit_is_consuls_64() -> None:
    assert META_MAX_PAIRS == 64
    meta = {f"k{i}": "v" for i in range(64)}
    assert parse({"Name": "web", "Port": 80, "Meta": meta}).meta == meta
    meta["k64"] = "v"
    assert rejection({"Name": "web", "Port": 80, "Meta": meta}) == (
        "Meta has 65 pairs: at most 64 allowed"
    )


def test_meta_not_an_object() -> None:
    assert rejection({"Name": "web", "Port": 80, "Meta": ["a"]}) == (
        "Meta must be an object of string values, got ['a']"
    )


@pytest.mark.parametrize("ttl", ["0s", "0ms", "0h0m0s"])
def test_zero_ttl_is_rejected(ttl: str) -> None:
    assert rejection({"Name": "web", "Port": 80, "Check": {"TTL": ttl}}) == (
        f"check TTL {ttl!r} must be a duration longer than zero, like '10s'"
    )


def test_bad_ttl_duration() -> None:
    assert rejection({"Name": "web", "Port": 80, "Check": {"TTL": "10"}}) == (
        "duration '10' is not a string like '10s' or '1m30s'"
    )


def test_checks_must_be_a_list_of_objects() -> None:
    assert rejection({"Name": "web", "Port": 80, "Checks": {"TTL": "10s"}}) == (
        "Checks must be a list of check objects, got {'TTL': '10s'}"
    )
    assert rejection({"Name": "web", "Port": 80, "Checks": ["10s"]}) == (
        "a check must be an object like {\"TTL\": \"10s\"}, got '10s'"
    )


# -- weights ----------------------------------------------------------------------


def test_weights_are_consuls_passing_and_warning() -> None:
    instance = parse({"Name": "web", "Port": 80, "Weights": {"Passing": 10, "Warning": 0}})
    assert (instance.weight, instance.warning_weight) == (10, 0)
    instance = parse({"name": "web", "port": 80, "weights": {"passing": 65535}})
    assert (instance.weight, instance.warning_weight) == (65535, 1)
    assert (parse({"Name": "web", "Port": 80}).weight, parse(
        {"Name": "web", "Port": 80, "Weights": None}).weight) == (1, 1)


@pytest.mark.parametrize(("weights", "message"), [
    ([3], 'Weights must be an object like {"Passing": 10, "Warning": 1}, got [3]'),
    ({"Passing": 0}, "Weights.Passing 0 is invalid: give a whole number from 1 to 65535"),
    ({"Passing": 65536}, "Weights.Passing 65536 is invalid: give a whole number from 1 to "
     "65535"),
    ({"Passing": "5"}, "Weights.Passing '5' is invalid: give a whole number from 1 to 65535"),
    ({"Passing": True}, "Weights.Passing True is invalid: give a whole number from 1 to 65535"),
    ({"Passing": 2.5}, "Weights.Passing 2.5 is invalid: give a whole number from 1 to 65535"),
    ({"Warning": -1}, "Weights.Warning -1 is invalid: give a whole number from 0 to 65535"),
    ({"Passing": 1, "Critical": 0}, "Weights has unknown field(s) Critical: only Passing and "
     "Warning are known"),
])
def test_bad_weights(weights: object, message: str) -> None:
    assert rejection({"Name": "web", "Port": 80, "Weights": weights}) == message


# -- catalog_entry ----------------------------------------------------------------


def test_catalog_entry_has_consuls_fields() -> None:
    instance = Instance(
        id="web-1", name="web", address="10.0.0.5", port=8080, tags=("v1", "primary"),
        meta={"version": "1.2"}, ttl=10.0, node="node-a", create_index=3, modify_index=7,
    )
    assert catalog_entry(instance, node_address="192.0.2.10", datacenter="dc1") == {
        "ID": "",
        "Node": "node-a",
        "Address": "192.0.2.10",
        "Datacenter": "dc1",
        "TaggedAddresses": {"lan": "192.0.2.10", "wan": "192.0.2.10"},
        "NodeMeta": {},
        "ServiceKind": "",
        "ServiceID": "web-1",
        "ServiceName": "web",
        "ServiceTags": ["v1", "primary"],
        "ServiceAddress": "10.0.0.5",
        "ServiceWeights": {"Passing": 1, "Warning": 1},
        "ServiceMeta": {"version": "1.2"},
        "ServicePort": 8080,
        "ServiceEnableTagOverride": False,
        "CreateIndex": 3,
        "ModifyIndex": 7,
    }


def test_catalog_entry_shows_the_registered_weights() -> None:
    instance = Instance(id="a", name="a", address="10.0.0.1", port=1, weight=7,
                        warning_weight=2)
    entry = catalog_entry(instance, node_address="192.0.2.10", datacenter="dc1")
    assert entry["ServiceWeights"] == {"Passing": 7, "Warning": 2}


def test_catalog_entry_copies_meta() -> None:
    instance = Instance(id="a", name="a", address="10.0.0.1", port=1, meta={"k": "v"})
    entry = catalog_entry(instance, node_address="192.0.2.10", datacenter="dc1")
    entry["ServiceMeta"]["k"] = "changed"
    assert instance.meta == {"k": "v"}


def test_a_tcp_check_port_of_other_digits_is_refused() -> None:
    """Found by make fuzz: '²' passes str.isdigit() but not int()."""
    assert rejection({"Name": "web", "Port": 80, "Check": {"TCP": "10.0.0.5:²",
                                                           "Interval": "5s"}}) == (
        "check TCP '10.0.0.5:²' must be host:port")
