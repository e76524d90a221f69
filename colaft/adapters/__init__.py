"""Adapters: a string-keyed registry (colaft.adapters.base) and one file per built-in type.

Adding an adapter type means one new file that calls `register_adapter`; a user can register
any nn.Module class the same way.
"""
from colaft.adapters import linear, lowrank, mlp
from colaft.adapters.base import (
                                  ADAPTERS,
                                  AdapterFactory,
                                  Mergeable,
                                  SiteSpec,
                                  build_adapter,
                                  is_mergeable,
                                  register_adapter,
                                  unsupported,
)

BUILT_IN = (linear, lowrank, mlp)  # imported for their registration
__all__ = ["ADAPTERS", "AdapterFactory", "BUILT_IN", "Mergeable", "SiteSpec", "build_adapter", "is_mergeable",
           "register_adapter", "unsupported"]
