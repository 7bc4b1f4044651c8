"""Training on texts: the word vocabulary a text student is built with, and texts turned into
the word ids it trains and is evaluated on.

``kdcli train`` and ``kdcli train-student`` call :func:`fit_words` on the training texts
(the transfer set's, for a student, by :func:`fit_transfer_words`; ``kdcli sweep`` fits them
once and gives them to every student of its grid) when the architecture is a text family
(``bow:64``): the vocabulary is fitted there, every text is encoded once into word ids
``[N, L]`` (L: the longest text, at most ``max_words``), and the vocabulary goes into the
student's :class:`~kdcli.preprocessing.Preprocessing`, so that the model file, the teacher
loader and the ONNX export tokenize exactly as training did.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from kdcli.config import TrainConfig, WordsConfig
from kdcli.data.base import Data
from kdcli.data.text import Texts
from kdcli.errors import UsageError
from kdcli.output import Reporter
from kdcli.preprocessing import Preprocessing


def is_text_family(arch: Any) -> bool:
    """Whether the architecture's family takes texts (``bow``)."""
    return bool(getattr(arch.config, "TEXT", False))


def check_kind(arch: Any, text: bool, source: str, fix: tuple[str, str] | None = None
               ) -> None:
    """Refuse a text family on data that is not text, and the other families on text.

    Args:
        arch: The student's architecture.
        text: Whether the data holds texts.
        source: The data, as the error names it.
        fix: The hints for a text student on other data and for another student on text
            (default: the ``--arch`` families to use).

    Raises:
        UsageError: naming the family to use instead.
    """
    other, texts = fix or ("Use mlp, cnn or resnet for images and tables",
                           "Use a text student, e.g. --arch bow:64")
    if is_text_family(arch) and not text:
        raise UsageError(f"{arch.spec()} is a text student, but {source} is not text", other)
    if text and not is_text_family(arch):
        raise UsageError(f"{source} holds texts, but {arch.spec()} does not take text", texts)


def family_defaults(cfg: TrainConfig, arch: Any, base: TrainConfig, rep: Reporter
                    ) -> TrainConfig:
    """``cfg`` with the family's own optimizer and learning rate (``TRAIN_DEFAULTS``, e.g.
    Adam at 0.005 for ``bow``) where both are still the command's defaults (``base``'s),
    said once; given ones are kept."""
    own = getattr(arch.config, "TRAIN_DEFAULTS", None)
    if not own or (cfg.optimizer, cfg.lr) != (base.optimizer, base.lr):
        return cfg
    rep.info(f"{arch.family} trains with {own['optimizer']} at lr {own['lr']:g} by default "
             "(--optimizer and --lr choose otherwise)")
    return replace(cfg, **own)


def fit_words(texts: Texts, words: WordsConfig, rep: Reporter, originals: int | None = None,
              ts: Any = None) -> tuple[torch.Tensor, Preprocessing]:
    """Fit the vocabulary on ``texts`` (on the first ``originals`` of them: a transfer set's
    texts before its augmented copies, whose masked and replaced words would otherwise make
    the vocabulary) and encode them all; with ``words.tokenizer``, read that tokenizer
    instead (see :func:`kdcli.training.tokens.fit_tokens`; ``ts``: the transfer set, for
    ``--tokenizer teacher``).

    Returns:
        Word ids ``[N, L]`` (int64, 0 = padding) and the student's preprocessing
        (``raw_shape`` ``[max_words]``, the vocabulary in ``words``).
    """
    from kdcli.students.words import WordVocab

    if texts.pairs:
        raise UsageError("the text students take one text per example, not sentence pairs",
                         "Give one --text-column")
    strings = texts.strings()
    if words.tokenizer:
        from kdcli.training.tokens import fit_tokens

        return fit_tokens(strings, words, rep, ts)
    vocab = WordVocab.fit(strings[:originals], size=words.vocab_size,
                          min_count=words.min_count)
    pre = Preprocessing(raw_shape=[words.max_words], units="word ids", words=vocab.to_json())
    ids = _encode(vocab, strings, words.max_words, rep, "the training texts")
    rep.info(f"vocabulary: {len(vocab):,} words (seen at least {words.min_count} times, "
             f"at most {words.vocab_size:,})")
    return ids, pre


def fit_transfer_words(ts: Any, words: WordsConfig, rep: Reporter
                       ) -> tuple[torch.Tensor, Preprocessing]:
    """:func:`fit_words` on the texts of the transfer set ``ts``, the vocabulary fitted on
    its rows before their augmented copies (which follow them)."""
    copies = int(ts.meta.get("copies", 0) or 0)
    return fit_words(ts.texts(slice(0, len(ts))), words, rep, len(ts) // (copies + 1), ts)


def encode(strings: list[str], pre: Preprocessing, rep: Reporter | None = None,
           what: str = "the texts") -> torch.Tensor:
    """Word ids ``[N, L]`` of ``strings`` by the vocabulary of ``pre``, cut after
    ``pre.raw_shape[0]`` words (how many texts were cut is said on ``rep``); token ids + 1
    by a subword student's tokenizer (see :func:`kdcli.training.tokens.encode`)."""
    from kdcli.students.words import WordVocab

    if pre.tokenizer is not None:
        from kdcli.training.tokens import encode as encode_tokens

        return encode_tokens(strings, pre, rep, what)

    return _encode(WordVocab.from_json(pre.words), strings, pre.raw_shape[0], rep, what)


def _encode(vocab: Any, strings: list[str], max_words: int, rep: Reporter | None,
            what: str) -> torch.Tensor:
    """``vocab.encode(strings, max_words)``, saying on ``rep`` how many texts were cut."""
    ids, counts = vocab.encode(strings, max_words, return_counts=True)
    if rep is not None:
        cut = int((counts > max_words).sum())
        if cut:
            rep.info(f"{cut:,} of {len(strings):,} of {what} have more than {max_words} "
                     "words and were cut (--max-words)")
    return ids


def init_student(model: Any, pre: Preprocessing, words: WordsConfig | None, rep: Reporter,
                 ts: Any = None) -> None:
    """A subword student's start from its teacher's embeddings, where ``--tokenizer`` named
    the teacher's folder (see :func:`kdcli.training.tokens.init_student`); else nothing."""
    if pre.tokenizer is not None:
        from kdcli.training.tokens import init_student as from_teacher

        from_teacher(model, pre, words, rep, ts)


def encoded(ds: Data | None, pre: Preprocessing) -> Data | None:
    """Text data with its texts replaced by word ids (for test errors); other data as is."""
    if ds is None or not ds.is_text:
        return ds
    return replace(ds, inputs=encode(ds.inputs.strings(), pre))
