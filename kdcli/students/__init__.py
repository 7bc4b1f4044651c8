"""kdcli's students: model families, each a module with its own configuration.

:data:`FAMILIES` names each family's configuration class by ``module:class`` and
:func:`family_config` imports it on demand, so no family imports this table. A family's
class is a dataclass of its fields with ``USAGE`` (its spec's form), ``OTHERS`` (the
refusal of fields it does not take), ``parse(rest) -> fields``, ``spec()``, ``check()``
and ``build(raw_shape, num_classes) -> (network, input shape)``. Adding a family is a module
and an entry here, plus its tests.
"""

from __future__ import annotations

import importlib

from kdcli.errors import UsageError

FAMILIES: dict[str, str] = {
    "mlp": "kdcli.students.mlp:MlpConfig",
    "cnn": "kdcli.students.cnn:CnnConfig",
    "resnet": "kdcli.students.resnet:ResNetConfig",
}


def family_config(name: str) -> type:
    """The configuration class of family ``name``.

    Raises:
        UsageError: no such family.
    """
    entry = FAMILIES.get(name) if isinstance(name, str) else None
    if entry is None:
        raise UsageError(f"unknown model family {name!r}", f"Use {usages()}")
    module, _, attr = entry.partition(":")
    return getattr(importlib.import_module(module), attr)


def usages() -> str:
    """Every family's spec form, for hints."""
    return ", ".join(family_config(name).USAGE for name in FAMILIES)
