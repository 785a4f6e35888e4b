"""Service derivation, one test per rule of registrator's services.md and run.md.

The containers are inspect-shaped dicts, as the Docker SDK returns them for
``docker run -d --name ... -p ... -e ...``; tests against a real dockerd are in
test_registrator_docker.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from consulate.control.registrator.derive import (
    DeriveOptions,
    derive,
    image_base_name,
    service_metadata,
    split_tags,
)
from consulate.control.registrator.model import Service, is_own_id

HOST_IP = "192.168.1.102"
OPTIONS = DeriveOptions(hostname="hostname", host_ip=HOST_IP)
CID = "c0ffee0123456789" + "0" * 48


def container(name: str = "redis.0", image: str = "progrium/redis", *,
              publish: dict[str, list[tuple[str, str]]] | None = None,
              expose: list[str] | None = None, env: list[str] | None = None,
              labels: dict[str, str] | None = None, ip: str = "172.17.0.5",
              network: str = "default") -> dict[str, Any]:
    """What ``docker inspect`` says of ``docker run -d --name NAME -p ... IMAGE``.

    ``publish`` maps "6379/tcp" to its bindings; ``expose`` adds ports exposed but
    not published (dockerd lists them with no bindings); ``network="host"`` gives
    an empty port map, as dockerd does for host networking.
    """
    published = publish or {}
    exposed = [*published, *(expose or [])]
    ports: dict[str, Any] = {key: [{"HostIp": h, "HostPort": p} for h, p in binds]
                             for key, binds in published.items()}
    ports.update({key: None for key in expose or []})
    return {
        "Id": CID,
        "Name": f"/{name}",
        "State": {"Running": True, "ExitCode": 0},
        "Config": {"Hostname": CID[:12], "Image": image, "Env": env or [],
                   "Labels": labels or {}, "ExposedPorts": {k: {} for k in exposed}},
        "HostConfig": {"NetworkMode": network},
        "NetworkSettings": {
            "IPAddress": "" if network == "host" else ip,
            "Ports": {} if network == "host" else ports,
            "Networks": {} if network == "host" else {"bridge": {"IPAddress": ip}},
        },
    }


def bound(port: str) -> list[tuple[str, str]]:
    """``-p <port>:...``: dockerd's two bindings, IPv4 first."""
    return [("0.0.0.0", port), ("::", port)]


def as_docs(service: Service) -> dict[str, Any]:
    """A service as services.md prints it."""
    return {"ID": service.id, "Name": service.name, "Port": service.port, "IP": service.ip,
            "Tags": list(service.tags), "Attrs": service.attrs}


def services(c: dict[str, Any], options: DeriveOptions = OPTIONS) -> list[dict[str, Any]]:
    return [as_docs(s) for s in derive(c, options).services]


# -- services.md's examples -------------------------------------------------------


def test_single_service_with_defaults() -> None:
    c = container("redis.0", "progrium/redis", publish={"6379/tcp": bound("10000")})
    assert services(c) == [{"ID": "hostname:redis.0:6379", "Name": "redis", "Port": 10000,
                            "IP": HOST_IP, "Tags": [], "Attrs": {}}]


def test_single_service_with_metadata() -> None:
    c = container(publish={"6379/tcp": bound("10000")},
                  env=["SERVICE_NAME=db", "SERVICE_TAGS=master,backups", "SERVICE_REGION=us2"])
    assert services(c) == [{"ID": "hostname:redis.0:6379", "Name": "db", "Port": 10000,
                            "IP": HOST_IP, "Tags": ["master", "backups"],
                            "Attrs": {"region": "us2"}}]


def test_a_tag_keeps_an_escaped_comma() -> None:
    c = container(publish={"6379/tcp": bound("10000")},
                  env=["SERVICE_NAME=db", "SERVICE_TAGS=/(;\\,:-_)/", "SERVICE_REGION=us2"])
    assert services(c)[0]["Tags"] == ["/(;,:-_)/"]


def test_multiple_services_with_defaults() -> None:
    c = container("nginx.0", "progrium/nginx",
                  publish={"443/tcp": bound("4443"), "80/tcp": bound("8000")})
    assert sorted(services(c), key=lambda s: s["ID"]) == [
        {"ID": "hostname:nginx.0:443", "Name": "nginx-443", "Port": 4443, "IP": HOST_IP,
         "Tags": [], "Attrs": {}},
        {"ID": "hostname:nginx.0:80", "Name": "nginx-80", "Port": 8000, "IP": HOST_IP,
         "Tags": [], "Attrs": {}},
    ]


def test_multiple_services_with_metadata() -> None:
    c = container("nginx.0", "progrium/nginx",
                  publish={"443/tcp": bound("4443"), "80/tcp": bound("8000")},
                  env=["SERVICE_443_NAME=https", "SERVICE_443_ID=https.12345",
                       "SERVICE_443_SNI=enabled", "SERVICE_80_NAME=http", "SERVICE_TAGS=www"])
    assert sorted(services(c), key=lambda s: s["Port"]) == [
        {"ID": "https.12345", "Name": "https", "Port": 4443, "IP": HOST_IP, "Tags": ["www"],
         "Attrs": {"sni": "enabled"}},
        {"ID": "hostname:nginx.0:80", "Name": "http", "Port": 8000, "IP": HOST_IP,
         "Tags": ["www"], "Attrs": {}},
    ]


def test_labels_define_metadata() -> None:
    c = container(image="dockerfile/redis", publish={"6379/tcp": bound("10000")},
                  labels={"SERVICE_NAME": "db", "SERVICE_TAGS": "master,backups",
                          "SERVICE_REGION": "us2"})
    assert services(c) == [{"ID": "hostname:redis.0:6379", "Name": "db", "Port": 10000,
                            "IP": HOST_IP, "Tags": ["master", "backups"],
                            "Attrs": {"region": "us2"}}]


# -- ports --------------------------------------------------------------------------


def test_unpublished_ports_are_skipped_with_a_note() -> None:
    c = container(publish={"80/tcp": bound("8080")}, expose=["443/tcp"])
    derived = derive(c, OPTIONS)
    assert [s.origin.exposed_port for s in derived.services] == ["80"]
    assert derived.notes == ("ignored: c0ffee012345 port 443 not published on host",)
    assert derived.services[0].name == "redis"  # one service left: no -<port> suffix


def test_a_container_without_ports_is_ignored() -> None:
    derived = derive(container(), OPTIONS)
    assert derived == type(derived)((), ("ignored: c0ffee012345 no published ports",))


def test_internal_uses_the_container_ip_and_the_exposed_port() -> None:
    c = container(publish={"80/tcp": bound("8080")}, expose=["443/tcp"], ip="172.17.0.9")
    found = services(c, DeriveOptions(hostname="hostname", host_ip=HOST_IP, internal=True))
    assert [(s["Name"], s["IP"], s["Port"]) for s in found] == [
        ("redis-80", "172.17.0.9", 80), ("redis-443", "172.17.0.9", 443)]


def test_internal_takes_the_ip_of_a_user_network() -> None:
    c = container(expose=["80/tcp"])
    c["NetworkSettings"]["IPAddress"] = ""
    c["NetworkSettings"]["Networks"] = {"mynet": {"IPAddress": "10.5.0.7"}}
    found = services(c, DeriveOptions(hostname="hostname", internal=True))
    assert [(s["IP"], s["Port"]) for s in found] == [("10.5.0.7", 80)]


def test_host_networking_registers_exposed_ports_as_bound_to_themselves() -> None:
    c = container(expose=["8080/tcp"], network="host")
    assert [(s["IP"], s["Port"]) for s in services(c)] == [(HOST_IP, 8080)]


def test_the_first_binding_of_a_port_counts() -> None:
    c = container(publish={"80/tcp": [("0.0.0.0", "8080"), ("0.0.0.0", "9090")]})
    assert services(c)[0]["Port"] == 8080


def test_a_binding_to_one_address_keeps_that_address() -> None:
    c = container(publish={"80/tcp": [("10.0.0.7", "8080")]})
    assert services(c)[0]["IP"] == "10.0.0.7"


def test_ip_flag_overrides_every_host_address() -> None:
    c = container(publish={"80/tcp": [("10.0.0.7", "8080")], "81/tcp": bound("8181")})
    found = services(c, DeriveOptions(hostname="hostname", host_ip=HOST_IP, ip="10.9.9.9"))
    assert {s["IP"] for s in found} == {"10.9.9.9"}


def test_an_unresolvable_hostname_leaves_0_0_0_0() -> None:
    c = container(publish={"80/tcp": bound("8080")})
    assert services(c, DeriveOptions(hostname="hostname"))[0]["IP"] == "0.0.0.0"


def test_use_ip_from_label_cuts_a_prefix_length() -> None:
    c = container(publish={"80/tcp": bound("8080")}, labels={"ipam": "10.1.2.3/24"})
    derived = derive(c, DeriveOptions(hostname="h", host_ip=HOST_IP, use_ip_from_label="ipam"))
    assert derived.services[0].ip == "10.1.2.3"
    assert derived.notes == ("using container IP 10.1.2.3 from label 'ipam'",)


def test_use_ip_from_label_without_the_label_keeps_the_host_ip() -> None:
    c = container(publish={"80/tcp": bound("8080")})
    derived = derive(c, DeriveOptions(hostname="h", host_ip=HOST_IP, use_ip_from_label="ipam"))
    assert derived.services[0].ip == HOST_IP
    assert derived.notes == ("Label 'ipam' not found in container configuration",)


# -- names, ids, tags ----------------------------------------------------------------


@pytest.mark.parametrize(("image", "name"), [
    ("redis", "redis"), ("gliderlabs/foobar", "foobar"), ("progrium/nginx:1.9", "nginx"),
    ("registry.local:5000/team/app:2.0", "app"),
])
def test_default_name_is_the_image_base_without_tag(image: str, name: str) -> None:
    assert image_base_name(image) == name


def test_service_name_on_several_ports_still_gets_the_port_suffix() -> None:
    c = container(publish={"80/tcp": bound("8000"), "443/tcp": bound("4443")},
                  env=["SERVICE_NAME=web"])
    assert sorted(s["Name"] for s in services(c)) == ["web-443", "web-80"]


def test_a_port_specific_name_gets_no_suffix() -> None:
    c = container(publish={"80/tcp": bound("8000"), "443/tcp": bound("4443")},
                  env=["SERVICE_NAME=web", "SERVICE_443_NAME=tls"])
    assert sorted(s["Name"] for s in services(c)) == ["tls", "web-80"]


def test_explicit_registers_only_named_services() -> None:
    explicit = DeriveOptions(hostname="hostname", host_ip=HOST_IP, explicit=True)
    unnamed = container(publish={"80/tcp": bound("8000"), "443/tcp": bound("4443")},
                        env=["SERVICE_443_NAME=tls"])
    derived = derive(unnamed, explicit)
    assert [s.name for s in derived.services] == ["tls"]
    assert derived.notes == ("ignored: c0ffee012345 service on port 80",)


def test_udp_ports_get_the_udp_tag_and_id_suffix() -> None:
    c = container("dns.0", "coredns", publish={"53/udp": bound("53"), "53/tcp": bound("53")},
                  env=["SERVICE_TAGS=a"])
    found = {s["ID"]: s for s in services(c)}
    assert found["hostname:dns.0:53:udp"]["Tags"] == ["a", "udp"]
    assert found["hostname:dns.0:53"]["Tags"] == ["a"]


def test_forced_tags_follow_the_service_tags_and_precede_udp() -> None:
    c = container(publish={"53/udp": bound("53")}, env=["SERVICE_TAGS=own"])
    forced = DeriveOptions(hostname="hostname", host_ip=HOST_IP, tags="a,b\\,c,")
    assert services(c, forced)[0]["Tags"] == ["own", "a", "b,c", "udp"]


def test_service_id_overrides_the_generated_one_even_for_udp() -> None:
    c = container(publish={"53/udp": bound("53")}, env=["SERVICE_ID=dns-1"])
    assert services(c)[0]["ID"] == "dns-1"


def test_service_ignore_skips_the_container() -> None:
    c = container(publish={"80/tcp": bound("8000")}, labels={"SERVICE_IGNORE": "true"})
    derived = derive(c, OPTIONS)
    assert derived.services == ()
    assert derived.notes == ("ignored: c0ffee012345 service on port 80",)


def test_service_port_ignore_skips_one_port() -> None:
    c = container(publish={"80/tcp": bound("8000"), "443/tcp": bound("4443")},
                  env=["SERVICE_80_IGNORE=true"])
    assert [s["Name"] for s in services(c)] == ["redis-443"]  # still a group of two


def test_an_empty_ignore_value_ignores_nothing() -> None:
    c = container(publish={"80/tcp": bound("8000")}, env=["SERVICE_IGNORE="])
    assert len(services(c)) == 1


def test_ttl_flag_travels_with_each_service() -> None:
    c = container(publish={"80/tcp": bound("8000")})
    assert derive(c, DeriveOptions(hostname="h", ttl=30)).services[0].ttl == 30


# -- metadata -------------------------------------------------------------------------


def test_port_specific_keys_win_in_any_order() -> None:
    for env in (["SERVICE_80_REGION=eu", "SERVICE_REGION=us"],
                ["SERVICE_REGION=us", "SERVICE_80_REGION=eu"]):
        metadata, from_port = service_metadata(env, {}, "80")
        assert metadata == {"region": "eu"} and from_port == {"region"}


def test_env_wins_over_labels_and_other_ports_do_not_leak() -> None:
    metadata, _ = service_metadata(["SERVICE_NAME=from-env", "SERVICE_443_NAME=tls"],
                                   {"SERVICE_NAME": "from-label", "SERVICE_OWNER": "ops"}, "80")
    assert metadata == {"name": "from-env", "owner": "ops"}


def test_other_keys_become_lowercase_attributes() -> None:
    c = container(publish={"80/tcp": bound("8000")},
                  env=["SERVICE_NAME=web", "SERVICE_CHECK_HTTP=/health", "SERVICE_Team=Blue",
                       "OTHER=x", "SERVICE_ID=web-1", "SERVICE_TAGS=t"])
    assert derive(c, OPTIONS).services[0].attrs == {"check_http": "/health", "team": "Blue"}


@pytest.mark.parametrize(("text", "tags"), [
    ("", []), ("a", ["a"]), ("a,b", ["a", "b"]), (",a,,b,", ["a", "b"]),
    ("a\\,b,c", ["a,b", "c"]),
])
def test_split_tags(text: str, tags: list[str]) -> None:
    assert split_tags(text) == tags


@pytest.mark.parametrize(("service_id", "own"), [
    ("hostname:redis.0:6379", True), ("hostname:dns.0:53:udp", True),
    ("other:redis.0:6379", False), ("https.12345", False), ("hostname:redis.0:http", False),
])
def test_own_ids_have_registrators_shape_and_this_hostname(service_id: str, own: bool) -> None:
    assert is_own_id(service_id, "hostname") is own


def test_an_exposed_port_of_other_digits_reads_as_atoi_does() -> None:
    """Found by make fuzz: '²' passes str.isdigit() but not int() (derive raised);
    Go's Atoi, which registrator uses, reads it as 0, and so it sorts first."""
    c = container(publish={"80/tcp": bound("8080"), "²/tcp": bound("8081")})
    assert [(s["ID"], s["Port"]) for s in services(c)] == [
        ("hostname:redis.0:²", 8081), ("hostname:redis.0:80", 8080)]
