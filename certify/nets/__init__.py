"""Architectures by name, the Normalize layer and parameter counting."""

from certify.nets import architectures as _architectures  # noqa: F401  (registers the zoo)
from certify.nets.layers import Normalize
from certify.nets.registry import (
    arch_kwargs_of,
    arch_name,
    count_parameters,
    create_arch,
    list_archs,
    parse_arch,
    register_arch,
)

__all__ = [
    "Normalize",
    "arch_kwargs_of",
    "arch_name",
    "count_parameters",
    "create_arch",
    "list_archs",
    "parse_arch",
    "register_arch",
]
