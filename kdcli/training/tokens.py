"""Training on texts with the teacher's subword tokenizer (``--tokenizer``).

:func:`resolve` finds the ``tokenizer.json`` that ``--tokenizer`` names (``teacher``: the
transfer set's Hugging Face teacher, by the name the set records); :func:`fit_tokens` reads
it into the student's preprocessing and encodes every text once (token ids + 1, 0 =
padding, see :mod:`kdcli.students.subwords`); :func:`init_student` starts a transformer's
token embeddings from the teacher's when ``--tokenizer`` named its folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdcli.config import WordsConfig
from kdcli.errors import UsageError, quote_name
from kdcli.output import Reporter
from kdcli.preprocessing import Preprocessing
from kdcli.students import subwords


def resolve(given: str, ts: Any = None) -> tuple[Path, Path | None]:
    """The ``tokenizer.json`` and the Hugging Face folder (None for a file) that
    ``--tokenizer`` names; ``teacher`` is the first Hugging Face teacher of the transfer set
    ``ts``, found by its recorded name beside the set or in the current folder (a set
    records teachers by name only) and checked against the digest the set records.

    Raises:
        UsageError: ``teacher`` without a transfer set or without a Hugging Face teacher
            found, a folder of its name that is not the teacher, or a path that is not a
            tokenizer.
    """
    if given != "teacher":
        return subwords.tokenizer_path(given)
    if ts is None:
        raise UsageError("--tokenizer teacher needs a transfer set, and kdcli train has none",
                         "Give the teacher's folder or tokenizer.json: --tokenizer PATH")
    records = [t for t in ts.meta.get("teachers") or []
               if str(t.get("format", "")).startswith("huggingface")]
    if not records:
        raise UsageError(f"{quote_name(ts.path)} has no Hugging Face teacher, whose "
                         "tokenizer --tokenizer teacher means", "Give a tokenizer.json: "
                         "--tokenizer PATH")
    name = str(records[0].get("file"))
    for where in (Path(ts.path).parent / name, Path(name)):
        if (where / subwords.TOKENIZER_FILE).is_file():
            _check_teacher_folder(where, records[0], ts.path)
            return subwords.tokenizer_path(where)
    raise UsageError(f"the transfer set records its teacher by name only "
                     f"({quote_name(name)}), and no such folder is beside it or here",
                     "Give its path: "
                     f"--tokenizer path/to/{name}")


def _check_teacher_folder(folder: Path, record: dict[str, Any], set_path: Path) -> None:
    """Refuse a folder found by the teacher's name that is not the teacher the set records:
    its digest (SHA-256 over its config, weights and tokenizer files, as
    :meth:`~kdcli.teachers.base.TeacherFormat.digest` computes it when the set is written)
    differs from the one the set's ``teachers`` metadata records. A record without one
    is not checked.

    Raises:
        UsageError: another folder of the same name, naming both digests and the fix.
    """
    from kdcli.errors import DataError, FormatError
    from kdcli.teachers.formats import find_format

    recorded = record.get("sha256")
    if not recorded:
        return
    try:
        found = find_format(folder).digest(folder)
        what = f"hash to SHA-256 {found[:12]}..."
    except (DataError, FormatError):
        found, what = None, "are no checkpoint"
    if found != recorded:
        raise UsageError(f"{quote_name(folder)} is not the teacher {quote_name(set_path)} "
                         f"was made from: its config, weights and tokenizer files {what}, "
                         f"and the set's teachers record {recorded[:12]}... for "
                         f"{quote_name(str(record.get('file')))}",
                         "Give the teacher's folder or tokenizer.json: --tokenizer PATH")


def fit_tokens(strings: list[str], words: WordsConfig, rep: Reporter, ts: Any = None,
               ) -> tuple[torch.Tensor, Preprocessing]:
    """Read the tokenizer ``words.tokenizer`` names and encode ``strings`` with it.

    Returns:
        Token ids + 1 ``[N, L]`` (int64, 0 = padding) and the student's preprocessing
        (``raw_shape`` ``[max_words]``, the tokenizer in ``tokenizer``).
    """
    path, _ = resolve(words.tokenizer, ts)
    field = subwords.record(subwords.read_json(path))
    pre = Preprocessing(raw_shape=[words.max_words], units="token ids", tokenizer=field)
    ids = encode(strings, pre, rep, "the training texts")
    rep.info(f"tokenizer: {path} ({field['size']:,} tokens, sha256 "
             f"{field['sha256'][:12]}...)")
    return ids, pre


def encode(strings: list[str], pre: Preprocessing, rep: Reporter | None = None,
           what: str = "the texts") -> torch.Tensor:
    """Token ids + 1 ``[N, L]`` of ``strings`` by the tokenizer of ``pre``, cut after
    ``pre.raw_shape[0]`` tokens (how many texts were cut is said on ``rep``)."""
    ids, cut = subwords.encode(subwords.load(pre), strings, pre.raw_shape[0])
    if rep is not None and cut:
        rep.info(f"{cut:,} of {len(strings):,} of {what} have more than "
                 f"{pre.raw_shape[0]} tokens and were cut (--max-words)")
    return ids


def init_student(model: nn.Module, pre: Preprocessing, words: WordsConfig | None,
                 rep: Reporter, ts: Any = None) -> None:
    """Start a transformer student's token embeddings from its teacher's input embeddings
    (:func:`kdcli.students.transformer.init_from_teacher`) when ``--tokenizer`` named a
    Hugging Face folder with weights whose tokenizer.json is the student's."""
    from kdcli.students.transformer import TransformerClassifier, init_from_teacher

    net = model[-1] if isinstance(model, nn.Sequential) else model
    if pre.tokenizer is None or not words or not words.tokenizer or \
            not isinstance(net, TransformerClassifier):
        return
    path, folder = resolve(words.tokenizer, ts)
    if folder is None or not (folder / "config.json").is_file():
        return
    if subwords.sha256_text(subwords.read_json(path)) != pre.tokenizer["sha256"]:
        return  # not the same tokenizer: its rows are other tokens
    rep.info(f"starting from {init_from_teacher(net, folder)}")
