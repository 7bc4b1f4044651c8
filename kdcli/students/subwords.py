"""A subword tokenizer for text students: the teacher's ``tokenizer.json`` (``--tokenizer``).

The tokenizer is read with the ``tokenizers`` library from JSON only (a file that is a
pickle is refused, and no code from a checkpoint is run), and stored whole in the student's
:class:`~kdcli.preprocessing.Preprocessing` (``tokenizer``: its JSON text, its SHA-256 and
its size), so a model file tokenizes exactly as training did.

Inside kdcli a subword student takes one tensor, as the word students do: token id + 1
per position, 0 for padding, ``[B, L]`` (L at most ``raw_shape[0]``, the ``--max-words``
that texts are truncated at, special tokens included). The exported ONNX graph takes the
tokenizer's own ``input_ids`` and ``attention_mask`` (int64 ``[batch, tokens]``) through
:class:`TokenInputs`, with the tokenizer written beside it (:func:`export_json`: padding
and truncation set, so that ``Tokenizer.from_file`` gives the graph's inputs directly).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from kdcli.errors import FormatError, UnsafePickleError, UsageError, quote_name
from kdcli.io.files import inside_folder, require_file
from kdcli.preprocessing import Preprocessing

if TYPE_CHECKING:
    from tokenizers import Tokenizer

#: The file a subword student's tokenizer is read from in a folder, and written beside its
#: ONNX export.
TOKENIZER_FILE = "tokenizer.json"
#: Padding tokens looked for (in this order) when the exported tokenizer pads.
_PAD_TOKENS = ("[PAD]", "<pad>", "<|pad|>", "<PAD>", "[pad]")


def tokenizer_class() -> Any:
    """The ``tokenizers`` library's ``Tokenizer``, imported when a subword student needs it
    (kdcli's other commands run without the library).

    Raises:
        UsageError: the library is not installed.
    """
    try:
        from tokenizers import Tokenizer
    except ImportError as e:
        raise UsageError("a subword student's tokenizer needs the tokenizers library",
                         'pip install tokenizers (it comes with pip install "kdcli[hf]")') \
            from e
    return Tokenizer

def sha256_text(text: str) -> str:
    """The SHA-256 of ``text``'s UTF-8 bytes, in hex."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tokenizer_path(given: str | Path) -> tuple[Path, Path | None]:
    """The ``tokenizer.json`` that ``--tokenizer`` names, and the Hugging Face folder it is
    in when a folder was given (None for a file).

    Raises:
        UsageError: the path does not exist, or a folder without ``tokenizer.json``.
    """
    p = Path(given)
    if p.is_dir():
        if not (p / TOKENIZER_FILE).is_file():
            raise UsageError(f"{quote_name(p)} has no {TOKENIZER_FILE}",
                             "Give a Hugging Face folder saved with save_pretrained, or the "
                             "path of a tokenizer.json")
        return p / TOKENIZER_FILE, p
    return require_file(p, "tokenizer"), None


def read_json(path: str | Path) -> str:
    """The text of a ``tokenizer.json``, checked to be a tokenizer the ``tokenizers``
    library reads; never unpickled.

    Raises:
        UnsafePickleError: the file is a pickle.
        FormatError: not a JSON tokenizer.
    """
    from kdcli.teachers.hf_files import is_pickle

    p = require_file(path, "tokenizer")
    if is_pickle(p):
        raise UnsafePickleError(f"the tokenizer {quote_name(p)} is a pickle, not a "
                                "tokenizer.json; kdcli never unpickles tokenizer files (it "
                                "could run code)", "Save the tokenizer again with "
                                "save_pretrained (tokenizer.json)")
    try:
        text = p.read_text(encoding="utf-8")
        if not isinstance(json.loads(text), dict):
            raise ValueError("not a JSON object")
        tokenizer_class().from_str(text)
    except (OSError, UnicodeDecodeError, ValueError, Exception) as e:  # noqa: BLE001
        raise FormatError(f"{quote_name(p)} is not a tokenizer.json the tokenizers library "
                          f"reads ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})",
                          "Give the tokenizer.json of a Hugging Face fast tokenizer") from None
    return text


def record(text: str) -> dict[str, Any]:
    """The preprocessing's ``tokenizer`` field for the tokenizer JSON ``text``."""
    tok = tokenizer_class().from_str(text)
    return {"json": text, "sha256": sha256_text(text),
            "size": tok.get_vocab_size(with_added_tokens=True)}


def summary(field: dict[str, Any]) -> dict[str, Any]:
    """The ``tokenizer`` field as records show it: its hash and size, not its JSON."""
    return {"sha256": field["sha256"], "size": field["size"]}


def check_record(field: Any) -> None:
    """Check a model file's ``tokenizer`` field: its JSON has the SHA-256 it records and
    is a tokenizer.

    Raises:
        ValueError: saying what is wrong.
    """
    if not (isinstance(field, dict) and isinstance(field.get("json"), str)
            and isinstance(field.get("sha256"), str) and type(field.get("size")) is int):
        raise ValueError("tokenizer record without json, sha256 and size")
    if sha256_text(field["json"]) != field["sha256"]:
        raise ValueError("the tokenizer's JSON does not have the SHA-256 it records")
    if tokenizer_class().from_str(field["json"]).get_vocab_size(with_added_tokens=True) != \
            field["size"]:
        raise ValueError("the tokenizer's size is not the one it records")


def load(pre: Preprocessing, max_len: int | None = None) -> Tokenizer:
    """The tokenizer of ``pre``, truncating at ``max_len`` (default ``raw_shape[0]``) and not
    padding."""
    tok = tokenizer_class().from_str(pre.tokenizer["json"])
    tok.no_padding()
    tok.enable_truncation(max_len or pre.raw_shape[0])
    return tok


def encode(tok: Tokenizer, strings: list[str], max_len: int) -> tuple[torch.Tensor, int]:
    """Token ids + 1, right-padded with 0, ``[N, L]`` int64 (L: the longest, at most
    ``max_len``), and how many texts were cut at ``max_len`` tokens."""
    full = tok.encode_batch(list(strings))
    cut = sum(bool(e.overflowing) for e in full)
    width = max([len(e.ids) for e in full] + [1])
    out = torch.zeros(len(full), min(width, max_len), dtype=torch.int64)
    for i, e in enumerate(full):
        ids = e.ids[:max_len]
        if ids:
            out[i, :len(ids)] = torch.tensor(ids, dtype=torch.int64) + 1
    return out, cut


def export_json(pre: Preprocessing) -> str:
    """The tokenizer as written beside an ONNX export: truncating at ``raw_shape[0]`` and
    padding to the longest text, so it gives the graph's ``input_ids`` and
    ``attention_mask`` as they are."""
    tok = load(pre)
    pad = next((t for t in _PAD_TOKENS if tok.token_to_id(t) is not None), None)
    pad_id = tok.token_to_id(pad) if pad is not None else 0
    tok.enable_padding(pad_id=pad_id, pad_token=pad or (tok.id_to_token(0) or "[PAD]"))
    return tok.to_str()


def graph_inputs(tok: str | Tokenizer, strings: list[str]) -> dict[str, np.ndarray]:
    """What an exported graph gets for ``strings`` by the tokenizer ``tok`` (or its JSON)."""
    tok = tokenizer_class().from_str(tok) if isinstance(tok, str) else tok
    enc = tok.encode_batch(list(strings))
    return {"input_ids": np.array([e.ids for e in enc], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64)}


def read_beside(onnx_path: str | Path, meta: dict[str, str]) -> str:
    """The tokenizer written beside the ONNX file ``onnx_path`` (its metadata ``meta``),
    checked against the SHA-256 the graph records. The metadata's ``tokenizer_file`` must
    be a plain file name in the model's folder: a path, ``..`` or a link that leads out of
    the folder is refused before anything there is looked at.

    Raises:
        FormatError: no tokenizer beside it, a name that leads out of the folder, or one
            with another hash (a pickle too).
    """
    name = meta.get("tokenizer_file", TOKENIZER_FILE)
    where = Path(onnx_path).parent
    real = inside_folder(where, name) if _plain_name(name) else None
    if real is None or real.parent != Path(os.path.realpath(where)):
        raise FormatError(f"{quote_name(onnx_path)} names its tokenizer {name[:100]!r}, "
                          "which is not a file name in its folder",
                          f"Put the {TOKENIZER_FILE} written by kdcli export beside the "
                          "model, and export it again")
    p = Path(onnx_path).with_name(name)
    if not p.is_file():
        raise FormatError(f"{quote_name(onnx_path)} takes token ids, but no "
                          f"{p.name} is beside it", f"Put the {p.name} written by kdcli "
                          "export beside the .onnx")
    text = read_json(p)
    if sha256_text(text) != meta.get("tokenizer_sha256"):
        raise FormatError(f"{quote_name(p)} is not the tokenizer {quote_name(onnx_path)} "
                          "was exported with (its SHA-256 differs from the graph's "
                          "tokenizer_sha256)", "Export the model again, or put its own "
                          "tokenizer.json beside it")
    return text


def _plain_name(name: Any) -> bool:
    """Whether ``name`` is one file name: no folder, no ``..``, nothing odd."""
    return isinstance(name, str) and name not in ("", ".", "..") and \
        not any(c in name for c in "/\\\0:")


class TokenInputs(nn.Module):
    """A subword student as its ONNX graph takes it: ``input_ids`` and ``attention_mask``
    (int64 ``[B, L]``, the tokenizer's) -> the student's logits of ``(ids + 1) * mask``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model((input_ids + 1) * (attention_mask != 0).to(input_ids.dtype))
