"""The etcd channel's target (control/etcd_client.py); the channel's liveness
settings are tested against a real etcd that hangs in test_registry_conformance.py."""

from __future__ import annotations

import pytest

from consulate.control.etcd_client import channel_target


def test_one_member_is_dialled_as_it_is() -> None:
    assert channel_target([("10.0.0.1", 2379)]) == ("10.0.0.1", 2379)


def test_several_members_are_one_ipv4_address_list_ending_in_the_last() -> None:
    """aetcd dials f"{host}:{port}": the list ends with the last member's port."""
    host, port = channel_target([("10.0.0.1", 2379), ("10.0.0.2", 2380), ("10.0.0.3", 2381)])
    assert f"{host}:{port}" == "ipv4:10.0.0.1:2379,10.0.0.2:2380,10.0.0.3:2381"


def test_no_member_is_refused() -> None:
    with pytest.raises(ValueError, match="etcd needs at least one HOST:PORT endpoint"):
        channel_target([])
