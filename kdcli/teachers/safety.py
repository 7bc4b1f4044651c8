"""Refuse files that would run code when loaded, before any loader sees them.

What PyTorch 2.13 unpickles, and what kdcli does about it:

* ``torch.load(weights_only=True)`` (torch.save files, kdcli's checkpoints) uses torch's
  restricted unpickler, which refuses any global outside an allowlist: safe.
* ``torch.jit.load`` (TorchScript) reads ``data.pkl``, ``constants.pkl`` and ``*.debug_pkl``
  with TorchScript's own unpickler, which resolves only TorchScript types and refuses any
  other global ("Unknown type name"); the archive's code runs in the TorchScript
  interpreter, not in Python. Nothing to refuse beyond what torch refuses.
* ``torch.export.load`` (``.pt2``) is not safe. It unpickles with ``weights_only=False``
  every weight and tensor constant that ``*_weights_config.json`` /
  ``*_constants_config.json`` mark ``"use_pickle": true``; it ``pickle.loads`` constants
  named ``opaque_obj*`` and reads ``custom_obj*`` with the TorchScript pickler whatever
  the flag says; it loads sample inputs (``data/sample_inputs/*.pt``), legacy weight and
  constant files (``*.pt``) and the 2.7 format's ``serialized_*`` entries with
  ``weights_only=True`` and, if that fails, retries with ``weights_only=False``; and it
  loads AOTInductor shared libraries (``data/aotinductor/``). :func:`check_export_archive`
  refuses all of these unless ``trust_pickle``, except the ``*.pt`` payloads that torch's
  restricted unpickler accepts (those never reach the fallback).
"""

from __future__ import annotations

import importlib.util
import inspect
import io
import json
import pickle
import sys
import warnings
import zipfile
from pathlib import Path, PurePosixPath

import torch

from kdcli.errors import FormatError, UnsafePickleError, UsageError

_HINT = "If you trust its source, pass --trust-pickle (this runs code from the file)"
_NATIVE = (".so", ".dll", ".dylib", ".pyd")
# Not model code: --arch may not call into these (nor into the standard library).
_PACKAGES = {"site-packages", "dist-packages"}  # where installed libraries live
_LIBRARIES = ("torch", "numpy", "kdcli", "typer", "click", "onnx", "onnxruntime",
              "safetensors", "pytest", "_pytest", "pip", "setuptools")


def check_export_archive(path: str | Path, trust_pickle: bool = False) -> None:
    """Refuse a torch.export ``.pt2`` whose loading would unpickle or run code.

    Args:
        path: The archive.
        trust_pickle: Allow everything (the user trusts the file).

    Raises:
        UnsafePickleError: an entry would be unpickled without torch's restrictions, or
            the archive holds native code, and ``trust_pickle`` is false.
        FormatError: the archive is not a readable zip, or has duplicate entries.
    """
    if trust_pickle:
        return
    p = Path(path)
    try:
        with zipfile.ZipFile(p) as z:
            names = z.namelist()
            if len(set(names)) != len(names):
                raise FormatError(f"{p} has duplicate archive entries",
                                  "Save it again with torch.export.save")
            for name in names:
                rel = _relative(name)
                if "/aotinductor/" in f"/{name}" or rel.lower().endswith(_NATIVE):
                    raise UnsafePickleError(
                        f"{p} holds native code ({rel}) that loading it would run", _HINT)
                if rel.endswith("_weights_config.json") or \
                        rel.endswith("_constants_config.json"):
                    _check_payload_config(p, rel, z.read(name))
                elif _unpickled_with_fallback(rel):
                    _check_restricted_pickle(p, rel, z.read(name))
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise FormatError(f"{p} is a corrupt or truncated zip archive ({e})",
                          "Save it again with torch.export.save") from e


def _relative(name: str) -> str:
    """An entry's name without the archive's root folder (``model/data/...`` -> ``data/...``)."""
    parts = PurePosixPath(name).parts
    for i, part in enumerate(parts):
        if part in ("data", "models", "extra", "archive_format", "archive_version") or \
                part.startswith("serialized_"):
            return "/".join(parts[i:])
    return "/".join(parts[1:]) if len(parts) > 1 else name


def _unpickled_with_fallback(rel: str) -> bool:
    """Whether torch.export.load may unpickle this entry (after trying weights_only)."""
    base = rel.rsplit("/", 1)[-1]
    if base == "serialized_exported_program.json":
        return False
    return "/sample_inputs/" in f"/{rel}" or base.startswith("serialized_") or \
        base.endswith((".pt", ".pth", ".pkl"))


def _check_payload_config(p: Path, rel: str, data: bytes) -> None:
    from torch.export.pt2_archive import constants as pt2  # seconds to import: only here

    try:
        config = json.loads(data)["config"]
        entries = list(config.items())
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise FormatError(f"{p} has an unreadable {rel}", "Save it again with "
                          "torch.export.save") from e
    for fqn, meta in entries:
        if not isinstance(meta, dict):
            raise FormatError(f"{p} has a malformed entry {str(fqn)[:60]!r} in {rel}",
                              "Save it again with torch.export.save")
        path_name = str(meta.get("path_name", ""))
        pickled = meta.get("use_pickle") is not False
        if rel.endswith("_constants_config.json") and \
                not path_name.startswith(pt2.TENSOR_CONSTANT_FILENAME_PREFIX):
            pickled = True  # opaque / custom objects are unpickled whatever the flag says
        if pickled:
            raise UnsafePickleError(
                f"{p} stores {str(fqn)[:60]!r} as a pickle ({rel}); loading it runs code "
                "from the file", _HINT)


def _check_restricted_pickle(p: Path, rel: str, data: bytes) -> None:
    """Refuse an entry that torch's restricted unpickler rejects (torch would then retry
    without restrictions)."""
    if not data:
        return  # torch skips empty payloads
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafePickleError(
            f"{p} holds a pickled Python object in {rel}; loading it runs code from the file",
            _HINT) from e
    except Exception as e:  # noqa: BLE001 - any other failure: torch would retry unsafely
        raise UnsafePickleError(
            f"{p} holds an entry {rel} that only an unrestricted unpickler could read",
            _HINT) from e


def check_factory(spec: str, modname: str, attr: str, factory: object = None) -> None:
    """Refuse an ``--arch package.module:factory`` that is not the user's own model code.

    ``--arch`` imports the module and calls the factory with no arguments: running the
    user's code is its point. What it refuses is reaching anything else: a module of the
    standard library or a built-in one (``os:system``, ``builtins:breakpoint``), torch
    itself, any installed library (a module found in ``site-packages`` or ``dist-packages``:
    ``transformers:AutoModel``, ``PIL.Image:new``), a dotted or private attribute, and
    anything that is not a class or a function defined outside those (a re-exported
    ``os.system`` is refused too).
    The result must be an ``nn.Module`` (checked by the caller).

    Args:
        spec: The whole ``--arch`` value, for messages.
        modname: The module part.
        attr: The factory part.
        factory: The imported object (None: check the names only, before importing).

    Raises:
        UsageError: the spec or the object is refused.
    """
    top = modname.split(".")[0]
    if _library(top):
        raise UsageError(f"--arch {spec} names the library module {modname}, not model code",
                         "Give package.module:factory of your own code that returns an "
                         "nn.Module")
    if not attr.isidentifier() or attr.startswith("_") or not modname.replace(".", "_") \
            .isidentifier():
        raise UsageError(f"bad --arch {spec!r}", "Use package.module:factory, where factory "
                         "is a public class or function")
    if factory is None:
        return
    if not (inspect.isclass(factory) or inspect.isfunction(factory)):
        raise UsageError(f"--arch {spec} is a {type(factory).__name__}, not a class or "
                         "function", "Give a class or function that returns an nn.Module")
    home = getattr(factory, "__module__", "") or ""
    if not home or _library(home.split(".")[0]):
        raise UsageError(f"--arch {spec} is {home or 'an unknown module'}'s "
                         f"{getattr(factory, '__qualname__', attr)}, not model code of yours",
                         "Give a class or function of your own that returns an nn.Module")


def _library(top: str) -> bool:
    return top in sys.stdlib_module_names or top in sys.builtin_module_names or \
        top in _LIBRARIES or _installed(top)


def _installed(top: str) -> bool:
    """Whether the top-level module ``top`` is an installed library: found (without
    importing it) in a ``site-packages`` or ``dist-packages`` folder, where pip and the
    system's packages install. The user's own code (the working folder, PYTHONPATH, an
    editable install's source folder) is not there."""
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return False
    if spec is None:
        return False
    places = [spec.origin or "", *(spec.submodule_search_locations or [])]
    return any(_PACKAGES & set(Path(p).parts) for p in places if p)


def zip_names(p: Path) -> list[str]:
    """The member names of the zip archive at ``p`` ([] if it is not one).

    Raises:
        FormatError: a zip archive that is corrupt or truncated.
    """
    if p.is_dir():
        return []
    with open(p, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            return []
    try:
        return zipfile.ZipFile(p).namelist()
    except zipfile.BadZipFile as e:
        raise FormatError(f"{p} is a corrupt or truncated zip archive",
                          "Save the model again") from e
