"""The tests' name for consulate.control.labetcd (a real etcd server in the lab)."""

from consulate.control.labetcd import ETCDCTL_ENV, EtcdProcess

__all__ = ["ETCDCTL_ENV", "EtcdProcess"]
