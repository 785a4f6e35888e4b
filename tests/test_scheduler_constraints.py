"""Each attribute operator against nodes that meet it and nodes that do not."""

from __future__ import annotations

import pytest

from consulate.control.scheduler.constraints import parse_constraint, parse_version
from consulate.control.scheduler.nodes import Node

NODE = Node("h1", 4000, 8192, datacenter="east",
            attributes={"kernel.name": "linux", "kernel.version": "6.1.0-13-amd64",
                        "cpu.numcores": "8", "os.name": "debian", "tags": "ssd,gpu, fast"},
            meta={"rack": "r2", "zone": "b"})


@pytest.mark.parametrize(("attribute", "operator", "value", "expected"), [
    ("${attr.kernel.name}", "=", "linux", True),
    ("${attr.kernel.name}", "=", "windows", False),
    ("${attr.kernel.name}", "==", "linux", True),
    ("${attr.kernel.name}", "!=", "windows", True),
    ("${attr.kernel.name}", "!=", "linux", False),
    ("${attr.missing}", "!=", "linux", True),  # as Nomad: a missing attribute differs
    ("${attr.missing}", "=", "linux", False),
    ("${attr.cpu.numcores}", "<", "10", True),  # numbers compare as numbers: 8 < 10
    ("${attr.cpu.numcores}", "<", "8", False),
    ("${attr.cpu.numcores}", "<=", "8", True),
    ("${attr.cpu.numcores}", ">", "8", False),
    ("${attr.cpu.numcores}", ">", "7.5", True),
    ("${attr.cpu.numcores}", ">=", "8", True),
    ("${attr.os.name}", "<", "fedora", True),  # strings compare as strings
    ("${attr.os.name}", ">=", "fedora", False),
    ("${attr.missing}", ">=", "1", False),
    ("${attr.kernel.version}", "regexp", r"^6\.\d+", True),
    ("${attr.kernel.version}", "regexp", "^5", False),
    ("${attr.missing}", "regexp", ".*", False),
    ("${attr.tags}", "set_contains", "gpu,ssd", True),
    ("${attr.tags}", "set_contains", "gpu,nvme", False),
    ("${attr.tags}", "set_contains", "fast", True),
    ("${attr.tags}", "set_contains_any", "nvme,gpu", True),
    ("${attr.tags}", "set_contains_any", "nvme,hdd", False),
    ("${attr.kernel.version}", "version", ">= 5.4, < 7", True),
    ("${attr.kernel.version}", "version", ">= 6.2", False),
    ("${attr.kernel.version}", "version", "~> 6.0", True),
    ("${attr.kernel.version}", "version", "~> 6.0.5", False),  # 6.0.x from 6.0.5 only
    ("${attr.kernel.version}", "version", "= 6.1", True),
    ("${attr.kernel.version}", "version", "!= 6.1.0", False),
    ("${attr.kernel.version}", "semver", "> 6", True),
    ("${attr.kernel.name}", "version", ">= 1", False),  # not a version
    ("${attr.kernel.name}", "is_set", "", True),
    ("${attr.missing}", "is_set", "", False),
    ("${attr.missing}", "is_not_set", "", True),
    ("${meta.rack}", "=", "r2", True),
    ("${node.unique.name}", "=", "h1", True),
    ("${node.unique.id}", "regexp", "^h", True),
    ("${node.datacenter}", "=", "west", False),
])
def test_operator(attribute: str, operator: str, value: str, expected: bool) -> None:
    assert parse_constraint(attribute, operator, value).matches(NODE) is expected


def test_soft_constraints_carry_a_weight() -> None:
    soft = parse_constraint("${meta.zone}", "~=", "b")
    assert (soft.soft, soft.weight, str(soft)) == (True, 50, "${meta.zone} ~= b")
    assert parse_constraint("${meta.zone}", "~!=", "b", 80).weight == 80
    assert soft.to_json() == {"attribute": "${meta.zone}", "operator": "~=", "value": "b",
                              "weight": 50}


def test_placement_operators_are_validated_here_and_checked_by_placement() -> None:
    assert str(parse_constraint("", "distinct_hosts", "")) == "distinct_hosts true"
    assert parse_constraint("${meta.rack}", "distinct_property", "").value == "1"
    with pytest.raises(ValueError, match="distinct_hosts takes no attribute"):
        parse_constraint("${meta.rack}", "distinct_hosts", "")
    with pytest.raises(ValueError, match="operator is_set takes no value"):
        parse_constraint("${meta.rack}", "is_set", "x")
    with pytest.raises(ValueError, match="operator < needs a value"):
        parse_constraint("${meta.rack}", "<", "")


def test_miss_reasons_show_what_the_node_has() -> None:
    c = parse_constraint("${attr.kernel.name}", "=", "windows")
    assert c.miss_reason(NODE) == ("constraint ${attr.kernel.name} = windows not met: "
                                   "the node has 'linux'")
    c = parse_constraint("${meta.gpu}", "is_set", "")
    assert c.miss_reason(NODE) == ("constraint ${meta.gpu} is_set not met: the attribute is "
                                   "not set")


def test_versions() -> None:
    assert parse_version("v1.2") == (1, 2, 0)
    assert parse_version("6.1.0-13-amd64") == (6, 1, 0)
    assert parse_version("linux") is None
