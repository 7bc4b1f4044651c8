"""The files of a Hugging Face checkpoint folder, read and checked without transformers.

Which files a folder holds and whether they may be read: links that lead out of the folder,
FIFOs and devices, pickled weights (refused without ``--trust-pickle``), shards outside the
folder; the folder's digest; ``config.json`` and ``preprocessor_config.json`` with the fields
kdcli uses checked for their type.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import zipfile
from pathlib import Path
from typing import Any

from kdcli.errors import FormatError, UnsafePickleError, quote_name
from kdcli.io.files import inside_folder, sha256_file

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
PROCESSOR = "preprocessor_config.json"


def is_hf_folder(path: Path) -> bool:
    """Whether ``path`` is a folder holding a ``config.json`` (a checkpoint folder). A
    ``config.json`` that is a link counts without its target being looked at (loading
    then refuses one that leads out)."""
    try:
        mode = os.lstat(path / "config.json").st_mode
    except OSError:
        return False
    return path.is_dir() and (stat.S_ISREG(mode) or stat.S_ISLNK(mode))


def check_folder(folder: Path) -> None:
    """Refuse a checkpoint folder holding a link that leads out of it, or a FIFO, device or
    socket: transformers and kdcli read ``config.json``, ``preprocessor_config.json``,
    indexes, shards and other JSON files from it by name. Links are read with ``lstat``
    and ``readlink``; their targets outside are never touched.

    Raises:
        FormatError: naming the entry.
    """
    if not os.access(folder, os.R_OK | os.X_OK):
        raise FormatError(f"cannot list the checkpoint folder {quote_name(folder)}",
                          "Check the path and its permissions")
    # Every entry, subfolders included (transformers reads additional_chat_templates/*.jinja,
    # say); links are checked, never followed.
    for root, dirs, files in os.walk(folder, followlinks=False):
        for name in (*dirs, *files):
            _check_entry(folder, os.path.relpath(os.path.join(root, name), folder))


def _check_entry(folder: Path, name: str) -> None:
    """Refuse ``folder/name`` if it is a link that leads out of the folder, or a FIFO,
    device or socket."""
    path = os.path.join(folder, name)
    link = os.path.islink(path)
    if link and inside_folder(folder, name) is None:
        raise FormatError(f"{quote_name(folder)}: {quote_name(name)} is a link to "
                          f"{quote_name(os.readlink(path))}, outside the checkpoint "
                          "folder", "Copy the file into the folder (cp -L), or remove "
                          "the link")
    mode = (os.stat(path) if link and os.path.exists(path) else os.lstat(path)).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode)):
        raise FormatError(f"{quote_name(folder)}: {quote_name(name)} is not a regular "
                          "file (a FIFO, device or socket)", "Remove it from the folder")


def weight_files(folder: Path, trust_pickle: bool = False) -> list[Path]:
    """The weight files the checkpoint loads from, each checked to lie inside ``folder``.

    Raises:
        FormatError: no weights, a bad index, a link leading out of the folder, or a
            shard outside the folder.
        UnsafePickleError: pickled weights (``pytorch_model.bin``, or an index naming a
            shard that is not ``.safetensors``), and ``trust_pickle`` is off.
    """
    check_folder(folder)
    if (folder / SAFETENSORS_INDEX).is_file():
        index = folder / SAFETENSORS_INDEX
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise FormatError(f"{index} is not a safetensors index (no weight_map)",
                              "Save the checkpoint again with save_pretrained") from e
        files = [index, *(_inside(folder, s) for s in shards)]
        pickled = [s for s in shards if not str(s).endswith(".safetensors")]
        if pickled and not trust_pickle:
            raise UnsafePickleError(
                f"{SAFETENSORS_INDEX} in {quote_name(folder)} names the shard "
                f"{repr(str(pickled[0])[:100])}, not a safetensors file: it may "
                "be a pickle, and loading it can run code from the file",
                "If you trust its source, pass --trust-pickle; or save it again with "
                "save_pretrained(safe_serialization=True)")
    elif (folder / SAFETENSORS).is_file():
        files = [_inside(folder, SAFETENSORS)]
    elif any((folder / p).is_file() for p in PICKLES):
        if not trust_pickle:
            raise UnsafePickleError(
                f"{folder} has only pytorch_model.bin weights, a pickle: loading it can run "
                "code from the file",
                "If you trust its source, pass --trust-pickle; or save it again with "
                "save_pretrained(safe_serialization=True)")
        files = [_inside(folder, p) for p in PICKLES if (folder / p).is_file()]
    else:
        raise FormatError(f"{folder} has a config.json but no {SAFETENSORS} or "
                          f"{SAFETENSORS_INDEX}", "Save the model with save_pretrained")
    for f in files:
        if not f.is_file():
            raise FormatError(f"{folder}: the weight file {f.name} is missing",
                              "Copy the whole checkpoint folder")
    return files


def _inside(folder: Path, name: str) -> Path:
    """Where the weight file ``name`` leads, read without touching anything outside."""
    p = inside_folder(folder, str(name))
    if p is None or p == Path(os.path.realpath(folder)):
        raise FormatError(f"{folder} names the weight file {repr(str(name))}, "
                          "which is outside the checkpoint folder",
                          "Keep every shard inside the folder")
    return p


def folder_sha256(folder: Path, extra: tuple[str, ...] = ()) -> str:
    """SHA-256 over the names and SHA-256s of the config, processor config and weights (and
    the files named in ``extra`` that the folder holds, such as a tokenizer's)."""
    check_folder(folder)  # before any file is read (this runs before the loader)
    h = hashlib.sha256()
    names = ["config.json", PROCESSOR]
    files = [folder / n for n in names if (folder / n).is_file()]
    with contextlib.suppress(FormatError):  # the loader reports it
        files += weight_files(folder, trust_pickle=True)
    files += [folder / n for n in extra if (folder / n).is_file()]
    for f in files:
        h.update(f"{f.name}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def read_processor(folder: Path) -> dict[str, Any]:
    """The checkpoint's ``preprocessor_config.json`` ({} without one)."""
    p = folder / PROCESSOR
    if not p.is_file():
        return {}
    cfg = _json_object(p, "Save the processor again")
    _check_processor(cfg, p)
    return cfg


def _json_object(p: Path, hint: str) -> dict[str, Any]:
    """The JSON object in ``p`` (FormatError with ``hint`` if it is not one)."""
    try:
        cfg = json.loads(p.read_text())
    except ValueError as e:
        raise FormatError(f"{p} is not valid JSON ({e})", hint) from e
    if not isinstance(cfg, dict):
        raise FormatError(f"{p} is not a JSON object", hint)
    return cfg


def read_config(folder: Path) -> dict[str, Any]:
    """The checkpoint's ``config.json``, with the fields kdcli uses checked for their type.

    Raises:
        FormatError: not JSON, not an object, or a field of the wrong type.
    """
    p = folder / "config.json"
    cfg = _json_object(p, "Save the checkpoint again")
    n = cfg.get("num_labels")
    if n is not None and not _positive_int(n):
        _wrong(p, "num_labels", n, "a positive integer")
    id2label = cfg.get("id2label")
    if id2label is not None and not (isinstance(id2label, dict) and all(
            isinstance(k, str) and k.isdecimal() for k in id2label)):
        _wrong(p, "id2label", id2label, 'an object from class numbers to names ({"0": "cat"})')
    size = cfg.get("image_size")
    if size is not None and not (_positive_int(size) or _is_size(size) or (
            isinstance(size, list) and size and all(_positive_int(x) for x in size))):
        _wrong(p, "image_size", size, "a positive integer")
    return cfg


def _check_processor(proc: dict[str, Any], p: Path) -> None:
    """Refuse processor fields kdcli uses that have the wrong type (a string for a number,
    an object for a list, a size of zero)."""
    for key in ("rescale_factor",):
        if proc.get(key) is not None and not _number(proc[key]):
            _wrong(p, key, proc[key], "a number")
    for key in ("image_mean", "image_std"):
        v = proc.get(key)
        if v is not None and not (_number(v) or (isinstance(v, list) and v
                                                 and all(_number(x) for x in v))):
            _wrong(p, key, v, "a number or a list of numbers, one per channel")
    for key in ("size", "crop_size"):
        v = proc.get(key)
        if v is not None and not (_positive_int(v) or _is_size(v)):
            _wrong(p, key, v, 'a positive integer or {"height": H, "width": W}')


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _positive_int(v: Any, zero: bool = False) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= (0 if zero else 1)


def _is_size(v: Any) -> bool:
    """A size object of positive integers (``height`` and ``width``, ``shortest_edge``,
    ``longest_edge``, ...)."""
    return isinstance(v, dict) and bool(v) and all(_positive_int(x) for x in v.values()
                                                    if x is not None)


def _wrong(p: Path, key: str, value: Any, want: str) -> None:
    shown = json.dumps(value)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    raise FormatError(f"{p}: {key} must be {want}, not {shown}",
                      "Fix the field, or save the checkpoint again with save_pretrained")


#: The files a tokenizer is read from (any one will do), in the order they are named.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "merges.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.model", "spm.model", "bpe.codes")
#: The files beside them that say how the tokenizer is used (special tokens, maximum length).
TOKENIZER_SETTINGS = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
_PICKLE_SUFFIXES = (".pkl", ".pickle")


def tokenizer_files(folder: Path) -> list[str]:
    """The tokenizer files of a checkpoint folder, each checked not to be a pickle.

    transformers reads tokenizers from JSON, text and sentencepiece (protobuf) files, never
    by unpickling; a tokenizer kept only as a pickle is refused, as is a tokenizer file that
    is one (a pickle renamed ``tokenizer.json`` must not pass for a tokenizer).

    Raises:
        UnsafePickleError: a tokenizer file is a pickle, or the only tokenizer files are
            pickles (``vocab.pkl``).
        FormatError: no tokenizer file.
    """
    check_folder(folder)
    names = [n for n in (*TOKENIZER_FILES, *TOKENIZER_SETTINGS) if (folder / n).is_file()]
    for name in names:
        if is_pickle(folder / name):
            raise UnsafePickleError(
                f"{quote_name(folder)}: the tokenizer file {name} is a pickle, not a "
                "tokenizer; kdcli never unpickles tokenizer files (it could run code)",
                "Save the tokenizer again with save_pretrained (tokenizer.json)")
    if any(n in TOKENIZER_FILES for n in names):
        return names
    pickled = sorted(e.name for e in os.scandir(folder) if e.name.lower().endswith(
        _PICKLE_SUFFIXES) and e.is_file())
    if pickled:
        raise UnsafePickleError(
            f"{quote_name(folder)} holds its tokenizer only as pickled files ({pickled[0]}); "
            "kdcli never unpickles tokenizer files (it could run code)",
            "Save the tokenizer with save_pretrained (tokenizer.json) beside the model")
    raise FormatError(f"{quote_name(folder)} has no tokenizer (tokenizer.json, or vocabulary "
                      "files such as vocab.txt)", "Save the model's tokenizer beside it: "
                      "tokenizer.save_pretrained(FOLDER)")


def is_pickle(p: Path) -> bool:
    """Whether the file ``p`` is a pickle (protocol 2 or later) or a ``torch.save`` zip."""
    with open(p, "rb") as f:
        head = f.read(4)
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return True
    if head == b"PK\x03\x04":
        with contextlib.suppress(zipfile.BadZipFile, OSError):
            return any(n.endswith(".pkl") for n in zipfile.ZipFile(p).namelist())
    return False


def read_tokenizer_config(folder: Path) -> dict[str, Any]:
    """The checkpoint's ``tokenizer_config.json`` ({} without one)."""
    p = folder / "tokenizer_config.json"
    return _json_object(p, "Save the tokenizer again with save_pretrained") if p.is_file() else {}


def refuse_outside_files(folder: Path, settings: dict[str, Any]) -> None:
    """Refuse a ``tokenizer_config.json`` that names a file outside the checkpoint folder:
    any ``..._file`` or ``..._files`` value (``fast_tokenizer_files``, ``vocab_file``, ...)
    that is not a plain name of a file in the folder, which transformers would read.

    Raises:
        FormatError: naming the setting and the file.
    """
    for key, value in settings.items():
        if not (key.endswith("_file") or key.endswith("_files")) or value is None:
            continue
        for name in value if isinstance(value, list) else [value]:
            plain = isinstance(name, str) and name not in ("", ".", "..") and \
                "/" not in name and "\\" not in name
            if not plain or inside_folder(folder, name) is None:
                raise FormatError(
                    f"{quote_name(folder)}: tokenizer_config.json's {key} names "
                    f"{quote_name(str(name))}, which is not a file in the checkpoint folder",
                    "Save the tokenizer again with save_pretrained, or remove the setting")
