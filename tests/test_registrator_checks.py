"""SERVICE_CHECK_* as Consul checks (registrator's backends.md), and the facade taking them."""

from __future__ import annotations

import pytest

from consulate.control.registrator.checks import (
    consul_check,
    consul_meta,
    consul_registration,
)
from consulate.control.registrator.model import Origin, Service
from consulate.control.service_definition import parse_registration

ORIGIN = Origin(container_id="c0ffee0123456789", container_name="web.0",
                container_hostname="c0ffee012345", exposed_port="80", port_type="tcp")


def service(**attrs: str) -> Service:
    return Service(id="h:web.0:80", name="web", ip="10.0.0.5", port=8080, origin=ORIGIN,
                   tags=("a",), attrs=attrs)


def test_http_check_with_default_interval() -> None:
    assert consul_check(service(check_http="/health")) == {
        "HTTP": "http://10.0.0.5:8080/health", "Interval": "10s"}


def test_http_check_interval_and_timeout() -> None:
    check = consul_check(service(check_http="/h", check_interval="15s", check_timeout="1s"))
    assert check == {"HTTP": "http://10.0.0.5:8080/h", "Interval": "15s", "Timeout": "1s"}


def test_https_check() -> None:
    assert consul_check(service(check_https="/h"))["HTTP"] == "https://10.0.0.5:8080/h"  # type: ignore[index]


def test_tcp_check() -> None:
    assert consul_check(service(check_tcp="true", check_timeout="3s")) == {
        "TCP": "10.0.0.5:8080", "Interval": "10s", "Timeout": "3s"}


def test_ttl_check_has_no_interval() -> None:
    assert consul_check(service(check_ttl="30s")) == {"TTL": "30s"}


def test_script_check_is_interpolated() -> None:
    check = consul_check(service(check_script="nc $SERVICE_IP $SERVICE_PORT | grep OK"))
    assert check == {"Args": ["sh", "-c", "nc 10.0.0.5 8080 | grep OK"], "Interval": "10s"}


def test_cmd_check_runs_check_cmd_in_the_container() -> None:
    check = consul_check(service(check_cmd="/bin/health"))
    assert check == {"Args": ["sh", "-c", "check-cmd c0ffee012345 80 /bin/health"],
                     "Interval": "10s"}


def test_deregister_after_and_initial_status_apply_to_any_check() -> None:
    check = consul_check(service(check_ttl="30s", check_deregister_after="90m",
                                 check_initial_status="passing"))
    assert check == {"TTL": "30s", "DeregisterCriticalServiceAfter": "90m",
                     "Status": "passing"}


def test_http_wins_over_the_other_kinds() -> None:
    check = consul_check(service(check_ttl="30s", check_tcp="true", check_http="/h"))
    assert check is not None and set(check) == {"HTTP", "Interval"}


def test_no_check_attribute_no_check() -> None:
    assert consul_check(service(region="us2", check_interval="5s")) is None


def test_meta_holds_the_other_attributes_and_leaves_out_what_consul_refuses() -> None:
    meta, refused = consul_meta(service(region="us2", check_http="/h", **{"odd.key": "x"}))
    assert meta == {"region": "us2"}
    assert refused == ["odd.key"]


def test_registration_body() -> None:
    assert consul_registration(service(check_ttl="30s", region="us2")) == {
        "ID": "h:web.0:80", "Name": "web", "Port": 8080, "Address": "10.0.0.5", "Tags": ["a"],
        "Meta": {"region": "us2"}, "Check": {"TTL": "30s"}}


@pytest.mark.parametrize("attrs", [
    {"check_http": "/h", "check_timeout": "1s", "check_deregister_after": "1m"},
    {"check_tcp": "true"}, {"check_script": "true"}, {"check_ttl": "30s"}, {},
])
def test_the_consulate_facade_accepts_every_mapped_check(attrs: dict[str, str]) -> None:
    instance = parse_registration(consul_registration(service(**attrs)), node="n1",
                                  default_address="127.0.0.1")
    assert (instance.id, instance.port) == ("h:web.0:80", 8080)
    kinds = {"check_http": "http", "check_tcp": "tcp", "check_script": "script",
             "check_ttl": "ttl"}
    assert [c.kind for c in instance.checks] == [kinds[k] for k in attrs if k in kinds]
    assert instance.ttl is None  # health, not liveness: the agent runs these checks
