"""Word-level tokenizer of text students, the same in Python and inside an ONNX graph.

The rules, in one place (``normalise``, ``split``, and the ids of :class:`WordVocab`):

- **Normalise:** lower-case the ASCII letters ``A``-``Z``; every other character stays as
  it is (``É`` stays ``É``). This is what onnxruntime's ``StringNormalizer`` does with
  ``case_change_action="LOWER"`` and ``locale="C"``, the one locale every POSIX system has.
- **Split:** the words are the maximal runs of letters, numbers, ``_`` and ``'``: in Python
  ``[\\w']+`` (:data:`WORD_RE`: ``\\w`` is ``str.isalnum()`` or ``_``), in RE2, which the
  com.microsoft ``Tokenizer`` op runs, ``[\\p{L}\\p{N}_']+`` (:data:`TOKENEXP`). A combining
  mark is in neither, so ``"e\\u0301te"`` is two words, ``e`` and ``te``, on both sides. The
  two agree on every code point that Python's Unicode database assigns; they can differ
  only on letters assigned in a newer Unicode than Python's (RE2 may know them).
- **Ids:** 0 is padding (``<pad>``), 1 an unknown word (``<unk>``), then the words of the
  vocabulary by descending count in the texts it was fitted on, ties by the word.

Example:
    >>> vocab = WordVocab.fit(train_texts, size=20000, min_count=2)
    >>> ids = vocab.encode(["A fine film.", ""], max_len=64)    # LongTensor [2, 3]
    >>> meta = {"vocab": vocab.to_json(), "vocab_sha256": vocab.sha256()}
    >>> vocab = WordVocab.from_json(meta["vocab"])
    >>> nodes, inits, opsets = onnx_nodes(vocab, "text", "input_ids", max_len=64)
    >>> # nodes turn a string tensor "text" [N] into int64 "input_ids" [N, L], L >= 1,
    >>> # equal to vocab.encode(texts, 64); add them in front of the student's graph.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from kdcli.errors import FormatError, UsageError

PAD, UNK = "<pad>", "<unk>"
PAD_ID, UNK_ID = 0, 1
#: Python's half of the split rule.
WORD_RE = re.compile(r"[\w']+")
#: The same rule in RE2 syntax, for the com.microsoft Tokenizer op.
TOKENEXP = r"[\p{L}\p{N}_']+"
#: What the Tokenizer op pads short rows with: a control character, never in a word.
PAD_VALUE = "\x01"
#: The name of these rules in a vocabulary's JSON (a change of rules gets a new name).
RULES = "lower-ascii/words-v1"
_LOWER = str.maketrans({c: c + 32 for c in range(ord("A"), ord("Z") + 1)})


def normalise(text: str) -> str:
    """``text`` with the ASCII letters A-Z lower-cased, every other character kept."""
    return text.translate(_LOWER)


def _check_max_len(max_len: int) -> None:
    """Refuse a ``max_len`` that is not a positive integer (UsageError)."""
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
        raise UsageError(f"the maximum length must be a positive integer, got {max_len}",
                         "Try --max-words 64")


def tokenize(text: str) -> list[str]:
    """The words of ``text``: normalised, then split (see the module's rules)."""
    return WORD_RE.findall(normalise(text))


class WordVocab:
    """A word vocabulary: ``words[i]`` is the word of id ``i`` (``<pad>``, ``<unk>``, ...).

    Args:
        words: The words, ``<pad>`` and ``<unk>`` first, all distinct.
    """

    def __init__(self, words: Sequence[str]) -> None:
        self.words: list[str] = list(words)
        self._ids = {w: i for i, w in enumerate(self.words)}

    def __len__(self) -> int:
        return len(self.words)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WordVocab) and self.words == other.words

    __hash__ = None  # a list inside: mutable, compared by value

    def __repr__(self) -> str:
        return f"WordVocab({len(self)} words)"

    @classmethod
    def fit(cls, texts: Iterable[str], size: int = 20000, min_count: int = 2) -> WordVocab:
        """The vocabulary of ``texts``: the most frequent words seen ``min_count`` times.

        Args:
            texts: The texts to count words in.
            size: The most entries in all, ``<pad>`` and ``<unk>`` included (at least 2).
            min_count: The fewest times a word must occur to be kept (at least 1).

        Returns:
            ``<pad>``, ``<unk>``, then words by descending count, ties by the word.

        Raises:
            UsageError: ``size`` or ``min_count`` is out of range.
        """
        if isinstance(size, bool) or not isinstance(size, int) or size < 2:
            raise UsageError(f"the vocabulary size must be an integer of at least 2, got {size}",
                             "Try --vocab-size 20000")
        if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
            raise UsageError(f"the minimum count must be an integer of at least 1, "
                             f"got {min_count}", "Try --min-count 2")
        counts = Counter(w for text in texts for w in tokenize(text))
        kept = sorted((w for w, n in counts.items() if n >= min_count),
                      key=lambda w: (-counts[w], w))
        return cls([PAD, UNK, *kept[:size - 2]])

    def ids(self, text: str) -> list[int]:
        """The ids of every word of ``text`` (unknown words: 1), not truncated."""
        get = self._ids.get
        return [get(w, UNK_ID) for w in tokenize(text)]

    def encode(self, texts: Sequence[str], max_len: int, return_counts: bool = False
               ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The ids of ``texts``, one row each, right-padded with 0.

        Args:
            texts: The texts.
            max_len: The most words kept of each text (its first ones).
            return_counts: Also return each text's word count before truncation.

        Returns:
            int64 ``[N, L]``, L = min(max_len, the most words in a text), at least 1; with
            ``return_counts``, also int64 ``[N]``: the word counts before truncation.

        Raises:
            UsageError: ``max_len`` is not a positive integer.
        """
        _check_max_len(max_len)
        rows = [self.ids(text) for text in texts]
        width = max(1, min(max_len, max((len(r) for r in rows), default=0)))
        out = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            if row:
                row = row[:width]
                out[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        if return_counts:
            return out, torch.tensor([len(r) for r in rows], dtype=torch.long)
        return out

    def to_json(self) -> dict[str, Any]:
        """The vocabulary as JSON-able data (for a model file's metadata)."""
        return {"rules": RULES, "words": list(self.words)}

    @classmethod
    def from_json(cls, data: Any) -> WordVocab:
        """The vocabulary that :meth:`to_json` wrote, checked.

        Raises:
            FormatError: ``data`` is not a vocabulary of these rules.
        """
        hint = "Write the vocabulary with WordVocab.to_json (re-train or re-export the student)"
        if not isinstance(data, dict) or data.get("rules") != RULES:
            got = data.get("rules") if isinstance(data, dict) else type(data).__name__
            raise FormatError(f"the word vocabulary is not in kdcli's format {RULES!r} "
                              f"(got {got!r})", hint)
        words = data.get("words")
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise FormatError("the word vocabulary's 'words' is not a list of strings", hint)
        if words[:2] != [PAD, UNK]:
            raise FormatError(f"the word vocabulary must start with {PAD!r}, {UNK!r}, "
                              f"got {words[:2]}", hint)
        if len(set(words)) != len(words):
            dup = next(w for w, n in Counter(words).items() if n > 1)
            raise FormatError(f"the word vocabulary has {dup!r} twice", hint)
        bad = next((w for w in words[2:] if tokenize(w) != [w]), None)
        if bad is not None:
            raise FormatError(f"the word vocabulary holds {bad!r}, which is not one word "
                              "under its rules", hint)
        return cls(words)

    def sha256(self) -> str:
        """A hex SHA-256 of the rules and the words (the same on every machine)."""
        text = json.dumps(self.to_json(), ensure_ascii=False, sort_keys=True,
                          separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


def onnx_nodes(vocab: WordVocab, input_name: str, output_name: str, max_len: int,
               prefix: str = "words/") -> tuple[list[Any], list[Any], list[Any]]:
    """ONNX nodes that compute ``vocab.encode(texts, max_len)`` from a string tensor.

    ``input_name`` is a string tensor ``[N]`` (or ``[N, 1]``); ``output_name`` becomes
    int64 ``[N, L]``, equal to :meth:`WordVocab.encode`. The nodes run in stock onnxruntime:
    ``StringNormalizer`` (LOWER, locale ``C``), com.microsoft ``Tokenizer``, ai.onnx.ml
    ``LabelEncoder``, and default-domain ops for the shape.

    Args:
        vocab: The vocabulary.
        input_name: The name of the string input.
        output_name: The name of the ids the nodes write.
        max_len: The most words kept of each text.
        prefix: The start of the names of the intermediate values and initializers.

    Returns:
        ``(nodes, initializers, opset_imports)``: the nodes in order, their constant
        tensors, and the opsets they need (the default domain at 13 or above; a graph
        with a later default opset may use them as they are).

    Raises:
        UsageError: ``max_len`` is not a positive integer.
    """
    from onnx import helper, numpy_helper

    _check_max_len(max_len)
    p = prefix
    inits = [numpy_helper.from_array(np.array(v, dtype=np.int64), p + name)
             for name, v in [("flat", [-1]), ("zero", [0]), ("one", [1]), ("two", [2]),
                             ("max_len", [max_len]), ("pads", [0, 0, 0, 1])]]
    node = helper.make_node
    nodes = [
        node("Reshape", [input_name, p + "flat"], [p + "text"]),
        node("StringNormalizer", [p + "text"], [p + "lower"], case_change_action="LOWER",
             locale="C"),
        # [N, T]; T = the most words in a text, 0 when no text has a word.
        node("Tokenizer", [p + "lower"], [p + "tokens"], domain="com.microsoft", mark=0,
             mincharnum=1, pad_value=PAD_VALUE, tokenexp=TOKENEXP),
        node("Slice", [p + "tokens", p + "zero", p + "max_len", p + "one"], [p + "kept"]),
        node("LabelEncoder", [p + "kept"], [p + "ids"], domain="ai.onnx.ml",
             keys_strings=[*vocab.words[2:], PAD_VALUE],
             values_int64s=[*range(2, len(vocab)), PAD_ID], default_int64=UNK_ID),
        # At least one column: pad one 0 on the right, keep max(1, width) columns.
        node("Shape", [p + "ids"], [p + "shape"]),
        node("Slice", [p + "shape", p + "one", p + "two"], [p + "width"]),
        node("Max", [p + "width", p + "one"], [p + "end"]),
        node("Pad", [p + "ids", p + "pads"], [p + "padded"]),
        node("Slice", [p + "padded", p + "zero", p + "end", p + "one"], [output_name]),
    ]
    opsets = [helper.make_opsetid("", 13), helper.make_opsetid("ai.onnx.ml", 2),
              helper.make_opsetid("com.microsoft", 1)]
    return nodes, inits, opsets


def onnx_model(vocab: WordVocab, max_len: int, input_name: str = "text",
               output_name: str = "input_ids", opset: int = 18) -> Any:
    """A model of :func:`onnx_nodes` alone: string ``[N]`` in, int64 ``[N, L]`` out.

    Args:
        vocab: The vocabulary.
        max_len: The most words kept of each text.
        input_name: The input's name.
        output_name: The output's name.
        opset: The default domain's opset (13 or above).

    Returns:
        An ``onnx.ModelProto`` (to run as it is, or to join to a student's graph with
        ``onnx.compose.merge_models``).
    """
    from onnx import TensorProto, helper

    nodes, inits, opsets = onnx_nodes(vocab, input_name, output_name, max_len)
    opsets = [helper.make_opsetid("", opset), *opsets[1:]]
    graph = helper.make_graph(
        nodes, "words", [helper.make_tensor_value_info(input_name, TensorProto.STRING, ["N"])],
        [helper.make_tensor_value_info(output_name, TensorProto.INT64, ["N", "L"])], inits)
    return helper.make_model(graph, opset_imports=opsets)
