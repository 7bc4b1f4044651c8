"""ONNX text pipelines: models whose one input is a tensor of strings.

scikit-learn text pipelines (``TfidfVectorizer`` or ``CountVectorizer`` and a linear model)
exported with skl2onnx take one text per example, as ``[N]`` or ``[N, 1]`` strings. Such a
model is a text teacher (:data:`~kdcli.teachers.base.TEXT`): its runner gets the batch's texts
as they are, and :class:`TextFeed` makes them the string tensor the model declares.

Their graphs lower-case with ``StringNormalizer``, whose ``locale`` defaults to
``en_US.UTF-8``; onnxruntime refuses to create the session where that locale is not
installed (many Linux machines and containers). :func:`session_with_fallback_locale` then
rewrites the locale of every ``StringNormalizer`` in the in-memory model (the file is never
changed) to one that exists here, and says so once, with what it changes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from kdcli.errors import FormatError, ModelError, first_line

#: onnxruntime's type of a string input.
STRING_TYPE = "tensor(string)"
#: ``StringNormalizer``'s locale when the node does not name one.
DEFAULT_LOCALE = "en_US.UTF-8"
#: Locales tried, in order, when the model's is missing: the UTF-8 ones lower-case
#: non-ASCII letters too; ``C`` lower-cases ASCII letters only.
FALLBACK_LOCALES = ("C.UTF-8", "C.utf8", "en_US.utf8", "C")
_ASCII_ONLY = ("C", "POSIX")


def takes_strings(inputs: Sequence[Any]) -> bool:
    """Whether any of an onnxruntime session's inputs is a string tensor."""
    return any(i.type == STRING_TYPE for i in inputs)


def refuse_several_inputs(name: str, inputs: Sequence[Any]) -> None:
    """Refuse a text model with several inputs, naming them.

    Raises:
        ModelError: several inputs, one of them at least a string tensor.
    """
    if len(inputs) > 1 and takes_strings(inputs):
        listed = ", ".join(f"{i.name!r} ({i.type})" for i in inputs)
        raise ModelError(f"{name} takes {len(inputs)} inputs ({listed}); kdcli feeds a text "
                         "model one string input, one text per example",
                         "Export the pipeline with a single string input (join the text "
                         "fields before the vectorizer)")


def text_rank(name: str, inp: Any) -> int:
    """How many dimensions the model's string input has: 1 (``[N]``) or 2 (``[N, 1]``).

    Raises:
        ModelError: the input takes several strings per example, or has another rank.
    """
    dims = list(inp.shape)
    if len(dims) == 1:
        return 1
    if len(dims) == 2 and not (isinstance(dims[1], int) and dims[1] != 1):
        return 2
    raise ModelError(f"{name}'s string input {inp.name!r} has shape {dims}; kdcli feeds "
                     "one text per example",
                     "Export it with the input shape [None] or [None, 1]")


class TextFeed:
    """Makes a batch of texts the string tensor a model declares: ``[N]`` or ``[N, 1]``.

    Attributes:
        rank: 1 or 2, from :func:`text_rank`.
        where: The model, for error messages.
    """

    def __init__(self, rank: int, where: Path) -> None:
        self.rank, self.where = rank, where

    def __call__(self, texts: Sequence[Any]) -> np.ndarray:
        """The texts as an object array of ``str``.

        Raises:
            ModelError: an example is not one text (a sentence pair, a number).
        """
        items = list(texts)
        bad = next((t for t in items if not isinstance(t, str)), None)
        if bad is not None:
            what = "a pair of texts" if isinstance(bad, (tuple, list)) else type(bad).__name__
            raise ModelError(f"{Path(self.where).name} takes one text per example, "
                             f"got {what}",
                             "Give it one text column (an ONNX text pipeline reads no "
                             "sentence pairs)")
        arr = np.empty(len(items), dtype=object)
        arr[:] = items
        return arr if self.rank == 1 else arr.reshape(-1, 1)


def classifier_labels(graph: Any) -> list[str] | None:
    """The string class labels of the graph's one ONNX-ML classifier, in column order."""
    nodes = [n for n in graph.node if n.domain == "ai.onnx.ml" and
             n.op_type.endswith("Classifier")]
    if len(nodes) != 1:
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in nodes[0].attribute}
    labels = attrs.get("classlabels_strings")
    return [s.decode() if isinstance(s, bytes) else str(s) for s in labels] if labels else None


def onnxruntime_cause(err: BaseException) -> str:
    """onnxruntime's error on one line, without its C++ source location, function signature
    and ``false was false`` (the cause is at the end of its message, which
    :func:`~kdcli.errors.first_line` would cut)."""
    msg = " ".join(first_line(err, None).split())
    msg = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", msg)
    msg = re.sub(r"/onnxruntime_src/\S+:\d+ \S*?\([^)]*\)\S*\s*", "", msg)
    return msg.replace("false was false. ", "")[:300]


def is_locale_error(err: BaseException) -> bool:
    """Whether onnxruntime failed because a locale the model asks for is not installed."""
    msg = str(err)
    return "locale" in msg.lower() and ("StringNormalizer" in msg or "string_normalizer" in msg)


def string_normalizer_locales(proto: Any) -> list[str]:
    """The locales the model's ``StringNormalizer`` nodes use (their default included)."""
    found = []
    for node in _normalizers(proto):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        loc = attrs.get("locale", DEFAULT_LOCALE)
        loc = loc.decode() if isinstance(loc, bytes) else str(loc)
        if loc not in found:
            found.append(loc)
    return found


def with_locale(proto: Any, locale: str) -> bytes:
    """The serialized model with every ``StringNormalizer``'s locale set to ``locale``
    (``proto`` itself is left as it was)."""
    model = type(proto)()
    model.CopyFrom(proto)
    for node in _normalizers(model):
        kept = [a for a in node.attribute if a.name != "locale"]
        del node.attribute[:]
        node.attribute.extend([*kept, helper.make_attribute("locale", locale)])
    return model.SerializeToString()


def session_with_fallback_locale(path: Path, make_session: Callable[[bytes], Any],
                                 first_error: BaseException) -> tuple[Any, str, str]:
    """A session for the model at ``path`` whose ``StringNormalizer`` locale is missing:
    the first of :data:`FALLBACK_LOCALES` onnxruntime accepts, set in memory only.

    Args:
        path: The model file (its external data, if any, was checked by the caller).
        make_session: Creates an onnxruntime session from a serialized model.
        first_error: Why the model as exported failed (a missing locale).

    Returns:
        The session, the locale used, and the note that tells the user what changed.

    Raises:
        FormatError: no fallback locale exists, or the model fails for another reason.
    """
    proto = onnx.load(str(path))
    asked = string_normalizer_locales(proto) or [DEFAULT_LOCALE]
    for loc in FALLBACK_LOCALES:
        try:
            sess = make_session(with_locale(proto, loc))
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types
            if is_locale_error(e):
                continue
            raise FormatError(f"{path} is a corrupt or unsupported ONNX model "
                              f"({onnxruntime_cause(e)})", "Export it again") from e
        return sess, loc, _locale_note(path.name, asked, loc)
    raise FormatError(f"{path} lower-cases text in the locale {', '.join(asked)}, which is "
                      f"not installed, and none of {', '.join(FALLBACK_LOCALES)} is either "
                      f"({onnxruntime_cause(first_error)})",
                      f"Install the locale (e.g. locale-gen {asked[0]}) and run again")


def _locale_note(name: str, asked: list[str], used: str) -> str:
    """What the user is told once when the locale is replaced."""
    if used in _ASCII_ONLY:
        effect = ("only ASCII letters are lower-cased, so words with non-ASCII capitals "
                  "(É, Ä, Σ) may miss the vocabulary")
    else:
        effect = ("ASCII text is read the same; lower-casing of a few non-ASCII letters "
                  "may differ")
    return (f"{name}: its StringNormalizer asks for the locale {', '.join(asked)}, which is "
            f"not installed here; kdcli runs it with {used} (in memory, the file is "
            f"unchanged): {effect}. Install {asked[0]} to run it exactly as exported")


def _normalizers(proto: Any) -> list[Any]:
    """The ``StringNormalizer`` nodes of the main graph."""
    return [n for n in proto.graph.node
            if n.op_type == "StringNormalizer" and n.domain in ("", "ai.onnx")]
