"""Bare state dicts as teachers, with ``--arch``: plain safetensors files (the
``safetensors-state-dict`` entry) and, through :mod:`kdcli.teachers.pickled`, ``torch.save``
dicts. Both are recorded as ``state_dict``.

``--arch`` is a kdcli spec (``mlp:W,W``, ``cnn:MULT``), whose weights load by key or else
module by module in order, or ``package.module:factory`` (the user's code, checked by
:func:`kdcli.teachers.safety.check_factory`), whose weights load by key.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from kdcli.errors import FormatError, ModelError, UsageError, first_line
from kdcli.io.storage import read_safetensors_metadata
from kdcli.preprocessing import Preprocessing
from kdcli.students import FAMILIES, family_config
from kdcli.students.base import Architecture, build_model
from kdcli.teachers.base import (
    InputSpec,
    LoadRequest,
    Teacher,
    TeacherFormat,
    names_from_json,
    torch_runner,
)
from kdcli.teachers.safety import check_factory

#: The format name a state dict's teacher is recorded with.
STATE_DICT = "state_dict"


def _metadata(p: Path) -> dict[str, str] | None:
    return None if p.is_dir() else read_safetensors_metadata(p)


class SafetensorsStateDictFormat(TeacherFormat):
    """A safetensors file that is not a kdcli file: a state dict for ``--arch``."""

    name = "safetensors-state-dict"

    def detect(self, path: Path) -> bool:
        meta = _metadata(path)
        if meta is not None and meta.get("format") == "kdcli.transfer-set":
            raise FormatError(f"{path} is a transfer set, not a model",
                              "Give a teacher model; use the transfer set with train-student")
        return meta is not None

    def load(self, req: LoadRequest) -> Teacher:
        try:
            sd = load_file(str(req.path))
        except SafetensorError as e:
            raise FormatError(f"{req.path} is a corrupt safetensors file ({first_line(e)})",
                              "Save it again") from e
        return state_dict_teacher(self, req, sd, sorted_keys=True)

    def class_names(self, path: Path) -> list[str] | None:
        return names_from_json((_metadata(path) or {}).get("class_names"))


def state_dict_teacher(fmt: TeacherFormat, req: LoadRequest, sd: dict,
                       sorted_keys: bool = False) -> Teacher:
    """The spec of the model ``--arch`` builds, with the state dict ``sd`` loaded.

    Args:
        fmt: The entry that read the file.
        req: The load request (``req.opts.arch`` names the architecture).
        sd: The state dict.
        sorted_keys: The file sorts its keys (safetensors): modules then match in natural
            order (``layer2`` before ``layer10``).

    Raises:
        UsageError: no ``--arch``, or a factory that cannot be imported or called.
        FormatError: the state dict does not fit the architecture.
    """
    arch = req.opts.arch
    name = req.path.name
    if not arch:
        raise UsageError(f"{name} is a bare state dict with no architecture",
                         "Pass --arch mlp:WIDTH,WIDTH (kdcli's family) or "
                         "--arch package.module:factory (your own code)")
    shape = req.user_shape
    family = arch.partition(":")[0] if ":" in arch else None
    config = family_config(family) if family in FAMILIES else None
    if config is not None and getattr(config, "BARE_STATE_DICT", False):
        spec = Architecture.parse(arch)
        flat = getattr(config, "FLAT_INPUT", False)
        sample = _state_dict_input_size(sd)
        raw = list(req.user_shape) if req.user_shape else None
        if raw is None:
            raw = [sample] if flat and sample else [1, 28, 28]
        module = build_model(spec, Preprocessing(raw_shape=raw), _state_dict_num_classes(sd))
        _load_positional(module[1], sd, name, sorted_keys)
        if not flat:
            shape = tuple(raw)
    else:
        module = _call_factory(arch)
        try:
            module.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise FormatError(f"the state dict in {name} does not fit {arch}: "
                              f"{first_line(e)}", "Check --arch") from e
    runner, module = torch_runner(module, req.device, req.precision)
    return req.teacher(fmt, runner, format=STATE_DICT, module=module,
                       inputs=(InputSpec(shape=shape),), meta={"architecture": arch})


def _state_dict_input_size(sd: dict) -> int | None:
    first = next((v for k, v in sd.items() if k.endswith("weight") and v.dim() == 2), None)
    return int(first.shape[1]) if first is not None else None


def _state_dict_num_classes(sd: dict) -> int:
    weights = [v for k, v in sd.items() if k.endswith("weight") and v.dim() == 2]
    if not weights:
        raise FormatError("the state dict has no Linear weights", "Check --arch")
    return int(weights[-1].shape[0])


def _groups(d: dict, natural: bool) -> list[tuple[str, dict]]:
    """A state dict's parameters grouped by module (the key prefix), in the dict's order or
    in natural order."""
    out: dict[str, dict] = {}
    for k, v in d.items():
        if k.endswith("num_batches_tracked"):
            continue
        prefix, _, leaf = k.rpartition(".")
        out.setdefault(prefix, {})[leaf] = v
    items = list(out.items())
    if natural:
        items.sort(key=lambda kv: [int(s) if s.isdigit() else s
                                   for s in re.split(r"(\d+)", kv[0])])
    return items


def _load_positional(net: nn.Module, sd: dict, name: str, sorted_keys: bool = False) -> None:
    """Load ``sd`` into ``net`` by key, or else module by module in order.

    Modules are the key prefixes (``fc1`` of ``fc1.weight``). They keep the file's order,
    or natural order (``layer2`` before ``layer10``) for formats that sort keys
    (safetensors). Within a module, parameters match by name; every shape must agree.
    """
    try:
        net.load_state_dict(sd, strict=True)
        return
    except RuntimeError:
        pass
    own, theirs = _groups(net.state_dict(), False), _groups(sd, sorted_keys)
    shape = lambda gs: [{k: tuple(v.shape) for k, v in g.items()} for _, g in gs]  # noqa: E731
    if shape(own) != shape(theirs):
        raise FormatError(
            f"the state dict in {name} does not fit the architecture: it has "
            f"{_shapes(theirs)}, the architecture needs {_shapes(own)}",
            "Pass the --arch the teacher was built with")
    mapped = {f"{po}.{leaf}": g2[leaf] for (po, g1), (_, g2) in zip(own, theirs, strict=True)
              for leaf in g1}
    net.load_state_dict(mapped, strict=True)


def _shapes(groups: list[tuple[str, dict]]) -> str:
    text = ", ".join(f"{p or '.'}:{[list(v.shape) for v in g.values()]}" for p, g in groups)
    return text if len(text) < 160 else text[:157] + "..."


def _call_factory(spec: str) -> nn.Module:
    modname, _, attr = spec.partition(":")
    if not modname or not attr:
        raise UsageError(f"bad --arch {spec!r}",
                         "Use mlp:W,W / cnn:MULT, or package.module:factory")
    if "" not in sys.path:
        sys.path.insert(0, "")  # like `python -m`, user code in the working folder is found
    check_factory(spec, modname, attr)
    try:
        factory = getattr(importlib.import_module(modname), attr)
    except (ImportError, AttributeError) as e:
        raise UsageError(f"cannot import {spec} ({e})",
                         "Check the module is on PYTHONPATH and the factory name") from e
    check_factory(spec, modname, attr, factory)
    module = _run_factory(spec, factory)
    if not isinstance(module, nn.Module):
        raise ModelError(f"{spec}() returned {type(module).__name__}", "Return an nn.Module")
    return module


def _run_factory(spec: str, factory: object) -> object:
    """Call ``factory()``; one line if it needs arguments or raises."""
    try:
        inspect.signature(factory).bind()
    except TypeError as e:
        raise UsageError(f"--arch {spec} cannot be called without arguments ({e})",
                         "Give a factory whose arguments all have defaults") from None
    except ValueError:  # no signature to inspect (a builtin): let the call decide
        pass
    try:
        return factory()
    except Exception as e:  # noqa: BLE001 - the user's code raises anything
        raise ModelError(f"--arch {spec}: calling it raised {type(e).__name__}: "
                         f"{first_line(e, 150)!r}",
                         "Fix the factory; it must build the model with no arguments") from e


FORMAT = SafetensorsStateDictFormat()
