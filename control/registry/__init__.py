"""The service registry: one backend interface, the embedded backend first."""

from consulate.control.registry.backend import RegistryBackend
from consulate.control.registry.embedded import EmbeddedRegistry
from consulate.control.registry.model import (
    Change,
    Instance,
    RegistryError,
    UnknownInstance,
)

__all__ = [
    "Change",
    "EmbeddedRegistry",
    "Instance",
    "RegistryBackend",
    "RegistryError",
    "UnknownInstance",
]
