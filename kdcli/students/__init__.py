"""kdcli's students: model families, each a module with its own configuration.

:data:`FAMILIES` names each family's configuration class by ``module:class`` (with an
example spec for help texts) and :func:`family_config` imports it on demand, so no family
imports this table, and the command line lists the families without importing torch. A
family's
class is a dataclass of its fields with ``USAGE`` (its spec's form), ``OTHERS`` (the
refusal of fields it does not take), ``parse(rest) -> fields``, ``spec()``, ``check()``
and ``build(raw_shape, num_classes) -> (network, input shape)``; optionally ``FLAT_INPUT``
(it takes flattened examples) and ``BARE_STATE_DICT`` (a bare state dict of it loads as a
teacher with ``--arch``). Adding a family is a module
and an entry here, plus its tests.
"""

from __future__ import annotations

import importlib
from typing import NamedTuple

from kdcli.errors import UsageError


class Family(NamedTuple):
    """One entry of :data:`FAMILIES`.

    Attributes:
        config: The family's configuration class, as ``module:class``.
        example: A spec of the family, for help texts (shown without importing it).
    """

    config: str
    example: str


FAMILIES: dict[str, Family] = {
    "mlp": Family("kdcli.students.mlp:MlpConfig", "mlp:1200,1200"),
    "cnn": Family("kdcli.students.cnn:CnnConfig", "cnn:0.5"),
    "resnet": Family("kdcli.students.resnet:ResNetConfig", "resnet:20,0.5"),
    "bow": Family("kdcli.students.bow:BowConfig", "bow:64"),
    "bilstm": Family("kdcli.students.bilstm:BiLstmConfig", "bilstm:150"),
    "transformer": Family("kdcli.students.transformer:TransformerConfig", "transformer:2,128,4"),
    "kimcnn": Family("kdcli.students.kimcnn:KimCnnConfig", "kimcnn:100"),
}


def family_config(name: str) -> type:
    """The configuration class of family ``name``.

    Raises:
        UsageError: no such family.
    """
    entry = FAMILIES.get(name) if isinstance(name, str) else None
    if entry is None:
        raise UsageError(f"unknown model family {name!r}", f"Use {usages()}")
    module, _, attr = entry.config.partition(":")
    return getattr(importlib.import_module(module), attr)


def usages() -> str:
    """Every family's spec form, for hints."""
    return ", ".join(family_config(name).USAGE for name in FAMILIES)


def examples() -> str:
    """One spec of each family, for help texts: ``mlp:1200,1200, cnn:0.5 or ...``."""
    specs = [f.example for f in FAMILIES.values()]
    return ", ".join(specs[:-1]) + " or " + specs[-1] if len(specs) > 1 else specs[0]
