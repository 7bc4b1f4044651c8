"""``torch.save`` files as teachers (the ``torch.save`` entry): a state dict, loaded with
``weights_only=True`` and built with ``--arch`` (recorded as ``state_dict``, see
:mod:`kdcli.teachers.state_dict`), or a fully pickled ``nn.Module``, which runs code from the
file and so loads only with ``trust_pickle`` (recorded as ``pickle``).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdcli.errors import FormatError, UnsafePickleError, first_line
from kdcli.teachers.base import LoadRequest, Teacher, TeacherFormat, torch_runner
from kdcli.teachers.safety import zip_names
from kdcli.teachers.state_dict import state_dict_teacher

_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")


class TorchSaveFormat(TeacherFormat):
    """A ``torch.save`` file: zip (``data.pkl``) or legacy pickle."""

    name = "torch.save"

    def detect(self, path: Path) -> bool:
        if any(n.endswith("data.pkl") for n in zip_names(path)):
            return True
        with open(path, "rb") as f:
            return f.read(1) == b"\x80"  # a pickle protocol header: legacy torch.save

    def load(self, req: LoadRequest) -> Teacher:
        obj = _load(req.path, req.opts.trust_pickle)
        if isinstance(obj, nn.Module):
            runner, module = torch_runner(obj, req.device, req.precision)
            return req.teacher(self, runner, format="pickle", module=module)
        if isinstance(obj, dict):
            return state_dict_teacher(self, req, _unwrap_state_dict(obj, req.path))
        raise FormatError(f"{req.path} holds a {type(obj).__name__}, not a module or state dict",
                          "Save model.state_dict() and pass --arch")


def _load(p: Path, trust_pickle: bool) -> Any:
    """The object in ``p``: with ``weights_only``, or else fully unpickled if trusted.

    Raises:
        UnsafePickleError: the file holds a pickled object and ``trust_pickle`` is off.
        FormatError: the file is corrupt, or its pickle cannot be loaded.
    """
    try:
        return torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not trust_pickle:
            raise UnsafePickleError(
                f"{p} holds a pickled Python object; loading it runs code from the file",
                "If you trust its source, pass --trust-pickle; or save a state dict and "
                "pass --arch") from e
        try:
            return torch.load(str(p), map_location="cpu", weights_only=False)
        except Exception as e2:  # noqa: BLE001
            raise FormatError(f"cannot unpickle {p} ({first_line(e2)})",
                              "Make sure the module's code is importable (PYTHONPATH)") from e2
    except Exception as e:  # noqa: BLE001 - truncated zip, bad storage, ...
        raise FormatError(f"{p} is a corrupt torch.save file ({first_line(e)})",
                          "Save it again") from e


def _unwrap_state_dict(obj: dict, p: Path) -> dict:
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    for key in _STATE_DICT_KEYS:
        if isinstance(obj.get(key), dict):
            return _unwrap_state_dict(obj[key], p)
    raise FormatError(f"{p} holds a dict without a recognizable state dict",
                      f"Save model.state_dict() (or nest it under one of {_STATE_DICT_KEYS})")


FORMAT = TorchSaveFormat()
